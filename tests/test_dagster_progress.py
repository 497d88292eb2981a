"""Progress of long Dagster steps in the run's event log: the stage's bars (stitchvm.progress) reach `context.log`
through the tee that StitchVMResource.run_stage puts in front of stderr (assets/progress_log.py)."""
import io
import re
import sys

import yaml
from dagster import DagsterEventType, DagsterInstance, materialize

from assets import StitchVMResource
from assets.data import prompts, samples
from assets.progress_log import progress_to_log
from stitchvm.progress import tqdm

BAR_LINE = re.compile(r"^samples: +(\d+)%\|.*\| (\d+)/(\d+) \[")


class Lines:
    """A log that keeps what it is given (the tee only calls `info`)."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)


def test_the_tee_logs_bar_lines_and_passes_everything_to_stderr(monkeypatch):
    monkeypatch.setenv("STITCHVM_PROGRESS", "auto")
    monkeypatch.setenv("STITCHVM_PROGRESS_INTERVAL", "0")  # a line per update
    stderr, log = io.StringIO(), Lines()
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress_to_log(log):
        print("a warning that is no bar", file=sys.stderr)
        for _ in tqdm(range(5), desc="steps"):
            pass
    counts = [int(re.search(r"\| (\d)/5 \[", line).group(1)) for line in log.lines]
    assert counts[0] == 0 and counts[-1] == 5 and counts == sorted(counts)  # start, updates, the closing line
    assert all(line.startswith("steps: ") for line in log.lines)
    assert "a warning that is no bar" in stderr.getvalue()
    assert all(line in stderr.getvalue() for line in log.lines)  # stderr (the compute log) keeps every line
    assert sys.stderr is stderr  # restored


def test_a_materialisation_logs_its_progress_to_the_event_log(tmp_path, monkeypatch):
    """`samples` (4 shards) in a real Dagster run: its bar's lines are events of the run, from 0/4 to 4/4."""
    monkeypatch.setenv("STITCHVM_PROGRESS", "auto")
    monkeypatch.setenv("STITCHVM_PROGRESS_INTERVAL", "0")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "data"), "shard_size": 8},
                                      "prompts": {"train": 2, "val": 0, "test": 2},
                                      "samples": {"source": "smooth", "per_prompt": 8}}))
    instance = DagsterInstance.ephemeral()
    result = materialize([prompts, samples], instance=instance, resources={"stitchvm": StitchVMResource(
        params_path=str(params), reports_dir=str(tmp_path / "reports"))})
    assert result.success
    messages = [e.user_message for e in instance.all_logs(result.run_id)
                if e.dagster_event is None and e.step_key == "samples"]  # context.log lines of the step
    progress = [BAR_LINE.match(m) for m in messages if BAR_LINE.match(m)]
    done = [int(m.group(2)) for m in progress]
    assert done[0] == 0 and done[-1] == 4 and done == sorted(done) and len(done) >= 3
    assert all(int(m.group(3)) == 4 for m in progress)
    assert all(e.dagster_event_type != DagsterEventType.STEP_FAILURE for e in instance.all_logs(result.run_id)
               if e.dagster_event)
