import pytest
import torch

from stitchvm.value.training import teacher_targets
from stitchvm.value.evaluation import NoisyEvalSet, evaluate_value_model, noise_grid
from stitchvm.data.latent_fields import round_robin_prompts
from stitchvm.models.reward import true_reward
from stitchvm.value.monte_carlo import monte_carlo_value
from stitchvm.value.ranking import spearman_within_groups
from stitchvm.diffusion.sampling import cfg_velocity, encode_conditioning, sample, timesteps
from stitchvm.value.model import StitchedValueModel

from conftest import latents

PROMPTS = ["a red square", "a blue circle", "a red square"]
CFG = 4.5


def seed(k=0):
    return torch.Generator().manual_seed(k)


def test_a_rollout_from_a_grid_point_finishes_the_full_sample(backbone, gen):
    """Euler: two steps by hand to σ_2, then sample(start=σ_2) must land where the 5-step sampler lands."""
    z = latents(backbone, 3, gen)
    full = sample(backbone, PROMPTS, 5, CFG, None, latents=z)
    sigmas, c = timesteps(backbone, 5, 16), encode_conditioning(backbone, PROMPTS, CFG)
    mid = z
    for k in range(2):
        mid = mid + (sigmas[k + 1] - sigmas[k]) * cfg_velocity(backbone, mid, sigmas[k].expand(3), c.cond, c.uncond, CFG)
    rest = sample(backbone, PROMPTS, 5, CFG, None, latents=mid, start=float(sigmas[2]))
    assert torch.allclose(rest, full, rtol=0, atol=1e-5)
    # off the grid: one step from start to the next grid point below it, then the grid
    off = float(sigmas[2] + sigmas[3]) / 2
    first = mid + (sigmas[3] - off) * cfg_velocity(backbone, mid, torch.full((3,), off), c.cond, c.uncond, CFG)
    assert torch.allclose(sample(backbone, PROMPTS, 5, CFG, None, latents=mid, start=off),
                          sample(backbone, PROMPTS, 5, CFG, None, latents=first, start=float(sigmas[3])),
                          rtol=0, atol=1e-5)


def test_monte_carlo_value_is_the_mean_reward_of_its_rollouts(backbone, reward, gen):
    z_t, t = latents(backbone, 3, gen), 0.6
    value = monte_carlo_value(backbone, reward, z_t, t, PROMPTS, 4, 5, CFG, seed(3))
    assert value.shape == (3,)
    assert torch.equal(value, monte_carlo_value(backbone, reward, z_t, t, PROMPTS, 4, 5, CFG, seed(3)))
    rollouts = sample(backbone, [p for p in PROMPTS for _ in range(4)], 5, CFG, seed(3), eta=1.0,
                      latents=z_t.repeat_interleave(4, 0), start=t)  # (12, C, h, w): each latent's 4 rollouts
    scores = true_reward(backbone, reward, rollouts, [p for p in PROMPTS for _ in range(4)])
    assert torch.allclose(value, scores.view(3, 4).mean(1), atol=1e-5)
    assert scores.view(3, 4).std(1).min() > 0  # the rollouts really differ (η = 1 draws fresh noise)
    # batches of fewer latents draw the same noise in another order: a different, equally valid estimate
    assert not torch.equal(value, monte_carlo_value(backbone, reward, z_t, t, PROMPTS, 4, 5, CFG, seed(3),
                                                    batch_size=4))


def test_monte_carlo_value_at_low_noise_is_the_clean_reward(backbone, reward, gen):
    z0 = latents(backbone, 6, gen)
    z_t = noise_grid(z0, (0.002,), gen)[0.002]
    value = monte_carlo_value(backbone, reward, z_t, 0.002, PROMPTS * 2, 2, 5, CFG, seed(1))
    clean = true_reward(backbone, reward, z0, PROMPTS * 2)
    assert torch.allclose(value, clean, atol=0.02 * clean.abs().max().item())


@pytest.mark.parametrize("kwargs, message", [
    ({"rollouts": 0}, "rollouts must be an integer >= 1"),
    ({"t": 0.0}, r"t must lie in \(0, 1\]"),
    ({"prompts": PROMPTS[:2]}, "3 noisy latents but 2 prompts"),
    ({"prompts": []}, "prompts is empty"),
])
def test_monte_carlo_value_rejects_bad_arguments(backbone, reward, gen, kwargs, message):
    args = {"z_t": latents(backbone, 3, gen), "t": 0.5, "prompts": PROMPTS, "rollouts": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        monte_carlo_value(backbone, reward, steps=3, guidance_scale=CFG, generator=seed(), **args)


def test_start_needs_latents(backbone):
    with pytest.raises(ValueError, match="pass the noisy latents"):
        sample(backbone, PROMPTS, 3, CFG, seed(), start=0.5)


def test_evaluation_against_given_true_values(backbone, reward, gen):
    """With the teacher's own scores as the 'true value', agreement with it is the within-prompt Spearman itself."""
    model = StitchedValueModel(backbone, reward, 2, 1)
    data = NoisyEvalSet(latents(backbone, 8, gen), round_robin_prompts(2, 4), PROMPTS[:2])
    noisy = noise_grid(data.z0, (0.25, 0.75), gen)
    teacher = teacher_targets(backbone, reward, data.z0, 8)
    text = reward.text_embeds(data.prompts)
    own = reward.score_matrix(teacher.embeds, text)[torch.arange(8), data.prompt_ids]
    report = evaluate_value_model(model, backbone, reward, data, noisy, 4, teacher=teacher, progress=False,
                      true_values={0.75: own})
    assert [(r["sigma"], r["method"]) for r in report["eval"]] == [
        (0.25, "stitchvm"), (0.25, "tweedie"), (0.75, "stitchvm"), (0.75, "tweedie"), (0.75, "monte-carlo")]
    for row in report["eval"][2:4]:
        assert row["spearman_within_prompt_vs_mc"] == pytest.approx(row["spearman_within_prompt"])
    assert all("spearman_within_prompt_vs_mc" not in r for r in report["eval"][:2])
    assert report["eval"][4]["spearman_within_prompt"] == pytest.approx(1.0)
    shuffled = own[torch.tensor([6, 1, 4, 3, 2, 5, 0, 7])]  # same prompt ids (even/odd), other order
    mc = evaluate_value_model(model, backbone, reward, data, noisy, 4, teacher=teacher, progress=False,
                  true_values={0.75: shuffled})["eval"][4]
    assert mc["spearman_within_prompt"] == pytest.approx(spearman_within_groups(shuffled, own, data.prompt_ids))
    with pytest.raises(ValueError, match="have no noisy set"):
        evaluate_value_model(model, backbone, reward, data, noisy, 4, teacher=teacher, progress=False, true_values={0.5: own})
    with pytest.raises(ValueError, match=r"shape \(7,\), expected \(8,\)"):
        evaluate_value_model(model, backbone, reward, data, noisy, 4, teacher=teacher, progress=False,
                 true_values={0.75: own[:7]})
