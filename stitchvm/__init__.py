"""StitchVM: stitched value models for diffusion alignment.

The library is layered; a module imports only from its own layer or the layers below it (tests/test_layers.py
parses every import and checks this):

    6  stitchvm.benchmarks, stitchvm.smoke, stitchvm.__main__   the command line and benchmarks
    5  stitchvm.stages        one function per pipeline stage, its I/O, MLflow tracking, plots, tables
    4  stitchvm.guidance      DPS, FK steering, best-of-N and the registry of guidance methods
       stitchvm.alignment     DiffusionNFT, DRaFT and what they share (rollouts, fixed evaluation)
       stitchvm.world         the embedded world: procedural scenes and the pretraining of its models
    3  stitchvm.value         the value model: backbone head u_{≤i}, stitching layer, search, training, evaluation,
                              the Monte Carlo value, rank statistics
    2  stitchvm.diffusion     the flow-matching forward process and the one sampler
    1  stitchvm.models        backbone, reward (the one reward API), presets, tokenizers, LoRA, world sources
    0  stitchvm.config, stitchvm.profiling, stitchvm.progress, stitchvm.lr_schedule, stitchvm.data

Layers 4 do not import each other. Outside the library, the Dagster adapters (`assets/`, `pipelines/`) and the DVC
stages (`python -m stitchvm <stage>`) call layer 5 and never reimplement a stage.
"""
