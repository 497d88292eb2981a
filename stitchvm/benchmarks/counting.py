"""Counting mode of `bench guidance`: FLOPs and saved activations of one guided step, at real sizes, without a GPU.

The models are built on PyTorch's `meta` device (shapes only, no memory, no arithmetic) and one sampler step of each
method is run through the library's own functions:

- `unguided`: `sampling.cfg_velocity` under no_grad (both CFG branches, one batched call) + `sampling.sde_step`;
- `dps-tweedie` / `dps-stitchvm`: the `value_and_grad` callable that `guidance.dps_tweedie` / `guidance.dps_stitchvm`
  hold (`tweedie_value_and_grad`: CFG forward with autograd, Tweedie ẑ0, VAE decode, the reward's resize to its
  input size and CLIP, backward through all of it; `stitchvm_value_and_grad`: the unconditional branch's first i
  blocks shared with the value head, stitch + reward tail, backward through those only, the conditional branch under
  no_grad), then the correction `-c ∇V` and `sde_step`. `DPS.__call__` itself is not run because its coefficient
  reads σ as a Python float (`guidance._coefficient`: `float(t)`), which a meta tensor cannot give; it is a scalar and
  costs no FLOPs.
- other backbones at 1024² (`count_backbones`, the rows `bench guidance --count` adds when 1024 is among its
  resolutions): SD3.5-Large and FLUX.1-dev. FLUX.1-dev is guidance-distilled: its unguided step is one pass (no CFG
  pair), and DPS-StitchVM is counted with the head that shares that pass (the prompt branch at the sampler's embedded
  guidance) and with an empty-prompt head, whose i blocks are an extra forward.
- `fk-tweedie` / `fk-stitchvm` (per particle, during the proposal phase): the rest of the CFG velocity that the
  previous step's look at z_t left to do, M proposal steps and the M looks of `guidance.fk.tweedie_potential` /
  `stitchvm_potential` (no autograd): a look at a proposal is its potential together with the passes the next step's
  velocity reuses (the Tweedie potential's conditional branch, the value head's i blocks).

FLOPs: `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; elementwise ops count 0). Its
module tracker is replaced by a no-op: the tracker raises when a module's input is a leaf that requires grad inside
`autograd.grad` (DPS-StitchVM's head gets `z_t` itself), and only the global total is needed here.
Saved activations: every tensor autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`), counted
once per storage, parameters and buffers excluded.
Attention: on meta, `scaled_dot_product_attention` would take the math path, which saves the N² attention
probabilities; a GPU runs a fused kernel that saves only the output and the log-sum-exp. Every SDPA call is
therefore routed to the fused CPU kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, meta kernel and
autograd formula included), whose FLOPs are registered with the counter using torch's own SDPA formulas.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from stitchvm.models.backbone import Backbone, build_backbone
from stitchvm.config import GuidanceConfig, ModelSpec, RewardSpec
from stitchvm.guidance.dps import dps_stitchvm, dps_tweedie
from stitchvm.models.reward import ClipReward, build_reward
from stitchvm.diffusion.sampling import Conditioning, cfg_velocity, encode_conditioning, sde_step
from stitchvm.guidance.fk import Look, stitchvm_potential, tweedie_potential
from stitchvm.stages.tables import format_table
from stitchvm.value.model import StitchedValueModel

aten = torch.ops.aten
COUNTED = ("unguided", "dps-tweedie", "dps-stitchvm", "fk-tweedie", "fk-stitchvm")
PROMPT = "a photograph of an astronaut riding a horse"


# ---- the counters ------------------------------------------------------------------------------------------------
def _flash_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _flash_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


class _NoModules:
    """Stands in for FlopCounterMode's module tracker: everything is counted under 'Global'."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


class FlopCounter(FlopCounterMode):
    """`FlopCounterMode` with the fused CPU attention kernel registered and without the per-module breakdown."""

    def __init__(self):
        super().__init__(display=False, custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _flash_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_backward_flops,
        })
        self.mod_tracker = _NoModules()


class FusedAttention(TorchFunctionMode):
    """Route `F.scaled_dot_product_attention` to the fused (flash) CPU kernel, as a GPU would run a fused one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            # positional or by keyword (diffusers' attention dispatch, used by FLUX, passes query=, key=, value=)
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            for name, value in zip(names, args):
                kwargs[name] = value
            q, k, v = kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value")
            if not kwargs.get("enable_gqa", False) and q.shape[-3] == k.shape[-3]:
                out, _ = aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
                    attn_mask=kwargs.get("attn_mask"), scale=kwargs.get("scale"))
                return out
            return func(q, k, v, **kwargs)
        return func(*args, **kwargs)


class SavedActivations:
    """Bytes of the tensors autograd saves for backward, each storage once, `exclude` (parameters, buffers) skipped."""

    def __init__(self, *modules: torch.nn.Module):
        self.exclude = {StorageWeakRef(t.untyped_storage()).cdata for m in modules
                        for t in (*m.parameters(), *m.buffers())}
        self.seen: dict[int, int] = {}
        self._keep: list[torch.Tensor] = []

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            key = StorageWeakRef(t.untyped_storage()).cdata
            if key not in self.exclude and key not in self.seen:
                self.seen[key] = t.untyped_storage().nbytes()
                self._keep.append(t)  # keeps the storage (and so its key) alive until the count is read
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    @contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


# ---- one step of each method -----------------------------------------------------------------------------------
def _step(method: str, backbone: Backbone, reward: ClipReward, value_model: StitchedValueModel, z: torch.Tensor,
          t: torch.Tensor, cond: Conditioning, cfg: GuidanceConfig, ahead: Look | None = None):
    """One step of `method`; FK's step finishes the velocity from `ahead`, the previous step's look at (z, t)."""
    s, s_next = 0.5, 0.45
    if method == "unguided":
        with torch.no_grad():
            return sde_step(z, cfg_velocity(backbone, z, t, cond.cond, cond.uncond, cond.scale), s, s_next, cfg.eta)
    if method in ("dps-tweedie", "dps-stitchvm"):
        dps = (dps_tweedie(reward, cfg.scale_tweedie) if method == "dps-tweedie"
               else dps_stitchvm(value_model, cfg.scale_stitchvm))
        out = dps.value_and_grad(backbone, z, t, cond)  # what DPS.__call__ runs at a guided step
        with torch.no_grad():
            return sde_step(z, out.velocity - dps.scale * out.grad, s, s_next, cfg.eta)
    potential = _fk_potential(method, backbone, reward, value_model)
    with torch.no_grad():  # fk_sample is no_grad throughout
        u = ahead.velocity(torch.arange(z.shape[0]))  # what the previous step's look left to do (CPU rows: meta z)
        t_next = torch.full_like(t, s_next)
        cands = [sde_step(z, u, s, s_next, cfg.eta) for _ in range(cfg.proposals)]
        return [potential.look(backbone, c, t_next, cond).values for c in cands]


def _fk_potential(method: str, backbone: Backbone, reward: ClipReward, value_model: StitchedValueModel):
    return tweedie_potential(backbone, reward) if method == "fk-tweedie" else stitchvm_potential(value_model)


def latent_size(backbone: Backbone, resolution: int) -> int:
    """The latent side of `resolution`² pixels; a one-line error unless it is a positive multiple of VAE × patch."""
    step = backbone.vae_scale * backbone.patch_size
    if resolution < step or resolution % step:
        raise ValueError(f"resolution {resolution} is not a positive multiple of {step} (VAE × patch size)")
    return resolution // backbone.vae_scale


def count_step(method: str, backbone: Backbone, reward: ClipReward, value_model: StitchedValueModel,
               resolution: int, cfg: GuidanceConfig, batch: int = 1) -> dict:
    """FLOPs and saved activations of one step of `method` at `resolution`² pixels for `batch` prompts."""
    if method not in COUNTED:
        raise ValueError(f"counting mode has no per-step cost for {method!r} (counted: {', '.join(COUNTED)})")
    dev = backbone.device
    size = latent_size(backbone, resolution)
    z = torch.randn(batch, backbone.latent_channels, size, size, device=dev, dtype=backbone.transformer.dtype)
    t = torch.full((batch,), 0.5, device=dev, dtype=z.dtype)
    cond = encode_conditioning(backbone, [PROMPT] * batch, cfg.guidance_scale)
    reward.text_embeds([PROMPT])  # the text tower runs once per prompt (cached), not per step
    saved = SavedActivations(backbone.transformer, backbone.vae, reward, value_model)
    start = time.perf_counter()
    ahead = None
    if method.startswith("fk-"):  # the look at (z, t) belongs to the previous step: not counted here
        with torch.no_grad():
            ahead = _fk_potential(method, backbone, reward, value_model).look(backbone, z, t, cond)
    with FusedAttention(), FlopCounter() as flops, saved():
        _step(method, backbone, reward, value_model, z.view_as(z), t, cond, cfg, ahead)
    return {"method": method, "resolution": resolution, "tflops_per_step": flops.get_total_flops() / 1e12,
            "saved_activation_gb": saved.bytes / 2**30, "count_s": round(time.perf_counter() - start, 2)}


def build_meta(backbone: ModelSpec, reward: RewardSpec, i: int, j: int
               ) -> tuple[Backbone, ClipReward, StitchedValueModel]:
    """The models of the specs on the meta device (presets only: real weights cannot be loaded there)."""
    for spec in (backbone, reward):
        if not spec.source.startswith(("tiny:", "arch:")):
            raise ValueError(f"counting mode builds models on the meta device, which needs a preset source "
                             f"(arch:… or tiny:…), got {spec.source!r}")
    bb, rw = build_backbone(backbone, "meta"), build_reward(reward, "meta")
    # no autocast on meta: the trainable parts in the reward's dtype count as autocast would run them
    return bb, rw, StitchedValueModel(bb, rw, i, j, master_dtype=rw.dtype)


def count(backbone: ModelSpec, reward: RewardSpec, cfg: GuidanceConfig, resolutions=None,
          methods=None, progress: bool = True) -> list[dict]:
    """Rows {method, resolution, tflops_per_step, saved_activation_gb} for every counted method and resolution."""
    bb, rw, vm = build_meta(backbone, reward, cfg.value_i, cfg.value_j)
    methods = [m for m in (methods or cfg.methods) if m in COUNTED]
    rows = []
    for res in resolutions or cfg.count_resolutions:
        for m in methods:
            rows.append(count_step(m, bb, rw, vm, res, cfg))
            if progress:
                r = rows[-1]
                print(f"  counted {m} at {res}²: {r['tflops_per_step']:.4g} TFLOP, "
                      f"{r['saved_activation_gb']:.4g} GiB saved ({r['count_s']} s)", flush=True)
    return rows


def ratios(rows: list[dict]) -> dict:
    """Per resolution: DPS-Tweedie / DPS-StitchVM FLOPs, DPS-StitchVM / unguided FLOPs, saved-activation ratio."""
    out = {}
    for res in dict.fromkeys(r["resolution"] for r in rows):
        by = {r["method"]: r for r in rows if r["resolution"] == res}
        if not {"unguided", "dps-tweedie", "dps-stitchvm"} <= set(by):
            continue
        tw, vm, un = by["dps-tweedie"], by["dps-stitchvm"], by["unguided"]
        out[str(res)] = {
            "tweedie_over_stitchvm_flops": tw["tflops_per_step"] / vm["tflops_per_step"],
            "stitchvm_over_unguided_flops": vm["tflops_per_step"] / un["tflops_per_step"],
            "stitchvm_over_tweedie_saved": (vm["saved_activation_gb"] / tw["saved_activation_gb"]
                                            if tw["saved_activation_gb"] else None),
        }
    return out


# ---- other backbones at their real sizes: SD3.5-Large and FLUX.1-dev --------------------------------------------
OTHER_BACKBONES = ("arch:sd3.5-large", "arch:flux.1-dev")
PER_BACKBONE = ("unguided", "dps-tweedie", "dps-stitchvm")


def head_contexts(backbone: Backbone) -> tuple[str, ...]:
    """The value heads counted for DPS-StitchVM. SD3: the empty-prompt head, shared with CFG's unconditional pass. A
    guidance-distilled backbone (FLUX.1-dev) steps with one pass on the prompt, so the head that shares it reads the
    prompt ("prompt"); an empty-prompt head reads a branch nobody else runs and adds its i blocks ("empty")."""
    return ("prompt", "empty") if backbone.family.distilled else ("empty",)


def count_backbone(backbone: ModelSpec, reward: RewardSpec, cfg: GuidanceConfig, resolution: int = 1024,
                   progress: bool = True) -> list[dict]:
    """Rows {backbone, method, head, resolution, tflops_per_step, saved_activation_gb} of one backbone on meta:
    unguided, DPS-Tweedie and DPS-StitchVM for every head of `head_contexts`."""
    bb, rw = build_backbone(backbone, "meta"), build_reward(reward, "meta")
    heads = {c: StitchedValueModel(bb, rw, cfg.value_i, cfg.value_j, master_dtype=rw.dtype, context=c)
             for c in head_contexts(bb)}
    rows = []
    for method in PER_BACKBONE:
        for context in (heads if method == "dps-stitchvm" else (None,)):
            vm = heads[context or next(iter(heads))]  # unguided and DPS-Tweedie never read the value model
            rows.append({"backbone": backbone.source, "head": context,
                         **count_step(method, bb, rw, vm, resolution, cfg)})
            if progress:
                r = rows[-1]
                print(f"  counted {backbone.source} {method}{f' ({context} head)' if context else ''} at "
                      f"{resolution}²: {r['tflops_per_step']:.4g} TFLOP ({r['count_s']} s)", flush=True)
    return rows


def count_backbones(reward: RewardSpec, cfg: GuidanceConfig, dtype: str = "bfloat16", resolution: int = 1024,
                    backbones: tuple[str, ...] = OTHER_BACKBONES, progress: bool = True) -> list[dict]:
    """`count_backbone` for each of `backbones` (presets) in `dtype`."""
    return [row for source in backbones
            for row in count_backbone(ModelSpec(source, dtype=dtype), reward, cfg, resolution, progress)]


def backbone_ratios(rows: list[dict]) -> dict:
    """Per backbone: DPS-Tweedie / DPS-StitchVM and DPS-StitchVM / unguided FLOPs for the shared head (SD3: empty;
    FLUX: prompt), and for FLUX the empty head's FLOPs over the shared one's (the price of not sharing)."""
    out = {}
    for source in dict.fromkeys(r["backbone"] for r in rows):
        by = {(r["method"], r["head"]): r["tflops_per_step"] for r in rows if r["backbone"] == source}
        shared = by.get(("dps-stitchvm", "prompt"), by.get(("dps-stitchvm", "empty")))
        out[source] = {"tweedie_over_stitchvm_flops": by[("dps-tweedie", None)] / shared,
                       "stitchvm_over_unguided_flops": shared / by[("unguided", None)]}
        if ("dps-stitchvm", "prompt") in by and ("dps-stitchvm", "empty") in by:
            out[source]["empty_head_over_shared_head_flops"] = by[("dps-stitchvm", "empty")] / shared
    return out


def format_backbone_rows(rows: list[dict]) -> str:
    """The rows of `count_backbones` as a table, then each backbone's ratios."""
    columns = ("backbone", "method", "head", "resolution", "tflops_per_step", "saved_activation_gb")
    lines = [format_table(rows, columns)]
    for source, r in backbone_ratios(rows).items():
        extra = (f", empty head / shared head {r['empty_head_over_shared_head_flops']:.3g}"
                 if "empty_head_over_shared_head_flops" in r else "")
        lines.append(f"{source}: Tweedie/StitchVM FLOPs {r['tweedie_over_stitchvm_flops']:.3g}, StitchVM/unguided "
                     f"FLOPs {r['stitchvm_over_unguided_flops']:.3g}{extra}")
    return "\n".join(lines)
