import pytest
import torch

from stitchvm.models.backbone import build_backbone
from stitchvm.config import ModelSpec, RewardSpec
from stitchvm.models.reward import build_reward
from stitchvm.models.tokenizers import tiny_clip_tokenizer


def _params(module):
    return torch.cat([p.flatten() for p in module.parameters()])


def test_tiny_presets_build_fast_and_are_seeded():
    # (no wall-time bound: a test on a shared machine asserts behaviour, not speed)
    a, ra = build_backbone(ModelSpec("tiny:sd3", seed=3)), build_reward(RewardSpec("tiny:clip", seed=3))
    b, rb = build_backbone(ModelSpec("tiny:sd3", seed=3)), build_reward(RewardSpec("tiny:clip", seed=3))
    c = build_backbone(ModelSpec("tiny:sd3", seed=4))
    assert torch.equal(_params(a.transformer), _params(b.transformer))
    assert torch.equal(_params(ra.clip), _params(rb.clip))
    assert not torch.equal(_params(a.transformer), _params(c.transformer))


def test_building_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_backbone(ModelSpec("tiny:sd3"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("factory, spec, message", [
    (build_backbone, ModelSpec("tiny:sd4"), "unknown tiny backbone preset 'tiny:sd4' (known: tiny:flux, tiny:sd3)"),
    (build_backbone, ModelSpec("arch:sd4"),
     "unknown arch backbone preset 'arch:sd4' (known: arch:flux.1-dev, arch:sd3.5-large, arch:sd3.5-medium)"),
    (build_reward, RewardSpec("tiny:hps"), "unknown tiny reward preset 'tiny:hps' (known: tiny:clip, tiny:open_clip)"),
])
def test_unknown_presets_are_named(factory, spec, message):
    with pytest.raises(ValueError) as e:
        factory(spec)
    assert message in str(e.value)


def test_missing_aesthetic_head_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        build_reward(RewardSpec("tiny:clip", kind="aesthetic", head=str(tmp_path / "head.safetensors")))


def test_arch_presets_have_the_real_sizes():
    # on the meta device: real configurations, no memory, no download
    bb = build_backbone(ModelSpec("arch:sd3.5-medium"), device="meta")
    n = sum(p.numel() for p in bb.transformer.parameters())
    assert 2.2e9 < n < 2.6e9, n  # SD3.5-Medium's MMDiT is ~2.5B
    assert bb.depth == 24 and bb.width == 1536 and bb.latent_channels == 16 and bb.image_size == 1024
    rw = build_reward(RewardSpec("arch:clip-vit-l-14"), device="meta")
    nv = sum(p.numel() for p in rw.clip.vision_model.parameters())
    assert 3.0e8 < nv < 3.1e8, nv  # ViT-L/14 vision tower ~303M
    assert rw.grid == (16, 16) and rw.depth == 24 and rw.width == 1024


def test_tokenizer_is_offline_and_round_trips():
    tok = tiny_clip_tokenizer()
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle"


def test_local_paths_load_with_from_pretrained(tmp_path, backbone, reward, gen):
    """The real-weights path: save tiny models in the hub layout, load them back through the same factory."""
    backbone.pipeline.save_pretrained(tmp_path / "sd3")
    reward.clip.save_pretrained(tmp_path / "clip")
    reward.tokenizer.save_pretrained(tmp_path / "clip")
    bb = build_backbone(ModelSpec(str(tmp_path / "sd3")))
    rw = build_reward(RewardSpec(str(tmp_path / "clip")))
    z = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        emb, pooled = backbone.encode_prompts(["a cat", "a dog"])
        emb2, pooled2 = bb.encode_prompts(["a cat", "a dog"])
        assert torch.equal(emb, emb2) and torch.equal(pooled, pooled2)
        assert torch.allclose(backbone.velocity(z, t, emb, pooled), bb.velocity(z, t, emb2, pooled2), atol=1e-6)
        px = backbone.decode(z)
        assert torch.allclose(px, bb.decode(z), atol=1e-6)
        text = reward.text_embeds(["a cat", "a dog"])
        assert torch.allclose(reward.score(reward.image_features(px)[0], text),
                              rw.score(rw.image_features(px)[0], rw.text_embeds(["a cat", "a dog"])), atol=1e-5)
