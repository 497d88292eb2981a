"""What each process of a torchrun launch from a Dagster step runs (assets/torchrun.py): one data-parallel stage,
with rank 0 talking to the step through Dagster Pipes.

    python -m torch.distributed.run --standalone --nproc-per-node N -m assets.torchrun_stage STAGE \
        --params P --reports R --checkpoints C

The work is `torchrun ... -m stitchvm STAGE`'s (stitchvm/__main__.py): join the process group, take this process's
share of the cores, run the stage. Rank 0 opens Pipes (the step set its variables), sends the progress bars' lines to
the step's event log, and reports the stage's summary, or the one line of an expected failure, as a Pipes message.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dagster_pipes import open_dagster_pipes

from stitchvm import distributed
from stitchvm.config import load_params
from stitchvm.stages import stage
from stitchvm.stages.runtime import Paths, set_stage_threads

from assets.progress_log import progress_to_log
from assets.resources import EXPECTED


def run_stage(args: argparse.Namespace, progress: bool) -> dict:
    params = load_params(args.params)
    paths = Paths.from_params(params, reports=Path(args.reports), checkpoints=Path(args.checkpoints))
    return stage(args.stage).run(params, paths, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="assets.torchrun_stage", description=__doc__)
    parser.add_argument("stage")
    parser.add_argument("--params", required=True)
    parser.add_argument("--reports", required=True)
    parser.add_argument("--checkpoints", required=True)
    args = parser.parse_args(argv)
    distributed.init_from_env()  # before any model is built: a GPU per process
    try:
        set_stage_threads(distributed.local_world_size())
        if not distributed.is_main():
            run_stage(args, progress=False)
            return 0
        with open_dagster_pipes() as pipes:
            try:
                with progress_to_log(pipes.log):
                    summary = run_stage(args, progress=True)
            except EXPECTED as e:
                pipes.report_custom_message({"error": f"stitchvm {args.stage}: {e}"})
                return 1
            pipes.report_custom_message({"summary": json.loads(json.dumps(summary, default=str)),
                                         "processes": distributed.world_size()})
        return 0
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
