"""`python -m stitchvm <command>`: single stages and runs of the library."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stitchvm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help="build, search, finetune and evaluate on the params' models")
    smoke.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    smoke.add_argument("--out", default="reports/smoke.json", help="where to write the JSON report")
    smoke.add_argument("--checkpoint-dir", default=None, help="checkpoint (and resume) directory for finetuning")
    smoke.add_argument("--device", default="cpu")
    smoke.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ConfigError as e:
        print(f"stitchvm: {e}", file=sys.stderr)
        return 2
    if args.command == "smoke":
        from .smoke import run
        run(params, args.out, args.checkpoint_dir, args.device, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
