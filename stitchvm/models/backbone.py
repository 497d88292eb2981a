"""The SD3-family diffusion backbone: its components, prompt encoding, latent (de)coding and velocity.

Latents follow the SD3 pipeline's convention: `z = (E(x) - shift) · scale`, and `D(z) = decode(z / scale + shift)`
gives pixels in [-1, 1]. Time `t ∈ [0, 1]` is σ; the transformer is fed `1000 · t`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
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
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    text_encoder: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_2: CLIPTokenizer
    t5_tokens: int = 256  # zero "T5" token states appended without T5 (the pipeline's max_sequence_length)

    @cached_property
    def pipeline(self) -> StableDiffusion3Pipeline:
        return StableDiffusion3Pipeline(
            transformer=self.transformer, vae=self.vae, scheduler=self.scheduler,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            text_encoder_3=None, tokenizer_3=None,
        )

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def width(self) -> int:
        """Width of the image tokens the transformer blocks carry."""
        return self.transformer.inner_dim

    @property
    def depth(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def image_size(self) -> int:
        """The default (training) resolution in pixels."""
        return self.transformer.config.sample_size * self.vae_scale

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
        """Prompt conditioning as the SD3 pipeline computes it: (B, L, joint_dim) token states, (B, pooled_dim)."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.t5_tokens,
        )
        return embeds, pooled

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

    def velocity(self, z_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """v_θ(z_t, t, c) ≈ ε - z0 for t of shape (B,) in [0, 1]."""
        return self.transformer(
            hidden_states=z_t.to(self.transformer.dtype), timestep=t * 1000, encoder_hidden_states=embeds, pooled_projections=pooled
        ).sample


def build_backbone(spec: ModelSpec, device: str | torch.device = "cpu") -> Backbone:
    """The one factory for diffusion backbones (see `ModelSpec` for the three kinds of source)."""
    if is_preset(spec.source):
        return _build_preset(spec, device)
    if is_world(spec.source):
        return _load_world(spec, device)
    return _load_pretrained(spec, device)


def _build_preset(spec: ModelSpec, device) -> Backbone:
    cfg = lookup(BACKBONE_PRESETS, spec.source, "backbone")
    dtype = DTYPES[spec.dtype]
    with seeded(spec.seed), torch.device(device):
        transformer = SD3Transformer2DModel(**cfg["transformer"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
        if spec.source.startswith("tiny:"):
            fan_in_init_(text_encoder)
            fan_in_init_(text_encoder_2)
    backbone = Backbone(
        spec=spec, transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
    )
    return _freeze(backbone, dtype)


def _load_pretrained(spec: ModelSpec, device) -> Backbone:
    with loading("backbone.source", spec.source):  # a missing repo or folder part: one line, not a paragraph
        return _load_pretrained_parts(spec, device)


def _load_pretrained_parts(spec: ModelSpec, device) -> Backbone:
    src, dtype = spec.source, DTYPES[spec.dtype]
    transformer = SD3Transformer2DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dtype)
    backbone = Backbone(
        spec=spec,
        transformer=transformer,
        vae=AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder", dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", dtype=dtype),
        tokenizer_2=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2"),
    )
    return _freeze(backbone.to(device), dtype)


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
