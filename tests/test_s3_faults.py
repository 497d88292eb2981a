"""Issue 17, S3 faults: the S3 server stops while `samples` writes to s3:// and comes back on the same port.

The stage fails within seconds in one line naming the endpoint (exit status 1, no traceback); nothing partial is
visible under a final key (an object exists only once its PUT completed; a shard is listed only once both its objects
are there); the re-run resumes (the shards complete before the fault are not written again) and ends with objects
byte-identical to an uninterrupted run's. moto keeps its buckets in module-global backends, so a server stopped and
started again in the same process serves the objects written before the fault.
"""
from __future__ import annotations

import io
import random
import subprocess
import time

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load as load_safetensors

from conftest import free_port
from stitchvm.data.storage import index_parts, open_root, shard_status
from test_kill_resume import N_SHARDS, SAMPLES, SEED, cli, complete_shards, env, run_to_end, summary_of, write_params

# moto's state is process-global (which is why a restarted server still holds the objects): a bucket of this test's
# own, so that the session's other S3 tests (conftest's `bucket`) and this one never meet
BUCKET = "stitchvm-faults"
PREFIX = f"{BUCKET}/faults"
FAIL_WITHIN_S = 20  # botocore's and s3fs's retries on a refused connection take about 5-7 s here


@pytest.fixture
def moto(monkeypatch):
    """A moto S3 server on a free port with the bucket BUCKET; yields its port, `stop` and `restart` (same port)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port)]
    servers[0].start()
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, value)

    def restart() -> None:
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port))
        servers[-1].start()

    fs = s3(port)
    fs.mkdir(BUCKET)
    yield {"port": port, "stop": lambda: servers[-1].stop(), "restart": restart}
    try:
        servers[-1].stop()
    except Exception:  # already stopped by the test
        pass


def s3(port: int) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("s3", key="testing", secret="testing", use_listings_cache=False, skip_instance_cache=True,
                             client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})


def options(port: int) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}


def objects(fs, prefix: str) -> dict[str, bytes]:
    """{key relative to prefix: bytes} of every object under it."""
    return {p[len(prefix) + 1:]: fs.cat_file(p) for p in sorted(fs.find(prefix))}


def assert_nothing_partial(fs, prefix: str) -> None:
    """Every object parses (an object under a final key is complete)."""
    for key, body in objects(fs, prefix).items():
        if key.endswith(".safetensors"):
            load_safetensors(body)
        elif key.endswith(".parquet"):
            pq.read_table(io.BytesIO(body))


@pytest.mark.e2e
def test_s3_server_stopped_mid_write_fails_in_one_line_and_the_rerun_resumes(moto, tmp_path):
    port, endpoint = moto["port"], f"http://127.0.0.1:{moto['port']}"
    ref = tmp_path / "ref"  # the uninterrupted run, on local disk: shards are byte-identical across backends
    write_params(ref, SAMPLES)
    run_to_end(cli("--no-progress", "prompts"), ref, env())
    reference = subprocess.Popen(cli("--no-progress", "samples"), cwd=ref, env=env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)

    remote = tmp_path / "remote"
    params = write_params(remote, SAMPLES, root=f"s3://{PREFIX}")
    data = yaml.safe_load(params.read_text())
    data["storage"]["options"] = options(port)
    params.write_text(yaml.safe_dump(data))
    aws = env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    fs = s3(port)
    fs.pipe_file(f"{PREFIX}/prompts.parquet", (ref / "data" / "prompts.parquet").read_bytes())
    storage = open_root(f"s3://{PREFIX}", options(port))

    proc = subprocess.Popen(cli("--no-progress", "samples"), cwd=remote, env=aws, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not index_parts(storage, "samples"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(random.Random(SEED).uniform(0, 2.0))
    assert proc.poll() is None, "finished before the server stopped: make the run longer"
    moto["stop"]()
    stopped = time.monotonic()
    stdout, stderr = proc.communicate(timeout=120)
    waited = time.monotonic() - stopped
    assert proc.returncode == 1, stderr[-3000:]
    # the failure is the last line and the only one from stitchvm; above it only transformers' weight-loading bars
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and [line for line in lines if "stitchvm" in line] == lines[-1:], stderr[-3000:]
    assert all(line.startswith("Loading weights") for line in lines[:-1]), stderr[-3000:]
    assert lines[-1].startswith("stitchvm samples: ") and endpoint in lines[-1] and "re-run" in lines[-1], lines[-1]
    assert waited < FAIL_WITHIN_S, f"failed {waited:.1f} s after the server stopped"
    print(f"the stage failed {waited:.1f} s after the server stopped: {lines[-1]}")

    moto["restart"]()  # same port, same process: moto's backends still hold what was written before the fault
    storage = open_root(f"s3://{PREFIX}", options(port))
    assert_nothing_partial(fs, PREFIX)
    done = [s for s in index_parts(storage, "samples") if shard_status(storage, "samples", s) is None]
    assert done == index_parts(storage, "samples"), "a listed shard is damaged"
    assert 0 < len(done) < N_SHARDS, f"stopped after {len(done)} of {N_SHARDS} shards: not mid-way (seed {SEED})"

    rerun = summary_of(run_to_end(cli("--no-progress", "samples"), remote, aws))
    # the shards complete before the fault are kept (not generated or PUT again)
    assert rerun["written"] == [s for s in range(N_SHARDS) if s not in done] and rerun["rewritten"] == {}
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    got = objects(fs, f"{PREFIX}/samples")
    want = {str(p.relative_to(ref / "data" / "samples")): p.read_bytes()
            for p in sorted((ref / "data" / "samples").rglob("*")) if p.is_file()}
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)
    assert len(complete_shards(ref / "data", "samples")) == N_SHARDS
