import pytest
import torch

from stitchvm.diffusion.sampling import cfg_velocity, encode_conditioning, sample, sde_step
from stitchvm.guidance.fk import fk_sample, stitchvm_potential, tweedie_potential
from stitchvm.value.model import StitchedValueModel

from conftest import latents, perturbed

PROMPTS = ["a red square", "a blue circle"]


def brightness(z, t, prompts):
    return z.mean(dim=(1, 2, 3))


def test_one_particle_one_proposal_is_the_base_sampler(backbone):
    for eta in (0.0, 0.7):
        base = sample(backbone, PROMPTS, 3, 2.0, torch.Generator().manual_seed(3), eta=eta)
        fk, values = fk_sample(backbone, PROMPTS, 3, 2.0, torch.Generator().manual_seed(3), brightness,
                               particles=1, proposals=1, eta=eta)
        assert torch.equal(base, fk) and values is None


def clean_brightness(z, prompts):
    return brightness(z, None, prompts)


def test_steering_raises_the_potential_and_is_deterministic(backbone):
    def run(particles, proposals, seed=0):
        return fk_sample(backbone, PROMPTS, 4, 2.0, torch.Generator().manual_seed(seed), brightness,
                         particles=particles, proposals=proposals, proposal_fraction=0.5, resample_every=1,
                         window=(0.0, 1.0), eta=1.0, final=clean_brightness)

    base = torch.stack([brightness(sample(backbone, PROMPTS, 4, 2.0, torch.Generator().manual_seed(s), eta=1.0),
                                   None, None) for s in range(4)]).mean()
    z, v = run(4, 3)
    assert z.shape == (2, 4, 16, 16)
    assert torch.allclose(v, brightness(z, None, None))
    assert v.mean() > base
    z2, v2 = run(4, 3)
    assert torch.equal(z, z2) and torch.equal(v, v2)


def test_value_potentials_run(backbone, reward):
    model = StitchedValueModel(backbone, reward, 2, 1)
    for potential in (stitchvm_potential(model), tweedie_potential(backbone, reward)):
        final = lambda z, prompts: potential(z, torch.zeros(len(z)), prompts)  # noqa: E731
        z, v = fk_sample(backbone, PROMPTS, 2, 2.0, torch.Generator().manual_seed(0), potential, particles=2,
                         proposals=2, resample_every=1, window=(0.0, 1.0), final=final)
        assert z.shape == (2, 4, 16, 16) and torch.isfinite(v).all()
        # the returned scores are the final scorer's of the returned latents, recomputed here
        with torch.no_grad():
            assert torch.allclose(v, final(z, PROMPTS), rtol=1e-4, atol=1e-5)


def test_final_selection_picks_the_best_particle_and_none_keeps_the_first(backbone):
    """Same generator, same particles: the selected output is, per prompt, the max of the final score over the N
    particles, the unselected one is particle 0 of the group; both come from the one particle population."""
    def run(final):
        return fk_sample(backbone, PROMPTS, 3, 2.0, torch.Generator().manual_seed(4), brightness, particles=3,
                         proposals=1, resample_every=1, window=(0.0, 1.0), eta=1.0, final=final)

    calls = []

    def recording(z, prompts):  # sees all N particles of every prompt
        calls.append(z.clone())
        return clean_brightness(z, prompts)

    selected, scores = run(recording)
    plain, none = run(None)
    assert none is None
    particles = calls[0].view(len(PROMPTS), 3, *calls[0].shape[1:])  # (B, N, C, H, W)
    per_particle = particles.mean(dim=(2, 3, 4))  # (B, N)
    assert torch.equal(selected, particles[torch.arange(len(PROMPTS)), per_particle.argmax(1)])
    assert torch.equal(plain, particles[:, 0])
    assert torch.allclose(scores, per_particle.max(1).values)


def perturbed_value_model(backbone, reward, context):
    return perturbed(StitchedValueModel(backbone, reward, 3, 2, context=context), seed=2)


@pytest.mark.parametrize("scale", [2.0, 1.0, 0.0])
@pytest.mark.parametrize("kind", ["stitchvm-prompt", "stitchvm-empty", "tweedie"])
def test_a_look_is_the_potential_and_the_cfg_velocity(backbone, reward, gen, kind, scale):
    """What FK reuses is exact: a look's values are the potential's own, and its velocity at any rows (a resampled
    population repeats and reorders rows) is the CFG velocity computed afresh at those latents."""
    potential = (tweedie_potential(backbone, reward) if kind == "tweedie"
                 else stitchvm_potential(perturbed_value_model(backbone, reward, kind.split("-")[1])))
    prompts = PROMPTS + PROMPTS[::-1]
    z, t = latents(backbone, 4, gen), torch.tensor([0.9, 0.6, 0.35, 0.6])
    cond = encode_conditioning(backbone, prompts, scale)
    with torch.no_grad():
        look = potential.look(backbone, z, t, cond)
        torch.testing.assert_close(look.values, potential(z, t, prompts), rtol=1e-5, atol=1e-5)
        rows = torch.tensor([2, 2, 0, 3])
        fresh = cfg_velocity(backbone, z[rows], t[rows], (cond.cond[0][rows], cond.cond[1][rows]),
                             (cond.uncond[0][rows], cond.uncond[1][rows]), scale)
        torch.testing.assert_close(look.velocity(rows), fresh, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["stitchvm-prompt", "stitchvm-empty", "tweedie"])
def test_shared_passes_steer_as_the_plain_potential(backbone, reward, kind):
    """FK with a potential that shares its passes with the step's velocity follows the same particles (proposals,
    resampling, final selection) as FK with the same potential as a plain callable, which shares nothing."""
    potential = (tweedie_potential(backbone, reward) if kind == "tweedie"
                 else stitchvm_potential(perturbed_value_model(backbone, reward, kind.split("-")[1])))

    def run(pot):
        return fk_sample(backbone, PROMPTS, 4, 2.0, torch.Generator().manual_seed(5), pot, particles=3, proposals=2,
                         proposal_fraction=0.5, resample_every=1, window=(0.0, 1.0), eta=1.0, final=clean_brightness)

    shared, scores = run(potential)
    plain, plain_scores = run(lambda z, t, prompts: potential(z, t, prompts))
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, plain_scores, rtol=1e-4, atol=1e-4)


def reference_fk(backbone, prompts, steps, scale, generator, potential, particles, proposals, proposal_fraction,
                 eta):
    """FK steering as written before its passes were shared: the CFG velocity computed afresh every step, the potential
    called at every proposal and step, resampling at every step (window (0, 1)); no final selection."""
    from stitchvm.diffusion.sampling import initial_latents, timesteps

    expanded = [p for p in prompts for _ in range(particles)]
    cond, n = encode_conditioning(backbone, expanded, scale), len(expanded)
    z = initial_latents(backbone, n, generator)
    sigmas = timesteps(backbone, steps, (z.shape[-2] // backbone.patch_size) * (z.shape[-1] // backbone.patch_size))
    v = potential(z, sigmas[0].expand(n), expanded)
    log_w = torch.zeros(n, dtype=torch.float64)
    for k in range(steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        t_next = s_next.expand(n)
        u = cfg_velocity(backbone, z, s.expand(n), cond.cond, cond.uncond, cond.scale)
        if k < proposal_fraction * steps:
            cands = torch.stack([sde_step(z, u, s, s_next, eta, generator) for _ in range(proposals)])
            values = torch.stack([potential(c, t_next, expanded) for c in cands])
            best = values.argmax(0)
            z, v_next = cands[best, torch.arange(n)], values[best, torch.arange(n)]
        else:
            z = sde_step(z, u, s, s_next, eta, generator)
            v_next = potential(z, t_next, expanded) if k + 1 < steps else None
        if v_next is not None:
            log_w += (v_next - v).double()
            probs = torch.softmax(log_w.view(len(prompts), particles), dim=1)
            pick = torch.multinomial(probs, particles, replacement=True, generator=generator)
            idx = (pick + torch.arange(len(prompts))[:, None] * particles).flatten()
            z, v_next = z[idx], v_next[idx]
            log_w.zero_()
        v = v_next
    return z


@pytest.mark.parametrize("kind", ["plain", "stitchvm-prompt", "tweedie"])
def test_steering_follows_the_reference_algorithm(backbone, reward, kind):
    """The particles after the last step (each prompt's first: no selection) are the reference loop's, whose every
    velocity is computed afresh: reusing a look's passes after proposals and resampling changes nothing."""
    potential = (brightness if kind == "plain" else tweedie_potential(backbone, reward) if kind == "tweedie"
                 else stitchvm_potential(perturbed_value_model(backbone, reward, "prompt")))
    with torch.no_grad():
        ref = reference_fk(backbone, PROMPTS, 4, 2.0, torch.Generator().manual_seed(6), potential, 3, 2, 0.5, 1.0)
    mine, _ = fk_sample(backbone, PROMPTS, 4, 2.0, torch.Generator().manual_seed(6), potential, particles=3,
                        proposals=2, proposal_fraction=0.5, resample_every=1, window=(0.0, 1.0), eta=1.0)
    torch.testing.assert_close(mine, ref[::3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"proposals": 0}, "proposals \\(M\\) must be an integer >= 1"),
    ({"particles": 0}, "particles must be an integer >= 1"),
    ({"window": (0.8, 0.2)}, "window must lie in"),
])
def test_bad_arguments(backbone, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fk_sample(backbone, PROMPTS, 2, 2.0, None, brightness, **kwargs)
    with pytest.raises(ValueError):
        fk_sample(backbone, [], 2, 2.0, None, brightness)
