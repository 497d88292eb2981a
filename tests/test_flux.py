"""The FLUX.1 backbone (tiny:flux): the family adapter against diffusers' own FluxPipeline / transformer forward, the
guidance-distilled DPS sharing, a local-folder round trip, every pipeline stage end to end, and the real sizes on meta."""
import dataclasses

import pytest
import torch
from diffusers import FluxPipeline

from stitchvm.config import ModelSpec
from stitchvm.diffusion.sampling import cfg_velocity, encode_conditioning, sample
from stitchvm.guidance.dps import stitchvm_value_and_grad
from stitchvm.guidance.shared_branch import shared_branch
from stitchvm.models.backbone import build_backbone, pack_latents, unpack_latents
from stitchvm.value.model import StitchedValueModel

from conftest import latents, perturbed

PROMPTS = ["a red square", "a blue circle"]
W = 3.5  # FLUX.1-dev's default embedded guidance


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def flux():
    return build_backbone(ModelSpec("tiny:flux"))


def test_packing_is_the_pipelines_and_round_trips(flux, gen):
    z = latents(flux, 2, gen)  # (2, 4, 16, 16)
    packed = pack_latents(z)
    assert packed.shape == (2, 64, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 4, 16, 16))
    assert torch.equal(unpack_latents(packed, (16, 16)), z)
    assert flux.depth == 4 and flux.patch_size == 2 and flux.family.distilled  # 2 double + 2 single blocks


def test_sampler_equals_the_flux_pipeline(flux):
    """sample() on the family adapter = FluxPipeline's own loop (its σ grid with dynamic shift, packing, guidance)."""
    z = sample(flux, PROMPTS, 3, W, torch.Generator().manual_seed(0))
    pipe = flux.pipeline
    pipe.set_progress_bar_config(disable=True)
    size = flux.image_size
    ref = pipe(prompt=PROMPTS, num_inference_steps=3, guidance_scale=W, generator=torch.Generator().manual_seed(0),
               height=size, width=size, max_sequence_length=flux.t5_tokens, output_type="latent").images
    ref = unpack_latents(ref, tuple(z.shape[-2:]))
    # the pipeline feeds the transformer (1000 σ) / 1000, we feed σ: a rounding apart
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(z, sample(flux, PROMPTS, 3, 1.0, torch.Generator().manual_seed(0)), atol=1e-3)


def test_head_blocks_are_the_transformers_own(flux, reward, gen):
    """u_{≤i} over double- then single-stream blocks is the transformer's state after block i: hooks on the real
    forward see the head's tokens, and finishing the head's stream gives the transformer's velocity."""
    z, t = latents(flux, 2, gen), torch.tensor([0.3, 0.8])
    cond = encode_conditioning(flux, PROMPTS, W)
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(out[1])) for b in flux.blocks]
    try:
        v = flux.velocity(z, t, *cond.cond, guidance=W)
    finally:
        for h in hooks:
            h.remove()
    model = StitchedValueModel(flux, reward, flux.depth, 1, context="prompt")
    mine = model.head(z, t, PROMPTS, all_blocks=True)
    assert len(mine) == len(seen) == 4
    for a, b in zip(mine, seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tokens, v_shared = shared_branch(model, flux, z, t, cond)  # i = L: nothing left but the output layer
    torch.testing.assert_close(v_shared, v, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, mine[-1])


@pytest.mark.parametrize("context", ["prompt", "empty"])
def test_dps_on_a_distilled_backbone(flux, reward, gen, context):
    """No CFG pair: the step's velocity is one pass at the embedded scale; a prompt head shares it (i = 2, a
    double-stream block, and i = 3, the first single-stream one), an empty head runs its blocks on the side. Either
    way the gradient is the value model's own autograd gradient and the velocity the sampler's."""
    z, t = latents(flux, 2, gen), torch.tensor([0.6, 0.6])
    cond = encode_conditioning(flux, PROMPTS, W)
    v_ref = cfg_velocity(flux, z, t, cond.cond, cond.uncond, W)
    torch.testing.assert_close(v_ref, flux.velocity(z, t, *cond.cond, guidance=W))
    assert not torch.allclose(v_ref, cfg_velocity(flux, z, t, cond.cond, cond.uncond, 1.0), atol=1e-4)
    for i in (2, 3):
        model = perturbed(StitchedValueModel(flux, reward, i, 2, context=context))
        out = stitchvm_value_and_grad(model, flux, z, t, cond)
        torch.testing.assert_close(out.velocity, v_ref, rtol=1e-5, atol=1e-5)
        z_in = z.clone().requires_grad_(True)
        value = model(z_in, t, PROMPTS)  # the head's default guidance is W, the sampler's
        (grad,) = torch.autograd.grad(value.sum(), z_in)
        torch.testing.assert_close(out.value, value.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.grad, grad, rtol=1e-4, atol=1e-7)
        assert grad.abs().sum() > 0


def test_local_folder_round_trip(flux, gen, tmp_path):
    """A FLUX folder in the diffusers layout (as FluxPipeline.save_pretrained writes it) loads through the factory."""
    flux.pipeline.save_pretrained(tmp_path / "flux")
    loaded = build_backbone(ModelSpec(str(tmp_path / "flux")))
    assert type(loaded.family) is type(flux.family) and loaded.depth == flux.depth
    loaded = dataclasses.replace(loaded, t5_tokens=flux.t5_tokens, sample_size=flux.sample_size)  # tiny, not dev
    z, t = latents(flux, 1, gen), torch.tensor([0.5])
    a, b = (bb.velocity(z, t, *bb.encode_prompts(PROMPTS[:1])) for bb in (flux, loaded))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reward_source", ["tiny:clip", "tiny:open_clip"])
def test_every_stage_runs_on_tiny_flux(tmp_path, reward_source):
    """search → train → evaluate on stored data, then the guidance stage (DPS-Tweedie/StitchVM, FK) and one NFT +
    StitchVM update, all on tiny:flux offline, with an HF CLIP and with an open_clip reward (converted)."""
    from test_stages import run_all, small_params
    from stitchvm.stages import stage
    from stitchvm.stages.runtime import Paths

    params = small_params(
        str(tmp_path / "data"), backbone={"source": "tiny:flux"}, reward={"source": reward_source, "kind": "clip"},
        guidance={"methods": ["unguided", "dps-tweedie", "dps-stitchvm", "fk-stitchvm"], "steps": 2, "prompts": 1,
                  "per_prompt": 2, "batch_size": 2, "particles": 2, "proposals": 2, "resample_every": 1,
                  "window": [0.0, 1.0], "guidance_scale": W},
        align={"method": "nft-stitchvm", "updates": 1, "prompts_per_update": 1, "group_size": 2, "steps": 3,
               "lora_rank": 2, "lora_alpha": 4.0, "batch_size": 8, "nft": {"train_times": 1, "lr": 1e-2},
               "eval_prompts": 1, "eval_seeds": [0], "guidance_scale": W})
    out = run_all(params, tmp_path)
    assert out["search"]["pair"]["i"] in range(1, 5) and len(out["search"]["table"]) == 4 * 2
    assert out["train"]["steps"] == 6 and all(r["spearman"] == r["spearman"] for r in out["evaluate"]["eval"])
    paths = Paths.from_params(params, reports=tmp_path / "reports", checkpoints=tmp_path / "ckpt", track=False)
    guided = stage("guidance").run(params, paths, progress=False)
    assert [r["method"] for r in guided["rows"]] == ["unguided", "dps-tweedie", "dps-stitchvm", "fk-stitchvm"]
    aligned = stage("align").run(params, paths, progress=False)
    assert aligned["method"] == "nft-stitchvm" and aligned["updates"] == 1
    assert aligned["reward_after"] != aligned["reward_before"]  # the update moved the adapter


@pytest.mark.parametrize("method", ["nft", "draft-stitchvm"])
def test_alignment_trainers_on_tiny_flux(flux, reward, gen, method):
    """LoRA on every FLUX attention (double- and single-stream blocks), a fresh adapter an exact no-op, and one NFT /
    DRaFT + StitchVM update that moves it (rollouts at the embedded guidance, one pass per step)."""
    from stitchvm.alignment.draft import train_draft
    from stitchvm.alignment.nft import NFT_ADAPTERS, train_nft
    from stitchvm.models.lora import TRAINED, LoraPolicy
    from test_align import cfg

    policy = LoraPolicy(flux, 2, 4, adapters=NFT_ADAPTERS if method == "nft" else (TRAINED,))
    wrapped = {name.split(".")[0] for name in policy.lora_tensors(TRAINED)}
    assert {"transformer_blocks", "single_transformer_blocks"} <= wrapped
    z, t = latents(flux, 1, gen), torch.tensor([0.5])
    cond = flux.encode_prompts(PROMPTS[:1])
    assert torch.equal(policy.backbone.velocity(z, t, *cond), flux.velocity(z, t, *cond))
    value_model = perturbed(StitchedValueModel(flux, reward, 2, 2, context="prompt"))
    run = train_nft if method == "nft" else train_draft
    history = run(policy, reward, PROMPTS, cfg(method, guidance_scale=W), seed=2, value_model=value_model)
    lora_b = torch.cat([v.flatten() for k, v in policy.lora_tensors(TRAINED).items() if k.endswith("lora_B")])
    assert lora_b.abs().max() > 0 and history[-1]["step"] == 1



def test_pyfunc_latent_checks_on_a_flux_head(flux, reward):
    """The MLflow signature's latent facts come from the head (FLUX: 4 channels, RoPE: any even size)."""
    from stitchvm.stages.tracking import check_latent_grid, model_latent_shape, native_latent_grid

    model = StitchedValueModel(flux, reward, 2, 2)
    assert model_latent_shape(model) == (4, -1, -1) and native_latent_grid(model) == (16, 16)
    check_latent_grid(model, (2, 4, 24, 40))
    with pytest.raises(ValueError, match="divisible by 2"):
        check_latent_grid(model, (2, 4, 15, 16))
    with pytest.raises(ValueError, match="must have 4 channels"):
        check_latent_grid(model, (2, 16, 16, 16))


# ---- counting (meta device) ------------------------------------------------------------------------------------
def test_count_rows_show_the_distilled_sharing():
    """tiny:flux on meta: the unguided step is one transformer pass (no CFG pair), and an empty-prompt head costs
    exactly its own forward (embeddings + i blocks) more than the prompt head that shares the sampler's pass."""
    from stitchvm.benchmarks.counting import FlopCounter, FusedAttention, backbone_ratios, count_backbone
    from stitchvm.config import GuidanceConfig, RewardSpec
    from stitchvm.models.reward import build_reward

    cfg = GuidanceConfig(value_i=3, value_j=2, guidance_scale=W)
    rows = count_backbone(ModelSpec("tiny:flux"), RewardSpec("tiny:clip"), cfg, resolution=64, progress=False)
    by = {(r["method"], r["head"]): r for r in rows}
    assert set(by) == {("unguided", None), ("dps-tweedie", None), ("dps-stitchvm", "prompt"),
                       ("dps-stitchvm", "empty")}
    bb, rw = build_backbone(ModelSpec("tiny:flux"), "meta"), build_reward(RewardSpec("tiny:clip"), "meta")
    z, t = torch.zeros(1, 4, 32, 32, device="meta"), torch.full((1,), 0.5, device="meta")
    cond = encode_conditioning(bb, ["a photograph of an astronaut riding a horse"], W)
    head = StitchedValueModel(bb, rw, 3, 2, master_dtype=rw.dtype).head
    with torch.no_grad(), FusedAttention():
        with FlopCounter() as one_pass:
            bb.velocity(z, t, *cond.cond, guidance=W)
        with FlopCounter() as head_forward:
            head(z, t)
    tflops = {k: r["tflops_per_step"] * 1e12 for k, r in by.items()}
    assert tflops[("unguided", None)] == pytest.approx(one_pass.get_total_flops(), rel=1e-9)
    extra = tflops[("dps-stitchvm", "empty")] - tflops[("dps-stitchvm", "prompt")]
    assert extra == pytest.approx(head_forward.get_total_flops(), rel=1e-6)
    r = backbone_ratios(rows)["tiny:flux"]
    assert r["empty_head_over_shared_head_flops"] > 1 and r["tweedie_over_stitchvm_flops"] > 1


def test_real_sizes_build_on_meta():
    """arch:flux.1-dev and arch:sd3.5-large at their published sizes (parameter counts of the public checkpoints)."""
    flux = build_backbone(ModelSpec("arch:flux.1-dev"), "meta")
    params = sum(p.numel() for p in flux.transformer.parameters())
    assert flux.depth == 19 + 38 and flux.width == 3072 and flux.image_size == 1024 and flux.t5_tokens == 512
    assert 11.8e9 < params < 12.0e9  # FLUX.1-dev: 11.9B
    assert 4.7e9 < sum(p.numel() for p in flux.text_encoder_2.parameters()) < 4.8e9  # T5-v1.1-XXL encoder
    large = build_backbone(ModelSpec("arch:sd3.5-large"), "meta")
    assert large.depth == 38 and large.width == 38 * 64 and large.image_size == 1024
    assert 8.0e9 < sum(p.numel() for p in large.transformer.parameters()) < 8.2e9  # SD3.5-Large: 8.1B
