"""GenEval in miniature: the built-in prompt set, its splits and specs, and the independent evaluator."""
import json

import pytest
import torch

from stitchvm.world import scenes
from stitchvm.world.evaluator import (
    SceneEvaluator, balanced_accuracy, evaluator_accuracy, load_evaluator, predict_scenes, save_evaluator,
    scene_targets, train_evaluator, verdicts,
)
from stitchvm.world.prompt_set import CATEGORIES, prompt_set, spec_tensor


def test_every_prompt_is_the_caption_of_its_spec():
    rows = prompt_set()
    assert {r["category"] for r in rows} == set(CATEGORIES)
    assert len({r["prompt"] for r in rows}) == len(rows)
    for r in rows:
        assert scenes.caption(spec_tensor(r["spec"])) == r["prompt"], r
        json.dumps(r["spec"])  # machine-readable
    assert prompt_set() == rows  # a pure function


def test_test_compositions_are_never_seen_in_training():
    rows = prompt_set()
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    assert all(by_split.values())

    def pairs(r):
        return {(g.get("colour"), g["shape"]) for g in r["spec"]["groups"] if "colour" in g}

    train_pairs = set().union(*(pairs(r) for r in by_split["train"]))
    colour_tests = [r for r in by_split["test"] if r["category"] in ("colors", "color_attr")]
    assert colour_tests and all(pairs(r) - train_pairs for r in colour_tests)
    for category in ("counting", "position", "two_object"):
        train_specs = {json.dumps(sorted(map(json.dumps, r["spec"]["groups"]))) for r in by_split["train"]
                       if r["category"] == category}
        tests = [r for r in by_split["test"] if r["category"] == category]
        assert tests and not {json.dumps(sorted(map(json.dumps, r["spec"]["groups"]))) for r in tests} & train_specs


@pytest.mark.parametrize("spec, message", [
    ({"groups": []}, "one or two groups"),
    ({"groups": [{"shape": "star"}]}, "'star' is not one of"),
    ({"groups": [{"count": 5, "shape": "circle"}]}, "count must be 1..4"),
    ({"groups": [{"size": "big"}]}, "unknown keys ['size']"),
    ([{"shape": "circle"}], "a spec is"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=None) as info:
        spec_tensor(spec)
    assert message in str(info.value)


class _Oracle(SceneEvaluator):
    """Logits that are one-hot in the true labels of known images (looked up by their first pixel values)."""

    def __init__(self, pixels, scene):
        super().__init__()
        self.key = {tuple(p[:, 0, :4].flatten().tolist()): k for k, p in enumerate(pixels)}
        self.targets = scene_targets(scene)

    def forward(self, pixels):
        idx = torch.tensor([self.key[tuple(p[:, 0, :4].flatten().tolist())] for p in pixels])
        sizes = {"layout": len(scenes.LAYOUTS) + 1, "count": 4, "colour": 8, "shape": 3}
        return {name: torch.nn.functional.one_hot(t[idx].clamp(min=0), sizes[name.rstrip("01")]).float()
                for name, t in self.targets.items()}


def test_read_back_scenes_and_verdicts_follow_the_spec():
    pixels, _, scene = scenes.make_scenes(300, torch.Generator().manual_seed(2), empty=0.2)
    assert 30 < (scene[:, 0, 0] < 0).sum() < 90  # background-only scenes: every group absent
    oracle = _Oracle(pixels, scene)
    assert torch.equal(predict_scenes(oracle, pixels, batch_size=64), scene)
    rows = prompt_set()
    specs = torch.stack([spec_tensor(rows[k % len(rows)]["spec"]) for k in range(300)])
    assert torch.equal(verdicts(oracle, pixels, specs), scenes.satisfies_each(specs, scene))
    assert not verdicts(oracle, pixels, specs)[scene[:, 0, 0] < 0].any()  # an empty image satisfies no prompt
    with pytest.raises(ValueError, match="expected"):
        verdicts(oracle, pixels, specs[:5])


def test_balanced_accuracy_against_its_definition():
    truth = torch.tensor([True, True, True, False, False, False, False, False])
    pred = torch.tensor([True, False, True, False, False, True, False, False])
    assert balanced_accuracy(pred, truth) == pytest.approx(0.5 * (2 / 3 + 4 / 5))
    assert balanced_accuracy(truth, truth) == 1.0


def test_a_short_evaluator_training_learns_and_round_trips(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, history = train_evaluator(60, 64, torch.Generator().manual_seed(0), progress=False, eval_every=60,
                                         n_eval=200)
    finally:
        torch.set_num_threads(threads)
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < first - 1.0, (first, last)
    save_evaluator(model, tmp_path / "e.safetensors")
    again = load_evaluator(tmp_path / "e.safetensors")
    pixels = scenes.make_scenes(16, torch.Generator().manual_seed(1))[0]
    with torch.no_grad():
        assert torch.allclose(again(pixels)["layout"], model(pixels)["layout"], atol=0.05)
    by_category = {c: torch.stack([spec_tensor(r["spec"]) for r in prompt_set() if r["category"] == c])
                   for c in CATEGORIES}
    accuracy = evaluator_accuracy(model, by_category, n=300)
    assert set(accuracy) == set(CATEGORIES) and all(0 <= v <= 1 for v in accuracy.values())
