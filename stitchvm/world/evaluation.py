"""Is the embedded world any good? Metrics of its pretrained models.

The headline metric is the **prompt-pair win rate** of the backbone under the world CLIP: sample images for prompts
"a {colour} {shape}", score every sample against every prompt, and for each ordered pair (A, B), A ≠ B, count the
fraction of samples of A that CLIP scores higher for A than for B; the win rate is the mean over pairs (0.5 is
chance, 1 means every sample is recognisably its own prompt rather than any other). Ties count as losses.
`pair_win_rates` keeps the (K, K) matrix so that pairs differing only in shape (or only in colour) can be read
separately: with one prompt per colour, colour alone can win every pair.

`world_report` adds the CLIP's zero-shot accuracy (colour, shape, count, position) on held-out single-group scenes
and its binding accuracy on two-group scenes, the VAE's round-trip PSNR, given the aesthetic reward the held-out
Spearman of its score with `image_property`, and given the evaluator (evaluator.py) GenEval in miniature:
`evaluator_accuracy` (its verdicts on held-out renders, per category) and `generator_accuracy` (the fraction of the
backbone's unguided samples for the test prompts that the evaluator finds true to their prompt, per category and
overall: the mean over categories, as GenEval's overall score).
"""
from __future__ import annotations

import torch

from stitchvm.models.backbone import Backbone
from stitchvm.value.ranking import spearman
from stitchvm.models.reward import ClipReward
from stitchvm.diffusion.sampling import sample
from stitchvm.world import scenes
from stitchvm.world.aesthetic import image_property
from stitchvm.world.autoencoder import psnr
from stitchvm.world.clip_training import binding_accuracy, held_out_scenes, zero_shot_accuracy
from stitchvm.world.evaluator import SceneEvaluator, verdicts
from stitchvm.world.prompt_set import CATEGORIES, spec_tensor

# the win-rate check: "a {colour} {shape}" for every colour, the shapes cycling (each colour once, each shape ≥ 2×)
WIN_RATE_PROMPTS = tuple(f"a {c} {scenes.SHAPES[k % 3]}" for k, c in enumerate(scenes.COLOURS))


def pair_win_rates(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, K) scores of every sample against every prompt and (N,) the prompt each sample was drawn for ->
    (K, K) matrix W with W[a, b] = fraction of the samples of a with score(a) > score(b) (NaN on the diagonal and for
    prompts without samples)."""
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"expected (N, K) scores and (N,) labels, got {tuple(scores.shape)} and {tuple(labels.shape)}")
    k = scores.shape[1]
    own = scores.gather(1, labels[:, None])  # (N, 1): each sample's score for its own prompt
    wins = (own > scores).double()  # (N, K)
    totals = torch.zeros(k, k, dtype=torch.float64).index_add_(0, labels, wins)
    counts = torch.bincount(labels, minlength=k).double()[:, None]
    rates = totals / counts
    rates.fill_diagonal_(float("nan"))
    return rates


def win_rate(rates: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean of a `pair_win_rates` matrix over its off-diagonal pairs (optionally only where `mask` is true)."""
    keep = ~rates.isnan() if mask is None else (~rates.isnan() & mask)
    return rates[keep].mean().item() if keep.any() else float("nan")


@torch.no_grad()
def sample_pixels(backbone: Backbone, prompts: list[str], per_prompt: int, steps: int, guidance_scale: float,
                  seed: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_prompt` samples per prompt with the backbone's sampler: (N, 3, H, W) pixels in [-1, 1], (N,) labels."""
    labels = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    generator = torch.Generator().manual_seed(seed)
    pixels = []
    for lo in range(0, len(labels), batch_size):
        batch = [prompts[i] for i in labels[lo:lo + batch_size].tolist()]
        z0 = sample(backbone, batch, steps, guidance_scale, generator)
        pixels.append(backbone.decode(z0).float().clamp(-1, 1))
    return torch.cat(pixels), labels


@torch.no_grad()
def clip_scores(reward: ClipReward, pixels: torch.Tensor, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N, K) CLIP scores of every image against every prompt."""
    text = reward.text_embeds(list(prompts))
    return torch.cat([reward.score_matrix(reward.image_features(pixels[k:k + batch_size])[0], text)
                      for k in range(0, len(pixels), batch_size)])


def prompt_pair_win_rate(backbone: Backbone, reward: ClipReward, prompts=WIN_RATE_PROMPTS, per_prompt: int = 16,
                         steps: int = 16, guidance_scale: float = 4.5, seed: int = 0) -> float:
    """The prompt-pair win rate of the module docstring for samples of `backbone`, scored by the CLIP `reward`."""
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError("the prompt-pair win rate needs at least two prompts")
    pixels, labels = sample_pixels(backbone, prompts, per_prompt, steps, guidance_scale, seed)
    return win_rate(pair_win_rates(clip_scores(reward, pixels, prompts), labels))


def _attribute_masks(prompts: list[str]) -> dict[str, torch.Tensor]:
    """(K, K) masks of prompt pairs that differ only in colour / only in shape (prompts "a {colour} {shape}")."""
    def parse(p):
        words = p.split()
        return (next((c for c in scenes.COLOURS if c in words), None), next((s for s in scenes.SHAPES if s in words),
                                                                             None))
    parsed = [parse(p) for p in prompts]
    colour = torch.tensor([[a[0] == b[0] for b in parsed] for a in parsed])
    shape = torch.tensor([[a[1] == b[1] for b in parsed] for a in parsed])
    return {"shape_only": colour & ~shape, "colour_only": shape & ~colour}


def specs_by_category(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Prompt-set rows ({"category", "spec", ...}) -> {category: (P, 2, 4) specs}, in `CATEGORIES` order."""
    out = {c: [spec_tensor(r["spec"]) for r in rows if r["category"] == c] for c in CATEGORIES}
    return {c: torch.stack(s) for c, s in out.items() if s}


def accuracy_by_category(correct: torch.Tensor, categories: list[str]) -> dict[str, float]:
    """(N,) bool verdicts and each sample's category -> {category: fraction true, "overall": mean over categories}."""
    out = {c: correct[torch.tensor([x == c for x in categories])].float().mean().item()
           for c in CATEGORIES if c in categories}
    out["overall"] = sum(out.values()) / len(out)
    return out


def judge(evaluator: SceneEvaluator, pixels: torch.Tensor, specs: list[dict], categories: list[str]
          ) -> tuple[dict[str, float], torch.Tensor]:
    """GenEval of images: ({category: accuracy, "overall"}, (N,) bool verdicts) for (N, 3, H, W) pixels, each with
    its prompt's spec ({"groups": [...]}) and category."""
    correct = verdicts(evaluator, pixels, torch.stack([spec_tensor(s) for s in specs]))
    return accuracy_by_category(correct, categories), correct


@torch.no_grad()
def generator_accuracy(backbone: Backbone, evaluator: SceneEvaluator, rows: list[dict], per_prompt: int, steps: int,
                       guidance_scale: float, seed: int) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """GenEval of the backbone's unguided samples for the prompts of `rows`: ({category: accuracy, "overall"},
    (N, 3, H, W) pixels, (N,) bool verdicts), `per_prompt` samples per prompt, in row order."""
    pixels, labels = sample_pixels(backbone, [r["prompt"] for r in rows], per_prompt, steps, guidance_scale, seed)
    accuracy, correct = judge(evaluator, pixels, [rows[k]["spec"] for k in labels.tolist()],
                              [rows[k]["category"] for k in labels.tolist()])
    return accuracy, pixels, correct


@torch.no_grad()
def world_report(backbone: Backbone, reward: ClipReward, aesthetic: ClipReward | None = None, *,
                 prompts=WIN_RATE_PROMPTS, per_prompt: int = 16, steps: int = 16, guidance_scale: float = 4.5,
                 seed: int = 0, n_eval: int = 1000) -> dict[str, float]:
    """Metrics of the world models: CLIP zero-shot and binding accuracies, VAE PSNR, prompt-pair win rates (all
    pairs, and pairs differing only in shape / only in colour when `prompts` has such pairs), aesthetic Spearman (if
    given)."""
    held_out = held_out_scenes(n_eval)
    pixels = held_out["single"][0]
    zero_shot = zero_shot_accuracy(reward.clip, reward.tokenizer, *held_out["single"])
    report = {f"clip_zero_shot_{'color' if k == 'colour' else k}": v for k, v in zero_shot.items()}
    binding = binding_accuracy(reward.clip, reward.tokenizer, *held_out["pair"])
    report.update({f"clip_binding_{k}": v for k, v in binding.items()})
    vae = backbone.vae
    x = pixels.to(backbone.device, vae.dtype)
    recon = torch.cat([vae.decode(vae.encode(x[k:k + 256]).latent_dist.mean).sample for k in range(0, len(x), 256)])
    report["vae_psnr"] = psnr(recon.clamp(-1, 1), x)
    prompts = list(prompts)
    samples, labels = sample_pixels(backbone, prompts, per_prompt, steps, guidance_scale, seed)
    rates = pair_win_rates(clip_scores(reward, samples, prompts), labels)
    report["prompt_pair_win_rate"] = win_rate(rates)
    for name, mask in _attribute_masks(prompts).items():
        if mask.any():
            report[f"prompt_pair_win_rate_{name}"] = win_rate(rates, mask)
    if aesthetic is not None:
        scores = torch.cat([aesthetic.score(aesthetic.image_features(pixels[k:k + 256])[0])
                            for k in range(0, len(pixels), 256)])
        report["aesthetic_spearman"] = spearman(scores, image_property(pixels))
        report["aesthetic_spearman_samples"] = spearman(
            aesthetic.score(aesthetic.image_features(samples)[0]), image_property(samples))
    return report
