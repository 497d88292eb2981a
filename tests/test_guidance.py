import copy

import pytest
import torch

from stitchvm.models.backbone import build_backbone
from stitchvm.config import ModelSpec
from stitchvm.diffusion.flow import tweedie_z0
from stitchvm.guidance.dps import (dps_stitchvm, dps_tweedie, power, stitchvm_value_and_grad, tweedie_value_and_grad,
                                   window)
from stitchvm.guidance.shared_branch import shared_branch
from stitchvm.diffusion.sampling import (cfg_velocity, encode_conditioning, euler_step, initial_latents, sample, sde_step, timesteps)
from stitchvm.value.model import StitchedValueModel

from conftest import latents, perturbed

PROMPTS = ["a red square", "a blue circle"]
CFG = 4.5


@pytest.fixture(scope="module")
def value_model(backbone, reward):
    return perturbed(StitchedValueModel(backbone, reward, 3, 2), seed=0)


def seed(k=0):
    return torch.Generator().manual_seed(k)


# ---- schedule and steps ----------------------------------------------------------------------------------------
def test_timesteps_are_the_schedulers_sigmas(backbone):
    sigmas = timesteps(backbone, 5)
    ref = copy.deepcopy(backbone.scheduler)
    ref.set_timesteps(5)
    assert sigmas.shape == (6,) and torch.equal(sigmas, ref.sigmas)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    shifted = 3 * 0.5 / (1 + 2 * 0.5)  # shift 3 moves σ = 0.5 up
    assert timesteps(backbone, 3)[1].item() == pytest.approx(shifted, rel=1e-2)  # linspace(1, σ_min, 3)[1] ≈ 0.5


def test_sampler_equals_the_diffusers_pipeline(backbone):
    z = sample(backbone, PROMPTS, 3, CFG, seed())
    pipe = backbone.pipeline
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPTS, num_inference_steps=3, guidance_scale=CFG, generator=seed(),
               output_type="latent").images
    assert torch.equal(z, ref)


def test_sde_with_eta_zero_is_euler(backbone, gen):
    z, v = latents(backbone, 2, gen), latents(backbone, 2, gen)
    g, s, s_next = seed(5), torch.tensor(0.8), torch.tensor(0.6)
    assert torch.equal(sde_step(z, v, s, s_next, 0.0, g), euler_step(z, v, s, s_next))
    assert torch.allclose(euler_step(z, v, s, s_next), z - 0.2 * v, rtol=0, atol=1e-6)
    assert torch.equal(g.get_state(), seed(5).get_state())  # η = 0 draws no noise
    euler = sample(backbone, PROMPTS, 3, CFG, seed(1))
    assert torch.equal(sample(backbone, PROMPTS, 3, CFG, seed(1), eta=0.0), euler)
    assert not torch.equal(sample(backbone, PROMPTS, 3, CFG, seed(1), eta=0.7), euler)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_sde_step_keeps_the_forward_marginals(eta):
    # with the exact velocity of a point mass z0, z_σ = (1-σ) z0 + σ ε must map to (1-σ') z0 + σ' ε'
    g = seed(3)
    s, s_next, n = 0.7, 0.4, 400_000
    z0, eps = torch.full((n,), 0.5, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    z = (1 - s) * z0 + s * eps
    out = sde_step(z, eps - z0, s, s_next, eta, g)
    assert out.mean().item() == pytest.approx((1 - s_next) * 0.5, abs=3e-3)
    assert out.std().item() == pytest.approx(s_next, rel=5e-3)


# ---- guidance --------------------------------------------------------------------------------------------------
def test_scale_zero_is_unguided_exactly(backbone, reward, value_model):
    unguided = sample(backbone, PROMPTS, 3, CFG, seed(2), eta=0.5)
    for guidance in (dps_tweedie(reward, 0.0), dps_stitchvm(value_model, 0.0),
                     dps_stitchvm(value_model, 3.0, schedule=window(0.0, 0.0)),  # σ > 0 at every step
                     dps_tweedie(reward, 0.3, schedule=lambda s: 0.0)):
        assert torch.equal(sample(backbone, PROMPTS, 3, CFG, seed(2), guidance=guidance, eta=0.5), unguided)


@pytest.fixture(scope="module")
def prompt_value_model(backbone, reward):
    """The value model on the prompt (conditional) branch, its trainable parts perturbed like `value_model`'s."""
    return perturbed(StitchedValueModel(backbone, reward, 3, 2, context="prompt"), seed=1)


@pytest.mark.parametrize("i", [3, 6])
def test_shared_branch_velocity_is_the_transformers(backbone, reward, value_model, gen, i):
    model = value_model if i == 3 else StitchedValueModel(backbone, reward, i, 2)
    z, t = latents(backbone, 2, gen), torch.tensor([0.9, 0.35])
    tokens, v_u = shared_branch(model, backbone, z, t, encode_conditioning(backbone, PROMPTS, CFG))
    null_embeds, null_pooled = backbone.encode_prompts(["", ""])
    with torch.no_grad():
        assert torch.allclose(v_u, backbone.velocity(z, t, null_embeds, null_pooled), rtol=0, atol=1e-5)
        assert torch.allclose(tokens, model.head(z, t), rtol=0, atol=1e-6)


def test_a_prompt_head_shares_the_conditional_branch(backbone, prompt_value_model, gen):
    z, t = latents(backbone, 2, gen), torch.tensor([0.9, 0.35])
    cond = encode_conditioning(backbone, PROMPTS, CFG)
    tokens, v_c = shared_branch(prompt_value_model, backbone, z, t, cond)
    with torch.no_grad():
        assert torch.allclose(v_c, backbone.velocity(z, t, *cond.cond), rtol=0, atol=1e-5)
        assert torch.allclose(tokens, prompt_value_model.head(z, t, PROMPTS), rtol=0, atol=1e-5)
        other = prompt_value_model.head(z, t, PROMPTS[::-1])  # the head really reads the prompt
        assert (other - tokens).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [CFG, 1.0, 0.0])
@pytest.mark.parametrize("context", ["empty", "prompt"])
def test_stitchvm_gradient_through_shared_cfg_equals_standalone(backbone, value_model, prompt_value_model, gen, cfg,
                                                                context):
    model = value_model if context == "empty" else prompt_value_model
    z, t = latents(backbone, 2, gen), torch.tensor([0.8, 0.45])
    cond = encode_conditioning(backbone, PROMPTS, cfg)
    out = stitchvm_value_and_grad(model, backbone, z, t, cond)
    zr = z.clone().requires_grad_(True)
    value = model(zr, t, PROMPTS)
    (grad,) = torch.autograd.grad(value.sum(), zr)
    assert grad.abs().sum() > 0
    assert torch.allclose(out.value, value.detach(), rtol=0, atol=1e-5)
    assert torch.allclose(out.grad, grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(out.velocity, cfg_velocity(backbone, z, t, cond.cond, cond.uncond, cfg),
                              rtol=0, atol=1e-4)


def test_tweedie_gradient_matches_finite_differences(backbone, reward, gen):
    bb = copy.copy(backbone)
    bb.transformer, bb.vae = copy.deepcopy(backbone.transformer).double(), copy.deepcopy(backbone.vae).double()
    rw = copy.deepcopy(reward).double()
    rw._text_cache.clear()  # cached text embeddings were float32
    c32 = encode_conditioning(backbone, PROMPTS, CFG)
    cond = type(c32)(c32.prompts, tuple(x.double() for x in c32.cond), tuple(x.double() for x in c32.uncond), CFG)
    z, t = latents(backbone, 2, gen).double(), torch.tensor([0.7, 0.4], dtype=torch.float64)
    out = tweedie_value_and_grad(bb, rw, z, t, cond)
    text = rw.text_embeds(PROMPTS)

    def value(x):
        with torch.no_grad():
            v = cfg_velocity(bb, x, t, cond.cond, cond.uncond, CFG)
            return rw.score(rw.image_features(bb.decode(tweedie_z0(x, t, v)))[0], text).sum()

    assert out.grad.abs().sum() > 0 and out.value.sum().item() == pytest.approx(value(z).item(), rel=1e-10)
    h = 1e-2  # 4th-order stencil; diffusers norms compute in float32 internally, so no smaller step
    for _ in range(2):
        d = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        fd = (-value(z + 2 * h * d) + 8 * value(z + h * d) - 8 * value(z - h * d) + value(z - 2 * h * d)) / (12 * h)
        assert (out.grad * d).sum().item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("method", ["tweedie", "stitchvm"])
def test_guided_step_climbs_the_value(backbone, reward, value_model, method):
    # one step σ = 1 -> 0: z' = z - u, so guided - unguided = c · ∇V(z)
    c = 0.05 if method == "tweedie" else 0.5
    z = initial_latents(backbone, 2, seed(4))
    t, cond = torch.ones(2), encode_conditioning(backbone, PROMPTS, CFG)
    if method == "tweedie":
        guidance, grad = dps_tweedie(reward, c), tweedie_value_and_grad(backbone, reward, z, t, cond).grad
    else:
        guidance, grad = dps_stitchvm(value_model, c), stitchvm_value_and_grad(value_model, backbone, z, t, cond).grad
    unguided = sample(backbone, PROMPTS, 1, CFG, None, latents=z)
    guided = sample(backbone, PROMPTS, 1, CFG, None, guidance=guidance, latents=z)
    assert (c * grad).abs().max() > 1e-3
    assert torch.allclose(guided - unguided, c * grad, rtol=0, atol=2e-5)


def test_schedules_scale_the_correction(backbone, value_model):
    z, cond = initial_latents(backbone, 2, seed(6)), encode_conditioning(backbone, PROMPTS, CFG)
    t = torch.full((2,), 0.5)
    full = dps_stitchvm(value_model, 2.0)(backbone, z, t, cond, 0)
    half = dps_stitchvm(value_model, 2.0, schedule=power(1.0))(backbone, z, t, cond, 0)
    assert torch.equal(full.velocity, half.velocity)
    assert torch.allclose(half.correction, 0.5 * full.correction, rtol=1e-6, atol=0)
    assert dps_stitchvm(value_model, 2.0, schedule=window(0.6, 1.0))(backbone, z, t, cond, 0).correction is None


@pytest.mark.parametrize("method", [None, "tweedie", "stitchvm"])
def test_every_method_is_deterministic_under_its_generator(backbone, reward, value_model, method):
    guidance = {None: None, "tweedie": dps_tweedie(reward, 0.1), "stitchvm": dps_stitchvm(value_model, 1.0)}[method]
    run = lambda k: sample(backbone, PROMPTS, 2, CFG, seed(k), guidance=guidance, eta=0.6)
    a = run(7)
    assert torch.equal(a, run(7))
    assert not torch.equal(a, run(8))


# ---- validation ------------------------------------------------------------------------------------------------
def test_bad_arguments_fail_with_messages(backbone, reward, value_model):
    g = seed()
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        sample(backbone, PROMPTS, 0, CFG, g)
    with pytest.raises(ValueError, match="steps must be an integer"):
        timesteps(backbone, 2.5)
    with pytest.raises(ValueError, match="prompts is empty"):
        sample(backbone, [], 2, CFG, g)
    with pytest.raises(ValueError, match="single string"):
        sample(backbone, "a cat", 2, CFG, g)
    with pytest.raises(ValueError, match=r"guidance_scale \(classifier-free guidance\) must be .* >= 0, got -1"):
        sample(backbone, PROMPTS, 2, -1, g)
    with pytest.raises(ValueError, match="eta must lie in"):
        sample(backbone, PROMPTS, 2, CFG, g, eta=1.5)
    with pytest.raises(ValueError, match="eta .* >= 0"):
        sample(backbone, PROMPTS, 2, CFG, g, eta=-0.1)
    with pytest.raises(ValueError, match="latents hold 3 samples for 2 prompts"):
        sample(backbone, PROMPTS, 2, CFG, g, latents=initial_latents(backbone, 3, g))
    with pytest.raises(ValueError, match="DPS-Tweedie guidance scale must be .* >= 0, got -0.1"):
        dps_tweedie(reward, -0.1)
    with pytest.raises(ValueError, match="DPS-StitchVM guidance scale must be .* >= 0"):
        dps_stitchvm(value_model, float("nan"))
    with pytest.raises(ValueError, match="schedule's value at t="):
        sample(backbone, PROMPTS, 1, CFG, g, guidance=dps_stitchvm(value_model, 1.0, schedule=lambda s: -1.0))
    with pytest.raises(ValueError, match="window needs"):
        window(0.7, 0.2)
    other = build_backbone(ModelSpec("tiny:sd3", seed=1))
    with pytest.raises(ValueError, match="value model was built on backbone"):
        sample(other, PROMPTS, 1, CFG, g, guidance=dps_stitchvm(value_model, 1.0))


@pytest.mark.parametrize("method", [None, "tweedie", "stitchvm"])
def test_guided_steps_waste_no_passes(backbone, reward, value_model, method):
    # per step every transformer block sees the 2B samples of CFG exactly once, guided or not: DPS-Tweedie
    # differentiates its one CFG forward, DPS-StitchVM shares blocks 1..i of the unconditional branch
    guidance = {None: None, "tweedie": dps_tweedie(reward, 0.1), "stitchvm": dps_stitchvm(value_model, 1.0)}[method]
    seen, decoded = [0] * backbone.depth, []

    def counter(k):
        def hook(module, args, kwargs):
            seen[k] += (args[0] if args else kwargs["hidden_states"]).shape[0]
        return hook

    handles = [b.register_forward_pre_hook(counter(k), with_kwargs=True)
               for k, b in enumerate(backbone.transformer.transformer_blocks)]
    handles.append(backbone.vae.decoder.register_forward_pre_hook(lambda m, args: decoded.append(args[0].shape[0])))
    try:
        sample(backbone, PROMPTS, 2, CFG, seed())
        assert seen == [2 * 2 * len(PROMPTS)] * backbone.depth and decoded == []
        seen[:] = [0] * backbone.depth
        sample(backbone, PROMPTS, 2, CFG, seed(), guidance=guidance)
    finally:
        for h in handles:
            h.remove()
    assert seen == [2 * 2 * len(PROMPTS)] * backbone.depth  # 2 steps × (uncond + cond) × B
    assert decoded == ([len(PROMPTS)] * 2 if method == "tweedie" else [])


def test_aesthetic_rewards_need_no_prompts(backbone, aesthetic, gen):
    model = StitchedValueModel(backbone, aesthetic, 3, 2)
    z, t = latents(backbone, 2, gen), torch.tensor([0.6, 0.3])
    cond = encode_conditioning(backbone, PROMPTS, CFG)
    out = stitchvm_value_and_grad(model, backbone, z, t, cond)
    zr = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(zr, t).sum(), zr)
    assert torch.allclose(out.grad, grad, rtol=1e-4, atol=1e-7)
    tw = tweedie_value_and_grad(backbone, aesthetic, z, t, cond)
    assert tw.value.shape == (2,) and tw.grad.abs().sum() > 0
    # against the composition written out: V(z) = a(D(ẑ0(z, v_cfg(z)))) with the aesthetic head on image features
    zr = z.clone().requires_grad_(True)
    v = cfg_velocity(backbone, zr, t, cond.cond, cond.uncond, CFG)
    direct = aesthetic.score(aesthetic.image_features(backbone.decode(tweedie_z0(zr, t, v)))[0])
    (direct_grad,) = torch.autograd.grad(direct.sum(), zr)
    assert torch.allclose(tw.value, direct.detach(), rtol=0, atol=1e-5)
    assert torch.allclose(tw.velocity, v.detach(), rtol=0, atol=1e-5)
    assert torch.allclose(tw.grad, direct_grad, rtol=1e-4, atol=1e-7)
