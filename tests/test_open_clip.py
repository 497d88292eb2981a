"""open_clip rewards (HPSv2, DFN-CLIP) converted to CLIPModel, PickScore's tokenizer-less checkpoint, the multi-reward
sum, and the stages on a tiny open_clip reward."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel

from stitchvm.config import ConfigError, RewardSpec, load_params
from stitchvm.models import open_clip_reward as oc
from stitchvm.models.presets import REWARD_PRESETS
from stitchvm.models.reward import RewardSum, build_reward, true_reward
from stitchvm.models.sources import ModelSourceError
from stitchvm.value.model import StitchedValueModel
from stitchvm.value.value_sum import ValueSum

from conftest import latents

TINY_OC = REWARD_PRESETS["tiny:open_clip"]["open_clip"]
PROMPTS = ["a red square", "two blue circles on the left", "a green triangle"]
# OpenAI's ids of "a photo of a cat" (openai/CLIP's and open_clip's tokenize: BOS, 5 words, EOS)
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


# ---- a direct implementation of open_clip's forward on its own state dict (the reference) ----------------------
def _ln(state, name, x):
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps=1e-5)


def _resblocks(state, prefix, layers, heads, quick_gelu, h, mask=None):
    """open_clip's ResidualAttentionBlock: x + attn(ln_1 x), then x + c_proj(act(c_fc(ln_2 x))), with torch's
    nn.MultiheadAttention holding the packed in_proj weights as open_clip does."""
    width = h.shape[-1]
    act = (lambda x: x * torch.sigmoid(1.702 * x)) if quick_gelu else F.gelu
    for k in range(layers):
        b = f"{prefix}{k}."
        mha = nn.MultiheadAttention(width, heads, batch_first=True)
        mha.load_state_dict({"in_proj_weight": state[b + "attn.in_proj_weight"],
                             "in_proj_bias": state[b + "attn.in_proj_bias"],
                             "out_proj.weight": state[b + "attn.out_proj.weight"],
                             "out_proj.bias": state[b + "attn.out_proj.bias"]})
        y = _ln(state, b + "ln_1", h)
        h = h + mha(y, y, y, need_weights=False, attn_mask=mask)[0]
        y = _ln(state, b + "ln_2", h)
        y = F.linear(act(F.linear(y, state[b + "mlp.c_fc.weight"], state[b + "mlp.c_fc.bias"])),
                     state[b + "mlp.c_proj.weight"], state[b + "mlp.c_proj.bias"])
        h = h + y
    return h


def open_clip_image(state, cfg, x):
    """(B, 3, S, S) normalised pixels -> (B, E) open_clip image embedding (not normalised)."""
    v = cfg["vision_cfg"]
    h = F.conv2d(x, state["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)  # (B, P, W)
    cls = state["visual.class_embedding"].expand(h.shape[0], 1, -1)
    h = _ln(state, "visual.ln_pre", torch.cat([cls, h], 1) + state["visual.positional_embedding"])
    h = _resblocks(state, "visual.transformer.resblocks.", v["layers"], v["width"] // v["head_width"],
                   cfg["quick_gelu"], h)
    return _ln(state, "visual.ln_post", h[:, 0]) @ state["visual.proj"]


def open_clip_text(state, cfg, ids):
    """(B, 77) token ids -> (B, E) open_clip text embedding: causal mask, pooled at argmax(ids)."""
    t = cfg["text_cfg"]
    h = state["token_embedding.weight"][ids] + state["positional_embedding"]
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    h = _ln(state, "ln_final", _resblocks(state, "transformer.resblocks.", t["layers"], t["heads"], cfg["quick_gelu"],
                                          h, mask))
    return h[torch.arange(ids.shape[0]), ids.argmax(-1)] @ state["text_projection"]


def reference_scores(state, cfg, reward, pixels, prompts):
    ids = reward.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    img = F.normalize(open_clip_image(state, cfg, reward.preprocess(pixels)), dim=-1)
    txt = F.normalize(open_clip_text(state, cfg, ids), dim=-1)
    return img, txt, state["logit_scale"].exp() * (img * txt).sum(-1)


def load(tmp_path, **sections):
    """params.yaml with `sections`, through load_params (which checks the model sources)."""
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(sections))  # JSON is YAML
    return load_params(path)


def tiny_pixels(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- the conversion ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_converted_clip_equals_open_clips_forward(quick_gelu):
    cfg = {**TINY_OC, "quick_gelu": quick_gelu}
    state = oc.random_open_clip_state(cfg, seed=3)
    clip = CLIPModel(oc.tiny_config(cfg))
    clip.load_state_dict(oc.hf_state_dict(state, cfg))
    assert clip.config.vision_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    reward = build_reward(RewardSpec("tiny:open_clip"))
    reward.clip = clip  # the tiny preset's tokenizer and preprocessing, with this state
    reward._text_cache.clear()
    pixels = tiny_pixels()
    img, txt, score = reference_scores(state, cfg, reward, pixels, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(reward.image_features(pixels)[0], img, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reward.text_embeds(PROMPTS), txt, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reward.score_pixels(pixels, PROMPTS), score, rtol=1e-5, atol=1e-4)
    assert score.std() > 1e-3 and img.std(0).mean() > 1e-3  # a test problem whose outputs vary with the input


def test_tiny_open_clip_preset_is_the_converted_seeded_state():
    reward = build_reward(RewardSpec("tiny:open_clip", seed=5))
    state = oc.random_open_clip_state(TINY_OC, seed=5)
    pixels = tiny_pixels(seed=1)
    _, _, score = reference_scores(state, {**TINY_OC, "quick_gelu": False}, reward, pixels, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(reward.score_pixels(pixels, PROMPTS), score, rtol=1e-5, atol=1e-4)
        other = build_reward(RewardSpec("tiny:open_clip", seed=6)).score_pixels(pixels, PROMPTS)
    assert not torch.allclose(other, score)


def test_building_open_clip_rewards_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_reward(RewardSpec("tiny:open_clip"))
    assert torch.equal(torch.rand(3), expected)


def test_the_split_at_every_block_j_composes_to_the_whole():
    reward = build_reward(RewardSpec("tiny:open_clip"))
    pixels = tiny_pixels()
    with torch.no_grad():
        whole, _ = reward.image_features(pixels)
        for j in range(1, reward.depth + 1):
            embeds, tokens = reward.tail(j)(reward.tokens_entering(pixels, j))
            torch.testing.assert_close(F.normalize(embeds, dim=-1), whole, rtol=1e-5, atol=1e-6)
            assert tokens.shape == (3, 1 + reward.grid[0] * reward.grid[1], reward.width)
    with pytest.raises(ValueError, match="j=5 is out of range"):
        reward.tokens_entering(pixels, 5)


@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-H-14-378-quickgelu", "ViT-L-14"])
def test_real_sizes_map_onto_clip_model_on_meta(name):
    cfg = oc.architecture(name)
    shapes = oc.open_clip_shapes(cfg)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with torch.device("meta"):
        clip = CLIPModel(oc.clip_config(cfg, 49406, 49407))
    clip.load_state_dict(oc.hf_state_dict(state, cfg), strict=True, assign=True)  # every name and shape
    n_open_clip = sum(torch.Size(s).numel() for s in shapes.values())
    assert sum(p.numel() for p in clip.parameters()) == n_open_clip


def test_arch_preset_has_vit_h_14_sizes_on_meta():
    reward = build_reward(RewardSpec("arch:open_clip-vit-h-14"), device="meta")
    assert (reward.depth, reward.width, reward.grid) == (32, 1280, (16, 16))
    assert reward.clip.config.projection_dim == 1024 and reward.clip.config.text_config.num_hidden_layers == 24
    assert round(sum(p.numel() for p in reward.clip.parameters()) / 1e6, 1) == 986.1  # open_clip's ViT-H-14: 986.1 M
    assert reward.tokenizer("a photo of a cat").input_ids == CAT_IDS


# ---- checkpoint files through `open_clip:<arch>@<weights>` ----------------------------------------------------
def openai_vocab_config(tmp_path):
    """A tiny open_clip config with OpenAI's 49408-token text vocabulary (as every real open_clip ViT), as JSON."""
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 24, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1}}
    path = tmp_path / "tiny-oc.json"
    path.write_text(json.dumps(cfg))
    return path, oc.architecture(str(path))


@pytest.mark.parametrize("layout", ["safetensors", "hpsv2-pt"])
def test_open_clip_checkpoint_files_load_through_the_source(tmp_path, layout):
    cfg_path, cfg = openai_vocab_config(tmp_path)
    state = oc.random_open_clip_state(cfg, seed=11)
    if layout == "safetensors":
        weights = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    else:  # HPSv2: {"state_dict": ...}, here also with DDP's module. prefix
        weights = tmp_path / "HPS_v2.1_compressed.pt"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, weights)
    source = f"open_clip:{cfg_path}@{weights}"
    params = load(tmp_path, reward={"source": source})  # params load accepts it
    reward = build_reward(params.reward)
    assert reward.tokenizer("a photo of a cat").input_ids == CAT_IDS
    pixels = tiny_pixels()
    _, _, score = reference_scores(state, cfg, reward, pixels, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(reward.score_pixels(pixels, PROMPTS), score, rtol=1e-5, atol=1e-4)


def test_hub_weights_resolve_from_the_cache_offline(tmp_path, monkeypatch):
    """`org/repo/file` (HPSv2) and `org/repo` in open_clip's layout (DFN5B: open_clip_pytorch_model.bin), read from
    a Hugging Face cache under HF_HUB_OFFLINE (conftest), as a machine that downloaded them once."""
    import huggingface_hub.constants

    cfg_path, cfg = openai_vocab_config(tmp_path)
    state = oc.random_open_clip_state(cfg, seed=2)
    cache = tmp_path / "hub"
    for repo, name, payload in (("xswu/HPSv2", "HPS_v2.1_compressed.pt", {"state_dict": state}),
                                ("apple/DFN-tiny", "open_clip_pytorch_model.bin", state)):
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        torch.save(payload, folder / "snapshots" / ("0" * 40) / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    pixels = tiny_pixels()
    scores = []
    for weights in ("xswu/HPSv2/HPS_v2.1_compressed.pt", "apple/DFN-tiny"):
        reward = build_reward(RewardSpec(f"open_clip:{cfg_path}@{weights}"))
        with torch.no_grad():
            scores.append(reward.score_pixels(pixels, PROMPTS))
    _, _, expected = reference_scores(state, cfg, reward, pixels, PROMPTS)
    for score in scores:
        torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ModelSourceError, match=r"reward\.source: cannot load 'open_clip:.*@xswu/HPSv2/missing\.pt'"):
        build_reward(RewardSpec(f"open_clip:{cfg_path}@xswu/HPSv2/missing.pt"))


def test_bad_open_clip_sources_fail_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.source: .*open_clip:<architecture>@"):
        load(tmp_path, reward={"source": "open_clip:ViT-H-14"})
    with pytest.raises(ConfigError, match="weights file .* does not exist"):
        load(tmp_path, reward={"source": f"open_clip:ViT-H-14@{tmp_path}/missing.pt"})
    with pytest.raises(ConfigError, match="reward model, not a backbone"):
        load(tmp_path, backbone={"source": "open_clip:ViT-H-14@x/y"})
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Q-14'.*ViT-H-14"):
        build_reward(RewardSpec(f"open_clip:ViT-Q-14@{tmp_path}/w.pt"))
    cfg_path, cfg = openai_vocab_config(tmp_path)
    weights = tmp_path / "w.safetensors"
    save_file(oc.random_open_clip_state(cfg, 0), str(weights))
    with pytest.raises(ValueError, match="do not fit open_clip architecture with 32 vision blocks.*check the arch"):
        build_reward(RewardSpec(f"open_clip:ViT-H-14@{weights}"))


def test_hf_checkpoint_without_tokenizer_uses_openais_bpe(tmp_path):
    """PickScore_v1's layout: a CLIPModel with OpenAI's vocabulary and no tokenizer files."""
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, projection_dim=8, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=24, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    clip = CLIPModel(cfg).eval()
    clip.save_pretrained(tmp_path / "pickscore")
    assert not any((tmp_path / "pickscore" / f).exists() for f in ("vocab.json", "tokenizer.json"))
    reward = build_reward(RewardSpec(str(tmp_path / "pickscore")))
    assert reward.tokenizer("a photo of a cat").input_ids == CAT_IDS
    pixels = tiny_pixels()
    ids = torch.tensor([CAT_IDS + [49407] * (77 - len(CAT_IDS))] * 3)
    with torch.no_grad():
        img = F.normalize(clip.get_image_features(pixel_values=reward.preprocess(pixels)).pooler_output, dim=-1)
        txt = F.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1)
        expected = clip.logit_scale.exp() * (img * txt).sum(-1)
        torch.testing.assert_close(reward.score_pixels(pixels, ["a photo of a cat"] * 3), expected)
    # a model with another vocabulary and no tokenizer has no tokenizer to fall back to
    small = CLIPModel(CLIPConfig(text_config={**cfg.text_config.to_dict(), "vocab_size": 600, "bos_token_id": 598,
                                              "eos_token_id": 599, "pad_token_id": 599},
                                 vision_config=cfg.vision_config.to_dict(), projection_dim=8))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="no tokenizer for its 600-token text model"):
        build_reward(RewardSpec(str(tmp_path / "small")))


# ---- the multi-reward sum --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rewards():
    return build_reward(RewardSpec("tiny:open_clip")), build_reward(RewardSpec("tiny:clip", seed=1))


def test_reward_sum_is_the_weighted_sum_of_its_terms(backbone, two_rewards, gen):
    total = RewardSum(list(two_rewards), [1.0, 0.5])
    z0 = latents(backbone, 3, gen)
    terms = [true_reward(backbone, r, z0, PROMPTS) for r in two_rewards]
    torch.testing.assert_close(true_reward(backbone, total, z0, PROMPTS), terms[0] + 0.5 * terms[1])
    with pytest.raises(ValueError, match="one weight per term"):
        RewardSum(list(two_rewards), [1.0])


def test_value_sum_shares_the_head_and_sums_values_and_gradients(backbone, two_rewards, gen, tmp_path):
    from stitchvm.diffusion.sampling import encode_conditioning
    from stitchvm.guidance.dps import stitchvm_value_and_grad

    terms = [StitchedValueModel(backbone, r, 2, j).eval() for r, j in zip(two_rewards, (1, 2))]
    for m in terms:  # the stitch's G starts at zero: make it act, so each term's value is its own
        nn.init.normal_(m.stitch.residual[2].weight, std=0.1)
    total = ValueSum(terms, [1.0, -2.0]).eval()
    z, t = latents(backbone, 3, gen), torch.tensor([0.3, 0.6, 0.9])
    with torch.no_grad():
        each = [m(z, t, PROMPTS) for m in terms]
        torch.testing.assert_close(total(z, t, PROMPTS), each[0] - 2.0 * each[1])
    cond = encode_conditioning(backbone, PROMPTS, 4.5)
    grads = [stitchvm_value_and_grad(m, backbone, z, t, cond).grad for m in terms]
    guided = stitchvm_value_and_grad(total, backbone, z, t, cond)
    torch.testing.assert_close(guided.grad, grads[0] - 2.0 * grads[1], rtol=1e-5, atol=1e-7)
    assert guided.grad.abs().sum() > 0
    total.save_pretrained(tmp_path / "sum")
    loaded = ValueSum.from_pretrained(tmp_path / "sum", backbone, list(two_rewards)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, t, PROMPTS), total(z, t, PROMPTS))
    # terms at different blocks i: one pass of the deepest head feeds both; DPS (one block's tokens) refuses
    deeper = StitchedValueModel(backbone, two_rewards[1], 4, 1).eval()
    mixed = ValueSum([terms[0], deeper], [1.0, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(mixed(z, t, PROMPTS), each[0] + 0.5 * deeper(z, t, PROMPTS))
    assert mixed.i == 4
    with pytest.raises(ValueError, match=r"stop at backbone blocks \[2, 4\]: DPS"):
        stitchvm_value_and_grad(mixed, backbone, z, t, cond)
    with pytest.raises(ValueError, match="share one backbone head"):
        ValueSum([terms[0], StitchedValueModel(backbone, two_rewards[1], 2, 1, context="prompt")], [1.0, 1.0])


def test_nft_and_draft_update_on_a_reward_sum_with_its_value_sum(backbone, two_rewards):
    """One NFT + StitchVM and one DRaFT + StitchVM update on a two-reward sum (the DFN-CLIP + HPSv2 shape)."""
    from test_align import cfg as align_cfg

    from stitchvm.alignment.draft import train_draft
    from stitchvm.alignment.nft import NFT_ADAPTERS, train_nft
    from stitchvm.models.lora import LoraPolicy

    total = ValueSum([StitchedValueModel(backbone, r, 2, 1).eval() for r in two_rewards], [1.0, 1.0])
    both = RewardSum(list(two_rewards), [1.0, 1.0])
    history = train_nft(LoraPolicy(backbone, 2, 4, adapters=NFT_ADAPTERS), both, PROMPTS, align_cfg("nft-stitchvm"),
                        seed=0, value_model=total)
    assert history[-1]["step"] == 1 and math.isfinite(history[-1]["loss"])
    history = train_draft(LoraPolicy(backbone, 2, 4), both, PROMPTS, align_cfg("draft-stitchvm"), seed=0,
                          value_model=total)
    assert history[-1]["step"] == 1 and math.isfinite(history[-1]["loss"])


# ---- the stages on a tiny open_clip reward ----------------------------------------------------------------------
def test_stages_dps_and_nft_run_on_a_tiny_open_clip_reward(tmp_path):
    """search -> train -> evaluate on tiny:sd3 + tiny:open_clip (smooth latents), then one DPS-StitchVM step with the
    trained value model and one NFT + StitchVM update."""
    from test_align import cfg as align_cfg
    from test_stages import run_all, small_params

    from stitchvm.alignment.nft import NFT_ADAPTERS, train_nft
    from stitchvm.diffusion.sampling import sample
    from stitchvm.guidance.dps import dps_stitchvm
    from stitchvm.models.lora import LoraPolicy
    from stitchvm.stages.runtime import models
    from stitchvm.stages.upstream import value_model_dir
    from stitchvm.data.storage import open_root

    params = small_params(str(tmp_path / "data"), reward={"source": "tiny:open_clip"})
    summaries = run_all(params, tmp_path)
    assert summaries["evaluate"] is not None
    report = json.loads((tmp_path / "reports" / "eval.json").read_text())
    assert report  # evaluate wrote its metrics
    backbone, reward = models(params)
    value = StitchedValueModel.from_pretrained(value_model_dir(open_root(params.storage.root)), backbone, reward)
    value.eval()
    assert value.reward_spec.source == "tiny:open_clip"

    g = torch.Generator().manual_seed(0)
    unguided = sample(backbone, PROMPTS[:2], 1, 4.5, torch.Generator().manual_seed(0))
    guided = sample(backbone, PROMPTS[:2], 1, 4.5, g, guidance=dps_stitchvm(value, 30.0))
    assert torch.isfinite(guided).all() and not torch.allclose(guided, unguided)

    policy = LoraPolicy(backbone, 2, 4, adapters=NFT_ADAPTERS)
    history = train_nft(policy, reward, PROMPTS, align_cfg("nft-stitchvm"), seed=0, value_model=value)
    last = history[-1]
    assert last["step"] == 1 and all(map(math.isfinite, (last["loss"], last["reward_mean"], last["grad_norm"])))
