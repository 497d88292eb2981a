import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from stitchvm.backbone import build_backbone
from stitchvm.config import ModelSpec, RewardSpec
from stitchvm.reward import build_reward


@pytest.fixture(scope="session")
def backbone():
    return build_backbone(ModelSpec("tiny:sd3"))


@pytest.fixture(scope="session")
def reward():
    return build_reward(RewardSpec("tiny:clip"))


@pytest.fixture(scope="session")
def aesthetic():
    return build_reward(RewardSpec("tiny:clip", kind="aesthetic", head="random"))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def latents(backbone, n, generator):
    size = backbone.image_size // backbone.vae_scale
    return torch.randn(n, backbone.latent_channels, size, size, generator=generator)
