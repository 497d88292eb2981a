"""The collapsed joint attention of the world backbone: SD3 without T5, at a fraction of the cost.

Without T5 the SD3 pipeline appends `M` (256) all-zero "T5" token states to the CLIP tokens. They enter every block
as the same vector, so they stay identical, and attending to M identical keys equals attending to one of them with
its logit raised by log M. `CollapsedJointAttnProcessor(M)` is diffusers' joint attention with that bias on the last
key: fed the CLIP tokens plus ONE zero token it computes the same function as the full context (to float rounding)
while the transformer carries 17 context tokens instead of 272 (about 12× faster for the world's 16 image tokens).
The world backbone is trained this way (`flow_training`) and loaded this way (`backbone.build_backbone("world:sd3")`:
the processor on every joint attention, `Backbone.t5_tokens = 1`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

ABSENT_T5_TOKENS = 256  # what the SD3 pipeline appends without T5 (its default max_sequence_length)


class CollapsedJointAttnProcessor:
    """diffusers' `JointAttnProcessor2_0` with an additive bias of log(`multiplicity`) on the last key (the one zero
    token that stands for `multiplicity` identical zero T5 tokens; see the module docstring)."""

    def __init__(self, multiplicity: int):
        self.log_multiplicity = math.log(multiplicity)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]

        def heads(x):  # (B, L, H·d) -> (B, H, L, d)
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)  # (B, H, L_img + L_ctx, d)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_multiplicity
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))  # (B, H, L, d)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        out, context = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


@contextmanager
def collapsed_attention(transformer: SD3Transformer2DModel, multiplicity: int):
    """Within the block, every joint attention uses `CollapsedJointAttnProcessor(multiplicity)`."""
    if transformer.config.dual_attention_layers:
        raise ValueError("collapsed attention supports transformers without dual attention layers")
    original = transformer.attn_processors
    transformer.set_attn_processor(CollapsedJointAttnProcessor(multiplicity))
    try:
        yield
    finally:
        transformer.set_attn_processor(original)


def collapse_attention_(transformer: SD3Transformer2DModel, multiplicity: int = ABSENT_T5_TOKENS) -> None:
    """Set `CollapsedJointAttnProcessor(multiplicity)` on every joint attention of `transformer` (in place)."""
    if transformer.config.dual_attention_layers:
        raise ValueError("collapsed attention supports transformers without dual attention layers")
    transformer.set_attn_processor(CollapsedJointAttnProcessor(multiplicity))
