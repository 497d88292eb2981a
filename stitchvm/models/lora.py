"""LoRA adapters (peft) on the SD3-family MMDiT for training-time alignment.

`LoraPolicy` owns a *copy* of the backbone's transformer with named LoRA adapters on every attention projection
(`to_q, to_k, to_v, to_out.0` of the image stream, `add_q_proj, add_k_proj, add_v_proj, to_add_out` of the context
stream; r = 32, α = 64 by default):

- `"default"`: the trained policy θ (the only adapter whose tensors require grad);
- `"old"`: DiffusionNFT's data-collection policy θ_old;
- `"ema"`: the evaluation EMA of θ.

The reference (base) model is the same transformer with every adapter disabled (`policy.reference()`), so it costs
no memory. The copy keeps the shared backbone untouched: other stages and the stitched value model (whose head
*shares* the backbone's first i blocks) keep seeing the frozen base weights. `copy=False` injects into the given
backbone's transformer instead (saves one transformer of memory; then anything sharing its blocks sees the adapter).

peft initialises `lora_B` to zero, so a fresh adapter is an exact no-op on the transformer's output.
Saved adapters use peft's format: `adapter_config.json` + `adapter_model.safetensors` (keys without the adapter name,
as `PeftModel.save_pretrained` writes them), loadable with `LoraPolicy.load` or peft/diffusers loaders.
"""
from __future__ import annotations

import copy as copy_module
import dataclasses
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from stitchvm.models.backbone import Backbone, seeded

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TRAINED = "default"
CONFIG_FILE, WEIGHTS_FILE, META_FILE = "adapter_config.json", "adapter_model.safetensors", "stitchvm_adapter.json"


def lora_config(rank: int = 32, alpha: float = 64, target_modules=TARGET_MODULES) -> LoraConfig:
    """peft LoraConfig on the MMDiT attention projections; `lora_B = 0` at init (exact no-op)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"lora alpha must be > 0, got {alpha!r}")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True,
                      lora_dropout=0.0, bias="none")


class LoraPolicy:
    """A backbone whose transformer carries named LoRA adapters (module docstring)."""

    def __init__(self, backbone: Backbone, rank: int = 32, alpha: float = 64, adapters: tuple[str, ...] = (TRAINED,),
                 copy: bool = True, seed: int = 0):
        if TRAINED not in adapters:
            raise ValueError(f"adapters must include {TRAINED!r} (the trained policy), got {adapters}")
        self.base = backbone
        transformer = copy_module.deepcopy(backbone.transformer) if copy else backbone.transformer
        self.backbone = dataclasses.replace(backbone, transformer=transformer) if copy else backbone
        self.config = lora_config(rank, alpha)
        self.adapters = tuple(adapters)
        with seeded(seed), warnings.catch_warnings():  # lora_A is drawn at random (kaiming): keep the global RNG
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: intended
            for name in adapters:
                transformer.add_adapter(copy_module.deepcopy(self.config), adapter_name=name)
        for name in adapters[1:]:
            self.copy_(TRAINED, name)  # every adapter starts as the policy (θ_old = θ_ema = θ at step 0)
        self._active = TRAINED
        self.activate(TRAINED)

    # ---- switching ---------------------------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.backbone.transformer

    @property
    def active(self) -> str | None:
        return self._active

    def activate(self, name: str | None) -> None:
        """Run the transformer with adapter `name` (None: no adapter, the base model). Only `"default"` ever
        requires grad (peft's own switching would toggle requires_grad with the active adapter)."""
        tr = self.transformer
        if name is None:
            tr.disable_adapters()
        else:
            if name not in self.adapters:
                raise ValueError(f"unknown adapter {name!r} (adapters: {', '.join(self.adapters)})")
            tr.set_adapter(name)
            tr.enable_adapters()
            tr.set_adapter(name)
        self._active = name
        for n, p in tr.named_parameters():
            p.requires_grad_(_adapter_of(n) == TRAINED)

    @contextmanager
    def use(self, name: str | None):
        """`with policy.use("old"):` runs the transformer with that adapter, then restores the previous one."""
        previous = self._active
        self.activate(name)
        try:
            yield self.backbone
        finally:
            self.activate(previous)

    def reference(self):
        """The base model (every adapter disabled): `with policy.reference(): ...`."""
        return self.use(None)

    # ---- tensors -----------------------------------------------------------------------------------------------
    def lora_tensors(self, name: str = TRAINED) -> dict[str, torch.nn.Parameter]:
        """{module path + '.lora_A' / '.lora_B': parameter} of adapter `name` (live parameters, not copies)."""
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r} (adapters: {', '.join(self.adapters)})")
        out = {}
        for path, module in self.transformer.named_modules():
            if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {}):
                out[f"{path}.lora_A"] = module.lora_A[name].weight
                out[f"{path}.lora_B"] = module.lora_B[name].weight
        return out

    def parameters(self, name: str = TRAINED) -> list[torch.nn.Parameter]:
        return list(self.lora_tensors(name).values())

    @torch.no_grad()
    def copy_(self, src: str, dst: str) -> None:
        """dst ← src, tensor by tensor."""
        for a, b in zip(self.lora_tensors(src).values(), self.lora_tensors(dst).values(), strict=True):
            b.copy_(a)

    @torch.no_grad()
    def ema_(self, dst: str, src: str, decay: float) -> None:
        """dst ← decay · dst + (1 - decay) · src on every LoRA tensor (A and B separately, as the reference does)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        for a, b in zip(self.lora_tensors(src).values(), self.lora_tensors(dst).values(), strict=True):
            b.copy_(b * decay + a * (1.0 - decay))

    # ---- persistence -------------------------------------------------------------------------------------------
    def state_dict(self, name: str = TRAINED) -> dict[str, torch.Tensor]:
        """peft's state dict of one adapter (keys without the adapter name, as `save_pretrained` stores them)."""
        state = get_peft_model_state_dict(self.transformer, adapter_name=name)
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def save(self, path: str | Path, name: str = TRAINED, metadata: dict | None = None) -> Path:
        """Write adapter `name` in peft's format (`adapter_config.json`, `adapter_model.safetensors`) plus
        `stitchvm_adapter.json` (backbone spec, rank, alpha, `metadata`)."""
        from stitchvm.config import to_dict

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = copy_module.deepcopy(self.config)
        cfg.base_model_name_or_path = self.base.spec.source
        sort_set_fields(cfg)
        cfg.save_pretrained(str(path))
        save_file(self.state_dict(name), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {"format": "stitchvm-adapter/1", "backbone": to_dict(self.base.spec), "rank": self.config.r,
                "alpha": self.config.lora_alpha, "adapter": name, **(metadata or {})}
        (path / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return path

    @torch.no_grad()
    def load(self, path: str | Path, name: str = TRAINED) -> None:
        """Load a saved adapter (peft format) into adapter `name`; shapes must match."""
        path = Path(path)
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path / f} does not exist: {path} is not a saved LoRA adapter")
        cfg = LoraConfig.from_pretrained(str(path))
        if (cfg.r, cfg.lora_alpha) != (self.config.r, self.config.lora_alpha):
            raise ValueError(f"{path}: adapter has r={cfg.r}, alpha={cfg.lora_alpha}; this policy has "
                             f"r={self.config.r}, alpha={self.config.lora_alpha}")
        state = load_file(str(path / WEIGHTS_FILE), device=str(self.backbone.device))
        result = set_peft_model_state_dict(self.transformer, state, adapter_name=name)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if missing:
            raise ValueError(f"{path}: tensor {missing[0]!r} does not fit this transformer")
        self.activate(self._active)

    @classmethod
    def from_pretrained(cls, backbone: Backbone, path: str | Path, copy: bool = True) -> "LoraPolicy":
        cfg = LoraConfig.from_pretrained(str(path))
        policy = cls(backbone, cfg.r, cfg.lora_alpha, copy=copy)
        policy.load(path)
        return policy


def sort_set_fields(cfg: LoraConfig) -> None:
    """Set-valued fields (peft keeps `target_modules` as a set) as sorted lists, in place: peft writes a set in
    hash-random order (PYTHONHASHSEED), and adapter_config.json must be byte-stable (DVC hashes it). Loading turns the
    lists back into sets."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, (set, frozenset)):
            setattr(cfg, f.name, sorted(value))


def _adapter_of(param_name: str) -> str | None:
    """'….lora_A.old.weight' -> 'old'; None for a base weight."""
    parts = param_name.split(".")
    for k, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            return parts[k + 1]
    return None
