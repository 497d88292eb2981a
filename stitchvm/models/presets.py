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

# SD3 family: transformer, VAE, scheduler and the two CLIP text encoders (T5 is optional in SD3 and left out here).
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
}


def lookup(presets: dict, source: str, what: str) -> dict:
    if source not in presets:
        kind = source.split(":", 1)[0]
        known = ", ".join(sorted(k for k in presets if k.startswith(kind + ":")))
        raise ValueError(f"unknown {kind} {what} preset {source!r} (known: {known})")
    return presets[source]


def is_preset(source: str) -> bool:
    return source.startswith(("tiny:", "arch:"))
