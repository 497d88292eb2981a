"""The world's VAE, flow backbone, aesthetic head and evaluation: reduced trainings learn, are deterministic under a
seed, and save/load through the project's factories (each test a few seconds on one core)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import CLIPModel

from stitchvm.models.backbone import build_backbone, fan_in_init_
from stitchvm.config import ModelSpec, RewardSpec
from stitchvm.models.reward import AestheticHead, build_reward
from stitchvm.world import scenes
from stitchvm.world.aesthetic import image_property, save_head, train_aesthetic
from stitchvm.world.autoencoder import set_latent_statistics, train_vae, world_vae_config
from stitchvm.world.clip_training import save_clip, world_clip_config
from stitchvm.world.evaluation import pair_win_rates, prompt_pair_win_rate, win_rate
from stitchvm.world.flow_training import (MAX_PROMPT_TOKENS, _PromptCache, collapsed_attention, flow_batch,
                                          save_backbone, train_flow, world_backbone, world_transformer_config)
from stitchvm.world.caption_tokenizer import world_clip_tokenizer

SMALL_VAE = world_vae_config(block_out_channels=(16, 16, 32), norm_num_groups=8)


def small_transformer(text_hidden=64, text_proj=64):
    return world_transformer_config(text_hidden, text_proj, patch_size=2, pos_embed_max_size=4, num_layers=2,
                                    attention_head_dim=16, num_attention_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A world-config CLIP with seeded fan-in init (inputs visibly change its embeddings), saved as a folder."""
    tokenizer = world_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(world_clip_config(tokenizer))
        fan_in_init_(model)
    path = tmp_path_factory.mktemp("world_clip")
    save_clip(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def vae():
    model, _ = train_vae(3, 8, torch.Generator().manual_seed(0), progress=False, config=SMALL_VAE)
    return model


# ---- VAE ---------------------------------------------------------------------------------------------------------
def test_vae_learns_below_the_pixel_variance():
    vae, history = train_vae(100, 16, torch.Generator().manual_seed(0), progress=False, config=SMALL_VAE,
                             lr=3e-3, eval_every=100, n_eval=64)
    pixels = scenes.make_scenes(256, torch.Generator().manual_seed(5))[0]
    variance = pixels.var(dim=(0, 2, 3)).mean().item()  # MSE of the per-channel mean image predictor
    assert history[0]["mse"] > 0.5 * variance
    assert sum(e["mse"] for e in history[-5:]) / 5 < 0.7 * variance
    assert history[-1]["psnr"] > 10 * torch.log10(torch.tensor(4.0 / variance)).item()
    assert {"loss", "mse", "kl", "lr", "seconds"} <= set(history[0])


def test_vae_latent_statistics_standardise_latents(vae):
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    pixels = scenes.make_scenes(512, torch.Generator().manual_seed(9))[0]
    z = (vae.encode(pixels).latent_dist.mean - shift) * scale  # Backbone.encode's convention
    assert abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.25
    assert set_latent_statistics(vae) == (shift, scale)  # the statistics batch is fixed


def test_vae_training_is_deterministic():
    runs = [train_vae(2, 4, torch.Generator().manual_seed(3), progress=False, config=SMALL_VAE, seed=1)
            for _ in range(2)]
    assert [e["loss"] for e in runs[0][1]] == [e["loss"] for e in runs[1][1]]
    for a, b in zip(runs[0][0].state_dict().values(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b)


# ---- flow backbone -------------------------------------------------------------------------------------------------
def test_collapsed_context_matches_the_full_sd3_conditioning(clip_dir, vae):
    backbone = world_backbone(clip_dir, vae, small_transformer())
    prompts = _PromptCache(backbone)
    captions = ["a red circle", "", "two shapes on the left", "three blue triangles in the centre"]
    z_t, t, _, _, _ = flow_batch(backbone, prompts, 4, torch.Generator().manual_seed(0), 0.0)
    embeds, pooled = backbone.encode_prompts(captions)  # (4, 16 + 256, D): CLIP tokens, then zero "T5" tokens
    assert embeds.shape[1] == MAX_PROMPT_TOKENS + 256
    full = backbone.velocity(z_t, t, embeds, pooled)
    short, _ = prompts(captions)  # (4, 17, D)
    with collapsed_attention(backbone.transformer, prompts.multiplicity):
        collapsed = backbone.velocity(z_t, t, short, pooled)
    assert prompts.multiplicity == 256
    torch.testing.assert_close(collapsed, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(backbone.velocity(z_t, t, embeds, pooled), full, atol=0, rtol=0)  # restored


def test_flow_loss_drops(clip_dir, vae):
    _, history = train_flow(clip_dir, vae, 40, 32, torch.Generator().manual_seed(0), progress=False,
                            config=small_transformer(), lr=3e-3, eval_every=40, n_eval=64)
    first = sum(e["loss"] for e in history[:5]) / 5
    last = sum(e["loss"] for e in history[-5:]) / 5
    assert last < 0.75 * first
    assert history[-1]["eval_loss"] < 0.75 * first


def test_flow_training_is_deterministic(clip_dir, vae):
    runs = [train_flow(clip_dir, vae, 2, 8, torch.Generator().manual_seed(1), progress=False,
                       config=small_transformer(), seed=2) for _ in range(2)]
    assert [e["loss"] for e in runs[0][1]] == [e["loss"] for e in runs[1][1]]
    for a, b in zip(runs[0][0].transformer.state_dict().values(), runs[1][0].transformer.state_dict().values()):
        assert torch.equal(a, b)


def test_save_backbone_round_trips_through_build_backbone(clip_dir, vae, tmp_path):
    backbone = world_backbone(clip_dir, vae, small_transformer(), seed=4)
    z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    embeds, pooled = backbone.encode_prompts(["a red circle", ""])
    expected = backbone.velocity(z_t, t, embeds, pooled)
    size = save_backbone(backbone, tmp_path / "fp32", dtype=torch.float32)
    assert size == sum(f.stat().st_size for f in (tmp_path / "fp32").rglob("*.safetensors"))
    loaded = build_backbone(ModelSpec(source=str(tmp_path / "fp32")))
    assert loaded.tokenizer.model_max_length == MAX_PROMPT_TOKENS
    assert loaded.scheduler.config.shift == backbone.scheduler.config.shift
    torch.testing.assert_close(loaded.velocity(z_t, t, *loaded.encode_prompts(["a red circle", ""])), expected,
                               atol=1e-6, rtol=1e-6)
    assert save_backbone(backbone, tmp_path / "fp16") < 0.6 * size  # fp16 by default
    half = build_backbone(ModelSpec(source=str(tmp_path / "fp16")))
    torch.testing.assert_close(half.velocity(z_t, t, *half.encode_prompts(["a red circle", ""])), expected,
                               atol=2e-2, rtol=2e-2)


# ---- aesthetic head ------------------------------------------------------------------------------------------------
def test_image_property_closed_form():
    pixels = torch.zeros(2, 3, 32, 32)  # uniform grey: nothing stands out
    pixels[1, :, 8:16, 8:16] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # a 8×8 patch, [0.5]*3 -> [1, .5, .5]
    expected = torch.tensor([0.0, 64 / 1024 * 0.5])
    torch.testing.assert_close(image_property(pixels), expected)


def test_aesthetic_head_learns_the_property(clip_dir, tmp_path):
    head, history = train_aesthetic(clip_dir, 60, 64, torch.Generator().manual_seed(0), progress=False, lr=1e-3,
                                    eval_every=60, n_eval=400)
    assert history[-1]["spearman"] > 0.3 and history[-1]["r2"] > 0.05
    path = tmp_path / "head.safetensors"
    save_head(head, path)
    reward = build_reward(RewardSpec(source=str(clip_dir), kind="aesthetic", head=str(path)))
    assert isinstance(reward.head, AestheticHead)
    embeds = reward.image_features(scenes.make_scenes(8, torch.Generator().manual_seed(1))[0])[0]
    torch.testing.assert_close(reward.score(embeds), head(embeds))


# ---- win rate ------------------------------------------------------------------------------------------------------
def test_pair_win_rates_closed_form():
    # 3 prompts; samples 0, 1 of prompt 0, sample 2 of prompt 1, sample 3 of prompt 2
    scores = torch.tensor([[3.0, 1.0, 2.0],   # prompt 0 beats 1 and 2
                           [1.0, 2.0, 0.0],   # prompt 0 loses to 1, beats 2
                           [5.0, 4.0, 4.0],   # prompt 1 loses to 0, ties 2 (a tie is a loss)
                           [0.0, 1.0, 2.0]])  # prompt 2 beats 0 and 1
    labels = torch.tensor([0, 0, 1, 2])
    rates = pair_win_rates(scores, labels)
    expected = torch.tensor([[float("nan"), 0.5, 1.0], [0.0, float("nan"), 0.0], [1.0, 1.0, float("nan")]],
                            dtype=torch.float64)
    torch.testing.assert_close(rates, expected, equal_nan=True)
    assert win_rate(rates) == pytest.approx(3.5 / 6)
    assert win_rate(rates, torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)) == 0.5
    assert win_rate(pair_win_rates(torch.eye(4) * 2, torch.arange(4))) == 1.0


def test_prompt_pair_win_rate_runs_on_a_world_backbone(clip_dir, vae):
    backbone = world_backbone(clip_dir, vae, small_transformer())
    reward = build_reward(RewardSpec(source=str(clip_dir)))
    rate = prompt_pair_win_rate(backbone, reward, ["a red circle", "a blue square"], per_prompt=2, steps=2,
                                guidance_scale=2.0, seed=0)
    assert 0.0 <= rate <= 1.0
    with pytest.raises(ValueError, match="two prompts"):
        prompt_pair_win_rate(backbone, reward, ["a red circle"], per_prompt=1, steps=1)
