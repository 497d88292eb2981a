"""Model configurations for the `tiny` (CPU tests and default) and `arch` (real sizes, random weights) presets.

Each preset is a dict of constructor arguments for the same diffusers/transformers classes the real models use.
"""
from stitchvm.models.tokenizers import byte_level_vocab

_VOCAB = byte_level_vocab()
_TINY_TEXT = dict(
    vocab_size=len(_VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=32,
    bos_token_id=_VOCAB["<|startoftext|>"], eos_token_id=_VOCAB["<|endoftext|>"], pad_token_id=_VOCAB["<|endoftext|>"],
)

# SD3 family (the default `family`): transformer, VAE, scheduler and the two CLIP text encoders (T5 is optional in
# SD3 and left out here).
BACKBONE_PRESETS = {
    "tiny:sd3": dict(
        transformer=dict(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm",
        ),
        vae=dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0, scaling_factor=3.8,
        ),
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
        text_encoder=_TINY_TEXT,
        text_encoder_2=_TINY_TEXT,
    ),
    "arch:sd3.5-medium": dict(
        transformer=dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        ),
        vae=dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5305,
        ),
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
        text_encoder=dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        ),
        text_encoder_2=dict(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
        ),
    ),
}

# SD3.5-Large: Medium's VAE, scheduler and text encoders; 38 blocks of 38 heads × 64, no dual-attention layers.
BACKBONE_PRESETS["arch:sd3.5-large"] = dict(
    BACKBONE_PRESETS["arch:sd3.5-medium"],
    transformer=dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm",
    ),
)

# FLUX.1 family (stitchvm/models/backbone.py FluxFamily): the transformer reads 2×2-packed latents (in_channels =
# 4 × the VAE's latent channels), T5 token states (joint_attention_dim = T5's d_model) and CLIP-L's pooled output
# (pooled_projection_dim = its hidden size); sum(axes_dims_rope) = attention_head_dim. `sample_size` is the default
# latent side, `max_sequence_length` the T5 tokens per prompt (FluxPipeline: 512 for dev).
_TINY_T5 = dict(
    vocab_size=len(_VOCAB), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8, pad_token_id=_VOCAB["<|endoftext|>"], eos_token_id=_VOCAB["<|endoftext|>"],
    decoder_start_token_id=_VOCAB["<|endoftext|>"],
)
BACKBONE_PRESETS["tiny:flux"] = dict(
    family="flux",
    transformer=dict(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    vae=dict(BACKBONE_PRESETS["tiny:sd3"]["vae"], shift_factor=0.1, scaling_factor=2.5),
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096),
    text_encoder=_TINY_TEXT,
    text_encoder_2=_TINY_T5,
    sample_size=16,
    max_sequence_length=32,
)
BACKBONE_PRESETS["arch:flux.1-dev"] = dict(  # black-forest-labs/FLUX.1-dev (~12B transformer)
    family="flux",
    transformer=dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    vae=dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    ),
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096),
    text_encoder=dict(  # CLIP ViT-L/14 text tower (CLIPTextModel: pooled output only)
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu",
    ),
    text_encoder_2=dict(  # T5-v1.1-XXL encoder
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ),
    sample_size=128,
    max_sequence_length=512,
)

REWARD_PRESETS = {
    "tiny:clip": dict(
        text_config=_TINY_TEXT,
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=24,
            patch_size=4,
        ),
        projection_dim=32,
        aesthetic_widths=(16, 8, 4, 2),
    ),
    "arch:clip-vit-l-14": dict(
        text_config=dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        ),
        vision_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
            patch_size=14, hidden_act="quick_gelu",
        ),
        projection_dim=768,
        # the LAION aesthetic predictor's MLP on the ViT-L/14 embedding
        aesthetic_widths=(1024, 128, 64, 16),
    ),
    # open_clip rewards (stitchvm/models/open_clip_reward.py converts them to CLIPModel): `open_clip` is open_clip's
    # configuration (or an architecture name). The tiny one is drawn as an open_clip state dict and converted, so
    # every test that builds it runs the key mapping; GELU (not CLIP's quick_gelu), as HPSv2's ViT-H-14.
    "tiny:open_clip": dict(
        open_clip=dict(
            embed_dim=32, quick_gelu=False,
            vision_cfg=dict(image_size=24, layers=4, width=32, head_width=16, patch_size=4, mlp_ratio=2.0),
            text_cfg=dict(context_length=77, vocab_size=len(_VOCAB), width=32, heads=2, layers=2, mlp_ratio=2.0),
        ),
        random_weights="open_clip",
        aesthetic_widths=(16, 8, 4, 2),
    ),
    # HPSv2 / DFN-CLIP size (ViT-H-14: 32 vision blocks of width 1280, 224², patch 14; text 24 × 1024; embed 1024)
    "arch:open_clip-vit-h-14": dict(open_clip="ViT-H-14", aesthetic_widths=(1024, 128, 64, 16)),
}


def lookup(presets: dict, source: str, what: str) -> dict:
    if source not in presets:
        kind = source.split(":", 1)[0]
        known = ", ".join(sorted(k for k in presets if k.startswith(kind + ":")))
        raise ValueError(f"unknown {kind} {what} preset {source!r} (known: {known})")
    return presets[source]


def is_preset(source: str) -> bool:
    return source.startswith(("tiny:", "arch:"))
