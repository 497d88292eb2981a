"""Diffusion backbones of two families, SD3/SD3.5 (MMDiT) and FLUX.1: components, prompt encoding, latent
(de)coding, velocity, and the pieces of the transformer that u_{≤i} runs (its embedders and blocks).

Both families share the latent convention `z = (E(x) - shift) · scale`, `D(z) = decode(z / scale + shift)` (pixels in
[-1, 1]), latents of shape (B, C, h, w), time `t ∈ [0, 1]` = σ and the rectified-flow velocity `v ≈ ε - z0`. What
differs lives in one small adapter class per family with the same interface (`SD3Family`, `FluxFamily`):

| | SD3 / SD3.5 | FLUX.1 |
|---|---|---|
| image tokens | `pos_embed`: 2×2 patch conv + learned positions | 2×2 packing of the latent (4C channels) → `x_embedder`; RoPE over (text, row, col) ids |
| text | CLIP-L + CLIP-G token states (+ T5, left out) and pooled 768 + 1280 | T5 token states, CLIP-L pooled 768 |
| blocks | `transformer_blocks` (joint MMDiT) | `transformer_blocks` (double-stream), then `single_transformer_blocks` |
| guidance | true CFG: an unconditional and a conditional pass | guidance-distilled (dev): one pass, the scale enters the time embedding |

`Backbone.blocks` lists every block in execution order (FLUX: double-stream then single-stream), so the head's depth i
runs over both kinds; every block is called as `ctx, h = block(h, ctx, temb[, rotary])`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
from torch import nn
from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                          T5Config, T5EncoderModel)
from transformers.utils import logging as transformers_logging

from stitchvm.config import ModelSpec
from stitchvm.models.presets import BACKBONE_PRESETS, is_preset, lookup
from stitchvm.models.tokenizers import tiny_clip_tokenizer
from stitchvm.models.collapsed_attention import ABSENT_T5_TOKENS, collapse_attention_
from stitchvm.models.world_source import check_world_source, is_world, world_path
from stitchvm.models.sources import loading

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 at least: bf16/fp16 widened; float32 (the same tensor, no op) and float64 left as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextmanager
def seeded(seed: int):
    """Seed random init without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fan_in_init_(module: torch.nn.Module) -> None:
    """Re-draw every Linear/Conv weight with std 1/sqrt(fan_in).

    Why: with the libraries' small default init (std 0.02) a random tiny CLIP embeds every input almost identically
    (its class token dominates, mean pairwise cosine ≈ 0.99), which makes rewards constant. Fan-in scaling keeps the
    tiny models' outputs dependent on their inputs.
    """
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)


@dataclass
class Backbone:
    spec: ModelSpec
    transformer: SD3Transformer2DModel | FluxTransformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    text_encoder: CLIPTextModelWithProjection | CLIPTextModel  # FLUX: CLIP-L, pooled output only
    tokenizer: CLIPTokenizer
    text_encoder_2: CLIPTextModelWithProjection | T5EncoderModel  # FLUX: T5, the token states
    tokenizer_2: CLIPTokenizer
    t5_tokens: int = 256  # SD3: zero "T5" token states appended without T5; FLUX: T5's max_sequence_length
    sample_size: int | None = None  # default latent side where the transformer's config has none (FLUX)

    @property
    def family(self) -> "SD3Family | FluxFamily":
        """The adapter for this transformer's family (derived, so a copied transformer gets its own)."""
        return family_of(self.transformer)

    @cached_property
    def pipeline(self) -> StableDiffusion3Pipeline | FluxPipeline:
        return self.family.pipeline(self)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def width(self) -> int:
        """Width of the image tokens the transformer blocks carry."""
        return self.transformer.inner_dim

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block in execution order (FLUX: double-stream, then single-stream)."""
        return self.family.blocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def patch_size(self) -> int:
        """Latent pixels per image token along each axis (FLUX: its 2×2 packing)."""
        return self.family.patch_size

    @property
    def image_size(self) -> int:
        """The default (training) resolution in pixels."""
        return (self.sample_size or self.transformer.config.sample_size) * self.vae_scale

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device) -> "Backbone":
        for m in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2):
            m.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt conditioning as the family's pipeline computes it: (B, L, joint_dim) token states, (B, pooled_dim)."""
        return self.family.encode_prompts(self, list(prompts))

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) pixels in [-1, 1] (differentiable)."""
        cfg = self.vae.config
        z0 = z0.to(self.vae.dtype)  # float32 latents (stored, or a value model's) into a bf16/fp16 VAE
        return self.vae.decode(z0 / cfg.scaling_factor + cfg.shift_factor).sample

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, C, h, w) latents (the posterior mean, so encoding is deterministic)."""
        cfg = self.vae.config
        pixels = pixels.to(self.vae.dtype)  # float32 images into a bf16/fp16 VAE
        return (self.vae.encode(pixels).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor

    def velocity(self, z_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | None = None) -> torch.Tensor:
        """v_θ(z_t, t, c) ≈ ε - z0 for t of shape (B,) in [0, 1]. `guidance`: the embedded guidance scale of a
        guidance-distilled backbone (None: its default); an SD3 backbone has no such input and ignores it."""
        return self.family.velocity(z_t, t, embeds, pooled, guidance)


# ---- the families ------------------------------------------------------------------------------------------------
class SD3Family:
    """SD3 / SD3.5 MMDiT: patch-conv tokens with learned positions, CLIP-L + CLIP-G conditioning, true CFG."""

    name = "sd3"
    distilled = False  # CFG runs an unconditional and a conditional pass

    def __init__(self, transformer: SD3Transformer2DModel):
        self.transformer = transformer

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def max_latent_side(self) -> int | None:
        """The largest latent side SD3's position table covers (None: no table)."""
        cfg = self.transformer.config
        return cfg.pos_embed_max_size * cfg.patch_size if cfg.pos_embed_max_size else None

    def embedders(self) -> dict[str, nn.Module]:
        """The modules u_{≤i} runs before the first block (the head registers them under these names)."""
        tr = self.transformer
        return {"pos_embed": tr.pos_embed, "time_text_embed": tr.time_text_embed, "context_embedder": tr.context_embedder}

    def embed_image(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) image tokens, N = (H/2)(W/2), row-major."""
        return self.transformer.pos_embed(z).contiguous()

    def embed_time(self, t: torch.Tensor, pooled: torch.Tensor, guidance: float | None, dtype: torch.dtype
                   ) -> torch.Tensor:
        """(B,) σ, (B, P) pooled -> (B, D) conditioning vector (SD3 reads the timestep in [0, 1000])."""
        return self.transformer.time_text_embed(t * 1000, pooled)

    def embed_context(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.transformer.context_embedder(embeds)

    def rotary(self, latent_hw: tuple[int, int], context_len: int, device) -> None:
        return None  # SD3's positions were added to the tokens by pos_embed

    def run_block(self, block: nn.Module, h, ctx, temb, rotary) -> tuple[torch.Tensor | None, torch.Tensor]:
        return block(h, ctx, temb)

    def output(self, h: torch.Tensor, temb: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """(B, N, D) tokens after the last block -> (B, C, H, W) velocity (norm_out, proj_out, unpatchify)."""
        tr, b = self.transformer, h.shape[0]
        h = tr.proj_out(tr.norm_out(h, temb))
        p, (hh, ww) = self.patch_size, latent_hw
        h = h.reshape(b, hh // p, ww // p, p, p, tr.out_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(b, tr.out_channels, hh, ww)

    def velocity(self, z, t, embeds, pooled, guidance) -> torch.Tensor:
        return self.transformer(hidden_states=z.to(self.transformer.dtype), timestep=t * 1000,
                                encoder_hidden_states=embeds, pooled_projections=pooled).sample

    def schedule_kwargs(self, steps: int) -> dict:
        return {}  # the SD3 pipeline sets its σ grid from the step count alone

    @staticmethod
    def pipeline(backbone: Backbone) -> StableDiffusion3Pipeline:
        return StableDiffusion3Pipeline(
            transformer=backbone.transformer, vae=backbone.vae, scheduler=backbone.scheduler,
            text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
            text_encoder_2=backbone.text_encoder_2, tokenizer_2=backbone.tokenizer_2,
            text_encoder_3=None, tokenizer_3=None,
        )

    @staticmethod
    def encode_prompts(backbone: Backbone, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = backbone.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=backbone.device, do_classifier_free_guidance=False,
            max_sequence_length=backbone.t5_tokens,
        )
        return embeds, pooled

    @staticmethod
    def build(spec: ModelSpec, cfg: dict) -> Backbone:
        """Random init from a preset's constructor arguments (under the caller's device and seed; the draw order,
        transformer, VAE, text encoders, is what gives `tiny:sd3` its weights: keep it)."""
        transformer, vae = SD3Transformer2DModel(**cfg["transformer"]), AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
        if spec.source.startswith("tiny:"):
            fan_in_init_(text_encoder)
            fan_in_init_(text_encoder_2)
        return Backbone(
            spec=spec, transformer=transformer, vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
            text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), text_encoder_2=text_encoder_2,
            tokenizer_2=tiny_clip_tokenizer(),
        )

    @staticmethod
    def load(spec: ModelSpec, dtype: torch.dtype) -> Backbone:
        """The SD3 layout: transformer/, vae/, scheduler/, text_encoder[_2]/, tokenizer[_2]/ (T5 is not loaded)."""
        src = spec.source
        return Backbone(
            spec=spec,
            transformer=SD3Transformer2DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler"),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder", dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer"),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", dtype=dtype),
            tokenizer_2=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2"),
        )


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C): FLUX's 2×2 packing (FluxPipeline._pack_latents), row-major tokens."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, (H/2)(W/2), 4C) -> (B, C, H, W): the inverse of `pack_latents`."""
    b, _, c4 = x.shape
    h, w = latent_hw
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(latent_hw: tuple[int, int], device) -> torch.Tensor:
    """(N, 3) RoPE ids (0, row, col) of the packed tokens (FluxPipeline._prepare_latent_image_ids)."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device)


class FluxFamily:
    """FLUX.1: packed 2×2 latent patches, RoPE positions, T5 tokens + CLIP pooled, double- then single-stream blocks.

    FLUX.1-dev is guidance-distilled: the CFG scale is an input of the time embedding (`guidance`, FluxPipeline's
    `guidance_scale`), so a guided velocity is one transformer pass on the prompt and there is no unconditional
    branch. A value head that should share the sampler's pass reads the prompt branch at the sampler's guidance
    (`context: prompt`); an empty-prompt head is a branch the sampler never runs (stitchvm/guidance/dps.py).
    """

    name = "flux"
    distilled = True
    DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (FLUX.1-dev)
    PACK = 2

    def __init__(self, transformer: FluxTransformer2DModel):
        self.transformer = transformer

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    @property
    def patch_size(self) -> int:
        return self.PACK * self.transformer.config.patch_size

    max_latent_side = None  # RoPE positions: any even latent size

    def embedders(self) -> dict[str, nn.Module]:
        tr = self.transformer
        return {"x_embedder": tr.x_embedder, "pos_embed": tr.pos_embed, "time_text_embed": tr.time_text_embed,
                "context_embedder": tr.context_embedder}

    def embed_image(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) image tokens, N = (H/2)(W/2), row-major (positions come later, as RoPE)."""
        return self.transformer.x_embedder(pack_latents(z))

    def embed_time(self, t: torch.Tensor, pooled: torch.Tensor, guidance: float | None, dtype: torch.dtype
                   ) -> torch.Tensor:
        """(B,) σ, (B, P) pooled -> (B, D); the transformer casts σ (and the guidance) to its dtype before × 1000."""
        tr = self.transformer
        timestep = t.to(dtype) * 1000
        if not tr.config.guidance_embeds:  # FLUX.1-schnell
            return tr.time_text_embed(timestep, pooled)
        g = torch.full_like(t, self.DEFAULT_GUIDANCE if guidance is None else float(guidance), dtype=torch.float32)
        return tr.time_text_embed(timestep, g.to(dtype) * 1000, pooled)

    def embed_context(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.transformer.context_embedder(embeds)

    def rotary(self, latent_hw: tuple[int, int], context_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) over the text ids (all zero) followed by the image ids, as the transformer builds them."""
        ids = torch.cat([torch.zeros(context_len, 3, device=device), image_ids(latent_hw, device)])
        return self.transformer.pos_embed(ids)

    def run_block(self, block: nn.Module, h, ctx, temb, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        return block(hidden_states=h, encoder_hidden_states=ctx, temb=temb, image_rotary_emb=rotary)

    def output(self, h: torch.Tensor, temb: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        tr = self.transformer
        return unpack_latents(tr.proj_out(tr.norm_out(h, temb)), latent_hw)

    def velocity(self, z, t, embeds, pooled, guidance) -> torch.Tensor:
        tr, hw = self.transformer, tuple(z.shape[-2:])
        g = None
        if tr.config.guidance_embeds:
            g = torch.full_like(t, self.DEFAULT_GUIDANCE if guidance is None else float(guidance), dtype=torch.float32)
        out = tr(hidden_states=pack_latents(z.to(tr.dtype)), timestep=t, guidance=g, pooled_projections=pooled,
                 encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3, device=z.device),
                 img_ids=image_ids(hw, z.device)).sample
        return unpack_latents(out, hw)

    def schedule_kwargs(self, steps: int) -> dict:
        return {"sigmas": np.linspace(1.0, 1 / steps, steps)}  # FluxPipeline's grid (then shifted by mu)

    @staticmethod
    def pipeline(backbone: Backbone) -> FluxPipeline:
        return FluxPipeline(transformer=backbone.transformer, vae=backbone.vae, scheduler=backbone.scheduler,
                            text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                            text_encoder_2=backbone.text_encoder_2, tokenizer_2=backbone.tokenizer_2)

    @staticmethod
    def encode_prompts(backbone: Backbone, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = backbone.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=backbone.device,
                                                            max_sequence_length=backbone.t5_tokens)
        return embeds, pooled

    @staticmethod
    def build(spec: ModelSpec, cfg: dict) -> Backbone:
        """Random init from a preset. The tokenizers are the offline byte-level CLIP one for both encoders (the T5
        SentencePiece model is not available offline); `text_encoder_2`'s vocabulary must cover its ids."""
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        text_encoder_2 = T5EncoderModel(T5Config(**cfg["text_encoder_2"]))
        if spec.source.startswith("tiny:"):
            fan_in_init_(text_encoder)
            fan_in_init_(text_encoder_2)
        return Backbone(
            spec=spec, transformer=FluxTransformer2DModel(**cfg["transformer"]), vae=AutoencoderKL(**cfg["vae"]),
            scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
            text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), text_encoder_2=text_encoder_2,
            tokenizer_2=tiny_clip_tokenizer(), t5_tokens=cfg["max_sequence_length"],
            sample_size=cfg["sample_size"],
        )

    @staticmethod
    def load(spec: ModelSpec, dtype: torch.dtype) -> Backbone:
        """The FLUX layout: transformer/, vae/, scheduler/, text_encoder/ (CLIP-L), text_encoder_2/ (T5),
        tokenizer[_2]/. T5 is required: FLUX's context tokens are T5's."""
        src = spec.source
        transformer = FluxTransformer2DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dtype)
        return Backbone(
            spec=spec,
            transformer=transformer,
            vae=AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler"),
            text_encoder=CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer"),
            text_encoder_2=T5EncoderModel.from_pretrained(src, subfolder="text_encoder_2", dtype=dtype),
            tokenizer_2=AutoTokenizer.from_pretrained(src, subfolder="tokenizer_2"),
            # FluxPipeline's defaults: 1024² images; 512 T5 tokens for dev, 256 for schnell (no guidance embedding)
            t5_tokens=512 if transformer.config.guidance_embeds else 256, sample_size=128,
        )


FAMILIES = {"sd3": SD3Family, "flux": FluxFamily}
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}  # transformer/config.json


def family_of(transformer: nn.Module) -> SD3Family | FluxFamily:
    if isinstance(transformer, FluxTransformer2DModel):
        return FluxFamily(transformer)
    if isinstance(transformer, SD3Transformer2DModel):
        return SD3Family(transformer)
    raise TypeError(f"{type(transformer).__name__} is not a supported backbone transformer (SD3, FLUX.1)")


# ---- the factory -------------------------------------------------------------------------------------------------
def build_backbone(spec: ModelSpec, device: str | torch.device = "cpu") -> Backbone:
    """The one factory for diffusion backbones (see `ModelSpec` for the kinds of source)."""
    if is_preset(spec.source):
        return _build_preset(spec, device)
    if is_world(spec.source):
        return _load_world(spec, device)
    return _load_pretrained(spec, device)


def _build_preset(spec: ModelSpec, device) -> Backbone:
    cfg = lookup(BACKBONE_PRESETS, spec.source, "backbone")
    with seeded(spec.seed), torch.device(device):
        backbone = FAMILIES[cfg.get("family", "sd3")].build(spec, cfg)
    return _freeze(backbone, DTYPES[spec.dtype])


def _load_pretrained(spec: ModelSpec, device) -> Backbone:
    with loading("backbone.source", spec.source):  # a missing repo or folder part: one line, not a paragraph
        kind = FluxTransformer2DModel.load_config(spec.source, subfolder="transformer").get("_class_name")
        if kind not in TRANSFORMER_FAMILIES:
            raise ValueError(f"backbone.source {spec.source!r}: its transformer is a {kind}, not one of "
                             f"{', '.join(TRANSFORMER_FAMILIES)}")
        backbone = FAMILIES[TRANSFORMER_FAMILIES[kind]].load(spec, DTYPES[spec.dtype])
    return _freeze(backbone.to(device), DTYPES[spec.dtype])


@contextmanager
def quiet_transformers():
    """transformers' logging at error level within the block (restored after)."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _load_world(spec: ModelSpec, device) -> Backbone:
    """`world:sd3`: the shipped world's parts (stitchvm/models/world_source.py); both text encoders are the world
    CLIP's text tower, as SD3 conditions on two CLIP text towers. Its joint attentions are collapsed
    (stitchvm/world/attention.py): the same function as with 256 zero T5 tokens, at 1/12 of the cost."""
    check_world_source(spec.source)
    if spec.source != "world:sd3":
        raise ValueError(f"{spec.source!r} is a reward model, not a diffusion backbone (use world:sd3)")
    dtype = DTYPES[spec.dtype]
    with quiet_transformers():  # the text tower of a CLIPModel folder: the vision weights are skipped
        text_encoder = CLIPTextModelWithProjection.from_pretrained(world_path("clip"), dtype=dtype)
    transformer = SD3Transformer2DModel.from_pretrained(world_path("transformer"), torch_dtype=dtype)
    collapse_attention_(transformer, ABSENT_T5_TOKENS)
    backbone = Backbone(
        spec=spec, transformer=transformer,
        vae=AutoencoderKL.from_pretrained(world_path("vae"), torch_dtype=dtype),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(world_path("scheduler")),
        text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(world_path("tokenizer")),
        text_encoder_2=text_encoder, tokenizer_2=CLIPTokenizer.from_pretrained(world_path("tokenizer")),
        t5_tokens=1,
    )
    return _freeze(backbone.to(device), dtype)


def _freeze(backbone: Backbone, dtype: torch.dtype) -> Backbone:
    for m in (backbone.transformer, backbone.vae, backbone.text_encoder, backbone.text_encoder_2):
        if m.dtype != dtype:
            m.to(dtype)
        m.eval().requires_grad_(False)
    return backbone
