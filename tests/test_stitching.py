import pytest
import torch
import torch.nn.functional as F

from stitchvm.value.stitching import StitchingLayer, map_to_tokens, tokens_to_map


def test_at_init_the_stitch_is_exactly_U_of_F(gen):
    layer = StitchingLayer(12, 20, out_grid=(6, 6))
    w, b = torch.randn(12, 20, generator=gen), torch.randn(20, generator=gen)
    layer.init_projection(w, b)
    tokens = torch.randn(2, 64, 12, generator=gen)  # an 8×8 backbone grid
    projected = tokens @ w + b  # F, per token: (2, 64, 20)
    fmap = projected.transpose(1, 2).reshape(2, 20, 8, 8)
    expected = F.interpolate(fmap, size=(6, 6), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(layer(tokens, (8, 8)), expected, atol=1e-5)


def test_residual_moves_off_init_once_trained(gen):
    layer = StitchingLayer(4, 16, out_grid=(3, 3))
    tokens = torch.randn(2, 16, 4, generator=gen)
    layer(tokens, (4, 4)).pow(2).sum().backward()
    assert layer.residual[2].weight.grad.abs().sum() > 0  # the zero-initialised conv still receives gradient
    # closed form at init (W₂ = 0, b₂ = 0, so s = x = U(F(h)) and SiLU'(0) = ½): with a = SiLU(W₁ x + b₁) and
    # L = Σ s², ∂L/∂W₂[o, k] = Σ_{b,pixels} 2 x_o · ½ · a_k, ∂L/∂b₂[o] = Σ x_o, and no gradient reaches W₁ through W₂ = 0
    with torch.no_grad():
        x = F.interpolate(layer.proj(tokens_to_map(tokens, (4, 4))).double(), size=(3, 3), mode="bilinear",
                          align_corners=False)
        a = F.silu(F.conv2d(x, layer.residual[0].weight.double(), layer.residual[0].bias.double()))
    torch.testing.assert_close(layer.residual[2].weight.grad.double(),
                               torch.einsum("bohw,bkhw->ok", x, a)[:, :, None, None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.residual[2].bias.grad.double(), x.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.residual[0].weight.grad, torch.zeros_like(layer.residual[0].weight))


def test_resampling_keeps_row_major_orientation():
    """Tokens whose value is their row index must stay constant along rows after resampling to another grid."""
    rows, cols = 8, 5
    tokens = torch.arange(rows).repeat_interleave(cols).float().view(1, rows * cols, 1)
    layer = StitchingLayer(1, 1, out_grid=(6, 3))
    layer.init_projection(torch.ones(1, 1), torch.zeros(1))
    out = layer(tokens, (rows, cols)).view(6, 3)
    assert torch.allclose(out, out[:, :1].expand(-1, 3))  # constant along each output row
    assert (out[1:, 0] > out[:-1, 0]).all()  # increasing down the rows


def test_token_map_round_trip(gen):
    x = torch.randn(2, 12, 7, generator=gen)
    assert torch.equal(map_to_tokens(tokens_to_map(x, (3, 4))), x)
    with pytest.raises(ValueError, match="12 tokens do not fill a 5×5 grid"):
        tokens_to_map(x, (5, 5))


def test_wrong_least_squares_shape_is_named():
    with pytest.raises(ValueError, match=r"shape \(3, 4\), the stitch needs \(4, 3\)"):
        StitchingLayer(4, 3, (2, 2)).init_projection(torch.zeros(3, 4), torch.zeros(3))


def test_subpixel_stitch_puts_each_sub_position_of_a_token_under_it(gen):
    """factor 2: token (r, c) predicts the four reward patches (2r + a, 2c + b), patch (a, b) from its own columns of
    F (pixel-unshuffle order: channel d·4 + 2a + b), checked against an explicit loop."""
    layer = StitchingLayer(3, 5, out_grid=(4, 6), factor=2)
    w, b = torch.randn(3, 20, generator=gen), torch.randn(20, generator=gen)
    layer.init_projection(w, b)
    tokens = torch.randn(2, 6, 3, generator=gen)  # a 2×3 backbone grid
    out = layer(tokens, (2, 3)).view(2, 4, 6, 5)  # (B, 4, 6, D)
    for r in range(2):
        for c in range(3):
            for a in range(2):
                for bb in range(2):
                    cols = [d * 4 + 2 * a + bb for d in range(5)]
                    expected = tokens[:, r * 3 + c] @ w[:, cols] + b[cols]
                    torch.testing.assert_close(out[:, 2 * r + a, 2 * c + bb], expected)
    with pytest.raises(ValueError, match="sub-pixel factor must be >= 1"):
        StitchingLayer(3, 5, (4, 4), factor=0)


def test_a_kxk_stitch_at_init_is_the_least_squares_map_of_each_tokens_neighbourhood(gen):
    """F as a 3×3 conv: at init each token's output is W applied to its 3×3 neighbourhood, zero padded, gathered here by
    hand in `neighbourhoods` order (channel d·9 + row·3 + col)."""
    din, dout = 5, 7
    layer = StitchingLayer(din, dout, out_grid=(4, 4), kernel=3)
    w, b = torch.randn(din * 9, dout, generator=gen), torch.randn(dout, generator=gen)
    layer.init_projection(w, b)
    tokens = torch.randn(2, 16, din, generator=gen)  # a 4×4 backbone grid, the reward grid too: U is the identity
    grid = tokens.view(2, 4, 4, din)
    expected = torch.empty(2, 4, 4, dout)
    for r in range(4):
        for c in range(4):
            x = torch.zeros(2, din, 3, 3)
            for dr in range(3):
                for dc in range(3):
                    rr, cc = r + dr - 1, c + dc - 1
                    if 0 <= rr < 4 and 0 <= cc < 4:
                        x[:, :, dr, dc] = grid[:, rr, cc]
            expected[:, r, c] = x.reshape(2, din * 9) @ w + b
    assert torch.allclose(layer(tokens, (4, 4)), expected.view(2, 16, dout), atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(5, 7\), the stitch needs \(45, 7\) \(its F is 3×3\)"):
        layer.init_projection(w[:din], b)
    with pytest.raises(ValueError, match="kernel must be an odd integer >= 1"):
        StitchingLayer(din, dout, out_grid=(4, 4), kernel=2)
