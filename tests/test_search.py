import pytest
import torch

from stitchvm.flow import forward_noise
from stitchvm.search import NormalEquations, search_stitch, stitched_from_search
from stitchvm.stitching import map_to_tokens, resample, tokens_to_map

from conftest import latents


def test_recovers_a_planted_linear_map_streaming(gen):
    x = torch.randn(600, 10, generator=gen, dtype=torch.float64)
    a, b = torch.randn(10, 5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    noise = torch.randn(600, 3, generator=gen, dtype=torch.float64)
    fit = NormalEquations(10, [5, 3])
    for s in range(0, 600, 128):  # batches of uneven size
        fit.add(x[s:s + 128], [x[s:s + 128] @ a + b, noise[s:s + 128]])
    (w, err), (_, noise_err) = fit.solve()
    assert torch.allclose(w[:-1], a, atol=1e-6) and torch.allclose(w[-1], b, atol=1e-6)
    assert err < 1e-10
    assert noise_err == pytest.approx(1 - 11 / 600, abs=0.03)  # pure noise: nothing explained beyond dof


def test_search_table_and_init(backbone, reward, gen):
    z0 = latents(backbone, 24, gen)
    t = torch.rand(24, generator=gen)
    z_t = forward_noise(z0, t, torch.randn(z0.shape, generator=gen))
    result = search_stitch(backbone, reward, z0, z_t, t, j_max=2, batch_size=10, progress=False)
    assert len(result.table) == backbone.depth * 2
    assert {(r["i"], r["j"]) for r in result.table} == {(i, j) for i in range(1, 7) for j in (1, 2)}
    best = min(result.table, key=lambda r: r["error"])
    assert (result.i, result.j) == (best["i"], best["j"])
    assert all(0.0 <= r["error"] <= 1.0 for r in result.table)

    model = stitched_from_search(backbone, reward, result)
    z, t = latents(backbone, 2, gen), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        u = model.head(z, t)
        x = map_to_tokens(resample(tokens_to_map(u, (8, 8)), reward.grid)).double()
        expected = x @ result.weight + result.bias  # the least-squares prediction of the patch tokens
        got = model.stitch_tokens(z, t) - model.position_embedding
    assert torch.allclose(got[:, 1:].double(), expected, atol=1e-4)
    assert torch.allclose(got[:, 0], result.class_token.float().expand(2, -1), atol=1e-6)


def test_j_max_beyond_reward_depth(backbone, reward, gen):
    z0 = latents(backbone, 2, gen)
    with pytest.raises(ValueError, match="reward block j=9 is out of range"):
        search_stitch(backbone, reward, z0, z0, torch.ones(2), j_max=9, batch_size=2)
    with pytest.raises(ValueError, match="probe sizes differ: 2 clean latents, 2 noisy latents, 1 times"):
        search_stitch(backbone, reward, z0, z0, torch.ones(1), j_max=1, batch_size=2)
