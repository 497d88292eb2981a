"""The world's independent evaluator (GenEval's role): reads a 32×32 image back into a scene, then checks specs.

GenEval decides whether a generated image satisfies its prompt with an object detector and a colour classifier,
never with the reward being optimised. Here a small CNN, trained on procedurally rendered scenes with exact labels,
predicts the scene's layout (no object, one group at one of five positions, or two groups left/right or
top/bottom) and each group's count, colour and shape; `verdicts` then applies the prompt's spec to the predicted scene with
`scenes.satisfies`, the same truth the scenes were rendered from. It never serves as a reward, a training target
or a value: it is how reward gains are checked for being real rather than reward hacking.

Generated images are softer than renders, so training renders are blurred (Gaussian, σ up to 1.2 px), noised and
shifted in contrast at random; `EMPTY` of them are background only, so an image without objects (a washed-out
sample) is read as empty and satisfies no prompt, instead of being forced into some layout. `evaluator_accuracy` is the balanced accuracy of its verdicts per prompt category on
held-out renders: every prompt of the category against every held-out scene, the verdict compared with the truth,
true and false pairs weighted equally (most random pairs are false).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from stitchvm.progress import tqdm
from stitchvm.lr_schedule import warmup_cosine
from stitchvm.world import scenes

HELD_OUT_SEED = 2_000_041
GROUP_FIELDS = (("count", len(scenes.COUNTS)), ("colour", len(scenes.COLOURS)), ("shape", len(scenes.SHAPES)))
EMPTY_LAYOUT = len(scenes.LAYOUTS)  # the layout class of a scene without objects
EMPTY = 0.1  # the fraction of training and held-out renders without objects
_GROUP_OUT = sum(n for _, n in GROUP_FIELDS)


class SceneEvaluator(nn.Module):
    """(B, 3, 32, 32) pixels in [-1, 1] -> logits: layout (B, 7) and, per group, count / colour / shape."""

    def __init__(self, width: int = 16):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())

        w = width
        self.features = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                      block(2 * w, 4 * w), nn.MaxPool2d(2))  # (B, 4w, 4, 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.SiLU(),
                                  nn.Linear(256, EMPTY_LAYOUT + 1 + 2 * _GROUP_OUT))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.features(pixels))  # (B, 8 + 2 · 15)
        logits, k = {"layout": out[:, :EMPTY_LAYOUT + 1]}, EMPTY_LAYOUT + 1
        for g in range(2):
            for name, n in GROUP_FIELDS:
                logits[f"{name}{g}"] = out[:, k:k + n]
                k += n
        return logits


def scene_targets(scene: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 2, 4) scenes -> class targets per head (-1 for absent groups: ignored)."""
    positions = scene[:, :, scenes.POSITION]
    layout = (positions[:, None, :] == scenes.LAYOUT_POSITIONS[None]).all(-1).float().argmax(1)
    layout[scene[:, 0, scenes.COUNT] < 0] = EMPTY_LAYOUT
    out = {"layout": layout}
    for g in range(2):
        for name, _ in GROUP_FIELDS:
            out[f"{name}{g}"] = scene[:, g, scenes.ATTRIBUTES.index(name)]
    return out


@torch.no_grad()
def predict_scenes(model: SceneEvaluator, pixels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, 3, 32, 32) pixels -> (N, 2, 4) predicted scenes (the form of `scenes.make_scenes`)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for k in range(0, len(pixels), batch_size):
        logits = model(pixels[k:k + batch_size].to(device, torch.float32))
        layout = logits["layout"].argmax(1).cpu()
        scene = torch.full((len(layout), 2, 4), -1, dtype=torch.long)
        empty = layout == EMPTY_LAYOUT
        scene[:, :, scenes.POSITION] = scenes.LAYOUT_POSITIONS[layout.clamp(max=EMPTY_LAYOUT - 1)]
        for g in range(2):
            for name, _ in GROUP_FIELDS:
                scene[:, g, scenes.ATTRIBUTES.index(name)] = logits[f"{name}{g}"].argmax(1).cpu()
        scene[scene[:, 1, scenes.POSITION] < 0, 1] = -1  # single-group layouts have no second group
        scene[empty] = -1
        out.append(scene)
    return torch.cat(out) if out else torch.empty(0, 2, 4, dtype=torch.long)


def verdicts(model: SceneEvaluator, pixels: torch.Tensor, specs: torch.Tensor) -> torch.Tensor:
    """(N,) bool: does image i satisfy spec i ((N, 2, 4), `prompt_set.spec_tensor`)?"""
    if specs.shape != (len(pixels), 2, 4):
        raise ValueError(f"expected ({len(pixels)}, 2, 4) specs for {len(pixels)} images, got {tuple(specs.shape)}")
    return scenes.satisfies_each(specs, predict_scenes(model, pixels))


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random Gaussian blur (σ in [0, 1.2] px), contrast in [0.8, 1.1] and pixel noise (std up to 0.08)."""
    g, n = generator, pixels.shape[0]
    sigma = 1.2 * torch.rand(n, generator=g) + 1e-3
    x = torch.arange(5, dtype=torch.float32) - 2
    k1 = torch.exp(-x[None] ** 2 / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # (n, 5)
    kernel = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # (3n, 1, 5, 5)
    blurred = F.conv2d(F.pad(pixels.reshape(1, 3 * n, 32, 32), (2, 2, 2, 2), mode="replicate"), kernel, groups=3 * n)
    blurred = blurred.view(n, 3, 32, 32)
    mean = blurred.mean((1, 2, 3), keepdim=True)
    contrast = 0.8 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    noise = 0.08 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(pixels.shape, generator=g)
    return ((blurred - mean) * contrast + mean + noise).clamp(-1, 1)


def evaluator_loss(model: SceneEvaluator, pixels: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    logits, targets = model(pixels), scene_targets(scene)
    return sum(F.cross_entropy(logits[k], targets[k], ignore_index=-1) for k in logits)


def train_evaluator(n_steps: int, batch_size: int, generator: torch.Generator, progress: bool = True, *,
                    lr: float = 2e-3, seed: int = 0, eval_every: int = 0, n_eval: int = 2000, on_step=None):
    """Train a `SceneEvaluator` on `n_steps` fresh batches of augmented renders; AdamW, warm-up then cosine decay.
    History: per-step dicts (step, loss, lr, seconds) with `scene_accuracy` (exact scene read-back on `n_eval`
    held-out clean renders) every `eval_every` steps and at the end. Returns `(model, history)`, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SceneEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(n_steps, max(1, n_steps // 20)))
    held_out = scenes.make_scenes(n_eval, torch.Generator().manual_seed(HELD_OUT_SEED), empty=EMPTY) \
        if eval_every else None
    history, start = [], time.perf_counter()
    bar = tqdm(range(n_steps), disable=not progress, desc="world evaluator", unit="step")
    for step in bar:
        model.train()
        pixels, _, scene = scenes.make_scenes(batch_size, generator, empty=EMPTY)
        loss = evaluator_loss(model, augment(pixels, generator), scene)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        entry = dict(step=step + 1, loss=loss.item(), lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - start)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == n_steps):
            entry["scene_accuracy"] = scene_accuracy(model, held_out[0], held_out[2])
        history.append(entry)
        if on_step is not None:
            on_step(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}")
    model.eval()
    return model, history


def scene_accuracy(model: SceneEvaluator, pixels: torch.Tensor, scene: torch.Tensor) -> float:
    """Fraction of scenes read back exactly (layout and every group's count, colour and shape)."""
    return (predict_scenes(model, pixels) == scene).all(-1).all(-1).float().mean().item()


def balanced_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean of the true-positive and true-negative rates of bool verdicts (NaN parts skipped)."""
    rates = [(predicted[truth] == 1).float().mean(), (predicted[~truth] == 0).float().mean()]
    rates = [r for r in rates if not r.isnan()]
    return float(sum(rates) / len(rates)) if rates else float("nan")


def evaluator_accuracy(model: SceneEvaluator, specs_by_category: dict[str, torch.Tensor], n: int = 4000,
                       seed: int = HELD_OUT_SEED + 1) -> dict[str, float]:
    """{category: balanced accuracy of the verdicts} over every (prompt, held-out render) pair (module docstring);
    `specs_by_category` maps a category to its prompts' (P, 2, 4) specs."""
    pixels, _, scene = scenes.make_scenes(n, torch.Generator().manual_seed(seed), empty=EMPTY)
    predicted = predict_scenes(model, pixels)
    return {c: balanced_accuracy(scenes.satisfies(s, predicted), scenes.satisfies(s, scene))
            for c, s in specs_by_category.items()}


def save_evaluator(model: SceneEvaluator, path) -> None:
    """The weights in float16 safetensors (the world's shipping format; ~0.4 MB)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(path))


def load_evaluator(path, device="cpu") -> SceneEvaluator:
    """A `SceneEvaluator` from `save_evaluator`'s file, in float32 and eval mode."""
    from safetensors.torch import load_file

    model = SceneEvaluator()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.to(device).eval().requires_grad_(False)
