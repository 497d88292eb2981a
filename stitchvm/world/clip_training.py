"""Pretraining the world's small CLIP on procedural scenes (symmetric InfoNCE with partial captions and hard negatives).

The model is a plain `transformers.CLIPModel` (`WORLD_CLIP` config) with the world tokenizer (OpenAI's BPE restricted
to the caption grammar), so it loads with `CLIPModel.from_pretrained` and works inside `stitchvm.models.reward.ClipReward`
unchanged: images are preprocessed exactly as `ClipReward.preprocess` does ([-1, 1] pixels -> OpenAI mean/std).

Training captions are partial descriptions of the scene (`scenes.sample_specs`: full, colour + shape, colour only,
shape only, any subset, per group; one or both groups), so short prompts such as "a red shape" or "a circle and a
square" embed well. Since partial captions are true of many scenes in a batch, the InfoNCE targets are multi-positive:
caption i and scene j form a positive pair whenever caption i is true of scene j (`scenes.satisfies`); each row's
target is uniform over its positives. The loss therefore bottoms out at the targets' entropy, reported as `floor` in
the history (0 for unique captions).

Hard negatives (NegCLIP): every batch adds, per scene, a minimally edited caption (`scenes.hard_negatives`: two
groups' colours, shapes or positions exchanged, or one count, colour, shape or position replaced). They are extra
candidates on the image side of the loss; a negative that happens to be true of some scene is a positive there.
Without them a CLIP learns a bag of words: "a red circle and a blue square" and "a blue circle and a red square"
embed alike, and binding, count and position are what the compositional prompts ask for.

Zero-shot accuracy (`zero_shot_accuracy`): on single-group scenes, for each attribute, every scene is classified as
the class whose prompt (`scenes.zero_shot_prompts`: "a {colour} shape", "a {shape}", "{count} shapes", "a shape
{position}") has the highest cosine with the scene's image embedding. Binding accuracy (`binding_accuracy`): on
two-group scenes, the fraction whose full caption scores above a hard negative of it, per kind of edit.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from stitchvm.progress import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from stitchvm.world import scenes
from stitchvm.lr_schedule import warmup_cosine
from stitchvm.world.caption_tokenizer import world_clip_tokenizer

# Equal to stitchvm.models.reward.OPENAI_CLIP_MEAN / _STD (a test checks it); kept here so the world imports lightly.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HELD_OUT_SEED = 2_000_003  # scenes for zero-shot evaluation; train with another seed

WORLD_CLIP = dict(
    text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=77),
    vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       image_size=scenes.IMAGE_SIZE, patch_size=4),
    projection_dim=64,
)


def world_clip_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPConfig:
    """`WORLD_CLIP` with the tokenizer's vocabulary size and special ids; `overrides` update text/vision/top level.

    The towers' own `projection_dim` is set to the model's, so `CLIPTextModelWithProjection` /
    `CLIPVisionModelWithProjection` built from the sub-configs load the matching projections.
    """
    top = {"projection_dim": WORLD_CLIP["projection_dim"], **overrides}
    text = dict(WORLD_CLIP["text_config"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                projection_dim=top["projection_dim"])
    text.update(top.pop("text_config", {}))
    vision = dict(WORLD_CLIP["vision_config"], projection_dim=top["projection_dim"])
    vision.update(top.pop("vision_config", {}))
    return CLIPConfig(text_config=text, vision_config=vision, **top)


def preprocess(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) in [-1, 1] -> CLIP input, as `ClipReward.preprocess` (no resize at the model's own size)."""
    mean = pixels.new_tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return ((pixels + 1) / 2 - mean) / std


def _vector(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5 returns a ModelOutput


def image_embeds(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, E) l2-normalised image embeddings of [-1, 1] pixels."""
    return F.normalize(_vector(model.get_image_features(pixel_values=preprocess(pixels))), dim=-1)


def text_embeds(model: CLIPModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """(K, E) l2-normalised text embeddings. Padding to the longest prompt gives the same vectors as padding to 77
    (the text tower is causal and pools at the first end-of-text token)."""
    ids = tokenizer(prompts, padding=True, return_tensors="pt").input_ids.to(model.device)
    return F.normalize(_vector(model.get_text_features(input_ids=ids)), dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric multi-positive InfoNCE; `positives[i, j]`: caption i is true of scene j. Every scene has a true
    caption; captions true of no scene in the batch (hard negatives) only compete on the image side.

    Returns (loss, floor): the floor is the loss of the ideal predictor (the targets' mean entropy).
    """
    logits = logit_scale.exp() * txt @ img.T  # (captions, scenes)
    pos = positives.float()
    rows = pos.sum(1) > 0  # captions with a positive in the batch
    t_text, t_image = pos[rows] / pos[rows].sum(1, keepdim=True), pos.T / pos.T.sum(1, keepdim=True)
    loss_text = -(t_text * logits[rows].log_softmax(1)).sum(1).mean()
    loss_image = -(t_image * logits.T.log_softmax(1)).sum(1).mean()
    floor = 0.5 * (pos[rows].sum(1).log().mean() + pos.sum(0).log().mean())
    return 0.5 * (loss_text + loss_image), floor


class _CaptionIds:
    """Token ids per caption, cached (the grammar has a few thousand distinct captions), padded per batch."""

    def __init__(self, tokenizer: CLIPTokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            for c, ids in zip(missing, self.tokenizer(missing).input_ids):
                self.cache[c] = ids
        rows = [self.cache[c] for c in captions]
        out = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id, dtype=torch.long)
        for k, r in enumerate(rows):
            out[k, :len(r)] = torch.tensor(r)
        return out


def train_clip(n_steps: int, batch_size: int, generator: torch.Generator, progress: bool = True, *,
               lr: float = 1e-3, weight_decay: float = 0.05, warmup: int | None = None,
               config: CLIPConfig | None = None, eval_every: int = 0, n_eval: int = 2000, seed: int = 0,
               pos_init_std: float = 0.2, on_step: Callable[[dict], None] | None = None,
               init: CLIPModel | None = None, swap: float = 0.5, targeted: bool = False,
               desc: str = "world clip"):
    """Train the world CLIP from scratch on `n_steps` fresh batches of `batch_size` scenes drawn from `generator`.

    AdamW (decay on matrices only), linear warm-up (default 5% of the steps) then cosine decay to 5% of `lr`; CLIP's
    learnable temperature, clamped at 100 as in CLIP. `seed` seeds the initial weights; the vision position
    embeddings start at std `pos_init_std` rather than HF's 0.02, which is ~10× weaker than the patch contents at
    init and delayed learning where objects are (position, count) by ~1000 steps. With `eval_every > 0` the
    zero-shot accuracy on `n_eval` held-out scenes (`HELD_OUT_SEED`) is recorded every `eval_every` steps and at the
    end. Returns `(model, tokenizer, history)`; history is a list of per-step dicts (step, loss, floor, lr,
    logit_scale, seconds: wall time since the start, evaluations included) with a `zero_shot` entry on evaluation
    steps; `on_step(entry)` is called with each. `init`: continue from this model (a copy) instead of a seeded new
    one; `swap`, `targeted`: how hard negatives exchange attributes between two groups (`scenes.hard_negatives`).
    """
    tokenizer = world_clip_tokenizer()
    config = config or world_clip_config(tokenizer)
    if init is not None:
        model = copy.deepcopy(init).float()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
            torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=pos_init_std)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, round(0.05 * n_steps)) if warmup is None else warmup

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(n_steps, warmup))
    ids_for = _CaptionIds(tokenizer)
    held_out = held_out_scenes(n_eval) if eval_every else None
    history, shown, start = [], {}, time.perf_counter()
    bar = tqdm(range(n_steps), disable=not progress, desc=desc, unit="step")
    for step in bar:
        pixels, _, scene = scenes.make_scenes(batch_size, generator)
        specs = scenes.sample_specs(scene, generator)
        specs = torch.cat([specs, scenes.hard_negatives(specs, generator, swap, targeted)])  # (2B, 2, 4)
        ids = ids_for(scenes.captions_for(specs))
        img = F.normalize(_vector(model.get_image_features(pixel_values=preprocess(pixels))), dim=-1)
        txt = F.normalize(_vector(model.get_text_features(input_ids=ids)), dim=-1)
        loss, floor = contrastive_loss(img, txt, model.logit_scale, scenes.satisfies(specs, scene))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        entry = dict(step=step + 1, loss=loss.item(), floor=floor.item(), lr=opt.param_groups[0]["lr"],
                     logit_scale=model.logit_scale.exp().item(), seconds=time.perf_counter() - start)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == n_steps):
            entry["zero_shot"] = zero_shot_accuracy(model, tokenizer, *held_out["single"])
            entry["binding"] = binding_accuracy(model, tokenizer, *held_out["pair"])
        history.append(entry)
        if on_step is not None:
            on_step(entry)
        shown = entry.get("zero_shot", shown)  # keep the latest zero-shot accuracies on the bar
        bar.set_postfix(loss=f"{entry['loss']:.3f}", floor=f"{entry['floor']:.3f}",
                        **{k: f"{v:.2f}" for k, v in shown.items()})
    model.eval()
    return model, tokenizer, history


def held_out_scenes(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`n` held-out single-group scenes and `n` two-group scenes (`HELD_OUT_SEED`): {"single"|"pair": (pixels, scene)}."""
    single = scenes.make_scenes(n, torch.Generator().manual_seed(HELD_OUT_SEED), two_groups=0.0)
    pair = scenes.make_scenes(n, torch.Generator().manual_seed(HELD_OUT_SEED + 1), two_groups=1.0)
    return {"single": (single[0], single[2]), "pair": (pair[0], pair[2])}


def _embed_images(model: CLIPModel, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([image_embeds(model, pixels[k:k + batch_size].to(model.device))
                      for k in range(0, len(pixels), batch_size)])


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, pixels: torch.Tensor, scene: torch.Tensor,
                       names=scenes.ATTRIBUTES, batch_size: int = 1000) -> dict[str, float]:
    """Zero-shot accuracy per attribute in `names` on single-group scenes (see the module docstring):
    {"colour": .., "shape": .., ...}; `scene` is the (n, 2, 4) scene tensor of `scenes.make_scenes`."""
    was_training = model.training
    model.eval()
    img = _embed_images(model, pixels, batch_size)
    out = {}
    for name in names:
        pred = (img @ text_embeds(model, tokenizer, scenes.zero_shot_prompts(name)).T).argmax(1).cpu()
        out[name] = (pred == scene[:, 0, scenes.ATTRIBUTES.index(name)]).float().mean().item()
    model.train(was_training)
    return out


@torch.no_grad()
def binding_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, pixels: torch.Tensor, scene: torch.Tensor,
                     batch_size: int = 1000) -> dict[str, float]:
    """On two-group scenes: the fraction whose full caption has a higher cosine than the same caption with the two
    groups' colours / shapes / positions exchanged, or with one group's count changed by one.
    {"swap_colour": .., "swap_shape": .., "swap_position": .., "count": ..}; scenes where the edit changes nothing
    (equal colours, say) are left out of that entry."""
    was_training = model.training
    model.eval()
    img = _embed_images(model, pixels, batch_size)
    true_sim = (img * text_embeds(model, tokenizer, scenes.captions_for(scene))).sum(1)
    out = {}
    for name, col in (("swap_colour", scenes.COLOUR), ("swap_shape", scenes.SHAPE),
                      ("swap_position", scenes.POSITION), ("count", scenes.COUNT)):
        edited = scene.clone()
        if name == "count":
            edited[:, 0, col] = (scene[:, 0, col] + 1) % len(scenes.COUNTS)
        else:
            edited[:, 0, col], edited[:, 1, col] = scene[:, 1, col], scene[:, 0, col]
        keep = ~scenes.satisfies(edited, scene).diagonal()
        if keep.any():
            sim = (img[keep] * text_embeds(model, tokenizer, scenes.captions_for(edited[keep]))).sum(1)
            out[name] = (true_sim[keep] > sim).float().mean().item()
    model.train(was_training)
    return out


def save_clip(model: CLIPModel, tokenizer: CLIPTokenizer, path: str | Path,
              dtype: torch.dtype = torch.float32) -> int:
    """`save_pretrained` of the model (in `dtype`, safetensors) and tokenizer; returns the weights' size in bytes."""
    path = Path(path)
    copy.deepcopy(model).to(dtype).save_pretrained(path)  # a copy: casting in place would round the weights
    tokenizer.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
