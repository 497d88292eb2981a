import pytest
import torch

from stitchvm.value.head import BackboneHead

from conftest import latents


@pytest.mark.parametrize("i", [1, 3, 6])
def test_head_equals_the_full_forward_at_block_i(backbone, gen, i):
    """Hook block i of the real transformer during its own forward with the empty prompt."""
    z = latents(backbone, 3, gen)
    t = torch.tensor([0.1, 0.5, 0.9])
    captured = {}

    def grab(module, args, out):
        captured["h"] = out[1]

    hook = backbone.transformer.transformer_blocks[i - 1].register_forward_hook(grab)
    embeds, pooled = backbone.encode_prompts([""] * 3)
    try:
        with torch.no_grad():
            backbone.velocity(z, t, embeds, pooled)
    finally:
        hook.remove()
    head = BackboneHead(backbone, i)
    with torch.no_grad():
        h = head(z, t)
    assert h.shape == (3, 64, backbone.width)
    assert torch.allclose(h, captured["h"], atol=1e-5, rtol=1e-5)


def test_head_runs_only_its_blocks(backbone, gen):
    head = BackboneHead(backbone, 2)
    called = []
    hooks = [b.register_forward_hook(lambda m, a, o, k=k: called.append(k))
             for k, b in enumerate(backbone.transformer.transformer_blocks)]
    try:
        with torch.no_grad():
            head(latents(backbone, 1, gen), torch.tensor([0.5]))
    finally:
        for h in hooks:
            h.remove()
    assert called == [0, 1]


def test_all_blocks_output_matches_single_depth(backbone, gen):
    z, t = latents(backbone, 2, gen), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        outs = BackboneHead(backbone, backbone.depth)(z, t, all_blocks=True)
        assert torch.equal(outs[2], BackboneHead(backbone, 3)(z, t))


def test_block_out_of_range(backbone):
    with pytest.raises(ValueError, match="backbone block i=7 is out of range.*6 blocks"):
        BackboneHead(backbone, 7)


def test_prompt_head_equals_the_conditional_forward(backbone, gen):
    """context="prompt": block i of the transformer's own forward with each latent's prompt."""
    prompts = ["a red square", "a blue circle", "a red square"]
    z, t = latents(backbone, 3, gen), torch.tensor([0.1, 0.5, 0.9])
    captured = {}
    hook = backbone.transformer.transformer_blocks[2].register_forward_hook(
        lambda module, args, out: captured.update(h=out[1]))
    try:
        with torch.no_grad():
            backbone.velocity(z, t, *backbone.encode_prompts(prompts))
    finally:
        hook.remove()
    head = BackboneHead(backbone, 3, context="prompt")
    with torch.no_grad():
        h = head(z, t, prompts)
        assert torch.allclose(h, captured["h"], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(h, BackboneHead(backbone, 3)(z, t), atol=1e-3)  # not the null branch
    assert set(head._prompt_cache) == {"a red square", "a blue circle"}  # each prompt encoded once


def test_prompt_head_needs_a_prompt_per_latent(backbone, gen):
    head = BackboneHead(backbone, 2, context="prompt")
    with pytest.raises(ValueError, match="needs one prompt per latent: got 1 prompts for 2 latents"):
        head(latents(backbone, 2, gen), torch.tensor([0.5, 0.5]), ["a red square"])
    with pytest.raises(ValueError, match="context 'text' is not one of"):
        BackboneHead(backbone, 2, context="text")
