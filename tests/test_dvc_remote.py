"""Issue 17: data versions a teammate can fetch. The default DVC remote (`storage`, S3, committed in .dvc/config with
a placeholder bucket; endpoint and credentials per machine in .dvc/config.local) carries what `dvc repro` recorded to
another clone: after the session's pipeline run, `dvc push` to a moto S3 server; a fresh `git clone` + `dvc pull`
restores every output of dvc.lock byte-identical, and `git checkout <older commit>` + `dvc pull`/`dvc checkout` brings
back that commit's shards and value model.

The end-to-end tests work on a copy of the session's DVC project (tests/conftest.py's `dvc_project`), so the session's
project, its git history and its MLflow store stay as the pipeline left them for the other tests.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import configobj
import fsspec
import pytest
import yaml

from test_dvc import DVC, _env, _ran, needs_dvc

ROOT = Path(__file__).resolve().parents[1]
REMOTE = "storage"  # the default remote in .dvc/config
BUCKET = "stitchvm-dvc-e2e"  # its own bucket on the session's moto server (the S3 stage tests use `bucket`)
# not copied from the session's project: per-machine state that is never a DVC output (a fresh MLflow store and no
# checkpoints for the copy's own `dvc repro train`) and DVC's own temporary folder
NOT_COPIED = {"mlflow.db", "mlruns", "checkpoints", "dvc_plots"}
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def default_remote(config: Path = ROOT / ".dvc/config") -> tuple[str, dict]:
    """The default remote's name and the options committed for it."""
    cfg = configobj.ConfigObj(str(config))
    name = cfg["core"]["remote"]
    return name, dict(cfg[f'remote "{name}"'])


# ---- the committed configuration (fast) ----------------------------------------------------------------------------
def test_the_default_remote_is_committed_on_s3_without_endpoint_or_credentials():
    name, options = default_remote()
    assert name == REMOTE and options["url"].startswith("s3://")
    # everything per machine (endpoint, credentials, a profile) belongs in .dvc/config.local, never in git
    assert set(options) == {"url"}, options
    assert "/config.local" in (ROOT / ".dvc/.gitignore").read_text().split()
    readme = (ROOT / "README.md").read_text()
    for command in (f"dvc remote modify {name} url s3://", f"dvc remote modify --local {name} endpointurl",
                    f"dvc remote modify --local {name} access_key_id", "dvc push", "dvc pull", "dvc checkout"):
        assert command in readme, command


# ---- push, clone, pull, checkout against a moto S3 server ------------------------------------------------------------
def _cmd(cwd: Path, *args: str, aws_env: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    """A command in `cwd` (test_dvc's environment) with no AWS config files (only the configured credentials count);
    `aws_env=False` also drops the AWS credential variables (the credentials then come from .dvc/config.local)."""
    env = _env(cwd)
    env.update(AWS_CONFIG_FILE=str(cwd.parent / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(cwd.parent / "no-aws-credentials"))
    if not aws_env:
        for var in AWS_CREDENTIALS:
            env.pop(var, None)
    run = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert run.returncode == 0, f"{' '.join(args)} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return run


def lock_outs(root: Path) -> dict[str, str]:
    """path -> md5 of every out of every stage in root's dvc.lock (metrics and plots included)."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", [])}


def uncached(root: Path) -> set[str]:
    """The outs, metrics and plots that root's dvc.yaml marks `cache: false` (committed to git, never pushed)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {path for s in stages.values() for key in ("outs", "metrics", "plots") for e in s.get(key) or []
            if isinstance(e, dict) for path, opts in e.items() if (opts or {}).get("cache", True) is False}


def out_files(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file of every out in root's dvc.lock (a folder out: every file under it)."""
    files = {}
    for out in lock_outs(root):
        path = root / out
        assert path.exists(), f"out {out} is missing in {root}"
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file() and "__pycache__" not in f.parts:  # .dvcignore'd
                files[f.relative_to(root).as_posix()] = f.read_bytes()
    return files


def assert_same_files(got: dict[str, bytes], expected: dict[str, bytes]):
    assert sorted(got) == sorted(expected)
    assert [p for p in expected if got[p] != expected[p]] == [], "files that differ"


def value_model(files: dict[str, bytes]) -> dict[str, bytes]:
    return {p: b for p, b in files.items() if p.startswith("data/value_model/")}


def _copy(src: Path, dst: Path):
    def ignore(folder, names):
        if Path(folder) == src:
            return [n for n in names if n in NOT_COPIED]
        return ["tmp"] if Path(folder) == src / ".dvc" else []

    shutil.copytree(src, dst, ignore=ignore)


def _set_remote(root: Path, endpoint: str, credentials: bool = False):
    """This machine's remote settings, as the README tells a teammate: the bucket and endpoint (MinIO-style) in
    .dvc/config.local, the credentials there too when `credentials` (else from the AWS variables)."""
    settings = [("url", f"s3://{BUCKET}/cache"), ("endpointurl", endpoint)]
    if credentials:
        settings += [("access_key_id", "testing"), ("secret_access_key", "testing")]
    for key, value in settings:
        _cmd(root, DVC, "remote", "modify", "--local", REMOTE, key, value)


@pytest.fixture(scope="module")
def versions(dvc_project, s3_options, tmp_path_factory) -> dict:
    """A copy of the session's project holding two committed and pushed versions: version 1 as the pipeline left it,
    version 2 with `train.steps` changed and only `dvc repro train` run (a few seconds on the reduced profile)."""
    endpoint = s3_options["client_kwargs"]["endpoint_url"]
    fsspec.filesystem("s3", **s3_options).mkdir(BUCKET)
    origin = tmp_path_factory.mktemp("remote") / "origin"
    _copy(dvc_project["root"], origin)
    _set_remote(origin, endpoint)  # credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the s3_options fixture)
    assert _cmd(origin, DVC, "remote", "default").stdout.strip() == REMOTE

    def commit_and_push(message: str) -> str:
        _cmd(origin, "git", "add", "-A")
        _cmd(origin, "git", "commit", "-q", "--allow-empty", "-m", message)
        assert _cmd(origin, "git", "status", "--porcelain").stdout == ""  # dvc.lock and the uncached outs are in git
        assert ".dvc/config.local" not in _cmd(origin, "git", "ls-files", ".dvc").stdout.split()
        _cmd(origin, DVC, "push")
        return _cmd(origin, "git", "rev-parse", "HEAD").stdout.strip()

    first = commit_and_push("version 1: the pipeline's run")
    files1 = out_files(origin)

    params = yaml.safe_load((origin / "params.yaml").read_text())
    steps = params["train"]["steps"]
    params["train"]["steps"] = 4 if steps != 4 else 5
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_cmd(origin, DVC, "repro", "train")) == ["train"]
    second = commit_and_push(f"version 2: train.steps={params['train']['steps']}")
    files2 = out_files(origin)
    assert value_model(files1) and value_model(files1) != value_model(files2), "the two versions must differ"
    listed = fsspec.filesystem("s3", **s3_options).find(f"{BUCKET}/cache/files/md5")
    return {"origin": origin, "endpoint": endpoint, "first": first, "second": second, "files1": files1,
            "files2": files2, "remote": {p.split("/files/md5/")[1].replace("/", "") for p in listed}}


@pytest.fixture(scope="module")
def clone(versions, tmp_path_factory) -> Path:
    """A teammate's fresh clone of the project at version 2: the committed config names the default remote; the
    bucket, endpoint and credentials go to its own .dvc/config.local (no AWS variables), then `dvc pull`."""
    clone = tmp_path_factory.mktemp("teammate") / "clone"
    _cmd(clone.parent, "git", "clone", "-q", str(versions["origin"]), str(clone))
    assert not (clone / ".dvc/config.local").exists() and not (clone / ".dvc/cache").exists()
    assert _cmd(clone, DVC, "remote", "default").stdout.strip() == REMOTE
    _set_remote(clone, versions["endpoint"], credentials=True)
    _cmd(clone, DVC, "pull", aws_env=False)
    return clone


@needs_dvc
@pytest.mark.e2e
def test_push_then_pull_in_a_fresh_clone_restores_every_out_byte_identical(versions, clone):
    assert _cmd(clone, "git", "rev-parse", "HEAD").stdout.strip() == versions["second"]
    assert_same_files(out_files(clone), versions["files2"])  # every file of every out of dvc.lock
    assert "in sync" in _cmd(clone, DVC, "status", "--cloud", aws_env=False).stdout
    assert "up to date" in _cmd(clone, DVC, "status", "train").stdout

    # what came from the remote and what from git: every cached out is in the bucket; the `cache: false` outs never
    # are (they are committed to git instead, and came with the clone)
    outs, skip, remote = lock_outs(clone), uncached(clone), versions["remote"]
    assert skip and skip <= set(outs)
    assert {p: h for p, h in outs.items() if p not in skip and h not in remote} == {}
    assert {p: h for p, h in outs.items() if p in skip and h in remote} == {}
    tracked = set(_cmd(clone, "git", "ls-files", *sorted(skip)).stdout.split())
    assert {p for p in skip if not any(t == p or t.startswith(p + "/") for t in tracked)} == set()


@needs_dvc
@pytest.mark.e2e
def test_an_older_commit_checks_out_its_own_shards_and_value_model(versions, clone):
    _cmd(clone, "git", "checkout", "-q", versions["first"])
    _cmd(clone, DVC, "pull", aws_env=False)  # version 1's value model is not in this clone's cache yet
    files = out_files(clone)
    assert_same_files(files, versions["files1"])  # the shards, the value model and every other out of version 1
    assert value_model(files) == value_model(versions["files1"]) != value_model(versions["files2"])
    assert any(p.startswith("data/samples/") for p in files)

    _cmd(clone, "git", "checkout", "-q", versions["second"])
    _cmd(clone, DVC, "checkout", aws_env=False)  # both versions are in the local cache now: no remote needed
    assert_same_files(out_files(clone), versions["files2"])
