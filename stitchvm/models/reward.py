"""The pixel-space reward model (CLIP family), split at reward block j.

Block indices are 1-based as in METHOD.md: `tokens_entering(x, j)` is r_{<j} (the tokens that enter block j) and
`RewardTail(j)` is r_{≥j} (blocks j..L, final norm, projection). HF CLIP vision runs embeddings → pre_layrnorm →
layers → post_layernorm(h[:, 0]) → visual_projection, so for j = 1 the tail owns `pre_layrnorm`.
Preprocessing is done in torch so the reward is differentiable with respect to the pixels. open_clip checkpoints
(HPSv2, DFN-CLIP: `open_clip:<arch>@<weights>`) are converted to CLIPModel by stitchvm/models/open_clip_reward.py and
split here like any other.

The reward API, the one place that knows the reward kinds (clip: the prompt's text embedding enters the score;
aesthetic: a scalar head on the image embedding, the prompt is ignored):
- `ClipReward.prompt_embeds(prompts)`: what a score needs of the prompts (None for a prompt-free kind);
- `ClipReward.score(image_embeds, text)` / `score_matrix` / `head_scores`: scores from embeddings;
- `ClipReward.score_pixels(pixels, prompts)`: r(x, prompt), differentiable in the pixels;
- `score_latents(backbone, reward, z0, prompts)`: r(D(z0), prompt), differentiable in z0;
- `true_reward(backbone, reward, z0, prompts)`: the same in batches without autograd, the true reward every stage,
  guidance method and trainer reports.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from stitchvm.models.backbone import DTYPES, Backbone, fan_in_init_, seeded, upcast
from stitchvm.config import RewardSpec
from stitchvm.models.presets import REWARD_PRESETS, is_preset, lookup
from stitchvm.models.tokenizers import tiny_clip_tokenizer
from stitchvm.models.world_source import check_world_source, is_world, world_path
from stitchvm.models.sources import loading
from stitchvm.models.open_clip_reward import build_open_clip, build_open_clip_preset, is_open_clip, openai_tokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LAION_AESTHETIC_WIDTHS = (1024, 128, 64, 16)


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor's MLP (same layer layout, so its state dict loads as is)."""

    def __init__(self, in_dim: int, widths: tuple[int, ...] = LAION_AESTHETIC_WIDTHS):
        super().__init__()
        dims = (in_dim, *widths)
        layers: list[nn.Module] = []
        for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if k < len(widths) - 1:
                layers.append(nn.Dropout(0.2 if k < 2 else 0.1))
        layers.append(nn.Linear(dims[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)  # (B, E) -> (B,)


class RewardTail(nn.Module):
    """r_{≥j}: CLIP vision blocks j..L, final norm and projection; returns (image embedding, per-token outputs)."""

    def __init__(self, clip: CLIPModel, j: int):
        super().__init__()
        vision = clip.vision_model
        self.pre_layrnorm = vision.pre_layrnorm if j == 1 else nn.Identity()
        self.layers = nn.ModuleList(vision.encoder.layers[j - 1:])
        self.post_layernorm = vision.post_layernorm
        self.visual_projection = clip.visual_projection

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pre_layrnorm(tokens)  # (B, 1+P, D)
        for layer in self.layers:
            h = layer(h, None)
        return self.visual_projection(self.post_layernorm(h[:, 0])), h  # (B, E), (B, 1+P, D)


class ClipReward(nn.Module):
    """A frozen CLIP-family reward: score = logit_scale · cos(image, text), or an aesthetic head on the image."""

    def __init__(self, spec: RewardSpec, clip: CLIPModel, tokenizer: CLIPTokenizer, head: AestheticHead | None = None,
                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
        super().__init__()
        self.spec, self.clip, self.tokenizer, self.head = spec, clip, tokenizer, head
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.requires_grad_(False).eval()

    @property
    def vision_config(self):
        return self.clip.config.vision_config

    @property
    def depth(self) -> int:
        return self.vision_config.num_hidden_layers

    @property
    def width(self) -> int:
        return self.vision_config.hidden_size

    @property
    def grid(self) -> tuple[int, int]:
        n = self.vision_config.image_size // self.vision_config.patch_size
        return n, n

    def check_block(self, j: int) -> None:
        if not 1 <= j <= self.depth:
            raise ValueError(f"reward block j={j} is out of range: the reward model {self.spec.source!r} has "
                             f"{self.depth} blocks (valid j: 1..{self.depth})")

    @property
    def dtype(self) -> torch.dtype:
        """The frozen CLIP's dtype (reward.dtype); scores, embeddings, the text-embedding cache and the aesthetic head
        are float32 (at least)."""
        return self.clip.dtype

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, S, S) normalised; resize shorter side to S, centre crop (as CLIP).
        Computed in float32 at least (the antialiased bicubic resize has no bfloat16 kernel on the CPU, and a
        bf16 resize would add its rounding to the VAE's), then cast to the CLIP's dtype for its patch embedding."""
        pixels = upcast(pixels)
        s = self.vision_config.image_size
        h, w = pixels.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            pixels = F.interpolate(pixels, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - s) // 2, (nw - s) // 2
            pixels = pixels[..., top:top + s, left:left + s]
        x = (pixels + 1) / 2
        return ((x - self.image_mean) / self.image_std).to(self.dtype)  # (B, 3, S, S) in the CLIP's dtype

    def tokens_entering(self, pixels: torch.Tensor, j: int) -> torch.Tensor:
        """r_{<j}: the (B, 1+P, D) tokens that enter reward block j (j = 1: the embeddings, before pre_layrnorm)."""
        self.check_block(j)
        vision = self.clip.vision_model
        h = vision.embeddings(self.preprocess(pixels))
        if j > 1:
            h = vision.pre_layrnorm(h)
            for layer in vision.encoder.layers[: j - 1]:
                h = layer(h, None)
        return h

    def tail(self, j: int) -> RewardTail:
        self.check_block(j)
        return RewardTail(self.clip, j)

    def image_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher outputs on pixels: (B, E) l2-normalised embedding and (B, 1+P, D) final token states."""
        embeds, tokens = self.tail(1)(self.tokens_entering(pixels, 1))
        return F.normalize(upcast(embeds), dim=-1), tokens  # the embedding in float32 (it meets the text cache)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """(K, E) l2-normalised text embeddings; cached per prompt since the text tower is frozen."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.image_mean.device)
            out = self.clip.get_text_features(input_ids=ids)
            out = getattr(out, "pooler_output", out)
            for p, e in zip(missing, F.normalize(out.float(), dim=-1)):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    @property
    def reads_prompt(self) -> bool:
        """Whether the score depends on the prompt (a CLIP similarity) or not (an aesthetic head)."""
        return self.spec.kind == "clip"

    def prompt_embeds(self, prompts: list[str]) -> torch.Tensor | None:
        """(K, E) what `score` needs of the prompts: their text embeddings, or None for a prompt-free reward."""
        return self.text_embeds(prompts) if self.reads_prompt else None

    def head_scores(self, image_embeds: torch.Tensor) -> torch.Tensor | None:
        """(B,) the scalar head's scores of normalised image embeddings; None for a reward without a head."""
        return None if self.head is None else self._head(image_embeds)

    def _head(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B,) the aesthetic head (float32 weights whatever reward.dtype: an MLP on one vector) on (B, E) embeds."""
        return self.head(image_embeds.to(self.head.layers[0].weight.dtype))

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) r(x, prompt) of (B, 3, H, W) pixels in [-1, 1]; differentiable in the pixels."""
        embeds, _ = self.image_features(pixels)
        text = self.prompt_embeds(prompts)
        return self.score(embeds, None if text is None else text.to(embeds.device))

    def score(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) reward from normalised image embeddings (B, E) and, for CLIP, the matching text embeddings (B, E).
        Float32 whatever the embeddings' dtype (bf16 keeps ~3 digits: samples of one prompt would tie)."""
        if self.spec.kind == "aesthetic":
            return self._head(image_embeds)
        if text_embeds is None:
            raise ValueError("a CLIP reward needs the prompts' text embeddings to score images")
        return upcast(self.clip.logit_scale).exp() * (upcast(image_embeds) * upcast(text_embeds)).sum(-1)

    def score_matrix(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B, K): every image against every prompt (for an aesthetic head the K columns are equal)."""
        if self.spec.kind == "aesthetic":
            return self._head(image_embeds)[:, None].expand(-1, text_embeds.shape[0])
        return upcast(self.clip.logit_scale).exp() * upcast(image_embeds) @ upcast(text_embeds).T  # as `score`


def score_latents(backbone: Backbone, reward: ClipReward, z0: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(B,) r(D(z0), prompt): the reward of the decoded clean latents; differentiable in z0 (DRaFT, DPS-Tweedie)."""
    return reward.score_pixels(backbone.decode(z0), prompts)


@torch.no_grad()
def true_reward(backbone: Backbone, reward: ClipReward, z0: torch.Tensor, prompts: list[str],
                batch_size: int = 16) -> torch.Tensor:
    """(B,) float32 the true reward of clean latents (the teacher on the decoded image), in batches, no autograd."""
    if len(prompts) != z0.shape[0]:
        raise ValueError(f"true_reward: {z0.shape[0]} latents but {len(prompts)} prompts")
    return torch.cat([score_latents(backbone, reward, z0[k:k + batch_size], prompts[k:k + batch_size]).float()
                      for k in range(0, len(prompts), batch_size)])


def build_reward(spec: RewardSpec, device: str | torch.device = "cpu") -> ClipReward:
    """The one factory for reward models (see `RewardSpec`)."""
    dtype = DTYPES[spec.dtype]
    if is_preset(spec.source) and "open_clip" in lookup(REWARD_PRESETS, spec.source, "reward"):
        clip = build_open_clip_preset(REWARD_PRESETS[spec.source], spec.seed, device)
        tokenizer = tiny_clip_tokenizer() if spec.source.startswith("tiny:") else openai_tokenizer()
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    elif is_preset(spec.source):
        cfg = lookup(REWARD_PRESETS, spec.source, "reward")
        with seeded(spec.seed), torch.device(device):
            clip = CLIPModel(CLIPConfig(text_config=cfg["text_config"], vision_config=cfg["vision_config"],
                                        projection_dim=cfg["projection_dim"]))
            if spec.source.startswith("tiny:"):
                fan_in_init_(clip)
        tokenizer = tiny_clip_tokenizer()
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    elif is_open_clip(spec.source):
        with loading("reward.source", spec.source):
            clip, tokenizer = build_open_clip(spec.source, dtype, device)
        # open_clip 3.3.0's preprocess configs of HPSv2 (ViT-H-14) and DFN5B: OpenAI's mean/std, bicubic; DFN5B
        # squashes to S×S where `preprocess` crops the shorter side: the same for the square images a sampler makes
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    else:
        source = _world_clip(spec.source) if is_world(spec.source) else spec.source
        with loading("reward.source", spec.source):  # a missing repo or folder part: one line, not a paragraph
            clip = CLIPModel.from_pretrained(source, dtype=dtype).to(device)
            tokenizer = _clip_tokenizer(source, clip.config.text_config.vocab_size)
        mean, std = _image_normalisation(source)
    # the aesthetic head stays float32 (ClipReward._head); the CLIP takes reward.dtype
    head = _build_head(spec, clip.config.projection_dim, device) if spec.kind == "aesthetic" else None
    return ClipReward(spec, clip.to(dtype), tokenizer, head, mean, std).to(device)


def _clip_tokenizer(source, vocab_size: int) -> CLIPTokenizer:
    """The checkpoint's own tokenizer, or OpenAI's BPE where it ships none and the model has OpenAI's 49408 ids:
    PickScore_v1 (yuvalkirstain/PickScore_v1) holds only the model; its authors load the processor of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K, whose tokenizer is OpenAI's BPE (end-of-text as padding, 77 tokens).
    transformers 5 loads a folder without tokenizer files as an empty tokenizer instead of failing, so a tokenizer
    whose size is not the model's vocabulary counts as none."""
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is not None and len(tokenizer) == vocab_size:
        return tokenizer
    if vocab_size == 49408:
        return openai_tokenizer()
    raise ValueError(f"reward.source {str(source)!r}: no tokenizer for its {vocab_size}-token text model (the "
                     f"checkpoint has {'none' if tokenizer is None else f'one of {len(tokenizer)} tokens'})")


def _world_clip(source: str) -> Path:
    check_world_source(source)
    if source != "world:clip":
        raise ValueError(f"{source!r} is a diffusion backbone, not a reward model (use world:clip)")
    return world_path("clip")


def _build_head(spec: RewardSpec, in_dim: int, device) -> AestheticHead:
    if spec.head == "random":
        widths = lookup(REWARD_PRESETS, spec.source, "reward")["aesthetic_widths"] if is_preset(spec.source) else (
            LAION_AESTHETIC_WIDTHS)
        with seeded(spec.seed + 1), torch.device(device):
            return AestheticHead(in_dim, widths)
    path = world_path("aesthetic.safetensors") if spec.head == "world" else Path(spec.head)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head weights {path} do not exist (reward.head)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    head = AestheticHead(in_dim)
    head.load_state_dict(state)
    return head.to(device)


def _image_normalisation(source: str):
    """CLIP's mean/std from the checkpoint's preprocessor config when it has one, else OpenAI's."""
    cfg = Path(source) / "preprocessor_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        return tuple(data.get("image_mean", OPENAI_CLIP_MEAN)), tuple(data.get("image_std", OPENAI_CLIP_STD))
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


class RewardSum(nn.Module):
    """Σ_k w_k r_k(x, prompt): a multi-reward objective (the paper aligns with DFN-CLIP + HPSv2) as a true reward.

    It offers `score_pixels`, what the true reward's consumers call (`score_latents`, `true_reward`: alignment, the
    policy evaluation, DPS-Tweedie); its value model is the weighted sum of one stitched value model per term
    (stitchvm/value/value_sum.py says why). Each term keeps its own scale (logit_scale · cosine with each
    checkpoint's own logit_scale; HPSv2 publishes the plain cosine), so `weights` set the trade-off.
    """

    def __init__(self, terms: list[ClipReward], weights: list[float]):
        super().__init__()
        if not terms or len(terms) != len(weights):
            raise ValueError(f"a reward sum needs one weight per term: {len(terms)} terms, {len(weights)} weights")
        self.terms, self.weights = nn.ModuleList(terms), [float(w) for w in weights]
        self.requires_grad_(False).eval()

    @property
    def reads_prompt(self) -> bool:
        return any(r.reads_prompt for r in self.terms)

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) Σ_k w_k r_k of (B, 3, H, W) pixels in [-1, 1]; differentiable in the pixels."""
        return sum(w * r.score_pixels(pixels, prompts) for w, r in zip(self.weights, self.terms))


def build_reward_sum(specs: list[RewardSpec], weights: list[float], device: str | torch.device = "cpu") -> RewardSum:
    """A `RewardSum` of rewards built by `build_reward` (e.g. DFN-CLIP and HPSv2 through their open_clip sources)."""
    return RewardSum([build_reward(s, device) for s in specs], weights)
