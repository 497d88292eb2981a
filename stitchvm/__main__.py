"""`python -m stitchvm <command>`: one pipeline stage, the end-to-end smoke run, or a benchmark."""
from __future__ import annotations

import argparse
import json
import sys

from stitchvm.config import ConfigError, load_params
from stitchvm.stages import GRAPH, PARTITIONED, stage


def _shards(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shards takes comma-separated shard numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stitchvm", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in GRAPH:
        p = sub.add_parser(name, help=f"run the `{name}` stage")
        if name in PARTITIONED:
            p.add_argument("--shards", type=_shards, default=None, help="only these shards (default: all)")
    smoke = sub.add_parser("smoke", help="every stage in-process on a temporary root; prints and writes a report")
    smoke.add_argument("--out", default="reports/smoke.json", help="where to write the JSON report")
    bench = sub.add_parser("bench", help="a benchmark on a profile: prints a table and writes JSON")
    bench.add_argument("name", choices=("guidance", "align"), help="what to benchmark")
    bench.add_argument("--profile", default="default",
                       help="`default` (params.yaml), a name under profiles/ (e.g. arch) or a .yaml path")
    bench.add_argument("--out", default=None, help="the JSON report (default: reports/bench_<name>.json)")
    bench.add_argument("--count", action="store_true",
                       help="guidance: count FLOPs and saved activations of the arch presets on `meta` (no GPU needed)")
    bench.add_argument("--updates", type=int, default=None, help="align: optimiser updates per method")
    for p in sub.choices.values():  # let --params/--no-progress also follow the command
        p.add_argument("--params", default=argparse.SUPPRESS)
        p.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    progress = not args.no_progress
    if args.command == "bench":
        return _bench(args, progress)
    try:
        params = load_params(args.params)
    except ConfigError as e:
        print(f"stitchvm: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "smoke":
            from stitchvm.smoke import run
            run(params, args.out, progress=progress)
            return 0
        from stitchvm.stages.runtime import Paths
        kwargs = {"shards": args.shards} if args.command in PARTITIONED else {}
        summary = stage(args.command).run(params, Paths.from_params(params), progress=progress, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        print(f"stitchvm {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k not in ("table", "eval")}, indent=2, default=str))
    return 0


def _bench(args: argparse.Namespace, progress: bool) -> int:
    out = args.out or f"reports/bench_{args.name}.json"
    if args.count and args.name != "guidance":
        print("stitchvm bench: --count applies to `bench guidance` only", file=sys.stderr)
        return 2
    if args.updates is not None and (args.name != "align" or args.updates < 1):
        print("stitchvm bench: --updates applies to `bench align` and must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.name == "guidance":
            from stitchvm.benchmarks.guidance import run
            run(args.profile, out, count=args.count, progress=progress)
        else:
            from stitchvm.benchmarks.align import run
            run(args.profile, out, updates=args.updates, progress=progress)
    except ConfigError as e:
        print(f"stitchvm bench {args.name}: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"stitchvm bench {args.name}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
