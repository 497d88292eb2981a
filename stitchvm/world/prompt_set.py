"""GenEval in miniature: the world's built-in prompt set, in GenEval's six categories, each prompt with a spec.

GenEval (Ghosh et al., 2023) scores text-to-image models on prompts whose truth an object detector can check:
single object, two objects, counting, colours, position and colour attribution. Here every prompt carries its
machine-readable spec (`{"groups": [{"count": 3, "shape": "circle"}, ...]}`, words as in `scenes`, counts as
numbers), which `spec_tensor` turns into the (2, 4) spec of `scenes.satisfies`, so the world's evaluator decides
for any generated image whether it satisfies its prompt.

Splits (`split_of`): the test split holds compositions never seen in training. Six colour–shape pairs are held out:
the "colors" prompts of those pairs and every "color_attr" prompt containing one of them are test prompts, and no
train prompt contains them; counting (count, shape), position (shape, shape, axis) and two-object (shape pair)
compositions are held out whole; a few compositions of each category go to val. Everything is a pure function of
`SPLIT_SEED`, so the set is the same on every machine.
"""
from __future__ import annotations

import itertools

import torch

from stitchvm.world import scenes

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLIT_SEED = 20231017  # GenEval's arXiv date; any fixed number
COLOUR_ATTR_PROMPTS = 36  # a seeded subset of the 336 ordered colour-attribution prompts
HELD_OUT_PAIRS = 6  # colour–shape pairs seen only in test prompts


def _article(shape: str) -> str:
    return f"a {shape}"


def _group(count=None, colour=None, shape=None, position=None) -> dict:
    return {k: v for k, v in dict(count=count, colour=colour, shape=shape, position=position).items() if v is not None}


def _entries() -> list[dict]:
    """Every prompt of the set with its category, spec and composition key (what the split holds out)."""
    s, c = scenes.SHAPES, scenes.COLOURS
    rows = [dict(prompt=_article(a), category="single_object", spec=[_group(shape=a)], key=("single", a))
            for a in s]
    rows += [dict(prompt=f"{_article(a)} and {_article(b)}", category="two_object",
                  spec=[_group(shape=a), _group(shape=b)], key=("two", *sorted((a, b))))
             for a, b in itertools.permutations(s, 2)]
    rows += [dict(prompt=f"{scenes.COUNTS[n - 1]} {scenes.SHAPE_PLURALS[k]}", category="counting",
                  spec=[_group(count=n, shape=a)], key=("count", n, a))
             for n in (2, 3, 4) for k, a in enumerate(s)]
    rows += [dict(prompt=f"a {col} {a}", category="colors", spec=[_group(colour=col, shape=a)], key=("colour", col, a))
             for col in c for a in s]
    for (p, q), (a, b) in itertools.product((("left", "right"), ("top", "bottom")), itertools.permutations(s, 2)):
        phrase = dict(zip(scenes.POSITIONS, scenes.POSITION_PHRASES))
        rows.append(dict(prompt=f"{_article(a)} {phrase[p]} and {_article(b)} {phrase[q]}", category="position",
                         spec=[_group(shape=a, position=p), _group(shape=b, position=q)], key=("position", p, a, b)))
    attr = [(c1, a, c2, b) for a, b in itertools.permutations(s, 2) for c1, c2 in itertools.permutations(c, 2)]
    pick = torch.randperm(len(attr), generator=torch.Generator().manual_seed(SPLIT_SEED))[:COLOUR_ATTR_PROMPTS]
    rows += [dict(prompt=f"a {c1} {a} and a {c2} {b}", category="color_attr",
                  spec=[_group(colour=c1, shape=a), _group(colour=c2, shape=b)], key=("attr", c1, a, c2, b))
             for c1, a, c2, b in (attr[k] for k in sorted(pick.tolist()))]
    return rows


def _held_out_pairs() -> set[tuple[str, str]]:
    pairs = [(col, a) for col in scenes.COLOURS for a in scenes.SHAPES]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SPLIT_SEED + 1)).tolist()
    return {pairs[k] for k in order[:HELD_OUT_PAIRS]}


def split_of(rows: list[dict]) -> list[str]:
    """The split of each entry (module docstring)."""
    held = _held_out_pairs()
    g = torch.Generator().manual_seed(SPLIT_SEED + 2)
    splits = [""] * len(rows)
    for category in CATEGORIES:
        idx = [k for k, r in enumerate(rows) if r["category"] == category]
        if category in ("colors", "color_attr"):
            pairs = [{(grp["colour"], grp["shape"]) for grp in rows[k]["spec"]} for k in idx]
            for k, p in zip(idx, pairs):
                splits[k] = "test" if p & held else ""
            idx = [k for k in idx if not splits[k]]
        keys = list(dict.fromkeys(rows[k]["key"] if category != "two_object" else rows[k]["key"] for k in idx))
        order = [keys[j] for j in torch.randperm(len(keys), generator=g).tolist()]
        n_test = 0 if category in ("colors", "color_attr") else max(1, round(0.25 * len(keys)))
        n_val = max(1, round(0.15 * len(keys)))
        split_of_key = {key: ("test" if j < n_test else "val" if j < n_test + n_val else "train")
                        for j, key in enumerate(order)}
        for k in idx:
            splits[k] = split_of_key[rows[k]["key"]]
    return splits


def prompt_set() -> list[dict]:
    """The built-in prompts: [{"prompt", "category", "spec", "split"}], in a fixed order."""
    rows = _entries()
    return [dict(prompt=r["prompt"], category=r["category"], spec={"groups": r["spec"]}, split=s)
            for r, s in zip(rows, split_of(rows))]


def spec_tensor(spec: dict) -> torch.Tensor:
    """A prompt's spec ({"groups": [...]}, at most two groups) -> the (2, 4) int64 spec of `scenes.satisfies`."""
    groups = spec.get("groups") if isinstance(spec, dict) else None
    if not isinstance(groups, list) or not 1 <= len(groups) <= 2:
        raise ValueError(f"a spec is {{'groups': [one or two groups]}}, got {spec!r}")
    out = torch.full((2, 4), -1, dtype=torch.long)
    for k, group in enumerate(groups):
        unknown = set(group) - set(scenes.ATTRIBUTES)
        if unknown:
            raise ValueError(f"spec group {group!r}: unknown keys {sorted(unknown)} (known: {scenes.ATTRIBUTES})")
        for name, value in group.items():
            col = scenes.ATTRIBUTES.index(name)
            if name == "count":
                if not isinstance(value, int) or not 1 <= value <= len(scenes.COUNTS):
                    raise ValueError(f"spec group {group!r}: count must be 1..{len(scenes.COUNTS)}")
                out[k, col] = value - 1
            elif value in scenes.VOCABULARIES[name]:
                out[k, col] = scenes.VOCABULARIES[name].index(value)
            else:
                raise ValueError(f"spec group {group!r}: {name} {value!r} is not one of {scenes.VOCABULARIES[name]}")
    return out
