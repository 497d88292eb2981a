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
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    assert not torch.equal(a[0], c[0])
    px = a[0]
    assert px.shape == (64, 3, 32, 32) and px.dtype == torch.float32 and px.min() >= -1 and px.max() <= 1
    assert a[2].shape == (64, 2, 4) and a[2].dtype == torch.long


def test_scenes_cover_every_attribute_value_and_layout():
    _, _, scene = scene_batch(2000, 0)
    for k, (name, vocab) in enumerate(scenes.VOCABULARIES.items()):
        assert set(scene[:, 0, k].tolist()) == set(range(len(vocab))), name
    pair = scene[:, 1, 0] >= 0
    assert 0.45 < pair.float().mean() < 0.55
    assert (scene[~pair, 1] == -1).all() and (scene[pair, 1] >= 0).all()
    # two groups sit left + right or top + bottom, the first group left / top
    assert set(map(tuple, scene[pair][:, :, 3].tolist())) == {(0, 1), (2, 3)}


def _centre_of(mask):
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return xs.float().mean() + 0.5, ys.float().mean() + 0.5


def test_pixels_agree_with_the_caption():
    """Colour, count and position of every group, read back from the pixels of single- and two-group scenes."""
    ndimage = pytest.importorskip("scipy.ndimage")
    n = 600
    pixels, captions, scene, masks = scene_batch(n, 3, with_masks=True)
    rgb = (pixels + 1) / 2
    halves = {0: (slice(None), slice(0, 16)), 1: (slice(None), slice(16, 32)),
              2: (slice(0, 16), slice(None)), 3: (slice(16, 32), slice(None)), 4: (slice(None), slice(None))}
    for k in range(n):
        assert captions[k] == scenes.caption(scene[k])
        for g in range(2):
            count, colour, shape, pos = scene[k, g].tolist()
            if count < 0:
                continue
            region = torch.zeros(32, 32, dtype=torch.bool)
            region[halves[pos]] = True
            mask = masks[k] * region
            inside = mask > 0.99
            mean = (rgb[k] * inside).sum((1, 2)) / inside.sum()
            assert torch.cdist(mean[None], scenes.PALETTE).argmin().item() == colour, (k, captions[k])
            _, n_objects = ndimage.label((mask > 0.5).numpy(), structure=[[1, 1, 1]] * 3)
            assert n_objects == count + 1, (k, captions[k])
            cx, cy = _centre_of(mask)
            expected = {"left": cx < 13, "right": cx > 19, "top": cy < 13, "bottom": cy > 19,
                        "centre": (12 < cx < 20) and (12 < cy < 20)}[scenes.POSITIONS[pos]]
            assert expected, (k, captions[k], cx.item(), cy.item())


def test_shapes_differ_in_the_pixels():
    """Same scene parameters, only the shape changed: each object's coverage differs by several pixels."""
    _, _, scene = scene_batch(200, 5)
    single = scene.clone()
    single[:, 1] = -1
    u = torch.rand(200, 2, 8, generator=torch.Generator().manual_seed(0))
    covs = []
    for k in range(len(scenes.SHAPES)):
        with_k = single.clone()
        with_k[:, 0, scenes.SHAPE] = k
        covs.append(scenes._group_coverage(with_k[:, 0], u[:, 0], torch.zeros(200, 4, 2)))
    for a in range(len(covs)):
        for b in range(a):
            per_object = (covs[a] - covs[b]).abs().sum((1, 2)) / (single[:, 0, 0] + 1)
            assert per_object.min() > 2.5, (scenes.SHAPES[a], scenes.SHAPES[b], per_object.min())


def test_vocabularies_match_the_builtin_prompts():
    from stitchvm.stages.prompts import SINGLE, read_source

    words = {w for p in SINGLE for w in p.split()}
    words |= {w for r in read_source("builtin") for w in r["prompt"].split()}
    assert words <= set(scenes.CAPTION_WORDS)


def _satisfies_by_enumeration(spec, scene) -> bool:
    """The definition, written out: an injective matching of the spec's groups to the scene's groups."""
    wanted = [row for row in spec.tolist() if any(v >= 0 for v in row)]
    present = [row for row in scene.tolist() if row[0] >= 0]
    import itertools

    for chosen in itertools.permutations(present, len(wanted)):
        if all(all(w < 0 or w == v for w, v in zip(want, have)) for want, have in zip(wanted, chosen)):
            return True
    return False


def test_captions_specs_and_satisfies():
    assert scenes.caption([[1, 0, 1, 0], [-1] * 4]) == "two red circles on the left"
    assert scenes.caption([[0, 0, 1, 4], [-1] * 4]) == "one red circle in the centre"
    assert scenes.caption([[-1, 3, 2, -1], [-1] * 4]) == "a yellow triangle"
    assert scenes.caption([[2, -1, -1, 2], [-1] * 4]) == "three shapes at the top"
    assert scenes.caption([[-1, 0, 1, -1], [-1, 2, 0, -1]]) == "a red circle and a blue square"
    assert scenes.caption([[3, -1, 0, 0], [-1, -1, 2, 1]]) == "four squares on the left and a triangle on the right"
    g = torch.Generator().manual_seed(0)
    _, _, scene = scenes.make_scenes(300, g)
    specs = scenes.sample_specs(scene, g)
    assert ((specs >= 0).any(-1)[:, 0]).all()  # the first row is never empty
    negatives = scenes.hard_negatives(specs, g)
    both = torch.cat([specs, negatives])
    truth = scenes.satisfies(both, scene)
    assert truth[:300].diagonal().all()
    assert truth[300:].diagonal().float().mean() < 0.1  # edits are almost always false of their scene
    assert torch.equal(scenes.satisfies_each(negatives, scene), truth[300:].diagonal())
    for i in range(0, 600, 23):
        for j in range(0, 300, 17):
            assert truth[i, j].item() == _satisfies_by_enumeration(both[i], scene[j]), (i, j)
    # the binding phase's negatives: every two-group spec that can exchange an attribute does so, at rate `swap`
    full = torch.where(torch.rand(300, 1, 1, generator=g) < 2, scene, -1)  # full captions of the scenes
    swappable = ((full[:, 0] >= 0) & (full[:, 1] >= 0) & (full[:, 0] != full[:, 1])).any(1)
    targeted = scenes.hard_negatives(full, torch.Generator().manual_seed(1), swap=1.0, targeted=True)
    exchanged = (targeted[:, 0] == full[:, 1]).any(1) & (targeted != full).any(-1).all(-1)
    assert exchanged[swappable].all()
    # false of the scene, unless the groups differ in that attribute alone (then the exchange changes nothing)
    assert scenes.satisfies_each(targeted[swappable], scene[swappable]).float().mean() < 0.05
    uniform = scenes.hard_negatives(full, torch.Generator().manual_seed(1), swap=1.0)
    assert (uniform != full).any(-1).all(-1)[swappable].float().mean() < 0.9  # some miss without targeting
    # a spec's caption is a function of the spec alone, and order-free specs are order-free
    swapped = specs.flip(1)
    two = (specs >= 0).any(-1).all(-1)
    assert torch.equal(scenes.satisfies(swapped[two], scene), scenes.satisfies(specs[two], scene))
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
    return scenes.make_scenes(600, torch.Generator().manual_seed(HELD_OUT_SEED), two_groups=0.0)


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
