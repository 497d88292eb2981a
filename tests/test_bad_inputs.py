"""Bad inputs, one table: each ends in one line on stderr that names the key, file, shard, model source or endpoint
and what to do, with an exact exit status (2: bad params or arguments, 1: a stage's input or storage), and leaves the
working folder byte-identical (nothing written, nothing damaged).

CLI cases run `stitchvm.__main__.main` in-process (most fail at params load, in milliseconds); a handful run
`python -m stitchvm` in a subprocess to prove the exit status end to end. Consumer cases call the value model's pyfunc
`predict` (stitchvm/stages/tracking.py) directly, on a tiny value model.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
import yaml

from conftest import free_port
from stitchvm.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"prompts": {"train": 2, "val": 0, "test": 2}, "samples": {"source": "smooth", "per_prompt": 4}}
MISSING = object()  # a params file that does not exist
FAST = 10.0  # seconds: every expected failure, an unreachable S3 endpoint included, is named within this


class Case(NamedTuple):
    id: str
    argv: list[str]  # after `--params FILE`
    params: dict | str | object | Callable  # changes to GOOD, raw YAML text, MISSING, or request -> changes
    status: int
    message: str  # a regex the one stderr line must match
    setup: Callable | None = None  # (folder, request) -> None: files the case needs, made before the snapshot


def prompt_file(name: str, content: bytes) -> Callable:
    return lambda folder, request: (folder / name).write_bytes(content)


def upstream(damage: Callable | None = None) -> Callable:
    """Copy the module's prompts + samples outputs into the case's storage root, then damage one file."""
    def setup(folder: Path, request) -> None:
        shutil.copytree(request.getfixturevalue("built") / "data", folder / "data")
        if damage is not None:
            damage(folder / "data")
    return setup


def truncate(rel: str, keep: float = 0.5) -> Callable:
    def damage(data: Path) -> None:
        content = (data / rel).read_bytes()
        (data / rel).write_bytes(content[: int(len(content) * keep)])
    return damage


def unreachable_s3(request) -> dict:
    """An S3 root whose endpoint is a local port where nothing listens."""
    return {"storage": {"root": "s3://bucket/run", "options": {
        "key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}}}}


def silent_s3(request) -> dict:
    """An S3 root whose endpoint accepts connections and never answers."""
    return {"storage": {"root": "s3://bucket/run", "options": {
        "key": "testing", "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{request.getfixturevalue('silent_port')}"}}}}


def missing_bucket(request) -> dict:
    """A live S3 server (moto) without the root's bucket."""
    return {"storage": {"root": "s3://no-such-bucket/run", "options": request.getfixturevalue("s3_options")}}


TINY_HUB = "nobody/no-such-model"
PROMPTS_TXT = {"prompts": {"source": "prompts.txt", "train": 2, "val": 0, "test": 2}}

CASES = [
    # params file and YAML
    Case("missing params file", ["prompts"], MISSING, 2, r"params file .*nope\.yaml does not exist"),
    Case("broken YAML", ["prompts"], "train: {steps: 3\nseed: 0\n", 2, r"params\.yaml:2:5: not valid YAML: expected ','"),
    Case("tab indentation", ["prompts"], "train:\n\tsteps: 3\n", 2, r"params\.yaml:2:1: not valid YAML: found character"),
    Case("duplicate section", ["prompts"], "train: {steps: 3}\nseed: 1\ntrain: {steps: 4}\n", 2,
         r"params\.yaml:3:1: not valid YAML: duplicate key 'train' \(first at line 1\)"),
    Case("not a mapping", ["prompts"], "- 1\n- 2\n", 2, r"<root>: expected a mapping, got list"),
    # params values
    Case("section is a scalar", ["prompts"], {"train": 3}, 2, r"train: expected a mapping, got int"),
    Case("unknown section", ["prompts"], {"trian": {"steps": 3}}, 2, r"trian: unknown key \(known keys: .*train"),
    Case("unknown key", ["prompts"], {"train": {"stpes": 3}}, 2, r"train\.stpes: unknown key"),
    Case("string for an int", ["prompts"], {"train": {"steps": "many"}}, 2, r"train\.steps: expected int, got str"),
    Case("bool for an int", ["prompts"], {"train": {"steps": True}}, 2, r"train\.steps: expected int, got bool"),
    Case("scalar for a list", ["prompts"], {"noisy": {"sigmas": 0.5}}, 2, r"noisy\.sigmas: expected a list"),
    Case("sigma out of range", ["prompts"], {"noisy": {"sigmas": [0.5, 1.5]}}, 2, r"noisy: sigmas must lie in \[0, 1\]"),
    Case("negative learning rate", ["prompts"], {"train": {"lr": -1.0}}, 2, r"train: lr must be > 0"),
    Case("gate sigma not evaluated", ["prompts"], {"evaluate": {"gate_sigma": 0.3}}, 2,
         r"evaluate\.gate_sigma 0\.3 is not one of noisy\.sigmas"),
    Case("images without a folder", ["prompts"], {"samples": {"source": "images"}}, 2,
         r"samples: source 'images' needs image_folder"),
    Case("aesthetic without a head", ["prompts"], {"reward": {"kind": "aesthetic"}}, 2,
         r"reward: kind 'aesthetic' needs a head"),
    Case("head file missing", ["prompts"], {"reward": {"kind": "aesthetic", "head": "head.safetensors"}}, 2,
         r"reward\.head: file 'head\.safetensors' does not exist"),
    Case("empty storage root", ["prompts"], {"storage": {"root": ""}}, 2, r"storage: root must not be empty"),
    # model sources
    Case("mistyped backbone scheme", ["prompts"], {"backbone": {"source": "wrld:sd3"}}, 2,
         r"backbone\.source: 'wrld:sd3' is not a known source \(world:…, tiny:…, arch:…, open_clip:.*a local folder, or a hub id"),
    Case("mistyped reward scheme", ["prompts"], {"reward": {"source": "tiyn:clip"}}, 2,
         r"reward\.source: 'tiyn:clip' is not a known source"),
    Case("unknown preset", ["prompts"], {"backbone": {"source": "tiny:sd4"}}, 2,
         r"backbone\.source: 'tiny:sd4' is not a known source \(world:sd3, tiny:sd3, arch:sd3\.5-medium"),
    Case("reward as backbone", ["prompts"], {"backbone": {"source": "world:clip"}}, 2,
         r"backbone\.source: 'world:clip' is a reward model, not a backbone \(use world:sd3"),
    Case("scheme without its colon", ["prompts"], {"backbone": {"source": "tiny-sd3"}}, 2,
         r"backbone\.source: 'tiny-sd3' is not a known source: did you mean 'tiny:sd3'\?"),
    Case("hub id not cached, offline", ["prompts"], {"reward": {"source": TINY_HUB}}, 2,
         r"reward\.source: hub id 'nobody/no-such-model' is not in the Hugging Face cache .* HF_HUB_OFFLINE"),
    Case("not a hub id", ["prompts"], {"backbone": {"source": "a/b/c"}}, 2,
         r"backbone\.source: 'a/b/c' is neither an existing local folder nor a hub id"),
    Case("local folder missing", ["prompts"], {"backbone": {"source": "./no-such-folder"}}, 2,
         r"backbone\.source: local folder './no-such-folder' does not exist"),
    # prompt files
    Case("prompt file missing", ["prompts"], PROMPTS_TXT, 1, r"prompt source prompts\.txt does not exist \(prompts\.source\)"),
    Case("prompt file empty", ["prompts"], PROMPTS_TXT, 1, r"prompt source prompts\.txt holds no prompts",
         prompt_file("prompts.txt", b"")),
    Case("prompt file of blank lines", ["prompts"], PROMPTS_TXT, 1, r"prompt source prompts\.txt holds no prompts",
         prompt_file("prompts.txt", b"  \n\t\n\n")),
    Case("blank lines leave too few prompts", ["prompts"], PROMPTS_TXT, 1,
         r"the prompt source has 2 unique prompts, the splits need 4", prompt_file("prompts.txt", b"a cat\n \n\na dog\n")),
    Case("prompt parquet garbage", ["prompts"], {"prompts": {**PROMPTS_TXT["prompts"], "source": "p.parquet"}}, 1,
         r"prompt source p\.parquet is not a readable Parquet file", prompt_file("p.parquet", b"not parquet")),
    Case("prompt file of another kind", ["prompts"], {"prompts": {**PROMPTS_TXT["prompts"], "source": "p.csv"}}, 1,
         r"prompt source p\.csv is not a \.txt, a \.parquet or an image folder", prompt_file("p.csv", b"a cat\n")),
    Case("more prompts than the built-in split", ["prompts"], {"prompts": {"train": 2, "val": 99, "test": 1}}, 1,
         r"prompts\.val is 99, the built-in set has 12 val prompts"),
    # shards and --shards
    Case("shard above the range", ["samples", "--shards", "999"], {}, 2,
         r"samples: --shards: shard 999 does not exist: the set has shards 0\.\.0"),
    Case("negative shard", ["labels", "--shards=-1"], {}, 2, r"labels: --shards: shard -1 does not exist: .* 0\.\.0"),
    Case("shard not a number", ["labels", "--shards", "x"], {}, 2, r"--shards takes comma-separated shard numbers, got 'x'"),
    Case("no shard given", ["samples", "--shards", ","], {}, 2, r"--shards takes comma-separated shard numbers, got ','"),
    Case("stage before its input", ["samples"], {}, 1, r"prompts\.parquet does not exist: run the `prompts` stage first"),
    Case("truncated shard", ["labels"], {}, 1,
         r"shard .*data/samples/shard-00000\.safetensors is corrupted or truncated .*run the stage that writes 'samples'",
         upstream(truncate("samples/shard-00000.safetensors"))),
    Case("truncated index part", ["noisy"], {}, 1,
         r"data/samples/index/shard-00000\.parquet is not a readable Parquet file .*: delete it and run",
         upstream(truncate("samples/index/shard-00000.parquet", 0.3))),
    Case("empty prompts table", ["samples"], {}, 1, r"data/prompts\.parquet is not a readable Parquet file",
         upstream(truncate("prompts.parquet", 0.0))),
    # other arguments
    Case("unknown command", ["sampels"], {}, 2, r"stitchvm: error: argument command: invalid choice: 'sampels'"),
    Case("negative smoke threads", ["smoke", "--threads", "-1"], {}, 2, r"--threads: expected an integer >= 0, got -1"),
    Case("zero bench steps", ["bench", "value", "--steps", "0"], {}, 2, r"--steps: expected an integer >= 1, got 0"),
    Case("unknown bench profile", ["bench", "value", "--profile", "nope"], {}, 1, r"unknown profile 'nope'"),
    Case("unknown bench align method", ["bench", "align", "--methods", "nft,nfts"], {}, 1,
         r"bench align methods \['nft', 'nfts'\]: each one of nft, nft-stitchvm, draft, draft-stitchvm, no repeats"),
    Case("bench methods elsewhere", ["bench", "value", "--methods", "nft"], {}, 2,
         r"--methods applies to `bench guidance` and `bench align` \(run mode\) only"),
    # storage endpoints
    Case("S3 endpoint where nothing listens", ["prompts"], unreachable_s3, 1,
         r"storage\.root s3://bucket/run: cannot reach the S3 endpoint http://127\.0\.0\.1:\d+ .*endpoint_url"),
    Case("S3 endpoint that never answers", ["prompts"], silent_s3, 1,
         r"storage\.root s3://bucket/run: cannot reach the S3 endpoint http://127\.0\.0\.1:\d+ \(ReadTimeoutError\)"),
    Case("S3 bucket missing", ["prompts"], missing_bucket, 1,
         r"storage\.root s3://no-such-bucket/run: bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+"),
]
# a few end to end, in a subprocess: the exit status of `python -m stitchvm` itself
SUBPROCESS = ("missing params file", "broken YAML", "mistyped backbone scheme", "negative shard")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """prompts + samples (smooth latents, tiny models) once: the upstream outputs the shard cases damage."""
    folder = tmp_path_factory.mktemp("built")
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({**GOOD, "storage": {"root": str(folder / "data")}}))
    for name in ("prompts", "samples"):
        assert main(["--params", str(params), "--no-progress", name]) == 0
    return folder


@pytest.fixture(scope="module")
def silent_port():
    """A local port that accepts connections (the kernel's backlog) and never answers a request."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def write_params(folder: Path, case: Case, request) -> str:
    path = folder / "params.yaml"
    if case.params is MISSING:
        return str(folder / "nope.yaml")
    if isinstance(case.params, str):
        path.write_text(case.params)
    else:
        changes = case.params(request) if callable(case.params) else case.params
        path.write_text(yaml.safe_dump({**GOOD, "storage": {"root": str(folder / "data")}, **changes}))
    return str(path)


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with its content's digest: equal snapshots mean nothing was written or damaged."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def case_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("STITCHVM_THREADS", "STITCHVM_DEVICE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_fails_in_one_line_and_writes_nothing(case, case_folder, capsys, request):
    folder = case_folder
    params = write_params(folder, case, request)
    if case.setup is not None:
        case.setup(folder, request)
    before = snapshot(folder)
    capsys.readouterr()  # what the fixtures printed (moto announces its server)
    start = time.perf_counter()
    try:
        status = main(["--params", params, "--no-progress", *case.argv])
    except SystemExit as e:  # argparse's usage errors exit; main returns its own
        status = e.code
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == case.status, (status, lines)
    assert len(lines) == 1 and re.search(case.message, lines[0]), lines
    assert lines[0].startswith("stitchvm") and out == ""
    assert snapshot(folder) == before
    assert elapsed < FAST, f"{case.id}: {elapsed:.1f} s"


@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS], ids=list(SUBPROCESS))
def test_the_exit_status_end_to_end(case, case_folder, request):
    folder = case_folder
    params = write_params(folder, case, request)
    before = snapshot(folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "stitchvm", "--params", params, *case.argv], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == case.status, done.stderr[-2000:]
    assert len(lines) == 1 and re.search(case.message, lines[0]), lines
    assert done.stdout == "" and snapshot(folder) == before


def test_the_named_sources_are_the_factories():
    """config lists the named sources (it sits below the models layer); they must be the ones the factories build."""
    from stitchvm.config import NAMED_SOURCES
    from stitchvm.models.presets import BACKBONE_PRESETS, REWARD_PRESETS
    from stitchvm.models.world_source import WORLD_SOURCES

    assert set(NAMED_SOURCES["backbone"]) == set(BACKBONE_PRESETS) | {s for s in WORLD_SOURCES if s.endswith("sd3")}
    assert set(NAMED_SOURCES["reward"]) == set(REWARD_PRESETS) | {s for s in WORLD_SOURCES if s.endswith("clip")}


def test_a_reachable_bucket_passes_the_check(s3_options):
    """The S3 check refuses only what is wrong: a live endpoint with the bucket opens."""
    from stitchvm.data.storage import open_root

    storage = open_root("s3://bucket/checked", s3_options)
    assert not storage.exists("anything")


def test_a_missing_model_folder_part_is_named_at_build(tmp_path):
    """What params load cannot see (a folder without the layout from_pretrained expects) fails in one line when the
    model is built, naming the key."""
    from stitchvm.config import ModelSpec, RewardSpec
    from stitchvm.models.backbone import build_backbone
    from stitchvm.models.reward import build_reward
    from stitchvm.models.sources import ModelSourceError

    for build, spec, key in ((build_backbone, ModelSpec(str(tmp_path)), "backbone"),
                             (build_reward, RewardSpec(str(tmp_path)), "reward")):
        with pytest.raises(ModelSourceError) as e:
            build(spec)
        assert str(e.value).startswith(f"{key}.source: cannot load '{tmp_path}'") and "\n" not in str(e.value)


# --- consumer inputs: the value model's pyfunc (stitchvm/stages/tracking.py ValueModelPyfunc.predict) ---

@pytest.fixture(scope="module")
def pyfunc(backbone, reward):
    from stitchvm.value.model import StitchedValueModel

    from stitchvm.stages.tracking import ValueModelPyfunc

    model = ValueModelPyfunc()
    model.model = StitchedValueModel(backbone, reward, i=2, j=1).eval()  # as load_context leaves it
    return model


def good_inputs(backbone) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(11)
    size = backbone.image_size // backbone.vae_scale
    return {"latents": torch.randn(3, backbone.latent_channels, size, size, generator=gen).numpy(),
            "t": np.array([0.1, 0.5, 0.9], np.float32), "prompts": np.array(["a red cube", "a dog", "a boat"])}


def nan_at(a: np.ndarray, k: int) -> np.ndarray:
    a = a.copy()
    a.flat[k] = np.nan
    return a


CONSUMER = [  # (what is wrong, change to the good inputs, the message)
    ("t above 1", lambda x: {**x, "t": np.array([0.1, 5.0, 0.9], np.float32)}, r"'t' must lie in \[0, 1\]"),
    ("NaN in t", lambda x: {**x, "t": nan_at(x["t"], 0)}, r"'t' holds NaN or inf"),
    ("NaN in latents", lambda x: {**x, "latents": nan_at(x["latents"], 7)}, r"'latents' holds 1 non-finite values"),
    ("empty batch", lambda x: {k: v[:0] for k, v in x.items()}, r"the batch is empty"),
    ("wrong channels", lambda x: {**x, "latents": x["latents"][:, :2]}, r"must have \d+ channels"),
    ("t missing", lambda x: {k: v for k, v in x.items() if k != "t"}, r"input 't' is missing"),
    ("batch sizes differ", lambda x: {**x, "prompts": x["prompts"][:2]}, r"same batch size"),
    ("integers as t", lambda x: {**x, "t": np.array([0, 1, 1])}, r"'t' must hold floats"),
    ("not a dict", lambda x: [x["latents"], x["t"], x["prompts"]], r"takes a dict with keys"),
]


@pytest.mark.parametrize("what, change, message", CONSUMER, ids=[c[0] for c in CONSUMER])
def test_the_value_model_refuses_bad_inputs_in_one_line(pyfunc, backbone, what, change, message):
    before = {k: v.clone() for k, v in pyfunc.model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        pyfunc.predict(None, change(good_inputs(backbone)))
    assert "\n" not in str(err.value) and len(str(err.value)) < 200
    after = pyfunc.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing damaged
    assert pyfunc.predict(None, good_inputs(backbone)).shape == (3,)  # and it still predicts


# --- Dagster: the same failures as a step's one-line Failure (assets/resources.py), not a traceback ---

@pytest.mark.parametrize("changes, message", [
    ({"backbone": {"source": "wrld:sd3"}}, r"params\.yaml: backbone\.source: 'wrld:sd3' is not a known source"),
    ({"prompts": {"source": "prompts.txt", "train": 2, "val": 0, "test": 2}},
     r"^stitchvm prompts: prompt source prompts\.txt does not exist"),
], ids=["bad params", "missing prompt file"])
def test_dagster_fails_the_step_with_the_line(case_folder, changes, message):
    from dagster import DagsterInstance, materialize

    from assets.data import prompts
    from assets.resources import StitchVMResource

    folder = case_folder
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({**GOOD, "storage": {"root": str(folder / "data")}, **changes}))
    result = materialize([prompts], resources={"stitchvm": StitchVMResource(params_path=str(params))},
                         instance=DagsterInstance.ephemeral(), raise_on_error=False)
    (failure,) = result.get_step_failure_events()
    data = failure.step_failure_data
    assert not result.success and data.user_failure_data is not None  # a Failure: Dagster does not retry it
    assert re.search(message, data.user_failure_data.description) and "\n" not in data.user_failure_data.description
    assert not (folder / "data").exists()
