"""A procedural, compositional image–caption world: 32×32 scenes of one or two groups of simple shapes.

A scene holds one group of 1–4 identical shapes (one count, colour and shape) at one of five positions, or two such
groups side by side (left and right, or top and bottom), on a plain or lightly textured background. A full caption
describes every group: "two red circles on the left and a blue square on the right" ("one" is written "a" only in
partial captions, which leave the count open).

**Specs.** What a caption (or a prompt) asserts is a *spec*: an (2, 4) int64 tensor of group constraints in
`ATTRIBUTES` order (count, colour, shape, position), -1 where an attribute is not mentioned and a row of -1 where
there is no second group. A scene is an (2, 4) tensor of the same form with every attribute of a present group set
(-1 rows: no second group). `satisfies(specs, scenes)` is the one truth of the world: every constrained group of the
spec is matched by a different group of the scene (order free; a group matches when every mentioned attribute is
equal). So "a circle and a square" needs two groups, "three circles" a group of exactly three circles, and "a red
circle" any group of red circles. The CLIP's training targets, the evaluator's verdicts and the prompt set's
categories all read specs through this function.

Attributes are indices into the vocabularies below (count index k means k + 1 objects). Everything is drawn from the
caller's `torch.Generator` in a fixed order, so `make_scenes(n, torch.Generator().manual_seed(s))` is deterministic.
Rendering is vectorised: one signed-distance field per object slot, evaluated on the whole pixel grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
PALETTE = torch.tensor([  # RGB in [0, 1], one row per colour
    [0.90, 0.10, 0.10], [0.10, 0.72, 0.20], [0.12, 0.30, 0.95], [0.95, 0.90, 0.12],
    [0.60, 0.15, 0.80], [1.00, 0.55, 0.05], [0.97, 0.97, 0.97], [0.05, 0.05, 0.05],
])
SHAPES = ("square", "circle", "triangle")
SHAPE_PLURALS = ("squares", "circles", "triangles")
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASES = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")

ATTRIBUTES = ("count", "colour", "shape", "position")  # the order of words in a group phrase, and of a spec's columns
VOCABULARIES = {"count": COUNTS, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
COUNT, COLOUR, SHAPE, POSITION = range(4)

# Layouts: one group at each of the five positions, or two groups (left + right, top + bottom).
LAYOUTS = ((0, -1), (1, -1), (2, -1), (3, -1), (4, -1), (0, 1), (2, 3))  # (position of group 0, of group 1 or -1)
LAYOUT_POSITIONS = torch.tensor(LAYOUTS)
PAIR_LAYOUTS = (5, 6)

# Zero-shot prompt templates, one prompt per class of the attribute (see `zero_shot_prompts`).
TEMPLATES = {
    "colour": "a {colour} shape",
    "shape": "a {shape}",
    "count": "{count} {shapes}",
    "position": "a shape {position}",
}

# Every word the caption grammar and the templates use (the world tokenizer keeps exactly their BPE pieces).
CAPTION_WORDS = tuple(dict.fromkeys(
    ["a", "an", "and", "shape", "shapes", *COUNTS, *COLOURS, *SHAPES, *SHAPE_PLURALS]
    + [w for phrase in POSITION_PHRASES for w in phrase.split()]
))

# Object centres (x, y) in pixels on the 32×32 canvas, per position and count, for up to 4 objects; unused: NaN.
# Groups at left/right/top/bottom stay in their half of the canvas, so two groups never overlap.
_N = float("nan")
_LEFT = [[[8, 16], [_N, _N], [_N, _N], [_N, _N]],
         [[8, 10], [8, 22], [_N, _N], [_N, _N]],
         [[8, 6.5], [8, 16], [8, 25.5], [_N, _N]],
         [[4, 10], [12, 10], [4, 22], [12, 22]]]
_CENTRE = [[[16, 16], [_N, _N], [_N, _N], [_N, _N]],
           [[11, 16], [21, 16], [_N, _N], [_N, _N]],
           [[16, 11], [11, 20.5], [21, 20.5], [_N, _N]],
           [[11, 11], [21, 11], [11, 21], [21, 21]]]
_left = torch.tensor(_LEFT)
_top = _left.flip(-1)  # the left half's slots transposed
_SLOTS = torch.stack([_left, _left + torch.tensor([16.0, 0.0]), _top, _top + torch.tensor([0.0, 16.0]),
                      torch.tensor(_CENTRE)])  # (5 positions, 4 counts, 4 objects, 2)
# radius range (pixels) per count: fewer objects may be larger
_RADIUS = torch.tensor([[3.4, 5.0], [2.8, 3.6], [2.6, 3.2], [2.1, 2.6]])
_CHUNK = 512  # keeps the (chunk, 4, 32, 32) temporaries in cache


def make_scenes(n: int, generator: torch.Generator, *, with_masks: bool = False, two_groups: float = 0.5,
                empty: float = 0.0):
    """Draw `n` scenes, a fraction `two_groups` of them (in expectation) with two groups; with `empty` > 0 that
    fraction of them is background only (no group: what the evaluator must learn to call empty; the draw is skipped
    at 0, so scene streams without empty scenes are unchanged).

    Returns `(pixels, captions, scene)`: pixels (n, 3, 32, 32) float32 in [-1, 1]; full captions; the scenes as an
    (n, 2, 4) int64 tensor (module docstring). With `with_masks=True` a fourth item is the (n, 32, 32) anti-aliased
    coverage of the shapes in [0, 1].
    """
    g = generator
    pair = torch.rand(n, generator=g) < two_groups
    layout = torch.where(pair, 5 + torch.randint(2, (n,), generator=g), torch.randint(5, (n,), generator=g))
    scene = torch.stack([torch.randint(len(COUNTS), (n, 2), generator=g),
                         torch.randint(len(COLOURS), (n, 2), generator=g),
                         torch.randint(len(SHAPES), (n, 2), generator=g),
                         LAYOUT_POSITIONS[layout]], dim=-1)  # (n, 2, 4)
    scene[~pair, 1] = -1
    if empty > 0:
        scene[torch.rand(n, generator=g) < empty] = -1
    u = torch.rand(n, 2, 8, generator=g)  # per-group continuous parameters
    background_u = torch.rand(n, 8, generator=g)
    obj_jitter = torch.rand(n, 2, 4, 2, generator=g) - 0.5  # ±0.5 px per object
    pixels, masks = [], []
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(n, lo + _CHUNK))
        px, cov = _render(scene[sl], u[sl], background_u[sl], obj_jitter[sl], g)
        pixels.append(px)
        masks.append(cov)
    pixels = torch.cat(pixels) if pixels else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = (pixels, captions_for(scene), scene)
    if with_masks:
        out += (torch.cat(masks) if masks else torch.empty(0, IMAGE_SIZE, IMAGE_SIZE),)
    return out


def _group_coverage(group: torch.Tensor, u: torch.Tensor, obj_jitter: torch.Tensor) -> torch.Tensor:
    """(n, 4) attributes of one group per scene (-1 rows: absent) -> (n, s, s) coverage in [0, 1]."""
    n, s = group.shape[0], IMAGE_SIZE
    present = group[:, COUNT] >= 0
    count, shape = group[:, COUNT].clamp(min=0), group[:, SHAPE].clamp(min=0)
    # slot centres + a group offset of ±1 px + per-object jitter
    centres = _SLOTS[group[:, POSITION].clamp(min=0), count] + (u[:, None, 0:2] - 0.5) * 2.0 + obj_jitter  # (n, 4, 2)
    valid = ~centres[..., 0].isnan() & present[:, None]
    centres = torch.nan_to_num(centres, nan=-100.0)
    lo, hi = _RADIUS[count].unbind(-1)
    radius = (lo + (hi - lo) * u[:, 2])[:, None]  # (n, 1)
    angle = ((u[:, 3] - 0.5) * 0.5)[:, None, None, None]  # ±0.25 rad, squares and triangles
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    dx = coords[None, None, None, :] - centres[..., 0, None, None]  # (n, 4, 1, s)
    dy = coords[None, None, :, None] - centres[..., 1, None, None]  # (n, 4, s, 1)
    r = radius[:, :, None, None]
    d = torch.empty(n, 4, s, s)  # signed distances (≈ pixels); each scene evaluates only its own shape
    for k in range(len(SHAPES)):
        idx = (shape == k).nonzero().squeeze(1)
        if idx.numel():
            d[idx] = _sdf(k, dx[idx], dy[idx], r[idx], angle[idx])
    return ((0.5 - d).clamp(0, 1) * valid[..., None, None]).amax(1)


def _render(scene, u, background_u, obj_jitter, g):
    n, s = scene.shape[0], IMAGE_SIZE
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    # background: a grey in [0.3, 0.62] with a slight tint; half the scenes get a gradient and low-frequency texture
    b = background_u
    bg = (0.30 + 0.32 * b[:, 0:1]) + (b[:, 1:4] - 0.5) * 0.10  # (n, 3)
    textured = (b[:, 4] < 0.5).float()[:, None, None, None]
    theta = b[:, 5] * 2 * math.pi
    ramp = (coords / s - 0.5)
    grad = theta.cos()[:, None, None] * ramp[None, None, :] + theta.sin()[:, None, None] * ramp[None, :, None]
    grad = (0.12 * b[:, 6])[:, None, None] * grad  # (n, s, s), amplitude ≤ 0.12 end to end
    low = torch.rand(n, 1, 4, 4, generator=g) - 0.5
    low = F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False) * 0.08  # (n, 1, s, s)
    image = bg[:, :, None, None] + textured * (grad[:, None] + low)
    total = torch.zeros(n, s, s)
    for k in range(2):  # groups occupy disjoint halves, so painting one after the other is exact
        cov = _group_coverage(scene[:, k], u[:, k], obj_jitter[:, k])
        # foreground colour: palette shade × [0.85, 1] + ±0.04 per channel
        fg = PALETTE[scene[:, k, COLOUR].clamp(min=0)] * (0.85 + 0.15 * u[:, k, 4:5]) + (u[:, k, 5:8] - 0.5) * 0.08
        image = image * (1 - cov[:, None]) + fg[:, :, None, None] * cov[:, None]
        total = torch.maximum(total, cov)
    image = image + 0.012 * torch.randn(n, 3, s, s, generator=g)  # sensor-like pixel noise
    return (image.clamp(0, 1) * 2 - 1).contiguous(), total


def _sdf(k: int, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) to shape k of size r, rotated by angle (circles ignore it)."""
    if k == 1:  # circle
        return torch.sqrt(dx * dx + dy * dy) - r
    cos, sin = angle.cos(), angle.sin()
    x, y = cos * dx + sin * dy, cos * dy - sin * dx  # object frame (y points down)
    if k == 0:  # square around the circle of radius r: its corners stick out by (sqrt 2 - 1) r
        return torch.maximum(x.abs(), y.abs()) - r
    big_r = 1.35 * r  # triangle, apex up: circumradius big_r, inradius big_r / 2
    return torch.maximum(torch.maximum(y, 0.866 * x - 0.5 * y), -0.866 * x - 0.5 * y) - 0.5 * big_r


# ---- captions and specs -----------------------------------------------------------------------------------------
def group_phrase(count: int, colour: int, shape: int, position: int) -> str:
    """One group's words; -1 leaves an attribute out ("a red circle" does not say how many, "two shapes on the
    left" not which shape)."""
    plural = count > 0
    noun = (SHAPE_PLURALS if plural else SHAPES)[shape] if shape >= 0 else ("shapes" if plural else "shape")
    words = [COUNTS[count] if count >= 0 else "a"]
    if colour >= 0:
        words.append(COLOURS[colour])
    words.append(noun)
    if position >= 0:
        words.append(POSITION_PHRASES[position])
    return " ".join(words)


def caption(spec: torch.Tensor | list) -> str:
    """The caption of one (2, 4) spec: its group phrases, in row order, joined by "and"."""
    rows = spec.tolist() if isinstance(spec, torch.Tensor) else spec
    return " and ".join(group_phrase(*row) for row in rows if any(v >= 0 for v in row))


def captions_for(specs: torch.Tensor) -> list[str]:
    """Captions of an (n, 2, 4) batch of specs (or of scenes: their full captions)."""
    return [caption(row) for row in specs.tolist()]


def _group_match(spec: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    """Broadcast (..., 4) spec groups against (..., 4) scene groups -> (...) bool: every mentioned attribute equal and
    the scene group present, or the spec group empty (no constraint)."""
    return ((spec < 0) | (spec == scene)).all(-1) & (scene[..., COUNT] >= 0) | (spec < 0).all(-1)


def _assigned(match: torch.Tensor) -> torch.Tensor:
    """(..., 2, 2) match[a, b] of spec group a and scene group b -> (...) bool: the two spec groups match two
    different scene groups."""
    return (match[..., 0, 0] & match[..., 1, 1]) | (match[..., 0, 1] & match[..., 1, 0])


def satisfies(specs: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    """(m, 2, 4) specs and (n, 2, 4) scenes -> (m, n) bool: spec i is true of scene j (module docstring)."""
    return _assigned(_group_match(specs[:, None, :, None, :], scene[None, :, None, :, :]))  # via (m, n, 2, 2)


def satisfies_each(specs: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    """(n, 2, 4) specs and (n, 2, 4) scenes -> (n,) bool: spec i is true of scene i."""
    if specs.shape != scene.shape:
        raise ValueError(f"specs {tuple(specs.shape)} and scenes {tuple(scene.shape)} differ in shape")
    return _assigned(_group_match(specs[:, :, None, :], scene[:, None, :, :]))  # via (n, 2, 2)


# Partial captions for contrastive and flow training: each mentioned group keeps all its attributes, colour + shape,
# one of them, or any non-empty subset; two-group scenes mention both groups (in either order) or one of them.
_SUBSETS = torch.tensor([[(k >> b) & 1 for b in range(4)] for k in range(1, 16)], dtype=torch.bool)
PARTIAL_MIX = {"full": 0.35, "colour+shape": 0.2, "colour": 0.05, "shape": 0.1, "any": 0.3}
BOTH_GROUPS = 0.7  # of two-group scenes, the fraction whose caption mentions both groups


def sample_specs(scene: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 4) scenes -> (n, 2, 4) partial specs that are true of them, drawn from `PARTIAL_MIX`."""
    g, n = generator, scene.shape[0]
    fixed = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    kind = torch.multinomial(torch.tensor(list(PARTIAL_MIX.values())), 2 * n, replacement=True, generator=g)
    anyset = _SUBSETS[torch.randint(len(_SUBSETS), (2 * n,), generator=g)]
    mention = torch.where((kind < 4)[:, None], fixed[kind.clamp(max=3)], anyset).view(n, 2, 4)
    pair = scene[:, 1, COUNT] >= 0
    keep = torch.rand(n, generator=g) < BOTH_GROUPS
    drop = torch.randint(2, (n,), generator=g)  # which group a one-group caption leaves out
    swap = torch.rand(n, generator=g) < 0.5
    spec = torch.where(mention, scene, -1)
    spec[pair & ~keep, drop[pair & ~keep]] = -1
    spec[~pair, 1] = -1
    empty = (spec < 0).all(-1)  # (n, 2)
    flip = empty[:, 0] | (swap & ~empty[:, 1])  # either order of two groups; a lone group in the first row
    return torch.where(flip[:, None, None], spec.flip(1), spec)


def hard_negatives(specs: torch.Tensor, generator: torch.Generator, swap: float = 0.5,
                   targeted: bool = False) -> torch.Tensor:
    """(n, 2, 4) specs -> (n, 2, 4) minimally edited specs, usually false of the scene the spec describes: about a
    fraction `swap` of them exchange one attribute between the two groups, the rest replace one mentioned attribute
    by another value. Binding, counting and position are then learned from near-identical captions rather than from
    a bag of words (NegCLIP's recipe).

    Which attribute is exchanged: uniformly at random, the exchange happening only where both groups mention it with
    different values (`targeted=False`: partial captions seldom mention an attribute of both groups, so exchanges,
    of colours and shapes above all, are rare; the shipped CLIP's pretraining learned count and position but bound
    colours to shapes at chance this way); or, with
    `targeted=True`, one among the attributes that can be exchanged, so every two-group caption that can get an
    exchange gets one with probability `swap` (the world CLIP's binding phase)."""
    g, n = generator, specs.shape[0]
    out, rows = specs.clone(), torch.arange(n)
    mentioned = specs >= 0  # (n, 2, 4)
    # replace: one mentioned (group, attribute), uniformly, by a different value of that attribute
    pick = torch.where(mentioned, torch.rand(n, 2, 4, generator=g), -1.0).view(n, 8).argmax(1)
    group, col = pick // 4, pick % 4
    sizes = torch.tensor([len(VOCABULARIES[a]) for a in ATTRIBUTES])[col]
    shift = 1 + (torch.rand(n, generator=g) * (sizes - 1)).long().clamp(max=sizes - 2)
    out[rows, group, col] = (specs[rows, group, col] + shift) % sizes
    # swap: one attribute exchanged between the groups
    swappable = (specs[:, 0] >= 0) & (specs[:, 1] >= 0) & (specs[:, 0] != specs[:, 1])  # (n, 4)
    if targeted:
        swap_col = torch.where(swappable, torch.rand(n, 4, generator=g), -1.0).argmax(1)
    else:
        swap_col = torch.randint(4, (n,), generator=g)
    a, b = specs[rows, 0, swap_col], specs[rows, 1, swap_col]
    swap = (torch.rand(n, generator=g) < swap) & swappable[rows, swap_col]
    out[swap] = specs[swap]
    out[rows[swap], 0, swap_col[swap]], out[rows[swap], 1, swap_col[swap]] = b[swap], a[swap]
    return out


def zero_shot_prompts(attribute: str) -> list[str]:
    """One prompt per class of `attribute`, from `TEMPLATES` (e.g. colour: "a red shape", ...)."""
    if attribute == "colour":
        return [TEMPLATES["colour"].format(colour=c) for c in COLOURS]
    if attribute == "shape":
        return [TEMPLATES["shape"].format(shape=s) for s in SHAPES]
    if attribute == "count":
        return [TEMPLATES["count"].format(count=c, shapes="shape" if k == 0 else "shapes")
                for k, c in enumerate(COUNTS)]
    if attribute == "position":
        return [TEMPLATES["position"].format(position=p) for p in POSITION_PHRASES]
    raise ValueError(f"unknown attribute {attribute!r} (known: {', '.join(ATTRIBUTES)})")
