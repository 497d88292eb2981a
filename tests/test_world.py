"""The procedural world: scenes and captions, the CLIP tokenizer, and a short CLIP pretraining run."""
import math

import pytest
import torch
import torch.nn.functional as F

from stitchvm.world import scenes
from stitchvm.world.clip_training import (
    HELD_OUT_SEED, image_embeds, preprocess, save_clip, text_embeds, train_clip, world_clip_config,
    zero_shot_accuracy,
)
from stitchvm.world.caption_tokenizer import (
    EXTRA_WORDS, openai_clip_tokenizer, openai_ids, world_clip_tokenizer, world_vocab_and_merges,
)


def scene_batch(n, seed, **kw):
    return scenes.make_scenes(n, torch.Generator().manual_seed(seed), **kw)


def test_scenes_are_deterministic_under_the_generator():
    a, b, c = scene_batch(64, 7), scene_batch(64, 7), scene_batch(64, 8)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert all(torch.equal(a[2][k], b[2][k]) for k in scenes.ATTRIBUTES)
    assert not torch.equal(a[0], c[0])
    px = a[0]
    assert px.shape == (64, 3, 32, 32) and px.dtype == torch.float32 and px.min() >= -1 and px.max() <= 1


def test_scenes_cover_every_attribute_value():
    _, _, attrs = scene_batch(2000, 0)
    for name, vocab in scenes.VOCABULARIES.items():
        assert set(attrs[name].tolist()) == set(range(len(vocab))), name


def test_pixels_agree_with_the_caption():
    ndimage = pytest.importorskip("scipy.ndimage")
    n = 600
    pixels, captions, attrs, masks = scene_batch(n, 3, with_masks=True)
    rgb = (pixels + 1) / 2
    inside = masks > 0.99
    # colour: the mean colour inside the shapes is nearest to the caption's palette colour
    mean = (rgb * inside[:, None]).sum((2, 3)) / inside.sum((1, 2))[:, None]
    assert torch.equal(torch.cdist(mean, scenes.PALETTE).argmin(1), attrs["colour"])
    for k in range(n):
        words = captions[k]
        count, colour, shape, pos = (attrs[a][k].item() for a in scenes.ATTRIBUTES)
        noun = (scenes.SHAPE_PLURALS if count else scenes.SHAPES)[shape]
        assert words == f"{scenes.COUNTS[count]} {scenes.COLOURS[colour]} {noun} {scenes.POSITION_PHRASES[pos]}"
        # count: separate objects; position: where the shapes' mass is
        _, n_objects = ndimage.label((masks[k] > 0.5).numpy(), structure=[[1, 1, 1]] * 3)
        assert n_objects == count + 1, (k, words)
        ys, xs = torch.nonzero(masks[k] > 0.5, as_tuple=True)
        cx, cy = xs.float().mean() + 0.5, ys.float().mean() + 0.5
        expected = {"left": cx < 13, "right": cx > 19, "top": cy < 13, "bottom": cy > 19,
                    "centre": (12 < cx < 20) and (12 < cy < 20)}[scenes.POSITIONS[pos]]
        assert expected, (k, words, cx.item(), cy.item())


def test_shapes_differ_in_the_pixels():
    """Same scene parameters, only the shape changed: each object's coverage differs by several pixels."""
    _, _, attrs = scene_batch(200, 5)
    u = torch.rand(200, 16, generator=torch.Generator().manual_seed(0))
    covs = []
    for k in range(len(scenes.SHAPES)):
        attrs_k = dict(attrs, shape=torch.full_like(attrs["shape"], k))
        covs.append(scenes._render(attrs_k, u, torch.zeros(200, 3, 2), torch.Generator().manual_seed(1))[1])
    for a in range(len(covs)):
        for b in range(a):
            per_object = (covs[a] - covs[b]).abs().sum((1, 2)) / (attrs["count"] + 1)
            assert per_object.min() > 3.0, (scenes.SHAPES[a], scenes.SHAPES[b], per_object.min())


def test_vocabularies_match_the_builtin_prompts():
    from stitchvm.stages.prompts import BUILTIN, COLOURS, SHAPES

    assert scenes.COLOURS == COLOURS and set(scenes.SHAPES) == set(SHAPES)
    words = {w for p in BUILTIN for w in p.split()}
    assert words <= set(scenes.CAPTION_WORDS)


def test_partial_captions_and_their_positives():
    assert scenes.caption(1, 0, 1, 0) == "two red circles on the left"
    assert scenes.caption(0, 0, 1, 4) == "one red circle in the centre"
    assert scenes.caption(2, 3, 2, 2, mention=(False, True, True, False)) == "a yellow triangle"
    assert scenes.caption(2, 3, 2, 2, mention=(True, False, False, True)) == "three shapes at the top"
    assert scenes.caption(2, 3, 2, 2, mention=(False, False, True, False)) == "a triangle"
    g = torch.Generator().manual_seed(0)
    _, _, attrs = scenes.make_scenes(200, g)
    mention = scenes.sample_mentions(200, g)
    assert mention.any(1).all()
    captions = scenes.captions_for(attrs, mention)
    pos = scenes.consistency(attrs, mention)
    assert pos.diagonal().all()
    # caption i is true of scene j exactly when scene j, described with caption i's mentions, gives caption i
    for i in range(0, 200, 7):
        again = scenes.captions_for(attrs, mention[i].expand(200, 4))
        assert pos[i].tolist() == [c == captions[i] for c in again]
    for name in scenes.ATTRIBUTES:
        prompts = scenes.zero_shot_prompts(name)
        assert len(prompts) == len(scenes.VOCABULARIES[name]) == len(set(prompts))
    assert scenes.zero_shot_prompts("colour")[0] == "a red shape" and scenes.zero_shot_prompts("shape")[1] == "a circle"


def test_openai_tokenizer_reproduces_openai_ids():
    tok = openai_clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_world_tokenizer_keeps_openai_pieces_for_the_grammar(tmp_path):
    full, world = openai_clip_tokenizer(), world_clip_tokenizer()
    assert len(world) < 700
    text = " ".join(scenes.CAPTION_WORDS + EXTRA_WORDS)
    assert world.tokenize(text) == full.tokenize(text)
    to_openai = openai_ids(world)
    for sentence in ["two red circles on the left", "a photo of a purple triangle in the centre", "a red square"]:
        assert [to_openai[i] for i in world(sentence).input_ids] == full(sentence).input_ids
    # other text still encodes without unknown tokens (bytes and the kept merges)
    ids = world("a giraffe!").input_ids
    assert world.unk_token_id not in ids[1:-1]
    vocab, merges = world_vocab_and_merges()
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    world.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tmp_path)(text).input_ids == world(text).input_ids


def test_preprocess_matches_clip_reward():
    from transformers import CLIPModel

    from stitchvm.models import reward
    from stitchvm.config import RewardSpec
    from stitchvm.world import clip_training

    assert clip_training.OPENAI_CLIP_MEAN == reward.OPENAI_CLIP_MEAN
    assert clip_training.OPENAI_CLIP_STD == reward.OPENAI_CLIP_STD
    tokenizer = world_clip_tokenizer()
    rew = reward.ClipReward(RewardSpec("tiny:clip"), CLIPModel(clip_training.world_clip_config(tokenizer)), tokenizer)
    px = scene_batch(4, 0)[0]
    assert torch.equal(rew.preprocess(px), preprocess(px))


# ---- a reduced pretraining run (a narrower, 2-layer CLIP; ~15 s on one core), shared by the tests below ----
STEPS, BATCH = 300, 64


@pytest.fixture(scope="module")
def trained():
    small = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2)
    config = world_clip_config(world_clip_tokenizer(), text_config=small, vision_config=small, projection_dim=48)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other test runs share the 2 cores: oversubscribed OpenMP threads are far slower
    try:
        return train_clip(STEPS, BATCH, torch.Generator().manual_seed(11), progress=False, config=config, lr=2e-3)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def held_out():
    return scene_batch(600, HELD_OUT_SEED)


def test_short_training_learns(trained, held_out):
    model, tokenizer, history = trained
    assert len(history) == STEPS and history[-1]["step"] == STEPS
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-10:]) / 10
    assert first > math.log(BATCH) - 0.5  # starts at chance
    assert last < math.log(BATCH) - 1.0 and last < first - 1.0
    acc = zero_shot_accuracy(model, tokenizer, held_out[0], held_out[2])
    assert set(acc) == set(scenes.ATTRIBUTES)
    assert acc["colour"] > 0.6  # chance: 1/8 (this run: 1.0; shape needs ~2000 steps of the full model)


def test_trained_clip_works_inside_clip_reward(trained, held_out):
    from stitchvm.config import RewardSpec
    from stitchvm.models.reward import ClipReward

    model, tokenizer, _ = trained
    rew = ClipReward(RewardSpec("tiny:clip"), model, tokenizer)
    px = held_out[0][:50]
    img, tokens = rew.image_features(px)
    assert tokens.shape == (50, 1 + 64, model.config.vision_config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(img, image_embeds(model, px), atol=1e-5)
        prompts = scenes.zero_shot_prompts("colour")
        # ClipReward pads prompts to 77 tokens, the world code to the longest: the causal text tower agrees
        assert torch.allclose(rew.text_embeds(prompts), text_embeds(model, tokenizer, prompts), atol=1e-5)


def test_save_and_reload(trained, held_out, tmp_path):
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

    model, tokenizer, _ = trained
    size32 = save_clip(model, tokenizer, tmp_path / "fp32")
    size16 = save_clip(model, tokenizer, tmp_path / "fp16", dtype=torch.float16)
    assert size16 < 0.6 * size32 and next(model.parameters()).dtype == torch.float32
    again = CLIPModel.from_pretrained(tmp_path / "fp32").eval()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "fp32")
    px = held_out[0][:8]
    with torch.no_grad():
        assert torch.allclose(image_embeds(again, px), image_embeds(model, px), atol=1e-6)
        prompts = ["a red circle", "three shapes at the top"]
        assert torch.allclose(text_embeds(again, tok, prompts), text_embeds(model, tokenizer, prompts), atol=1e-6)
        # the text tower alone (as an SD3 text encoder would load it) gives the same projected vectors
        text_only = CLIPTextModelWithProjection.from_pretrained(tmp_path / "fp32").eval()
        ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.allclose(F.normalize(text_only(input_ids=ids).text_embeds, dim=-1),
                              text_embeds(model, tokenizer, prompts), atol=1e-6)


def test_training_is_deterministic_under_the_generator():
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1)
    config = world_clip_config(world_clip_tokenizer(), text_config=tiny, vision_config=tiny, projection_dim=16)
    runs = [train_clip(3, 8, torch.Generator().manual_seed(4), progress=False, config=config)[2] for _ in range(2)]
    assert [h["loss"] for h in runs[0]] == [h["loss"] for h in runs[1]]
