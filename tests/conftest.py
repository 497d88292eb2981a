import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fsspec
import pytest
import torch

from stitchvm.models.backbone import build_backbone
from stitchvm.config import ModelSpec, RewardSpec
from stitchvm.models.reward import build_reward
from stitchvm.value.model import StitchedValueModel
from stitchvm.value.training import train_value_model


@pytest.fixture(scope="session")
def backbone():
    return build_backbone(ModelSpec("tiny:sd3"))


@pytest.fixture(scope="session")
def reward():
    return build_reward(RewardSpec("tiny:clip"))


@pytest.fixture(scope="session")
def aesthetic():
    return build_reward(RewardSpec("tiny:clip", kind="aesthetic", head="random"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`), restored after it: tiny
    matmuls on a shared 2-core machine run 10-100× slower with OpenMP threads spinning against other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def latents(backbone, n, generator):
    size = backbone.image_size // backbone.vae_scale
    return torch.randn(n, backbone.latent_channels, size, size, generator=generator)


def perturbed(model, seed: int = 0):
    """A value model moved off its initialisation (the zero-initialised residual G, as after finetuning), so that every
    trainable part matters to its value and gradient; in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def resumed_after_a_crash(backbone, reward, data, targets, cfg, checkpoint_dir, crash_step: int,
                          **kwargs) -> tuple[list[dict], StitchedValueModel]:
    """Train from scratch until an exception after step `crash_step`, then train a fresh model (a fresh process
    starts from init weights) from the checkpoint: (the resumed run's history, the resumed model)."""
    class Crash(Exception):
        pass

    def crash(row):
        if row["step"] == crash_step:
            raise Crash

    with pytest.raises(Crash):
        train_value_model(StitchedValueModel(backbone, reward, 2, 1), data, targets, cfg, seed=5,
                          checkpoint_dir=checkpoint_dir, on_step=crash, progress=False, **kwargs)
    resumed = StitchedValueModel(backbone, reward, 2, 1)
    history = train_value_model(resumed, data, targets, cfg, seed=5, checkpoint_dir=checkpoint_dir, progress=False,
                                **kwargs)
    return history, resumed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory):
    """One `dvc repro` of the reduced default profile in a fresh git repository (tests/test_dvc.py's build_project),
    built once per session: tests/test_dvc.py checks it and tests/test_readme.py runs the README against its MLflow
    store."""
    from test_dvc import build_project  # tests/ is on sys.path (no __init__.py): the module pytest collects

    return build_project(tmp_path_factory)


@pytest.fixture(scope="session")
def s3_options():
    """A real local S3 server (moto) on 127.0.0.1 with a bucket named `bucket`; yields s3fs storage options."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    # no client_kwargs region_name: s3fs.mkdir would send it as LocationConstraint, which S3 rejects for
    # us-east-1; the region comes from AWS_DEFAULT_REGION instead
    options = {"key": "testing", "secret": "testing", "use_listings_cache": False,
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.setenv(var, "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        fsspec.filesystem("s3", **options).mkdir("bucket")
        yield options
    server.stop()
