"""Stage 1b, the token fit (stitchvm/value/token_fit.py), and the configurable G it trains (stitching.py)."""
import copy
import json

import pytest
import torch

from stitchvm.config import FitConfig
from stitchvm.diffusion.flow import forward_noise, logit_normal
from stitchvm.value.model import StitchedValueModel
from stitchvm.value.token_fit import entry_tokens, fit_stitch, token_variance

from conftest import latents, perturbed

SIGMA = (-1.0, 1.0)


def wide_model(backbone, reward, context="empty"):
    return StitchedValueModel(backbone, reward, 3, 2, kernel=3, residual_width=12, residual_kernel=3, context=context)


def test_the_first_step_scores_the_stitched_tokens_against_the_teachers(backbone, reward, gen):
    """The fit's first loss, recomputed through another path: the model's full tokens entering block j (class token
    and position embeddings included, then taken off) against the teacher's tokens on the decoded clean latents, for
    the batch the fit draws from its seed."""
    z0 = latents(backbone, 10, gen)
    prompts = [f"p{k % 3}" for k in range(10)]
    model = perturbed(wide_model(backbone, reward, "prompt"), seed=3)
    before = copy.deepcopy(model)
    targets = entry_tokens(backbone, reward, z0, model.j, batch_size=4, progress=False)
    assert targets.shape == (10, reward.grid[0] * reward.grid[1], reward.width)
    cfg = FitConfig(steps=1, batch_size=6)
    (row,) = fit_stitch(model, z0, targets, cfg, SIGMA, seed=11, prompts=prompts, progress=False)

    g = torch.Generator().manual_seed(11)  # the fit's draws, in its order
    idx = torch.randint(10, (6,), generator=g)
    t = logit_normal(6, *SIGMA, g)
    z_t = forward_noise(z0[idx], t, torch.randn((6, *z0.shape[1:]), generator=g))
    with torch.no_grad():
        student = before.stitch_tokens(z_t, t, [prompts[k] for k in idx.tolist()]) - before.position_embedding
        pos = reward.clip.vision_model.embeddings.position_embedding.weight  # the teacher's (perturbed moved ours)
        teacher = reward.tokens_entering(backbone.decode(z0[idx]), model.j) - pos
    expected = (student[:, 1:] - teacher[:, 1:]).pow(2).mean().item()
    assert row["fit"] == pytest.approx(expected, rel=1e-5)
    assert row["fit_error"] == pytest.approx(expected / token_variance(targets), rel=1e-6)


def test_the_fit_lowers_the_error_trains_only_the_stitch_and_repeats(backbone, reward, gen):
    z0 = latents(backbone, 16, gen)
    model = wide_model(backbone, reward)
    start = copy.deepcopy(model)
    targets = entry_tokens(backbone, reward, z0, model.j, batch_size=8, progress=False)
    cfg = FitConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=2)
    history = fit_stitch(model, z0, targets, cfg, SIGMA, seed=0, progress=False)
    assert [r["step"] for r in history] == list(range(1, 41))
    first, last = (sum(r["fit_error"] for r in rows) / 5 for rows in (history[:5], history[-5:]))
    assert last < 0.8 * first
    trained, kept = model.trainable_state_dict(), start.trainable_state_dict()
    assert any(k.startswith("tail.") for k in trained)
    for name in trained:  # the tail, class token and position embeddings as they were; F and both of G's convs moved
        assert torch.equal(trained[name], kept[name]) != name.startswith("stitch."), name

    again = copy.deepcopy(start)
    fit_stitch(again, z0, targets, cfg, SIGMA, seed=0, progress=False)
    fitted = model.stitch.state_dict()
    assert all(torch.equal(v, fitted[k]) for k, v in again.stitch.state_dict().items())


def test_mismatched_inputs_are_refused(backbone, reward, gen):
    z0 = latents(backbone, 4, gen)
    model = wide_model(backbone, reward, "prompt")
    targets = entry_tokens(backbone, reward, z0, model.j, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="4 clean latents but 3 token targets"):
        fit_stitch(model, z0, targets[:3], FitConfig(steps=1), SIGMA, seed=0, prompts=["a"] * 4, progress=False)
    with pytest.raises(ValueError, match="needs one prompt per clean latent: got 0 for 4"):
        fit_stitch(model, z0, targets, FitConfig(steps=1), SIGMA, seed=0, progress=False)


def test_g_shape_is_saved_and_loaded(tmp_path, backbone, reward, gen):
    model = perturbed(wide_model(backbone, reward), seed=1)
    model.save_pretrained(tmp_path / "vm")
    assert json.loads((tmp_path / "vm" / "config.json").read_text())["residual"] == {"width": 12, "kernel": 3}
    loaded = StitchedValueModel.from_pretrained(tmp_path / "vm", backbone=backbone, reward=reward).eval()
    z, t = latents(backbone, 3, gen), torch.tensor([0.2, 0.5, 0.8])
    prompts = ["a red circle"] * 3
    with torch.no_grad():
        assert torch.equal(loaded(z, t, prompts), model(z, t, prompts))


def test_a_model_saved_before_g_was_configurable_loads_methods_g(tmp_path, backbone, reward):
    StitchedValueModel(backbone, reward, 2, 1).save_pretrained(tmp_path / "vm")
    cfg = json.loads((tmp_path / "vm" / "config.json").read_text())
    del cfg["residual"]
    (tmp_path / "vm" / "config.json").write_text(json.dumps(cfg))
    loaded = StitchedValueModel.from_pretrained(tmp_path / "vm", backbone=backbone, reward=reward)
    assert (loaded.stitch.residual_width, loaded.stitch.residual_kernel) == (max(reward.width // 8, 1), 1)


def test_g_with_an_even_kernel_is_refused(backbone, reward):
    with pytest.raises(ValueError, match="odd integer"):
        StitchedValueModel(backbone, reward, 2, 1, residual_kernel=2)
