"""Typed configuration: `params.yaml` is parsed once into frozen dataclasses.

Every error names the key path (`train.lr`) and the reason, so a bad params file fails at load time,
not three stages later.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A params value is unknown, of the wrong type or impossible; the message starts with its key path."""


def _check(ok: bool, reason: str) -> None:
    if not ok:
        raise ValueError(reason)


SOURCE_PREFIXES = ("world", "tiny", "arch", "open_clip")
# The named sources of each role, as stitchvm/models/presets.py and world_source.py build them: config sits below
# models and cannot import them, so it lists them (tests/test_bad_inputs.py checks that the lists agree).
NAMED_SOURCES = {"backbone": ("world:sd3", "tiny:sd3", "arch:sd3.5-medium", "arch:sd3.5-large", "tiny:flux",
                              "arch:flux.1-dev"),
                 "reward": ("world:clip", "tiny:clip", "arch:clip-vit-l-14", "tiny:open_clip",
                            "arch:open_clip-vit-h-14")}
SOURCE_KINDS = "world:…, tiny:…, arch:…, open_clip:<arch>@<weights> (rewards), a local folder, or a hub id org/name"


class KeyedError(ValueError):
    """A check of one field in `__post_init__`; `from_dict` reports it under that field's key path (`backbone.source`)
    rather than the section's."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key = key


def _is_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def _check_source(source: str) -> None:
    """Any spec, built from params or in code: a `name:` source needs a known scheme, so that a mistyped one
    (`wrld:sd3`) is never taken for a hub id (hub ids have no ':'). The rest is checked at params load
    (`_check_model_source`), since specs built in code may name folders that do not exist yet."""
    if not source:
        raise KeyedError("source", f"must not be empty ({SOURCE_KINDS})")
    prefix, colon, _ = source.partition(":")
    if colon and prefix not in SOURCE_PREFIXES and not _is_local(source):
        raise KeyedError("source", f"{source!r} is not a known source ({SOURCE_KINDS})")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _check_model_source(role: str, source: str) -> None:
    """What params load can know about `<role>.source` without the network: a named source exists for its role, a
    local folder exists, a hub id is well formed, is no mistyped named source and, under HF_HUB_OFFLINE, is cached.
    An uncached hub id online fails when the first stage builds the model (stitchvm/models/sources.py)."""
    import difflib

    named, other = NAMED_SOURCES[role], next(r for r in NAMED_SOURCES if r != role)
    if _is_local(source):
        _check(Path(source).expanduser().is_dir(), f"local folder {source!r} does not exist (relative paths start "
                                                   f"from {Path.cwd()}): fix the path or use {', '.join(named)}")
        return
    if source.startswith("open_clip:"):  # the architecture name is checked when the reward is built
        _check(role == "reward", f"{source!r} is a reward model, not a {role}")
        arch, _, weights = source.removeprefix("open_clip:").partition("@")
        _check(bool(arch and weights), f"{source!r}: use open_clip:<architecture>@<weights file, org/repo/file or "
                                       f"org/repo> (e.g. open_clip:ViT-H-14@xswu/HPSv2/HPS_v2.1_compressed.pt)")
        _check(not weights.startswith(("/", ".", "~")) or Path(weights).expanduser().is_file(),
               f"open_clip weights file {weights!r} does not exist")
        return
    if ":" in source:  # _check_source has seen the scheme; the name must exist, for this role
        _check(source not in NAMED_SOURCES[other],
               f"{source!r} is a {other} model, not a {role} (use {', '.join(named)})")
        _check(source in named, f"{source!r} is not a known source ({', '.join(named)}, a local folder, or a hub id)")
        return
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except ValueError:
        raise ValueError(f"{source!r} is neither an existing local folder nor a hub id (org/name: letters, digits, "
                         f"'-', '_', '.'), nor {', '.join(named)}") from None
    close = difflib.get_close_matches(source, named, n=1, cutoff=0.75)  # `tiny-sd3` must not reach the hub
    if close:
        raise ValueError(f"{source!r} is not a known source: did you mean {close[0]!r}? (a hub id is org/name)")
    if _hub_offline():
        from huggingface_hub.constants import HF_HUB_CACHE

        cached = Path(HF_HUB_CACHE) / f"models--{source.replace('/', '--')}"
        _check(cached.is_dir(), f"hub id {source!r} is not in the Hugging Face cache ({HF_HUB_CACHE}) and "
               f"HF_HUB_OFFLINE forbids downloading it: download it online first, or use a local folder")


def _check_model_sources(params: "Params") -> None:
    """`_check_model_source` for the backbone and the reward, and the reward's head file; ConfigError with the key."""
    for role, spec in (("backbone", params.backbone), ("reward", params.reward)):
        try:
            _check_model_source(role, spec.source)
        except ValueError as e:
            raise ConfigError(f"{role}.source: {e}") from None
    head = params.reward.head
    if head not in (None, "random", "world") and not Path(head).expanduser().is_file():
        raise ConfigError(f"reward.head: file {head!r} does not exist (random, world, or a .safetensors/.pth file)")


@dataclass(frozen=True)
class ModelSpec:
    """Where a diffusion backbone comes from.

    `source`: `world:sd3` (the shipped pretrained embedded world), `tiny:<preset>` (small config, seeded random
    init), `arch:<preset>` (the real configuration with random weights) or a Hugging Face id / local path (real
    weights via `from_pretrained`).
    """

    source: str = "tiny:sd3"
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        _check_source(self.source)
        _check(self.dtype in ("float32", "float16", "bfloat16"), f"dtype {self.dtype!r} is not float32/float16/bfloat16")


@dataclass(frozen=True)
class RewardSpec:
    """Where the pixel-space reward model comes from, and which score it gives.

    `kind`: `clip` (logit_scale · cos(image, text)) or `aesthetic` (an MLP head on the normalised image embedding).
    `source`: `world:clip` (the embedded world's CLIP), a preset, or a Hugging Face id / local path.
    `head`: for `aesthetic`, `random` (seeded random head), `world` (the world's head, with `world:clip`) or a path
    to the head's weights (.safetensors or .pth).
    """

    source: str = "tiny:clip"
    kind: str = "clip"
    head: str | None = None
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        _check_source(self.source)
        _check(self.kind in ("clip", "aesthetic"), f"kind {self.kind!r} is not 'clip' or 'aesthetic'")
        _check(self.kind != "aesthetic" or self.head is not None,
               "kind 'aesthetic' needs a head ('random', 'world' or a path)")
        _check(self.head != "world" or self.source == "world:clip", "head 'world' needs source 'world:clip'")
        _check(self.dtype in ("float32", "float16", "bfloat16"), f"dtype {self.dtype!r} is not float32/float16/bfloat16")


@dataclass(frozen=True)
class StorageConfig:
    """One root for every stage output: a local folder (tracked by DVC) or `s3://bucket/prefix` through s3fs."""

    root: str = "data"
    options: dict | None = None  # fsspec storage options, e.g. {client_kwargs: {endpoint_url: http://…}}
    shard_size: int = 64

    def __post_init__(self):
        _check(bool(self.root), "root must not be empty")
        _check(self.shard_size >= 1, "shard_size must be >= 1")


@dataclass(frozen=True)
class PromptsConfig:
    """`source`: `builtin` (a list suited to the reward), a `.txt` (one prompt a line) / `.parquet` (column `prompt`)
    file, or an image folder (its `metadata.jsonl` captions). Prompts are shuffled under the seed and split into
    train / val / test."""

    source: str = "builtin"
    train: int = 8
    val: int = 2
    test: int = 4

    def __post_init__(self):
        _check(self.train >= 1 and self.test >= 1, "train and test need at least one prompt each")
        _check(self.val >= 0, "val must be >= 0")


@dataclass(frozen=True)
class SamplesConfig:
    """Clean latents: `pipeline` (the backbone's own flow-matching Euler sampler with CFG), `images` (VAE-encoded
    images of `image_folder`, `per_prompt` for each caption) or `smooth` (smooth latent fields, the testbed for
    random-weight models)."""

    source: str = "pipeline"
    image_folder: str | None = None
    per_prompt: int = 8
    steps: int = 10
    guidance_scale: float = 4.5
    batch_size: int = 16

    def __post_init__(self):
        _check(self.source in ("pipeline", "images", "smooth"),
               f"source {self.source!r} is not 'pipeline', 'images' or 'smooth'")
        _check(self.source != "images" or self.image_folder is not None, "source 'images' needs image_folder")
        _check(self.per_prompt >= 2, "per_prompt must be >= 2 (within-prompt ranks)")
        _check(self.steps >= 1, "steps must be >= 1")
        _check(self.guidance_scale >= 0, "guidance_scale must be >= 0")
        _check(self.batch_size >= 1, "batch_size must be >= 1")


@dataclass(frozen=True)
class NoisyConfig:
    """The fixed noisy inputs: the stitch-search probe (t ~ U[0, 1]) and the evaluation σ grid."""

    probe_size: int = 200
    sigmas: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)

    def __post_init__(self):
        _check(self.probe_size >= 2, "probe_size must be >= 2")
        _check(len(self.sigmas) >= 1, "needs at least one sigma")
        _check(all(0.0 <= s <= 1.0 for s in self.sigmas), f"sigmas must lie in [0, 1], got {list(self.sigmas)}")


@dataclass(frozen=True)
class SearchConfig:
    j_max: int = 4
    batch_size: int = 16
    upsample: str = "bilinear"  # U: bilinear (METHOD.md), or subpixel where the reward grid is finer (stitching.py)
    context: str = "empty"  # the CFG branch the value head reads: empty (METHOD.md's ∅) or prompt (backbone_head.py)
    kernel: int = 1  # the stitch's F: a kernel × kernel conv on the token grid (METHOD.md: 1), value/stitching.py

    def __post_init__(self):
        _check(self.upsample in ("bilinear", "subpixel"), f"upsample {self.upsample!r} is not bilinear/subpixel")
        _check(isinstance(self.kernel, int) and self.kernel >= 1 and self.kernel % 2 == 1,
               f"kernel must be an odd integer >= 1 (a centred neighbourhood), got {self.kernel!r}")
        _check(self.context in ("empty", "prompt"), f"context {self.context!r} is not empty/prompt")
        _check(self.j_max >= 1, "j_max must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")


@dataclass(frozen=True)
class FitConfig:
    """Stage 1b (`train.fit`, value/token_fit.py): F and G fitted to the teacher's tokens entering block j by Adam,
    `steps` steps (0: off, METHOD.md's recipe) of `batch_size` latents at `lr` (linear warm-up over `warmup_steps`,
    then cosine decay to 5 %); t is drawn as stage 2 draws it (train.sigma_logit_mean / std)."""

    steps: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100

    def __post_init__(self):
        _check(self.steps >= 0, f"steps must be >= 0 (0 turns the token fit off), got {self.steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class TrainConfig:
    """The stitch's G (`residual_width`, 0: METHOD.md's reward width / 8; `residual_kernel`), stage 1b (`fit`: the
    token fit) and stage 2 (distillation, `steps` ≥ 0); defaults are the paper's recipe for CLIP ViT-L on SD3.5-M."""

    residual_width: int = 0
    residual_kernel: int = 1
    fit: FitConfig = field(default_factory=FitConfig)
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-5
    stitch_lr_mult: float = 5.0
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    lambda_tok: float = 1.0
    lambda_score: float = 1.0
    sigma_logit_mean: float = 0.0
    sigma_logit_std: float = 1.0
    group_size: int = 1  # > 1: batches of same-prompt groups sharing t and noise (value/training.py)
    lambda_rank: float = 0.0  # weight of the within-group ranking loss (needs group_size > 1)
    rank_temperature: float = 1.0  # ListNet temperature, in reward units
    checkpoint_every: int = 500
    num_workers: int = 0  # DataLoader workers reading the training rows from the shards (0: the training process)

    def __post_init__(self):
        _check(self.steps >= 0, "steps must be >= 0 (0: no stage 2)")
        _check(self.residual_width >= 0, f"residual_width must be >= 0 (0: the reward width / 8), got "
                                         f"{self.residual_width}")
        _check(self.residual_kernel >= 1 and self.residual_kernel % 2 == 1,
               f"residual_kernel must be an odd integer >= 1, got {self.residual_kernel}")
        _check(self.num_workers >= 0, "num_workers must be >= 0")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.stitch_lr_mult > 0, "stitch_lr_mult must be > 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(self.grad_clip > 0, "grad_clip must be > 0")
        _check(self.lambda_tok >= 0 and self.lambda_score >= 0, "loss weights must be >= 0")
        _check(self.sigma_logit_std > 0, "sigma_logit_std must be > 0")
        _check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        _check(self.group_size >= 1 and self.batch_size % self.group_size == 0,
               f"group_size must be >= 1 and divide batch_size ({self.batch_size})")
        _check(self.lambda_rank >= 0, "lambda_rank must be >= 0")
        _check(self.lambda_rank == 0 or self.group_size > 1, "lambda_rank > 0 needs group_size > 1")
        _check(self.rank_temperature > 0, "rank_temperature must be > 0")


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation batch size and the gate for promoting a model to `champion`: at `gate_sigma`, the value's
    within-prompt Spearman must reach `min_spearman_within_prompt` and its loss must stay below the trivial predictor's
    times `max_loss_ratio`."""

    batch_size: int = 32
    gate_sigma: float = 0.5
    min_spearman_within_prompt: float = 0.3
    max_loss_ratio: float = 1.0
    mc_rollouts: int = 0  # Monte Carlo value (monte_carlo.py) with this many generator rollouts per latent; 0: off
    mc_sigmas: tuple[float, ...] = (0.5, 0.75)  # the σ (of noisy.sigmas) where it is computed

    def __post_init__(self):
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.mc_rollouts >= 0, "mc_rollouts must be >= 0 (0 turns the Monte Carlo value off)")
        _check(0.0 <= self.gate_sigma <= 1.0, "gate_sigma must lie in [0, 1]")
        _check(-1.0 <= self.min_spearman_within_prompt <= 1.0, "min_spearman_within_prompt must lie in [-1, 1]")
        _check(self.max_loss_ratio > 0, "max_loss_ratio must be > 0")


@dataclass(frozen=True)
class MlflowConfig:
    """`tracking_uri`: None means the MLFLOW_TRACKING_URI variable, else sqlite:///mlflow.db in the project."""

    tracking_uri: str | None = None
    experiment: str = "stitchvm"
    registered_model: str = "stitchvm-value"


ALIGN_METHODS = ("nft", "nft-stitchvm", "draft", "draft-stitchvm")


def _check_window(name: str, window: tuple[int, int], of_name: str, of: int) -> None:
    """A stopping window [lo, hi] in steps of an `of`-step schedule (scaled to the sampler's steps at run time)."""
    _check(len(window) == 2 and 1 <= window[0] <= window[1] < of,
           f"{name} {list(window)} must be [lo, hi] with 1 <= lo <= hi < {of_name} ({of})")


@dataclass(frozen=True)
class NftConfig:
    """DiffusionNFT (`align.nft`, methods `nft` and `nft-stitchvm`; stitchvm/alignment/nft.py); defaults follow
    NVlabs/DiffusionNFT. AdamW `lr` / `weight_decay`; `beta` the implicit-policy mixing, `adv_clip` the advantage clip
    c, `kl_weight` the KL to the base model; `train_times` grid times drawn per update (0: all); the data-collection
    policy's decay min(`old_rate` · k, `old_max`), the evaluation EMA's cap `ema_max`, evaluated when `eval_ema`;
    `tau_window` (of a `tau_of`-step schedule): where `nft-stitchvm` stops."""

    lr: float = 3e-4
    weight_decay: float = 1e-4
    beta: float = 1.0
    adv_clip: float = 5.0
    kl_weight: float = 1e-4
    train_times: int = 0
    old_rate: float = 0.001
    old_max: float = 0.5
    ema_max: float = 0.9
    eval_ema: bool = True
    tau_window: tuple[int, int] = (12, 17)
    tau_of: int = 25

    def __post_init__(self):
        for name in ("lr", "beta", "adv_clip"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "kl_weight", "old_rate", "train_times"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(0.0 <= self.old_max <= 1.0, f"old_max must lie in [0, 1], got {self.old_max}")
        _check(0.0 <= self.ema_max <= 1.0, f"ema_max must lie in [0, 1], got {self.ema_max}")
        _check_window("tau_window", self.tau_window, "tau_of", self.tau_of)


@dataclass(frozen=True)
class DraftConfig:
    """DRaFT (`align.draft`, methods `draft` and `draft-stitchvm`; stitchvm/alignment/draft.py); defaults follow the
    paper. `k`: the last K sampler steps (before τ) carry autograd; AdamW `lr` / `weight_decay`; `reg_weight`: the
    output regulariser's weight; `tau_window` (of a `tau_of`-step schedule): where `draft-stitchvm` stops."""

    k: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    reg_weight: float = 0.01
    tau_window: tuple[int, int] = (3, 7)
    tau_of: int = 10

    def __post_init__(self):
        _check(self.k >= 1, f"k must be >= 1, got {self.k}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "reg_weight"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check_window("tau_window", self.tau_window, "tau_of", self.tau_of)


@dataclass(frozen=True)
class AlignConfig:
    """Training-time alignment (stage `align`, stitchvm/alignment/nft.py and draft.py): a LoRA adapter on the MMDiT.

    `method`: `nft` (DiffusionNFT on terminal rewards), `nft-stitchvm` (rollouts stop at τ, V(z_τ) as reward, bridge
    regression anchored at z_τ), `draft` (DRaFT-K: the terminal reward backpropagated through the last K steps),
    `draft-stitchvm` (stop at τ, maximise V(z_τ) through the K steps before τ). One update = one optimiser step on
    `prompts_per_update` prompts × `group_size` rollouts of `steps` steps. The method's own keys sit in `nft`
    (NftConfig) and `draft` (DraftConfig); stopping windows are given in steps of a `tau_of`-step schedule and
    scaled to `steps`. Evaluation: the true reward of fully denoised samples for `eval_prompts` held-out prompts ×
    `eval_seeds` (`eval_steps` 0: `steps`), every `eval_every` updates (NFT evaluates its EMA weights when
    `nft.eval_ema`).
    """

    method: str = "nft"
    updates: int = 100
    prompts_per_update: int = 4
    group_size: int = 4
    steps: int = 10
    guidance_scale: float = 1.0
    eta: float = 0.0
    lora_rank: int = 32
    lora_alpha: float = 64.0
    grad_clip: float = 1.0
    checkpointing: bool = False
    eval_prompts: int = 4
    eval_seeds: tuple[int, ...] = (0, 1)
    eval_every: int = 1
    eval_steps: int = 0
    eval_guidance_scale: float = 1.0
    batch_size: int = 16
    nft: NftConfig = field(default_factory=NftConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)

    def __post_init__(self):
        _check(self.method in ALIGN_METHODS, f"method {self.method!r} is not one of {', '.join(ALIGN_METHODS)}")
        for name in ("updates", "prompts_per_update", "group_size", "lora_rank", "eval_prompts", "eval_every",
                     "batch_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.steps >= 2, f"steps must be >= 2, got {self.steps}")
        _check(self.method not in ("nft", "nft-stitchvm") or self.group_size >= 2,
               f"group_size must be >= 2 for DiffusionNFT (optimality is relative to the prompt's group), "
               f"got {self.group_size}")
        _check(self.guidance_scale >= 0 and self.eval_guidance_scale >= 0, "guidance scales must be >= 0")
        _check(0.0 <= self.eta <= 1.0, f"eta must lie in [0, 1], got {self.eta}")
        for name in ("lora_alpha", "grad_clip"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.eval_steps >= 0, f"eval_steps must be >= 0, got {self.eval_steps}")
        _check(self.method != "draft" or self.draft.k <= self.steps,
               f"draft.k ({self.draft.k}) must be <= steps ({self.steps})")
        _check(len(self.eval_seeds) >= 1, "eval_seeds needs at least one seed")


def _check_recipe(recipe) -> None:
    """The checks every bootstrap recipe shares (steps on fresh batches of procedural scenes)."""
    _check(recipe.steps >= 1, "steps must be >= 1")
    _check(recipe.batch_size >= 2, "batch_size must be >= 2")
    _check(recipe.lr > 0, "lr must be > 0")


@dataclass(frozen=True)
class ClipTraining:
    """Contrastive pretraining (`steps`), then a binding phase (`binding_steps` at `binding_lr`) that continues from
    the pretrained weights rounded to float16 (as shipped) with targeted hard negatives: two groups' attributes
    exchanged in `binding_swap` of them (stitchvm/world/clip_training.py)."""

    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    binding_steps: int = 0
    binding_lr: float = 3e-4
    binding_swap: float = 0.75

    def __post_init__(self):
        _check_recipe(self)
        _check(self.binding_steps >= 0, "binding_steps must be >= 0")
        _check(self.binding_lr > 0, "binding_lr must be > 0")
        _check(0.0 <= self.binding_swap <= 1.0, "binding_swap must lie in [0, 1]")


@dataclass(frozen=True)
class VaeTraining:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    kl_weight: float = 1e-5

    def __post_init__(self):
        _check_recipe(self)
        _check(self.kl_weight >= 0, "kl_weight must be >= 0")


@dataclass(frozen=True)
class FlowTraining:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1  # share of empty captions, so classifier-free guidance has an unconditional model

    def __post_init__(self):
        _check_recipe(self)
        _check(0.0 <= self.caption_dropout < 1.0, "caption_dropout must lie in [0, 1)")


@dataclass(frozen=True)
class HeadTraining:
    steps: int = 500
    batch_size: int = 128
    lr: float = 1e-3

    def __post_init__(self):
        _check_recipe(self)


@dataclass(frozen=True)
class WorldReportConfig:
    """The bootstrap evaluation: zero-shot and binding accuracy on `scenes` held-out scenes (the evaluator's on twice
    as many); the prompt-pair win rate over `per_prompt` samples for each of the 8 prompts "a {colour} {shape}",
    sampled with `steps` Euler steps at CFG `guidance_scale` (stitchvm/world/evaluation.py); the generator's GenEval
    accuracy over `per_prompt` samples of each built-in test prompt, with the pipeline's sampler (`samples.steps`,
    `samples.guidance_scale`)."""

    scenes: int = 2000
    per_prompt: int = 16
    steps: int = 20
    guidance_scale: float = 4.5

    def __post_init__(self):
        _check(self.scenes >= 1, "scenes must be >= 1")
        _check(self.per_prompt >= 1, "per_prompt must be >= 1")
        _check(self.steps >= 1, "steps must be >= 1")
        _check(self.guidance_scale >= 0, "guidance_scale must be >= 0")


@dataclass(frozen=True)
class WorldConfig:
    """The bootstrap stages that pretrain the embedded world (`world_*`, stitchvm/models/world_source.py)."""

    seed: int = 0
    clip: ClipTraining = field(default_factory=ClipTraining)
    vae: VaeTraining = field(default_factory=VaeTraining)
    backbone: FlowTraining = field(default_factory=FlowTraining)
    aesthetic: HeadTraining = field(default_factory=HeadTraining)
    evaluator: HeadTraining = field(default_factory=lambda: HeadTraining(steps=1500, batch_size=128, lr=2e-3))
    report: WorldReportConfig = field(default_factory=WorldReportConfig)


GUIDANCE_METHODS = ("unguided", "dps-tweedie", "dps-stitchvm", "fk-tweedie", "fk-stitchvm", "fk-tweedie-noselect",
                    "fk-stitchvm-noselect", "best-of-n", "best-of-n-matched")  # stitchvm/guidance/methods.py


def parse_schedule(text: str) -> tuple[str, tuple[float, ...]]:
    """A guidance schedule c_t / scale: `constant`, `power:P` (σ^P) or `window:LO:HI` (1 for σ in [LO, HI])."""
    kind, _, rest = str(text).partition(":")
    try:
        args = tuple(float(a) for a in rest.split(":")) if rest else ()
    except ValueError:
        raise ValueError(f"schedule {text!r}: arguments must be numbers") from None
    ok = {"constant": len(args) == 0, "power": len(args) == 1,
          "window": len(args) == 2 and 0 <= args[0] <= args[1] <= 1}
    _check(ok.get(kind, False), f"schedule {text!r} is not 'constant', 'power:P' or 'window:LO:HI' "
                                f"(0 <= LO <= HI <= 1)")
    return kind, args


@dataclass(frozen=True)
class GuidanceConfig:
    """Reward-guided sampling (the `guidance` stage and `bench guidance`): every method on the same prompts and seeds.

    Scales differ by orders of magnitude between the two DPS value sources (paper sweeps: Tweedie 0.01–0.5,
    StitchVM 0.5–7); schedules are `constant`, `power:P` or `window:LO:HI` on σ. `eta` is the stochastic sampler's
    noise level for every method (FK needs eta > 0 for its proposals to differ). FK: `particles` N, `proposals` M
    during the first `proposal_fraction` of the steps, resampling every `resample_every` steps inside `window`
    (fractions of the steps). Best-of-N keeps, per prompt, the best of `best_of_n` independent samples by the true
    reward (the teacher on the decoded image): an oracle reference. `prompts` test prompts × `per_prompt` samples,
    sampled `batch_size` at a time (chunk k uses the generator seeded `seed + k`, the same for every method).
    `value_i`/`value_j`: the stitch of an untrained value model, used only where no trained one exists (benchmarks
    on `arch` sizes, counting mode). `count_resolutions`: pixel sizes of the counting mode (`bench guidance --count`).
    """

    methods: tuple[str, ...] = ("unguided", "dps-tweedie", "dps-stitchvm", "fk-tweedie", "fk-stitchvm", "best-of-n")
    steps: int = 10
    guidance_scale: float = 4.5
    eta: float = 1.0
    scale_tweedie: float = 0.1
    scale_stitchvm: float = 2.0
    schedule_tweedie: str = "constant"
    schedule_stitchvm: str = "constant"
    particles: int = 4
    proposals: int = 2
    proposal_fraction: float = 0.4
    resample_every: int = 4
    window: tuple[float, ...] = (0.2, 0.8)
    best_of_n: int = 4
    prompts: int = 4
    per_prompt: int = 2
    batch_size: int = 8
    seed: int = 0
    value_i: int = 4
    value_j: int = 4
    count_resolutions: tuple[int, ...] = (512, 1024)

    def __post_init__(self):
        _check(len(self.methods) >= 1, "methods must name at least one method")
        bad = [m for m in self.methods if m not in GUIDANCE_METHODS]
        _check(not bad, f"unknown method {bad[0]!r} in methods (known: {', '.join(GUIDANCE_METHODS)})" if bad else "")
        _check(len(set(self.methods)) == len(self.methods), "methods must not repeat")
        if "best-of-n-matched" in self.methods:  # its N comes from the times measured before it
            before = self.methods[:self.methods.index("best-of-n-matched")]
            _check("unguided" in before and "fk-stitchvm" in before,
                   "methods: best-of-n-matched must come after unguided and fk-stitchvm (it matches their times)")
        _check(self.steps >= 1, "steps must be >= 1")
        _check(self.guidance_scale >= 0, "guidance_scale must be >= 0")
        _check(0.0 <= self.eta <= 1.0, "eta must lie in [0, 1]")
        _check(self.scale_tweedie >= 0 and self.scale_stitchvm >= 0, "guidance scales must be >= 0")
        parse_schedule(self.schedule_tweedie)
        parse_schedule(self.schedule_stitchvm)
        _check(self.particles >= 1 and self.proposals >= 1, "particles and proposals must be >= 1")
        _check(0.0 <= self.proposal_fraction <= 1.0, "proposal_fraction must lie in [0, 1]")
        _check(self.resample_every >= 1, "resample_every must be >= 1")
        _check(len(self.window) == 2 and 0.0 <= self.window[0] <= self.window[1] <= 1.0,
               f"window must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(self.window)}")
        _check(self.best_of_n >= 1, "best_of_n must be >= 1")
        _check(self.prompts >= 1 and self.per_prompt >= 1, "prompts and per_prompt must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.value_i >= 1 and self.value_j >= 1, "value_i and value_j must be >= 1")
        _check(len(self.count_resolutions) >= 1 and all(r >= 8 for r in self.count_resolutions),
               "count_resolutions must list pixel sizes >= 8")


def check_device(device: str) -> str:
    """A device setting: `auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`."""
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is not None,
           f"device {device!r} is not auto, cpu, cuda or cuda:N")
    return device


@dataclass(frozen=True)
class Params:
    seed: int = 0
    device: str = "auto"  # where the stages run (stitchvm/stages/runtime.py); the CLI's --device overrides it
    backbone: ModelSpec = field(default_factory=ModelSpec)
    reward: RewardSpec = field(default_factory=RewardSpec)
    storage: StorageConfig = field(default_factory=StorageConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    noisy: NoisyConfig = field(default_factory=NoisyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    def __post_init__(self):
        check_device(self.device)
        _check(self.evaluate.mc_rollouts == 0 or set(self.evaluate.mc_sigmas) <= set(self.noisy.sigmas),
               f"evaluate.mc_sigmas {list(self.evaluate.mc_sigmas)} are not all among noisy.sigmas "
               f"{list(self.noisy.sigmas)}")
        _check(self.evaluate.gate_sigma in self.noisy.sigmas,
               f"evaluate.gate_sigma {self.evaluate.gate_sigma} is not one of noisy.sigmas {list(self.noisy.sigmas)}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, path: str):
    """Check `value` against the annotation `tp` (the small subset params use) and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (inner, _) = typing.get_args(tp)
        return tuple(_convert(v, inner, f"{path}[{k}]") for k, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return value
    if (tp in (int, float) and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data, path: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types with the key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known keys: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        if isinstance(e, KeyedError):  # one field's check: name the field, not just its section
            raise ConfigError(f"{path + '.' if path else ''}{e.key}: {e}") from None
        raise ConfigError(f"{path or '<root>'}: {e}") from None


def load_params(path: str | Path) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:  # file:line:column, as editors and compilers write it
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    try:
        params = from_dict(Params, data)
        _check_model_sources(params)
        return params
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: plain YAML keeps the last one silently,
    so a second `train:` section would quietly replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def to_dict(obj):
    """The plain form of a config (tuples become lists) for JSON, MLflow params and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj
