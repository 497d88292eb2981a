import pytest
import torch

from stitchvm.diffusion.flow import forward_noise
from stitchvm.value.search import NormalEquations, search_stitch, stitched_from_search
from stitchvm.value.stitching import map_to_tokens, resample, tokens_to_map

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
    with pytest.raises(ValueError, match="upsample 'nearest' is not 'bilinear' or 'subpixel'"):
        search_stitch(backbone, reward, z0, z0, torch.ones(2), j_max=1, batch_size=2, upsample="nearest")


def test_subpixel_search_fits_each_sub_position_and_initialises_the_stitch(backbone, reward, gen):
    """On 6×6 latents the backbone grid is 3×3 and the reward's 6×6: factor 2. The stitch at init reproduces the
    least-squares prediction of every patch from the token above it."""
    z0 = torch.randn(24, backbone.latent_channels, 6, 6, generator=gen)
    t = torch.rand(24, generator=gen)
    z_t = forward_noise(z0, t, torch.randn(z0.shape, generator=gen))
    result = search_stitch(backbone, reward, z0, z_t, t, j_max=1, batch_size=10, progress=False, upsample="subpixel")
    assert result.factor == 2 and result.weight.shape == (backbone.width, 4 * reward.width)
    assert result.to_json()["factor"] == 2
    model = stitched_from_search(backbone, reward, result)
    z, tt = z0[:2], torch.tensor([0.3, 0.6])
    with torch.no_grad():
        u = model.head(z, tt).double()  # (2, 9, Db)
        got = (model.stitch_tokens(z, tt) - model.position_embedding)[:, 1:].double().view(2, 6, 6, -1)
    for r in range(3):
        for c in range(3):
            for a in range(2):
                for b in range(2):
                    cols = [d * 4 + 2 * a + b for d in range(reward.width)]
                    expected = u[:, r * 3 + c] @ result.weight[:, cols] + result.bias[cols]
                    assert torch.allclose(got[:, 2 * r + a, 2 * c + b], expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"reward patch grid \(6, 6\) to be an integer multiple .* token grid \(8, 8\)"):
        search_stitch(backbone, reward, latents(backbone, 2, gen), latents(backbone, 2, gen), torch.ones(2),
                      j_max=1, batch_size=2, upsample="subpixel")


def test_prompt_context_search_fits_the_conditional_features(backbone, reward, gen):
    z0 = latents(backbone, 12, gen)
    t = torch.rand(12, generator=gen)
    z_t = forward_noise(z0, t, torch.randn(z0.shape, generator=gen))
    prompts = ["a red square", "a blue circle"] * 6
    with pytest.raises(ValueError, match="context 'prompt' needs one prompt per probe: got 0 for 12 probes"):
        search_stitch(backbone, reward, z0, z_t, t, j_max=1, batch_size=5, progress=False, context="prompt")
    result = search_stitch(backbone, reward, z0, z_t, t, j_max=1, batch_size=5, progress=False, context="prompt",
                           prompts=prompts)
    assert result.context == "prompt" and result.to_json()["context"] == "prompt"
    model = stitched_from_search(backbone, reward, result)
    assert model.context == "prompt"
    zz, tt = latents(backbone, 2, gen), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        u = model.head(zz, tt, prompts[:2])
        x = map_to_tokens(resample(tokens_to_map(u, (8, 8)), reward.grid)).double()
        got = model.stitch_tokens(zz, tt, prompts[:2]) - model.position_embedding
    assert torch.allclose(got[:, 1:].double(), x @ result.weight + result.bias, atol=1e-4)


def test_kernel_fit_initialises_a_kxk_stitch_and_explains_at_least_the_1x1_fit(backbone, reward, gen):
    """With kernel 3 the chosen pair is refitted on 3×3 neighbourhoods: the model at init reproduces that least-squares
    prediction (neighbourhoods gathered by hand), and, the 1×1 map being one of its candidates (the centre tap), its
    in-sample error is at most the table's for the pair."""
    z0 = torch.randn(40, backbone.latent_channels, 6, 6, generator=gen)
    t = torch.rand(40, generator=gen)
    z_t = forward_noise(z0, t, torch.randn(z0.shape, generator=gen))
    result = search_stitch(backbone, reward, z0, z_t, t, j_max=1, batch_size=16, progress=False, upsample="subpixel",
                           kernel=3)
    db = backbone.width
    assert result.kernel == 3 and result.weight.shape == (9 * db, 4 * reward.width)
    assert result.to_json()["kernel"] == 3
    pair = next(r["error"] for r in result.table if (r["i"], r["j"]) == (result.i, result.j))
    assert 0.0 <= result.kernel_error <= pair + 1e-9
    model = stitched_from_search(backbone, reward, result)
    assert model.kernel == 3
    z, tt = z0[:2], torch.tensor([0.3, 0.6])
    with torch.no_grad():
        u = model.head(z, tt).double().view(2, 3, 3, db)  # the 3×3 token grid of 6×6 latents
        got = (model.stitch_tokens(z, tt) - model.position_embedding)[:, 1:].double().view(2, 6, 6, -1)
    for r in range(3):
        for c in range(3):
            x = torch.zeros(2, db, 3, 3, dtype=torch.float64)
            for dr in range(3):
                for dc in range(3):
                    if 0 <= r + dr - 1 < 3 and 0 <= c + dc - 1 < 3:
                        x[:, :, dr, dc] = u[:, r + dr - 1, c + dc - 1]
            pred = x.reshape(2, 9 * db) @ result.weight + result.bias  # (2, 4·D) in pixel_unshuffle order
            for a in range(2):
                for b in range(2):
                    cols = [d * 4 + 2 * a + b for d in range(reward.width)]
                    assert torch.allclose(got[:, 2 * r + a, 2 * c + b], pred[:, cols], atol=1e-4)
    with pytest.raises(ValueError, match="kernel must be an odd integer >= 1"):
        search_stitch(backbone, reward, z0, z_t, t, j_max=1, batch_size=16, progress=False, kernel=0)
