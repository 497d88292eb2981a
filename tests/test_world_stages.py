"""The world's bootstrap stages through the Dagster front-end (a reduced world in a temporary STITCHVM_WORLD; the
shipped world is never touched), the `world:` model sources, and the shipped world itself."""
import copy
import dataclasses
import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]

from dagster import DagsterInstance, Definitions
from diffusers.models.attention_processor import JointAttnProcessor2_0

import pipelines.world
from assets import MlflowResource, StitchVMResource
from stitchvm.models.backbone import build_backbone
from stitchvm.config import ModelSpec, RewardSpec
from stitchvm.models.reward import build_reward
from stitchvm.stages import BOOTSTRAP
from stitchvm.stages.bootstrap import install
from stitchvm.models import world_source as pretrained

REDUCED_WORLD = {
    "clip": {"steps": 6, "batch_size": 16, "binding_steps": 2},
    "vae": {"steps": 6, "batch_size": 8},
    "backbone": {"steps": 6, "batch_size": 8},
    "aesthetic": {"steps": 6, "batch_size": 16},
    "evaluator": {"steps": 6, "batch_size": 16},
    "report": {"scenes": 32, "per_prompt": 2, "steps": 2},
}
PARTS = ("clip", "vae", "transformer", "scheduler", "tokenizer", "aesthetic.safetensors", "evaluator.safetensors")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The `world_bootstrap` job, materialised in-process on a reduced recipe into a temporary world folder."""
    tmp = tmp_path_factory.mktemp("world")
    uri = f"sqlite:///{tmp}/mlflow.db"
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"world": REDUCED_WORLD, "mlflow": {"tracking_uri": uri}}))
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STITCHVM_WORLD", str(tmp / "world"))
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.chdir(tmp)
        defs = Definitions(assets=pipelines.world.defs.assets, jobs=pipelines.world.defs.jobs, resources={
            "stitchvm": StitchVMResource(params_path=str(params), reports_dir=str(tmp / "reports"),
                                         checkpoints_dir=str(tmp / "checkpoints")),
            "mlflow": MlflowResource(tracking_uri=uri)})
        result = defs.resolve_job_def("world_bootstrap").execute_in_process(instance=DagsterInstance.ephemeral())
        yield {"tmp": tmp, "uri": uri, "result": result}
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


@pytest.mark.e2e
def test_bootstrap_job_writes_every_part_with_metadata_and_runs(world):
    result, tmp = world["result"], world["tmp"]
    assert result.success
    assert {p.name for p in (tmp / "world").iterdir()} == set(PARTS)  # no staging folder left behind
    md = {name: result.asset_materializations_for_node(name)[0].metadata for name in BOOTSTRAP}
    for name in BOOTSTRAP:
        if name != "world_report":
            assert md[name]["curve"].value.startswith("![curve](data:image/png;base64,iVBOR"), name
            assert md[name]["bytes"].value > 0
    assert md["world_report"]["samples"].value.startswith("![samples](data:image/png;base64,iVBOR")
    report = json.loads((tmp / "reports" / "world.json").read_text())
    for key in ("clip_zero_shot_color", "clip_zero_shot_shape", "clip_binding_swap_colour", "prompt_pair_win_rate"):
        assert 0.0 <= report[key] <= 1.0
    from stitchvm.world.prompt_set import CATEGORIES

    assert set(report["evaluator_accuracy"]) == set(CATEGORIES)
    assert set(report["generator_accuracy"]) == {*CATEGORIES, "overall"}
    assert all(0.0 <= v <= 1.0 for v in report["generator_accuracy"].values())
    runs = MlflowClient(world["uri"]).search_runs(
        [MlflowClient(world["uri"]).get_experiment_by_name("stitchvm").experiment_id])
    assert {r.info.run_name for r in runs} == set(BOOTSTRAP) - {"world_report"}
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.e2e
def test_world_sources_load_the_trained_parts(world, monkeypatch):
    monkeypatch.setenv("STITCHVM_WORLD", str(world["tmp"] / "world"))
    backbone = build_backbone(ModelSpec("world:sd3"))
    reward = build_reward(RewardSpec("world:clip"))
    aesthetic = build_reward(RewardSpec("world:clip", kind="aesthetic", head="world"))
    # SD3's two CLIP text encoders are the world CLIP's text tower (stored once)
    assert backbone.text_encoder is backbone.text_encoder_2
    text_tower = reward.clip.text_model.state_dict()
    for name, value in backbone.text_encoder.text_model.state_dict().items():
        assert torch.equal(value, text_tower[name]), name
    z = torch.randn(2, backbone.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, pooled = backbone.encode_prompts(["a red circle", ""])
    assert backbone.velocity(z, torch.tensor([0.5, 0.5]), embeds, pooled).shape == z.shape
    assert backbone.decode(z).shape == (2, 3, 32, 32)
    # the collapsed context (one zero token, log 256 on its logit) is the full 256-zero-token SD3 context
    full = dataclasses.replace(backbone, transformer=copy.deepcopy(backbone.transformer), t5_tokens=256)
    full.transformer.set_attn_processor(JointAttnProcessor2_0())  # diffusers' own joint attention
    embeds_full, pooled_full = full.encode_prompts(["a red circle", ""])
    assert embeds.shape[1] == backbone.tokenizer.model_max_length + 1 and embeds_full.shape[1] == embeds.shape[1] + 255
    torch.testing.assert_close(backbone.velocity(z, torch.tensor([0.5, 0.5]), embeds, pooled),
                               full.velocity(z, torch.tensor([0.5, 0.5]), embeds_full, pooled_full),
                               rtol=1e-4, atol=1e-5)
    features, _ = aesthetic.image_features(backbone.decode(z))
    assert aesthetic.score(features, None).shape == (2,)


@pytest.mark.e2e
def test_the_samples_stage_draws_from_the_full_context_model(world, monkeypatch):
    """`samples` calls the diffusers pipeline itself: it must hand it the collapsed context (one zero T5 token), or
    the collapsed attention would weight 256 real zero tokens by 256 once more."""
    import pyarrow as pa

    from stitchvm.config import Params, SamplesConfig
    from stitchvm.stages.samples import generate

    monkeypatch.setenv("STITCHVM_WORLD", str(world["tmp"] / "world"))
    backbone = build_backbone(ModelSpec("world:sd3"))
    full = dataclasses.replace(backbone, transformer=copy.deepcopy(backbone.transformer), t5_tokens=256)
    full.transformer.set_attn_processor(JointAttnProcessor2_0())
    params = Params(samples=SamplesConfig(source="pipeline", per_prompt=2, steps=3, guidance_scale=4.5, batch_size=2))
    # the longest caption of the grammar fits the backbone's token budget (a truncated prompt would differ)
    assert len(backbone.tokenizer("four purple triangles at the top and three orange squares at the bottom")
               .input_ids) <= backbone.tokenizer.model_max_length
    rows = pa.table({"seed": [11, 12], "prompt": ["a red circle", "two blue squares on the left"]})
    pipe = full.pipeline
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(prompt=rows.column("prompt").to_pylist(), num_inference_steps=3, guidance_scale=4.5,
                        generator=[torch.Generator().manual_seed(s) for s in (11, 12)], height=32, width=32,
                        output_type="latent").images
    torch.testing.assert_close(generate(backbone, rows, params), expected.float(), rtol=1e-4, atol=1e-4)


def test_a_missing_part_names_the_stage_that_writes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STITCHVM_WORLD", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run the `world_clip` stage"):
        build_backbone(ModelSpec("world:sd3"))
    with pytest.raises(ValueError, match="use world:clip"):
        build_reward(RewardSpec("world:sd3"))


def test_a_failed_install_keeps_the_previous_part(tmp_path, monkeypatch):
    monkeypatch.setenv("STITCHVM_WORLD", str(tmp_path))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "weights").write_text("previous")
    with pytest.raises(RuntimeError):
        with install("vae") as path:
            path.mkdir()
            (path / "weights").write_text("half-written")
            raise RuntimeError("interrupted")
    assert (tmp_path / "vae" / "weights").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]
    with install("vae") as path:
        path.mkdir()
        (path / "weights").write_text("new")
    assert (tmp_path / "vae" / "weights").read_text() == "new"


# ---- the shipped world -----------------------------------------------------------------------------------------
shipped = pytest.mark.skipif(not all((pretrained.SHIPPED / p).exists() for p in PARTS),
                             reason="the shipped world is not there")


@pytest.fixture
def shipped_world(monkeypatch):
    """The shipped world, even while the module's reduced world (STITCHVM_WORLD) is set."""
    monkeypatch.delenv("STITCHVM_WORLD", raising=False)


@shipped
def test_the_shipped_world_is_small(shipped_world):
    total = sum(f.stat().st_size for f in pretrained.SHIPPED.rglob("*") if f.is_file())
    assert total <= 25 * 2**20, f"{total / 2**20:.1f} MiB"


@shipped
def test_the_shipped_clip_knows_colours_and_shapes(shipped_world):
    from stitchvm.world import scenes
    from stitchvm.world.clip_training import zero_shot_accuracy

    reward = build_reward(RewardSpec("world:clip"))
    pixels, _, scene = scenes.make_scenes(400, torch.Generator().manual_seed(7), two_groups=0.0)  # not training's
    accuracy = zero_shot_accuracy(reward.clip, reward.tokenizer, pixels, scene, names=("colour", "shape"))
    assert accuracy["colour"] >= 0.9 and accuracy["shape"] >= 0.9, accuracy


@shipped
def test_the_shipped_evaluator_reads_renders_back(shipped_world):
    from stitchvm.world import scenes
    from stitchvm.world.evaluator import load_evaluator, scene_accuracy

    evaluator = load_evaluator(pretrained.SHIPPED / "evaluator.safetensors")
    pixels, _, scene = scenes.make_scenes(400, torch.Generator().manual_seed(8))  # not the training stream
    assert scene_accuracy(evaluator, pixels, scene) >= 0.9


@shipped
def test_the_shipped_backbone_draws_what_it_is_asked(shipped_world):
    from stitchvm.world.evaluation import clip_scores, pair_win_rates, sample_pixels, win_rate

    backbone, reward = build_backbone(ModelSpec("world:sd3")), build_reward(RewardSpec("world:clip"))
    prompts = ["a red circle", "a blue square", "a yellow triangle", "a green circle"]
    pixels, labels = sample_pixels(backbone, prompts, per_prompt=4, steps=10, guidance_scale=4.5, seed=3)
    assert win_rate(pair_win_rates(clip_scores(reward, pixels, prompts), labels)) >= 0.8
