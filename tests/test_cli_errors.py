"""Expected failures of the command line end in one line naming the key, file or shard, with exit status 2 (bad
params or arguments) or 1 (a stage's missing input), and write nothing. The table of bad inputs is in
tests/test_bad_inputs.py; here: that good params pass, the thread count, and no storage-task noise after a failure."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stitchvm.__main__ import main

GOOD = {"storage": {"root": "data"}, "prompts": {"train": 2, "val": 0, "test": 2},
        "samples": {"source": "smooth", "per_prompt": 4}}


def params_file(tmp_path: Path, text: str | None = None, **changes) -> str:
    path = tmp_path / "params.yaml"
    data = {**GOOD, **changes, "storage": {"root": str(tmp_path / "data")}}
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return str(path)


def test_good_params_pass_the_same_checks(tmp_path, monkeypatch, capsys):
    """The checks refuse only what is wrong: the same file with the mistakes fixed runs the stage."""
    monkeypatch.chdir(tmp_path)
    assert main(["--params", params_file(tmp_path), "--no-progress", "prompts"]) == 0
    assert (tmp_path / "data" / "prompts.parquet").is_file()


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_named(tmp_path, monkeypatch, capsys, value):
    monkeypatch.setenv("STITCHVM_THREADS", value)
    monkeypatch.chdir(tmp_path)
    assert main(["--params", params_file(tmp_path), "prompts"]) == 1
    assert capsys.readouterr().err.strip() == (f"stitchvm prompts: STITCHVM_THREADS={value!r}: expected a positive "
                                               f"integer (torch threads per stage)")
    assert not (tmp_path / "data").exists()


def test_stage_threads_share_the_cores(monkeypatch):
    import os

    import torch

    from stitchvm.stages.runtime import set_stage_threads, stage_threads

    monkeypatch.delenv("STITCHVM_THREADS", raising=False)
    cores = os.cpu_count()
    assert stage_threads(1) == cores and stage_threads(2) == max(1, cores // 2) and stage_threads(10 * cores) == 1
    monkeypatch.setenv("STITCHVM_THREADS", "3")
    before = torch.get_num_threads()
    try:
        assert stage_threads(2) == 3 and set_stage_threads() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


ORPHANED_TASK = """
import asyncio, gc
{imports}
async def write():
    raise ConnectionError("Cannot write to closing transport")
loop = asyncio.new_event_loop()
task = loop.create_task(write())
loop.run_until_complete(asyncio.sleep(0.01))
del task
gc.collect()
"""


@pytest.mark.parametrize("imports, reported", [("", True), ("import stitchvm.__main__", False)])
def test_an_orphaned_storage_task_adds_no_traceback_to_the_one_line_failure(imports, reported):
    """s3fs's request tasks die with the endpoint; asyncio reports each one it collects with a traceback. The CLI
    drops that report (the stage's own one-line failure says it); without the CLI's filter it is printed."""
    run = subprocess.run([sys.executable, "-c", ORPHANED_TASK.format(imports=imports)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert ("Task exception was never retrieved" in run.stderr) == reported, run.stderr
