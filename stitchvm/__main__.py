"""`python -m stitchvm <command>`: one pipeline stage, the end-to-end smoke run, a benchmark, or the summary of the
pipeline's reports."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

# Without torchvision (CPU installs here) transformers notes on stderr, at the first diffusers import, that it falls
# back to its PIL image processors: expected, and it would be the first lines of every command's stderr.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
# s3fs sends its requests from an asyncio loop of its own: when an S3 endpoint drops mid-write, aiohttp's pending write
# task fails as well, and asyncio logs "Task exception was never retrieved" with a traceback once the task is collected.
# The failure itself reaches the stage and is reported in one line (EXPECTED below): that second report is noise.
logging.getLogger("asyncio").addFilter(lambda record: "exception was never retrieved" not in record.getMessage())

from stitchvm import distributed
from stitchvm.config import ConfigError, check_device, load_params
from stitchvm.stages import GRAPH, PARTITIONED, stage

DATA_PARALLEL = ("samples", "labels", "train", "align")  # the stages that split their work over torchrun's processes
# The failures a stage expects and names in one line (a missing input, bad data, an unreachable or forbidden storage
# endpoint); anything else is a bug and keeps its traceback.
EXPECTED = (FileNotFoundError, PermissionError, ConnectionError, ValueError)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line: argparse prints the whole usage above them (`--help` still shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _shards(text: str) -> list[int]:
    """Shard numbers; their range depends on params, so `_check_shards` checks it once params are loaded."""
    try:
        shards = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shards takes comma-separated shard numbers, got {text!r}") from None
    if not shards:
        raise argparse.ArgumentTypeError(f"--shards takes comma-separated shard numbers, got {text!r}")
    return shards


def _check_shards(args: argparse.Namespace, params) -> str | None:
    """The one-line error for `--shards` outside the set's range (0..n-1, n from params), else None."""
    if getattr(args, "shards", None) is None:
        return None
    from stitchvm.stages.upstream import shards_to_run
    try:
        shards_to_run(params, args.shards)
    except ValueError as e:
        return f"stitchvm {args.command}: --shards: {e}"
    return None


def _at_least(low: int):
    """An argparse type: an integer >= `low`, refused by argparse itself (before any model or data is touched)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def _device(text: str) -> str:
    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="stitchvm", description=__doc__)
    parser.add_argument("--params", default=None,
                        help="params file (default: params.yaml; for `smoke`: profiles/smoke.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--device", type=_device, default=None,
                        help="auto | cpu | cuda | cuda:N, instead of params' `device` (default auto: CUDA when torch "
                             "sees a GPU)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in GRAPH:
        p = sub.add_parser(name, help=f"run the `{name}` stage")
        if name in PARTITIONED:
            p.add_argument("--shards", type=_shards, default=None, help="only these shards (default: all)")
    smoke = sub.add_parser("smoke", help="every stage but the world bootstrap in-process on a temporary root, on "
                                         "profiles/smoke.yaml unless --params; prints and writes a report")
    smoke.add_argument("--out", default="reports/smoke.json", help="where to write the JSON report")
    smoke.add_argument("--threads", type=_at_least(0), default=1,
                       help="torch CPU threads (default 1: the smoke's models are tiny; 0: torch's default)")
    summary = sub.add_parser("summary", help="the pipeline's results in short: the evaluation table (eval.json), "
                                             "guidance and alignment when run, and where the outputs are")
    summary.add_argument("--reports", default="reports", help="the reports folder (default: reports)")
    bench = sub.add_parser("bench", help="a benchmark on a profile: prints a table and writes JSON")
    bench.add_argument("name", choices=("guidance", "align", "value", "memory", "truth"),
                       help="what to benchmark")
    bench.add_argument("--profile", default="default",
                       help="`default` (params.yaml), a name under profiles/ (e.g. arch) or a .yaml path")
    bench.add_argument("--out", default=None, help="the JSON report (default: reports/bench_<name>.json)")
    bench.add_argument("--count", action="store_true",
                       help="guidance: FLOPs and saved activations per step, align: FLOPs per update, of the arch "
                            "presets on `meta` (no GPU needed)")
    bench.add_argument("--rewards", default=None,
                       help="align --count: comma-separated reward presets summed (default: the profile's reward)")
    bench.add_argument("--updates", type=int, default=None, help="align: optimiser updates per method")
    bench.add_argument("--seeds", default=None, help="align: comma-separated seeds, every method once per seed")
    bench.add_argument("--steps", type=_at_least(1), default=None, help="value: training steps per variant; memory: train steps per run (default 20)")
    bench.add_argument("--rollouts", type=_at_least(2), default=None,
                       help="truth: Monte Carlo rollouts per noisy latent, in two halves (even; default 16)")
    bench.add_argument("--variants", default=None, help="value: comma-separated variants (default: all)")
    bench.add_argument("--per-prompt", default=None,
                       help="memory: comma-separated samples.per_prompt sizes (default: 192,768; use --profile smoke)")
    bench.add_argument("--methods", default=None,
                       help="guidance: comma-separated methods instead of guidance.methods (e.g. with "
                            "best-of-n-matched); align: a subset of nft,nft-stitchvm,draft,draft-stitchvm")
    bench.add_argument("--sweep", action="append", default=None, metavar="METHOD=S1,S2",
                       help="guidance: sweep a DPS method's scale on the val prompts (repeatable; JSON default: "
                            "reports/bench_guidance_sweep.json)")
    for p in sub.choices.values():  # let --params/--no-progress also follow the command
        p.add_argument("--params", default=argparse.SUPPRESS)
        p.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS)
        p.add_argument("--device", type=_device, default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is not None:  # read by stitchvm.stages.runtime.stage_device, here and in the bench's subprocesses
        from stitchvm.stages.runtime import DEVICE_ENV, resolve_device
        try:
            resolve_device(args.device)  # a CUDA device torch cannot see fails now, not in the first model build
        except ValueError as e:
            print(f"stitchvm: {e}", file=sys.stderr)
            return 2
        os.environ[DEVICE_ENV] = args.device
    progress = not args.no_progress
    if distributed.launched() and args.command not in DATA_PARALLEL:
        print(f"stitchvm {args.command}: runs in one process; under torchrun only {', '.join(DATA_PARALLEL)} "
              f"split their work", file=sys.stderr)
        return 2
    if args.command == "bench":
        return _bench(args, progress)
    if args.params is None:
        from stitchvm.smoke import PROFILE
        args.params = PROFILE if args.command == "smoke" else "params.yaml"
    try:
        params = load_params(args.params)
    except ConfigError as e:
        print(f"stitchvm: {e}", file=sys.stderr)
        return 2
    if (message := _check_shards(args, params)) is not None:
        print(message, file=sys.stderr)
        return 2
    if args.command == "summary":
        return _summary(Path(args.reports), params, args.params)
    try:
        if args.command == "smoke":
            from stitchvm.smoke import run
            run(params, args.out, progress=progress, threads=args.threads)
            return 0
        from stitchvm.stages.runtime import Paths, set_stage_threads
        distributed.init_from_env()  # under torchrun: join the group before any model is built (a GPU per process)
        set_stage_threads(distributed.local_world_size())  # $STITCHVM_THREADS, else the cores shared by its ranks
        kwargs = {"shards": args.shards} if args.command in PARTITIONED else {}
        summary = stage(args.command).run(params, Paths.from_params(params), progress=progress, **kwargs)
        if not distributed.is_main():
            return 0  # rank 0 prints the summary
    except EXPECTED as e:
        print(f"stitchvm {args.command}: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.close()
    print(json.dumps({k: v for k, v in summary.items() if k not in ("table", "eval")}, indent=2, default=str))
    return 0


def _bench(args: argparse.Namespace, progress: bool) -> int:
    out = args.out or f"reports/bench_{args.name}.json"
    if args.count and args.name not in ("guidance", "align"):
        print("stitchvm bench: --count applies to `bench guidance` and `bench align` only", file=sys.stderr)
        return 2
    if args.rewards is not None and not (args.name == "align" and args.count):
        print("stitchvm bench: --rewards applies to `bench align --count` only", file=sys.stderr)
        return 2
    if args.sweep and (args.name != "guidance" or args.count):
        print("stitchvm bench: --sweep applies to `bench guidance` (run mode) only", file=sys.stderr)
        return 2
    if args.methods is not None and (args.name not in ("guidance", "align") or args.count or args.sweep):
        print("stitchvm bench: --methods applies to `bench guidance` and `bench align` (run mode) only",
              file=sys.stderr)
        return 2
    if args.seeds is not None and args.name != "align":
        print("stitchvm bench: --seeds applies to `bench align` only", file=sys.stderr)
        return 2
    if args.updates is not None and (args.name != "align" or args.updates < 1):
        print("stitchvm bench: --updates applies to `bench align` and must be >= 1", file=sys.stderr)
        return 2
    if args.rollouts is not None and args.name != "truth":
        print("stitchvm bench: --rollouts applies to `bench truth` only", file=sys.stderr)
        return 2
    try:
        if args.name == "guidance" and args.sweep:
            from stitchvm.benchmarks import guidance_sweep
            guidance_sweep.run(args.profile, args.out or "reports/bench_guidance_sweep.json",
                               guidance_sweep.parse_sweeps(args.sweep), progress=progress)
        elif args.name == "guidance":
            from stitchvm.benchmarks.guidance import run
            run(args.profile, out, count=args.count, progress=progress,
                methods=tuple(args.methods.split(",")) if args.methods else None)
        elif args.name == "value":
            from stitchvm.benchmarks.value import run
            run(args.profile, out, steps=args.steps, progress=progress,
                variants=args.variants.split(",") if args.variants else None)
        elif args.name == "truth":
            from stitchvm.benchmarks.truth import run
            run(args.profile, out, rollouts=args.rollouts or 16, progress=progress)
        elif args.name == "memory":
            from stitchvm.benchmarks.memory import PER_PROMPT, run
            run(args.profile, out, steps=args.steps or 20, progress=progress,
                per_prompt=tuple(int(n) for n in args.per_prompt.split(",")) if args.per_prompt else PER_PROMPT)
        elif args.count:
            from stitchvm.benchmarks.align_counting import run_count
            run_count(args.profile, args.out or "reports/bench_align_count.json", args.rewards, progress=progress)
        else:
            from stitchvm.benchmarks.align import run
            run(args.profile, out, updates=args.updates, progress=progress, seeds=_seeds(args.seeds),
                **({"methods": tuple(args.methods.split(","))} if args.methods else {}))
    except ConfigError as e:
        print(f"stitchvm bench {args.name}: {e}", file=sys.stderr)
        return 2
    except EXPECTED as e:
        print(f"stitchvm bench {args.name}: {e}", file=sys.stderr)
        return 1
    return 0


def _seeds(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected integers separated by commas") from None


def _summary(reports: Path, params, params_file: str) -> int:
    """Print the evaluation table, guidance and alignment results (where their reports exist) and the outputs; the
    timings come from the stages' run records (reports/runs/<stage>.json), joined to the DVC metrics' rows."""
    from stitchvm.stages.run_record import RUNS, join_rows, read_json, read_record
    from stitchvm.stages.tables import EVAL_COLUMNS, GUIDANCE_COLUMNS, format_cell, format_table

    try:
        ev, guidance, align = (read_json(reports / name) for name in ("eval.json", "guidance.json", "align.json"))
        runs = {name: read_record(reports, name) or {} for name in ("evaluate", "guidance", "align")}
    except ValueError as e:
        print(f"stitchvm summary: {e}", file=sys.stderr)
        return 1
    if ev is None:
        print(f"stitchvm summary: no {reports / 'eval.json'}: run the pipeline first (dvc repro)", file=sys.stderr)
        return 1
    lines = [f"== stitchvm: {params.backbone.source} / {params.reward.source} ({params_file}) =="]
    pair = (guidance or {}).get("value_model")
    head = "evaluation (eval.json)"
    if pair and "i" in pair and "j" in pair:
        head += f": value model stitched at (i, j) = ({pair['i']}, {pair['j']})"
    lines.append(head)
    extra = [f"{label} {format_cell(ev[key])}" for key, label in (("trivial_loss", "trivial-predictor loss"),
                                                                    ("teacher_recall_at_1", "teacher recall@1"))
             if ev.get(key) is not None]
    if ev.get("monte_carlo"):
        mc = ev["monte_carlo"]
        extra.append(f"Monte Carlo value: {mc.get('rollouts')} rollouts at sigma "
                     f"{', '.join(format_cell(s) for s in mc.get('sigmas', []))}")
    if extra:
        lines.append("  " + "; ".join(extra))
    lines.append(format_table(join_rows(ev.get("eval", []), runs["evaluate"].get("eval"), ("sigma", "method")),
                              EVAL_COLUMNS))
    if ev.get("gate"):
        gate = ev["gate"]
        checks = ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in gate.get("checks", {}).items())
        verdict = "passed" if gate.get("passed") else "not passed"
        lines.append(f"gate at sigma {format_cell(gate.get('sigma'))}: {verdict}" + (f" ({checks})" if checks else ""))
    if guidance is not None:
        lines += ["", "guidance (guidance.json): true reward of each sampler, same prompts and seeds",
                  format_table(join_rows(guidance.get("rows", []), runs["guidance"].get("rows"), ("method",)),
                               GUIDANCE_COLUMNS)]
    if align is not None:
        align = {**align, **{k: v for k, v in runs["align"].items() if k != "curve"}}  # its timings
        lines += ["", f"align (align.json): {align.get('method')}, {align.get('updates')} updates, "
                      f"{format_cell(align.get('sec_per_update'))} s/update",
                  f"  true reward {format_cell(align.get('reward_before'))} -> {format_cell(align.get('reward_after'))}"
                  f" (gain {format_cell(align.get('reward_gain'))})"]
    root = params.storage.root.rstrip("/")
    registered = params.mlflow.registered_model
    # as stitchvm.stages.tracking.tracking_uri (not imported: it imports MLflow)
    uri = params.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    outputs = [(f"{reports}/", ", ".join(sorted(p.name for p in reports.iterdir() if p.is_file())))]
    if (reports / RUNS).is_dir():
        outputs.append((f"{reports}/{RUNS}/", "run records (wall times, memory, device, MLflow run ids; not hashed by "
                                              "DVC): " + ", ".join(sorted(p.name for p in (reports / RUNS).iterdir()))))
    outputs.append((f"{root}/value_model", "the trained value model (StitchedValueModel.from_pretrained)"))
    if align is not None:
        outputs.append((f"{root}/adapter", "the LoRA adapter of `align` (peft format)"))
    outputs.append((uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri,
                    f"MLflow runs and registry: model `{registered}` (alias `champion` once the gate passes)"
                    + (f", adapter `{registered}-adapter`" if align is not None else "")
                    + (f"; browse: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else "")))
    width = max(len(where) for where, _ in outputs)
    lines += ["", "outputs:"] + [textwrap.fill(what, 118, initial_indent=f"  {where.ljust(width)}  ",
                                               subsequent_indent=" " * (width + 4), break_on_hyphens=False)
                                 for where, what in outputs]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
