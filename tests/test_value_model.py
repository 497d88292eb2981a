import copy
import json

import pytest
import torch

from stitchvm.models.backbone import build_backbone
from stitchvm.config import ModelSpec
from stitchvm.value.model import StitchedValueModel

from conftest import latents, perturbed


def test_value_gradient_matches_finite_differences(backbone, reward, gen):
    model = copy.deepcopy(perturbed(StitchedValueModel(backbone, reward, 2, 2))).double()
    model.reward._text_cache.clear()  # cached text embeddings were float32
    z = latents(backbone, 2, gen).double().requires_grad_(True)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    prompts = ["a red square", "a blue square"]
    value = lambda x: model(x, t, prompts).double().sum()
    (grad,) = torch.autograd.grad(value(z), z)
    assert grad.abs().sum() > 0
    x = z.detach()
    for k in range(3):
        d = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        # 4th-order central differences with a step large enough that float32 internals of diffusers' norms
        # (they upcast/downcast) add only ~1e-7 relative noise to the quotient
        h = 1e-2
        fd = (-value(x + 2 * h * d) + 8 * value(x + h * d) - 8 * value(x - h * d) + value(x - 2 * h * d)) / (12 * h)
        assert (grad * d).sum().item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-6)


def test_save_load_round_trip(tmp_path, backbone, reward, gen):
    model = perturbed(StitchedValueModel(backbone, reward, 3, 2))
    model.save_pretrained(tmp_path / "vm")
    cfg = json.loads((tmp_path / "vm" / "config.json").read_text())
    assert cfg["i"] == 3 and cfg["j"] == 2 and cfg["backbone"]["source"] == "tiny:sd3"
    loaded = StitchedValueModel.from_pretrained(tmp_path / "vm")  # frozen parts rebuilt from their specs
    z, t = latents(backbone, 3, gen), torch.tensor([0.1, 0.5, 0.9])
    prompts = ["a", "b", "c"]
    with torch.no_grad():
        assert torch.equal(model(z, t, prompts), loaded(z, t, prompts))
    assert set(model.trainable_state_dict()) == set(loaded.trainable_state_dict())
    # a sub-pixel stitch (6×6 latents: 3×3 tokens under the 6×6 reward grid) keeps its factor
    model = perturbed(StitchedValueModel(backbone, reward, 3, 2, factor=2))
    model.save_pretrained(tmp_path / "subpixel")
    loaded = StitchedValueModel.from_pretrained(tmp_path / "subpixel")
    z = torch.randn(3, backbone.latent_channels, 6, 6, generator=gen)
    with torch.no_grad():
        assert loaded.factor == 2 and torch.equal(model(z, t, prompts), loaded(z, t, prompts))
    # a k×k stitch keeps its kernel
    model = perturbed(StitchedValueModel(backbone, reward, 3, 2, kernel=3))
    model.save_pretrained(tmp_path / "kernel")
    loaded = StitchedValueModel.from_pretrained(tmp_path / "kernel")
    z = latents(backbone, 3, gen)
    with torch.no_grad():
        assert loaded.kernel == 3 and torch.equal(model(z, t, prompts), loaded(z, t, prompts))
    # a head on the prompt branch keeps its context, and its value depends on the prompt through the head too
    model = perturbed(StitchedValueModel(backbone, reward, 3, 2, context="prompt"))
    model.save_pretrained(tmp_path / "prompt")
    loaded = StitchedValueModel.from_pretrained(tmp_path / "prompt")
    z = latents(backbone, 3, gen)
    with torch.no_grad():
        assert loaded.context == "prompt" and torch.equal(model(z, t, prompts), loaded(z, t, prompts))
        e1, _ = loaded.embed(z, t, prompts)
        e2, _ = loaded.embed(z, t, prompts[::-1])
        assert (e1 - e2).abs().max() > 1e-4
    assert json.loads((tmp_path / "vm" / "config.json").read_text())["context"] == "empty"


def test_only_trainable_parts_are_saved(tmp_path, backbone, reward):
    model = StitchedValueModel(backbone, reward, 2, 1)
    keys = model.trainable_state_dict()
    assert keys and all(k.startswith(("stitch.", "class_token", "position_embedding", "tail.")) for k in keys)
    trainable = {id(p) for p in model.trainable_parameters()}
    frozen = [p for p in model.parameters() if id(p) not in trainable]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.trainable_parameters())


def test_checkpoint_for_another_backbone_is_refused(tmp_path, backbone, reward):
    StitchedValueModel(backbone, reward, 2, 1).save_pretrained(tmp_path / "vm")
    other = build_backbone(ModelSpec("tiny:sd3", seed=7))
    with pytest.raises(ValueError, match=r"trained with backbone .*'seed': 0.*given backbone is .*'seed': 7"):
        StitchedValueModel.from_pretrained(tmp_path / "vm", backbone=other)


def test_weights_that_do_not_fit_are_refused(tmp_path, backbone, reward):
    StitchedValueModel(backbone, reward, 2, 1).save_pretrained(tmp_path / "vm")
    cfg = json.loads((tmp_path / "vm" / "config.json").read_text())
    cfg["j"] = 3  # the saved tail has 4 blocks, j=3 needs 2
    (tmp_path / "vm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit a value model with i=2, j=3"):
        StitchedValueModel.from_pretrained(tmp_path / "vm", backbone=backbone, reward=reward)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        StitchedValueModel.from_pretrained(tmp_path / "nothing")


def test_clip_value_needs_one_prompt_per_latent(backbone, reward, gen):
    model = StitchedValueModel(backbone, reward, 1, 1)
    with pytest.raises(ValueError, match="got 1 prompts for 2 latents"):
        model(latents(backbone, 2, gen), torch.tensor([0.5, 0.5]), ["a"])
