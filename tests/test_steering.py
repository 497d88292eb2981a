import pytest
import torch

from stitchvm.diffusion.sampling import sample
from stitchvm.guidance.fk import fk_sample, stitchvm_potential, tweedie_potential
from stitchvm.value.model import StitchedValueModel

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
