"""OpenAI's CLIP tokenizer built offline, and the world's compact variant of it.

`assets/bpe_simple_vocab_16e6.txt.gz` is OpenAI's BPE merges file (MIT, 1.36 MB; see the licence file beside it).
`openai_clip_tokenizer()` builds from it a `CLIPTokenizer` that reproduces OpenAI's ids (vocab 49408).

A 49408-token embedding table at width 64 is 3.2 M parameters (12.6 MB fp32), more than half the budget of the whole
world, while the caption grammar uses a few dozen words. `world_clip_tokenizer()` therefore keeps OpenAI's BPE but
only the part of it the grammar needs: the 512 byte-level symbols, the merges that OpenAI's BPE applies to the
grammar's words (and every intermediate piece they produce) and the two special tokens — about 600 tokens.

Trade-off: grammar words (`scenes.CAPTION_WORDS` plus `EXTRA_WORDS`) are split into exactly OpenAI's pieces (same
token strings; the ids are compact, ordered as OpenAI's, and `openai_ids()` maps them back). Any other text still
encodes without unknown tokens, but falls back to bytes and whatever kept merges apply, so it is segmented
differently from OpenAI's tokenizer and is out of the training distribution of a world model anyway.
Why this is exact for grammar words: BPE applies, at each step, the lowest-ranked merge among those applicable; the
kept merges include every merge that OpenAI's run applies, so dropping the others never changes the choice.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from stitchvm.world.scenes import CAPTION_WORDS

BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# a few generic prompt words beyond the caption grammar (their pieces are kept too)
EXTRA_WORDS = ("photo", "of", "image", "picture", "and", "with", "center", "middle", "small", "large", "big")


@lru_cache(maxsize=1)
def openai_merges() -> tuple[tuple[str, str], ...]:
    """OpenAI's 48894 merges, in rank order (the file's lines 1 .. 49152 - 256 - 2, as in openai/CLIP)."""
    lines = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1])


def openai_vocab() -> dict[str, int]:
    """OpenAI's 49408-token vocabulary: 256 bytes, 256 bytes + "</w>", one token per merge, then BOS and EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in openai_merges()] + [BOS, EOS]
    return {t: k for k, t in enumerate(tokens)}


def openai_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer (ids identical to openai/CLIP for lower-case text without ftfy-specific fixes)."""
    return CLIPTokenizer(vocab=openai_vocab(), merges=list(openai_merges()),
                         model_max_length=max_length)


def _bpe_trace(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges OpenAI's BPE applies to one pre-tokenized word (byte-level symbols), in order."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, k = [], 0
        while k < len(symbols):
            if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == best:
                merged.append(symbols[k] + symbols[k + 1])
                k += 2
            else:
                merged.append(symbols[k])
                k += 1
        symbols = merged
    return used


def world_vocab_and_merges(words=CAPTION_WORDS + EXTRA_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The compact vocabulary (token -> id, ordered as OpenAI's ids) and the kept merges (rank order) for `words`."""
    merges = openai_merges()
    ranks = {m: k for k, m in enumerate(merges)}
    byte_map = bytes_to_unicode()
    kept: set[tuple[str, str]] = set()
    for word in words:
        kept.update(_bpe_trace("".join(byte_map[b] for b in word.lower().encode("utf-8")), ranks))
    full = openai_vocab()
    chars = list(bytes_to_unicode().values())
    tokens = set(chars) | {c + "</w>" for c in chars} | {"".join(m) for m in kept} | {BOS, EOS}
    vocab = {t: k for k, t in enumerate(sorted(tokens, key=full.__getitem__))}
    return vocab, [m for m in merges if m in kept]


def world_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The world's CLIP tokenizer: OpenAI's BPE restricted to the caption grammar (see the module docstring)."""
    vocab, merges = world_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def openai_ids(tokenizer: CLIPTokenizer) -> list[int]:
    """For a compact tokenizer: OpenAI's id of each of its ids (index = compact id)."""
    full = openai_vocab()
    vocab = tokenizer.get_vocab()
    return [full[t] for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
