"""A procedural image–caption world: 32×32 scenes of simple shapes with captions in words.

Every scene holds one group of 1–3 identical shapes (one colour, one shape) at one of five positions on a plain or
lightly textured background, so a caption such as "two red circles on the left" describes it completely.

Attributes are indices into the vocabularies below (`count` index k means k + 1 objects). Everything is drawn from
the caller's `torch.Generator` in a fixed order, so `make_scenes(n, torch.Generator().manual_seed(s))` is
deterministic. Rendering is vectorised: one signed-distance field per object, evaluated on the whole pixel grid.

Colours and shapes are the ones of `stitchvm.stages.prompts` (its built-in prompts are "a {colour} {shape}").
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
COUNTS = ("one", "two", "three")
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASES = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")

ATTRIBUTES = ("count", "colour", "shape", "position")  # the order of words in a caption
VOCABULARIES = {"count": COUNTS, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS}

# Zero-shot prompt templates, one prompt per class of the attribute (see `zero_shot_prompts`).
TEMPLATES = {
    "colour": "a {colour} shape",
    "shape": "a {shape}",
    "count": "{count} {shapes}",
    "position": "a shape {position}",
}

# Every word the caption grammar and the templates use (the world tokenizer keeps exactly their BPE pieces).
CAPTION_WORDS = tuple(dict.fromkeys(
    ["a", "an", "shape", "shapes", *COUNTS, *COLOURS, *SHAPES, *SHAPE_PLURALS]
    + [w for phrase in POSITION_PHRASES for w in phrase.split()]
))

# Object centres (x, y) in pixels on the 32×32 canvas, per position and count; unused slots are NaN.
_N = float("nan")
_SLOTS = torch.tensor([
    [[[8, 16], [_N, _N], [_N, _N]], [[8, 10], [8, 22], [_N, _N]], [[8, 6.5], [8, 16], [8, 25.5]]],  # left
    [[[24, 16], [_N, _N], [_N, _N]], [[24, 10], [24, 22], [_N, _N]], [[24, 6.5], [24, 16], [24, 25.5]]],  # right
    [[[16, 8], [_N, _N], [_N, _N]], [[10, 8], [22, 8], [_N, _N]], [[6.5, 8], [16, 8], [25.5, 8]]],  # top
    [[[16, 24], [_N, _N], [_N, _N]], [[10, 24], [22, 24], [_N, _N]], [[6.5, 24], [16, 24], [25.5, 24]]],  # bottom
    [[[16, 16], [_N, _N], [_N, _N]], [[11, 16], [21, 16], [_N, _N]], [[16, 11], [11, 20.5], [21, 20.5]]],  # centre
])
# radius range (pixels) per count: a single object may be larger
_RADIUS = torch.tensor([[3.6, 5.5], [2.8, 3.8], [2.7, 3.4]])
_CHUNK = 512  # keeps the (chunk, 3, 32, 32) temporaries in cache


def make_scenes(n: int, generator: torch.Generator, *, with_masks: bool = False):
    """Draw `n` scenes.

    Returns `(pixels, captions, attributes)`: pixels (n, 3, 32, 32) float32 in [-1, 1]; full captions such as
    "two red circles on the left" ("one red circle ..." for a single object); attributes {"count", "colour", "shape",
    "position"} of (n,) int64 indices into `VOCABULARIES`. With `with_masks=True` a fourth item is the (n, 32, 32)
    anti-aliased coverage of the shapes in [0, 1].
    """
    g = generator
    attrs = {
        "count": torch.randint(len(COUNTS), (n,), generator=g),
        "colour": torch.randint(len(COLOURS), (n,), generator=g),
        "shape": torch.randint(len(SHAPES), (n,), generator=g),
        "position": torch.randint(len(POSITIONS), (n,), generator=g),
    }
    u = torch.rand(n, 16, generator=g)  # per-scene continuous parameters, consumed below
    obj_jitter = torch.rand(n, 3, 2, generator=g) - 0.5  # ±0.5 px per object
    pixels, masks = [], []
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(n, lo + _CHUNK))
        px, cov = _render({k: v[sl] for k, v in attrs.items()}, u[sl], obj_jitter[sl], g)
        pixels.append(px)
        masks.append(cov)
    pixels = torch.cat(pixels) if pixels else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = (pixels, captions_for(attrs), attrs)
    if with_masks:
        out += (torch.cat(masks) if masks else torch.empty(0, IMAGE_SIZE, IMAGE_SIZE),)
    return out


def _render(attrs, u, obj_jitter, g):
    n, s = u.shape[0], IMAGE_SIZE
    count, shape = attrs["count"], attrs["shape"]
    # object geometry: slot centres + a global offset of ±1.5 px + per-object jitter
    centres = _SLOTS[attrs["position"], count] + (u[:, None, 0:2] - 0.5) * 3.0 + obj_jitter  # (n, 3, 2)
    valid = ~centres[..., 0].isnan()
    centres = torch.nan_to_num(centres, nan=-100.0)
    lo, hi = _RADIUS[count].unbind(-1)
    radius = (lo + (hi - lo) * u[:, 2])[:, None]  # (n, 1)
    angle = ((u[:, 3] - 0.5) * 0.5)[:, None, None, None]  # ±0.25 rad, squares and triangles
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    dx = coords[None, None, None, :] - centres[..., 0, None, None]  # (n, 3, 1, s)
    dy = coords[None, None, :, None] - centres[..., 1, None, None]  # (n, 3, s, 1)
    r = radius[:, :, None, None]
    # signed distances (≈ pixels); each scene evaluates only its own shape
    d = torch.empty(n, 3, s, s)
    for k in range(len(SHAPES)):
        idx = (shape == k).nonzero().squeeze(1)
        if idx.numel():
            d[idx] = _sdf(k, dx[idx], dy[idx], r[idx], angle[idx])
    cov = (0.5 - d).clamp(0, 1) * valid[..., None, None]
    cov = cov.amax(1)  # (n, s, s)

    # foreground colour: palette shade × [0.85, 1] + ±0.04 per channel
    fg = PALETTE[attrs["colour"]] * (0.85 + 0.15 * u[:, 4:5]) + (u[:, 5:8] - 0.5) * 0.08
    # background: a grey in [0.3, 0.62] with a slight tint; half the scenes get a gradient and low-frequency texture
    bg = (0.30 + 0.32 * u[:, 8:9]) + (u[:, 9:12] - 0.5) * 0.10  # (n, 3)
    textured = (u[:, 12] < 0.5).float()[:, None, None, None]
    theta = u[:, 13] * 2 * math.pi
    ramp = (coords / s - 0.5)
    grad = theta.cos()[:, None, None] * ramp[None, None, :] + theta.sin()[:, None, None] * ramp[None, :, None]
    grad = (0.12 * u[:, 14])[:, None, None] * grad  # (n, s, s), amplitude ≤ 0.12 end to end
    low = torch.rand(n, 1, 4, 4, generator=g) - 0.5
    low = F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False) * 0.08  # (n, 1, s, s)
    background = bg[:, :, None, None] + textured * (grad[:, None] + low)
    image = background * (1 - cov[:, None]) + fg[:, :, None, None] * cov[:, None]
    image = image + 0.012 * torch.randn(n, 3, s, s, generator=g)  # sensor-like pixel noise
    return (image.clamp(0, 1) * 2 - 1).contiguous(), cov


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


def caption(count: int, colour: int, shape: int, position: int,
            mention: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> str:
    """A caption mentioning the chosen attributes (in `ATTRIBUTES` order).

    Without the count the article "a" and the singular noun are used ("a red circle" does not say how many); without
    the shape the noun is "shape(s)". E.g. (count, position) -> "two shapes on the left".
    """
    m_count, m_colour, m_shape, m_position = mention
    plural = m_count and count > 0
    noun = (SHAPE_PLURALS if plural else SHAPES)[shape] if m_shape else ("shapes" if plural else "shape")
    words = [COUNTS[count] if m_count else "a"]
    if m_colour:
        words.append(COLOURS[colour])
    words.append(noun)
    if m_position:
        words.append(POSITION_PHRASES[position])
    return " ".join(words)


def captions_for(attrs: dict[str, torch.Tensor], mention: torch.Tensor | None = None) -> list[str]:
    """Captions for a batch of attributes; `mention` is an optional (n, 4) bool mask in `ATTRIBUTES` order."""
    cols = [attrs[k].tolist() for k in ATTRIBUTES]
    if mention is None:
        return [caption(*a) for a in zip(*cols)]
    return [caption(*a, mention=tuple(m)) for *a, m in zip(*cols, mention.tolist())]


# Mixture of partial captions for contrastive training: the full caption, the zero-shot forms (colour + shape,
# colour only, shape only) and, for the rest, any non-empty subset of the attributes.
_SUBSETS = torch.tensor([[(k >> b) & 1 for b in range(4)] for k in range(1, 16)], dtype=torch.bool)
PARTIAL_MIX = {"full": 0.3, "colour+shape": 0.2, "colour": 0.1, "shape": 0.1, "any": 0.3}


def sample_mentions(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) bool: which attributes each training caption mentions (drawn from `PARTIAL_MIX`)."""
    fixed = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    probs = torch.tensor(list(PARTIAL_MIX.values()))
    kind = torch.multinomial(probs, n, replacement=True, generator=generator)
    anyset = _SUBSETS[torch.randint(len(_SUBSETS), (n,), generator=generator)]
    return torch.where((kind < 4)[:, None], fixed[kind.clamp(max=3)], anyset)


def consistency(attrs: dict[str, torch.Tensor], mention: torch.Tensor) -> torch.Tensor:
    """(n, n) bool: caption i (attributes `attrs`, mentioning `mention[i]`) is true of scene j."""
    ok = torch.ones(mention.shape[0], mention.shape[0], dtype=torch.bool)
    for k, name in enumerate(ATTRIBUTES):
        a = attrs[name]
        ok &= (a[:, None] == a[None, :]) | ~mention[:, k, None]
    return ok


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
