"""A small world whose models are pretrained by the project's own pipeline.

- `scenes`: a procedural, compositional image–caption dataset (one or two groups of 1–4 shapes with colour, count
  and position; captions in words), the specs a caption asserts and the one truth `satisfies`.
- `prompt_set`: GenEval in miniature, the built-in prompts in six categories with specs and held-out compositions.
- `evaluator`: the independent evaluator (a CNN that reads a scene back from pixels; never a reward).
- `tokenizer`: OpenAI's CLIP BPE built offline, and the world's compact tokenizer (the BPE restricted to the grammar).
- `clip_training`: contrastive pretraining of a small `transformers.CLIPModel` and its zero-shot evaluation.
- `autoencoder`: the world's `AutoencoderKL` (32×32×3 <-> 8×8×4), its latent scale and shift.
- `flow_training`: the world's `SD3Transformer2DModel`, rectified flow conditioned through the CLIP text tower.
- `attention`: the collapsed joint attention (SD3 without T5: 256 zero tokens as one, exactly).
- `aesthetic`: a scalar reward head on the CLIP image embedding (the shapes' salience).
- `evaluation`: zero-shot and binding accuracy, prompt-pair win rate, VAE PSNR, the head's Spearman, the evaluator's
  and the generator's GenEval accuracy (`world_report`).
- `pretrained`: where the shipped weights live and how the `world:` sources find them.

Submodules are imported on demand (`from stitchvm.world import scenes`) so that importing the package stays light.
"""
