"""The CFG branch the value head shares with the sampler (DPS-StitchVM, FK-StitchVM).

The head u_{≤i} runs the backbone's first i blocks on one branch: the unconditional one for an empty-prompt head,
the conditional one with the sampler's own prompt embeddings for a prompt head; on a guidance-distilled backbone
(FLUX.1-dev) the one pass at the sampler's embedded scale. The sampler runs that branch at the same (z_t, t) anyway,
so a step that needs both the value and the velocity runs those i blocks once: the value reads the stream after
block i (`head_stream`), the branch's velocity continues it (`finish`), and the other branch runs as usual
(`cfg_velocity_sharing`). An empty-prompt head on a distilled backbone reads a branch the sampler never runs: its
blocks are an extra forward there.
"""
from __future__ import annotations

import torch

from stitchvm.diffusion.sampling import Conditioning
from stitchvm.models.backbone import Backbone
from stitchvm.value.head import Stream
from stitchvm.value.model import StitchedValueModel


def check_compatible(value_model: StitchedValueModel, backbone: Backbone) -> None:
    if value_model.backbone_spec != backbone.spec:
        raise ValueError(f"the value model was built on backbone {value_model.backbone_spec.source!r} "
                         f"({value_model.backbone_spec}), the sampler runs {backbone.spec.source!r} "
                         f"({backbone.spec}): its head is not a branch of the sampler's")


def head_stream(value_model: StitchedValueModel, backbone: Backbone, z: torch.Tensor, t: torch.Tensor,
                conditioning: Conditioning) -> Stream:
    """Blocks 1..i of the branch the head reads, with the head's own modules (exactly BackboneHead's math), under
    the caller's grad mode: the tokens carry the autograd graph to z when z requires grad."""
    check_compatible(value_model, backbone)
    head = value_model.head
    ctx, pooled = head.conditioning(z.shape[0], cond=conditioning.cond if head.context == "prompt" else None)
    guidance = conditioning.scale if backbone.family.distilled else None
    return head.run(z, t, ctx, pooled, guidance)


@torch.no_grad()
def finish(backbone: Backbone, stream: Stream, depth: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Blocks depth+1..L, norm_out, proj_out and unpatchify on the detached stream after block `depth`, as the
    transformer runs them: (B, C, H, W) the branch's velocity."""
    family = backbone.family
    h, ctx, temb = stream.h.detach(), None if stream.ctx is None else stream.ctx.detach(), stream.temb.detach()
    for block in family.blocks[depth:]:
        ctx, h = family.run_block(block, h, ctx, temb, stream.rotary)
    return family.output(h, temb, latent_hw)


def select(stream: Stream, rows: torch.Tensor) -> Stream:
    """The stream of the batch rows `rows` (FLUX's rotary table has no batch dimension)."""
    return Stream(stream.h[rows], None if stream.ctx is None else stream.ctx[rows], stream.temb[rows], stream.rotary)


def needs_branch(value_model: StitchedValueModel, backbone: Backbone, scale: float) -> bool:
    """Whether the step's velocity uses the branch the head reads (not at CFG scale 1 for an empty-prompt head or
    0 for a prompt head; never for an empty-prompt head on a distilled backbone)."""
    prompt_head = value_model.context == "prompt"
    if backbone.family.distilled:
        return prompt_head
    return scale != 0 if prompt_head else scale != 1


@torch.no_grad()
def cfg_velocity_sharing(value_model: StitchedValueModel, backbone: Backbone, z: torch.Tensor, t: torch.Tensor,
                         conditioning: Conditioning, v_shared: torch.Tensor | None) -> torch.Tensor:
    """The step's CFG velocity from `v_shared`, the velocity of the branch the head reads (None where
    `needs_branch` is False), and the other branch, run here: (B, C, H, W)."""
    w, prompt_head = conditioning.scale, value_model.context == "prompt"
    if backbone.family.distilled:
        return v_shared if prompt_head else backbone.velocity(z, t, *conditioning.cond, guidance=w)
    if prompt_head:
        v_c, v_u = v_shared, backbone.velocity(z, t, *conditioning.uncond) if w != 1 else None
    else:
        v_u, v_c = v_shared, backbone.velocity(z, t, *conditioning.cond) if w != 0 else None
    return v_u if w == 0 else v_c if w == 1 else v_u + w * (v_c - v_u)


def shared_branch(value_model: StitchedValueModel, backbone: Backbone, z: torch.Tensor, t: torch.Tensor,
                  conditioning: Conditioning, finish_branch: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass of the branch the head reads: ((B, N, D) tokens u_{≤i} under the caller's grad mode, (B, C, H, W)
    that branch's velocity, without autograd; None with `finish_branch=False`)."""
    stream = head_stream(value_model, backbone, z, t, conditioning)
    if not finish_branch:
        return stream.h, None
    return stream.h, finish(backbone, stream, len(value_model.head.blocks), tuple(z.shape[-2:]))
