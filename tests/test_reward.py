import copy

import pytest
import torch
import torch.nn.functional as F


def test_split_at_every_j_equals_the_whole_model(reward, gen):
    px = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    x = reward.preprocess(px)
    with torch.no_grad():
        expected = reward.clip.get_image_features(pixel_values=x).pooler_output
        for j in range(1, reward.depth + 1):
            emb, tokens = reward.tail(j)(reward.tokens_entering(px, j))
            assert torch.allclose(emb, expected, atol=1e-5), j
            assert tokens.shape == (2, 1 + 36, reward.width)


def test_clip_score_is_scaled_cosine(reward, gen):
    px = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    prompts = ["a red square", "two blue circles"]
    with torch.no_grad():
        img = reward.clip.get_image_features(pixel_values=reward.preprocess(px)).pooler_output
        ids = reward.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        txt = reward.clip.get_text_features(input_ids=ids).pooler_output
        expected = reward.clip.logit_scale.exp() * F.cosine_similarity(img, txt)
        got = reward.score(reward.image_features(px)[0], reward.text_embeds(prompts))
    assert torch.allclose(got, expected, atol=1e-5)


def test_reward_is_differentiable_in_pixels(aesthetic, gen):
    px = (torch.rand(2, 3, 40, 32, generator=gen) * 2 - 1).requires_grad_(True)  # non-square: resize + crop
    aesthetic.score(aesthetic.image_features(px)[0]).sum().backward()
    assert px.grad is not None and torch.isfinite(px.grad).all() and px.grad.abs().sum() > 0
    # the gradient is the derivative: directional derivatives against 4th-order central differences in float64
    rw = copy.deepcopy(aesthetic).double()
    x = px.detach().double().requires_grad_(True)
    score = lambda p: rw.score(rw.image_features(p)[0]).sum()
    (grad,) = torch.autograd.grad(score(x), x)
    torch.testing.assert_close(grad.float(), px.grad, rtol=1e-3, atol=1e-6)  # float32 autograd agrees
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            d = torch.randn(x.shape, generator=g, dtype=torch.float64)
            h = 1e-3
            fd = (-score(x + 2 * h * d) + 8 * score(x + h * d) - 8 * score(x - h * d) + score(x - 2 * h * d)) / (12 * h)
            assert (grad * d).sum().item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_j_beyond_depth_is_named(reward):
    with pytest.raises(ValueError, match=r"reward block j=5 is out of range.*4 blocks \(valid j: 1\.\.4\)"):
        reward.tail(5)


def test_clip_score_needs_text(reward):
    with pytest.raises(ValueError, match="needs the prompts"):
        reward.score(torch.randn(2, 32))
