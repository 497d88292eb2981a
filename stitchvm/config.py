"""Typed configuration: `params.yaml` is parsed once into frozen dataclasses.

Every error names the key path (`train.lr`) and the reason, so a bad params file fails at load time,
not three stages later.
"""
from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class ModelSpec:
    """Where a diffusion backbone comes from.

    `source`: `tiny:<preset>` (small config, seeded random init), `arch:<preset>` (the real configuration with
    random weights) or a Hugging Face id / local path (real weights via `from_pretrained`).
    """

    source: str = "tiny:sd3"
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        _check(bool(self.source), "source must not be empty")
        _check(self.dtype in ("float32", "float16", "bfloat16"), f"dtype {self.dtype!r} is not float32/float16/bfloat16")


@dataclass(frozen=True)
class RewardSpec:
    """Where the pixel-space reward model comes from, and which score it gives.

    `kind`: `clip` (logit_scale · cos(image, text)) or `aesthetic` (an MLP head on the normalised image embedding).
    `head`: for `aesthetic`, `random` (seeded random head) or a path to the head's weights (.safetensors or .pth).
    """

    source: str = "tiny:clip"
    kind: str = "clip"
    head: str | None = None
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        _check(bool(self.source), "source must not be empty")
        _check(self.kind in ("clip", "aesthetic"), f"kind {self.kind!r} is not 'clip' or 'aesthetic'")
        _check(self.kind != "aesthetic" or self.head is not None, "kind 'aesthetic' needs a head ('random' or a path)")
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

    def __post_init__(self):
        _check(self.j_max >= 1, "j_max must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Stage 2 (distillation); defaults are the paper's recipe for CLIP ViT-L on SD3.5-M."""

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
    checkpoint_every: int = 500

    def __post_init__(self):
        _check(self.steps >= 1, "steps must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.stitch_lr_mult > 0, "stitch_lr_mult must be > 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(self.grad_clip > 0, "grad_clip must be > 0")
        _check(self.lambda_tok >= 0 and self.lambda_score >= 0, "loss weights must be >= 0")
        _check(self.sigma_logit_std > 0, "sigma_logit_std must be > 0")
        _check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation batch size and the gate for promoting a model to `champion`: at `gate_sigma`, the value's
    within-prompt Spearman must reach `min_spearman_within_prompt` and its loss must stay below the trivial predictor's
    times `max_loss_ratio`."""

    batch_size: int = 32
    gate_sigma: float = 0.5
    min_spearman_within_prompt: float = 0.3
    max_loss_ratio: float = 1.0

    def __post_init__(self):
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(0.0 <= self.gate_sigma <= 1.0, "gate_sigma must lie in [0, 1]")
        _check(-1.0 <= self.min_spearman_within_prompt <= 1.0, "min_spearman_within_prompt must lie in [-1, 1]")
        _check(self.max_loss_ratio > 0, "max_loss_ratio must be > 0")


@dataclass(frozen=True)
class MlflowConfig:
    """`tracking_uri`: None means the MLFLOW_TRACKING_URI variable, else sqlite:///mlflow.db in the project."""

    tracking_uri: str | None = None
    experiment: str = "stitchvm"
    registered_model: str = "stitchvm-value"


@dataclass(frozen=True)
class Params:
    seed: int = 0
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

    def __post_init__(self):
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
        raise ConfigError(f"{path or '<root>'}: {e}") from None


def load_params(path: str | Path) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f)
    try:
        return from_dict(Params, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(obj):
    """The plain form of a config (tuples become lists) for JSON, MLflow params and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj
