"""Launching a data-parallel stage (samples, labels, train: the stages the CLI runs under torchrun) from a Dagster
step through Dagster Pipes, when the resource's `nproc` (STITCHVM_NPROC) asks for processes.

The step runs `python -m torch.distributed.run --standalone --nproc-per-node N -m assets.torchrun_stage <stage>`
(the README's `torchrun --nproc_per_node N -m stitchvm <stage>`, with the step's params, reports and checkpoints) and
waits; rank 0 sends the bars' lines to the step's event log and the stage's summary back as a Pipes message, so the
asset's metadata is the same as in-process. The asset stays one unpartitioned materialisation: the ranks share its
shards (rank r of N takes shards r, r + N, ...), and a re-run skips complete shards.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from dagster import (DagsterExecutionInterruptedError, Failure, OpExecutionContext, PipesTempFileContextInjector,
                     PipesTempFileMessageReader, open_pipes_session)

RANK_MODULE = "assets.torchrun_stage"


def torchrun_command(stage: str, nproc: int, params: str, reports: str, checkpoints: str) -> list[str]:
    """The torchrun command line of one stage on `nproc` processes of this machine (`--standalone`: a local
    rendezvous; several machines are the README's multi-node torchrun, outside Dagster)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", RANK_MODULE, stage, "--params", params, "--reports", reports, "--checkpoints", checkpoints]


def launch(context: OpExecutionContext, stage: str, command: list[str]) -> dict:
    """Run `command` in a Pipes session of the step; return the stage summary rank 0 reported, or fail the step with
    the one line of an expected failure (else the exit status; the traceback is in the step's stderr)."""
    context.log.info(f"stitchvm {stage}: {' '.join(command)}")
    with open_pipes_session(context=context, context_injector=PipesTempFileContextInjector(),
                            message_reader=PipesTempFileMessageReader()) as session:
        process = subprocess.Popen(command, env={**os.environ, **session.get_bootstrap_env_vars()})
        try:
            returncode = process.wait()
        except DagsterExecutionInterruptedError:  # the run was cancelled: torchrun stops its processes on SIGINT
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
            raise
    messages = session.get_custom_messages()
    errors = [m["error"] for m in messages if "error" in m]
    if returncode != 0 or errors:
        raise Failure(description=errors[0] if errors else
                      f"stitchvm {stage}: torchrun exited with status {returncode} (the step's stderr has the "
                      f"traceback)", allow_retries=False)
    (summary,) = [m["summary"] for m in messages if "summary" in m]
    return summary
