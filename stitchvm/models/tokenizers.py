"""An offline CLIP tokenizer for the tiny presets.

The real CLIP BPE merges are not available offline, so tiny models use the same `CLIPTokenizer` class with the
byte-level alphabet and no merges: every word becomes its characters (the last one marked `</w>`).
"""
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_level_vocab() -> dict[str, int]:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {t: k for k, t in enumerate(tokens)}


def tiny_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=max_length)
