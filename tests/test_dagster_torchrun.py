"""Data-parallel stages launched from Dagster under torchrun through Dagster Pipes (StitchVMResource.nproc, the
environment's STITCHVM_NPROC): 2 gloo processes on the CPU write the same shards as the in-process step, rank 0's
progress and summary come back through Pipes, and an expected failure fails the step with its one line."""
import pyarrow.parquet as pq
import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, materialize

from assets import StitchVMResource
from assets.data import labels, prompts, samples

SMALL = {"prompts": {"train": 2, "val": 0, "test": 2}, "samples": {"source": "smooth", "per_prompt": 8},
         "storage": {"shard_size": 8}}


@pytest.fixture
def cpu_ranks(monkeypatch):
    """Two CPU processes on one machine: gloo over loopback, one thread each (ENVIRONMENT: torchrun on CPU)."""
    for key, value in {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "STITCHVM_THREADS": "1",
                       "STITCHVM_PROGRESS": "auto", "STITCHVM_PROGRESS_INTERVAL": "0", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)


def run(tmp, assets, nproc):
    tmp.mkdir(parents=True, exist_ok=True)
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({**SMALL, "storage": {**SMALL["storage"], "root": str(tmp / "data")}}))
    instance = DagsterInstance.ephemeral()
    result = materialize(assets, instance=instance, raise_on_error=False, resources={"stitchvm": StitchVMResource(
        params_path=str(params), reports_dir=str(tmp / "reports"), checkpoints_dir=str(tmp / "checkpoints"),
        nproc=nproc)})
    return result, instance.all_logs(result.run_id)


@pytest.mark.e2e
def test_samples_under_torchrun_equal_the_in_process_step(tmp_path, cpu_ranks):
    launched, events = run(tmp_path / "torchrun", [prompts, samples], nproc=2)
    assert launched.success
    in_process, _ = run(tmp_path / "in_process", [prompts, samples], nproc=0)
    md, reference = (r.asset_materializations_for_node("samples")[0].metadata for r in (launched, in_process))
    assert md["shards_written"].value == reference["shards_written"].value == 4
    assert md["dagster/row_count"].value == 32 and md["shard_table"].value == reference["shard_table"].value
    index = {name: pq.read_table(tmp_path / name / "data" / "samples" / "index").sort_by("sample_id")
             for name in ("torchrun", "in_process")}
    assert index["torchrun"].column("sha256").equals(index["in_process"].column("sha256"))  # the same bytes

    messages = [e.user_message for e in events if e.step_key == "samples" and e.dagster_event is None]
    assert any("torch.distributed.run" in m and "--nproc-per-node=2" in m for m in messages)  # the launch
    # rank 0's bar (its 2 shards of 4) reached the event log through Pipes
    bar = [m for m in messages if m.startswith("samples: ")]
    assert bar and "2/2" in bar[-1], messages


@pytest.mark.e2e
def test_an_expected_failure_under_torchrun_fails_the_step_with_its_line(tmp_path, cpu_ranks):
    """`labels` on an empty root: every rank fails to read its inputs; the step fails with rank 0's one line."""
    result, events = run(tmp_path, [labels], nproc=2)
    assert not result.success
    (failure,) = [e.dagster_event for e in events
                  if e.dagster_event and e.dagster_event_type == DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.user_failure_data.description
    assert message.startswith("stitchvm labels: ") and "\n" not in message
    assert message.endswith("run the `prompts` stage first (python -m stitchvm prompts)")
