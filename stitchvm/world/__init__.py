"""A small world whose models are pretrained by the project's own pipeline (issue 4).

- `scenes`: a procedural image–caption dataset (32×32 shapes with colour, count and position; captions in words).
- `tokenizer`: OpenAI's CLIP BPE built offline, and the world's compact tokenizer (the BPE restricted to the grammar).
- `clip_training`: contrastive pretraining of a small `transformers.CLIPModel` and its zero-shot evaluation.

Submodules are imported on demand (`from stitchvm.world import scenes`) so that importing the package stays light.
"""
