"""The value model through real MLflow: sqlite tracking + registry in a temporary folder, loaded in a fresh process."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stitchvm.stages import tracking
from stitchvm.value.model import StitchedValueModel
from conftest import perturbed

NAME = "stitchvm-value"

# Loads the registered model by alias with nothing but mlflow, as a consumer would, and saves its predictions.
CONSUMER = """
import sys
import mlflow
import numpy as np
inputs = np.load(sys.argv[2])
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict({key: inputs[key] for key in ("latents", "t", "prompts")}))
"""


def perturbed_model(backbone, reward) -> StitchedValueModel:
    """A value model whose trainable parameters differ from their initialisation (as after finetuning)."""
    return perturbed(StitchedValueModel(backbone, reward, i=2, j=1), seed=7)


def example_inputs(backbone) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(11)
    size = backbone.image_size // backbone.vae_scale
    return {"latents": torch.randn(3, backbone.latent_channels, size, size, generator=gen).numpy(),
            "t": np.array([0.1, 0.5, 0.9], dtype=np.float32),
            "prompts": np.array(["a red cube", "a photo of a dog", "an oil painting of a lighthouse"])}


def values(model: StitchedValueModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(inputs["latents"]), torch.from_numpy(inputs["t"]),
                     list(inputs["prompts"])).numpy()


@pytest.fixture(scope="module")
def logged(tmp_path_factory, backbone, reward):
    """One run in a fresh sqlite store that logs and registers a perturbed value model (alias `candidate`)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    model = perturbed_model(backbone, reward)
    size = backbone.image_size // backbone.vae_scale
    with tracking.start_run("value-model", run_name="test", tracking_uri=uri,
                            artifact_location=str(root / "artifacts")) as run:
        version = tracking.log_value_model(model, latent_shape=(backbone.latent_channels, size, size))
    yield {"root": root, "uri": uri, "run_id": run.info.run_id, "version": version, "model": model}
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


def test_registered_model_predicts_the_same_values_in_a_fresh_process(logged, backbone, reward):
    root, inputs = logged["root"], example_inputs(backbone)
    np.savez(root / "inputs.npz", **inputs)
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "HF_HUB_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_REGISTRY_URI", None)
    done = subprocess.run([sys.executable, "-c", CONSUMER, f"models:/{NAME}@candidate", str(root / "inputs.npz"),
                           str(root / "predictions.npy")], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = np.load(root / "predictions.npy")
    assert predicted.dtype == np.float32 and predicted.shape == (3,)
    np.testing.assert_allclose(predicted, values(logged["model"], inputs), atol=1e-5)
    # the loaded weights are the trained ones, not a fresh initialisation
    assert not np.allclose(predicted, values(StitchedValueModel(backbone, reward, i=2, j=1).eval(), inputs),
                           atol=1e-3)


def test_only_the_trainable_part_is_logged(logged):
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged["version"].source,
                                                     dst_path=str(logged["root"] / "download")))
    saved = local / "artifacts" / "value_model"
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    inputs = mlflow.models.get_model_info(logged["version"].source).signature.inputs
    assert [(s.name, s.type, s.shape) for s in inputs.inputs][1:] == [("t", np.dtype(np.float32), (-1,)),
                                                                      ("prompts", np.dtype(str), (-1,))]


def test_the_model_is_logged_from_code_with_an_input_example(logged, backbone):
    """Loading runs the logged value_pyfunc.py (nothing is unpickled); the stored example is a valid input."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged["version"].source,
                                                     dst_path=str(logged["root"] / "download-code")))
    assert (local / "value_pyfunc.py").is_file() and not list(local.rglob("*.pkl"))
    info = mlflow.models.get_model_info(logged["version"].source)
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    example = mlflow.models.Model.load(str(local)).load_input_example(str(local))
    size = backbone.image_size // backbone.vae_scale
    assert example["latents"].shape == (2, backbone.latent_channels, size, size) and example["t"].shape == (2,)
    values = mlflow.pyfunc.load_model(logged["version"].source).predict(
        {"latents": np.asarray(example["latents"], np.float32), "t": np.asarray(example["t"], np.float32),
         "prompts": np.asarray(example["prompts"], dtype=str)})
    assert values.shape == (2,) and np.isfinite(values).all()


def test_the_version_says_what_it_stitches(logged, backbone):
    version = logged["version"]
    assert {k: version.tags[k] for k in ("stitch.i", "stitch.j", "backbone", "reward")} == {
        "stitch.i": "2", "stitch.j": "1", "backbone": "tiny:sd3", "reward": "tiny:clip"}
    assert "\n" not in version.description and "not evaluated yet" in version.description
    # tiny:sd3's position table is larger than its native grid: H and W stay free in the signature
    assert tracking.model_latent_shape(logged["model"]) == (backbone.latent_channels, -1, -1)


def test_candidate_alias_then_promotion_to_champion(logged):
    client, version = MlflowClient(), logged["version"]
    assert version.name == NAME and version.aliases == ["candidate"] and version.run_id == logged["run_id"]
    promoted = tracking.promote(NAME, version.version)
    assert sorted(promoted.aliases) == ["candidate", "champion"]
    assert client.get_model_version_by_alias(NAME, "champion").version == version.version
    assert client.get_model_version_by_alias(NAME, "candidate").version == version.version


def test_predict_rejects_bad_inputs_naming_the_key(logged, backbone):
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    inputs = example_inputs(backbone)
    python_model = pyfunc.unwrap_python_model()
    np.testing.assert_allclose(python_model.predict(None, inputs), values(logged["model"], inputs), atol=1e-5)
    with pytest.raises(ValueError, match="'t' is missing"):
        python_model.predict(None, {k: v for k, v in inputs.items() if k != "t"})
    with pytest.raises(ValueError, match=r"same batch size.*'t' \(2,\)"):
        python_model.predict(None, {**inputs, "t": inputs["t"][:2]})
    with pytest.raises(ValueError, match=r"'latents' must have 4 dimensions, got shape \(4, 16, 16\)"):
        python_model.predict(None, {**inputs, "latents": inputs["latents"][0]})
    # through the pyfunc, MLflow's tensor signature catches a missing key first; the batch check is ours
    with pytest.raises(MlflowException, match="missing inputs.*prompts"):
        pyfunc.predict({k: v for k, v in inputs.items() if k != "prompts"})
    with pytest.raises(ValueError, match=r"'prompts' \(2,\)"):
        pyfunc.predict({**inputs, "prompts": inputs["prompts"][:2]})


BAD_INPUTS = [  # (what is wrong, change to the good inputs, the message)
    ("t above 1", lambda x: {**x, "t": np.array([0.1, 5.0, 0.9], np.float32)}, r"'t' must lie in \[0, 1\].*5"),
    ("t below 0", lambda x: {**x, "t": np.array([-1.0, 0.5, 0.9], np.float32)}, r"'t' must lie in \[0, 1\]"),
    ("NaN in t", lambda x: {**x, "t": np.array([np.nan, 0.5, 0.9], np.float32)}, r"'t' holds NaN or inf"),
    ("NaN in latents", lambda x: {**x, "latents": np.where(np.arange(x["latents"].size).reshape(x["latents"].shape)
                                                             == 7, np.nan, x["latents"]).astype(np.float32)},
     r"'latents' holds 1 non-finite values"),
    ("empty batch", lambda x: {k: v[:0] for k, v in x.items()}, r"the batch is empty"),
    ("wrong channels", lambda x: {**x, "latents": x["latents"][:, :2]}, r"must have \d+ channels"),
    ("odd grid", lambda x: {**x, "latents": x["latents"][..., :-1]}, r"H and W divisible by"),
    ("grid too large", lambda x: {**x, "latents": np.tile(x["latents"], (1, 1, 40, 40))}, r"at most"),
    ("strings as latents", lambda x: {**x, "latents": x["latents"].astype(str)}, r"'latents' must hold floats"),
    ("integers as t", lambda x: {**x, "t": np.array([0, 1, 1])}, r"'t' must hold floats.*int64"),
    ("objects as latents", lambda x: {**x, "latents": x["latents"].astype(object)}, r"'latents' must hold floats"),
    ("ragged latents", lambda x: {**x, "latents": [x["latents"][0], x["latents"][1, :2]]},
     r"'latents' is not a rectangular array"),
    ("float64 beyond float32", lambda x: {**x, "latents": np.full(x["latents"].shape, 1e300)},
     r"'latents' holds \d+ non-finite values"),
    ("numbers as prompts", lambda x: {**x, "prompts": np.arange(3)}, r"'prompts' must hold strings"),
]


@pytest.mark.parametrize("what, change, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_predict_refuses_nonsense_with_a_short_message(logged, backbone, what, change, message):
    python_model = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate").unwrap_python_model()
    with pytest.raises(ValueError, match=message) as err:
        python_model.predict(None, change(example_inputs(backbone)))
    assert len(str(err.value)) < 200  # a message, not a dump of the array


def test_predict_converts_float64_and_matches_float32(logged, backbone):
    python_model = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate").unwrap_python_model()
    inputs = example_inputs(backbone)
    wide = {**inputs, "latents": inputs["latents"].astype(np.float64), "t": inputs["t"].astype(np.float64)}
    np.testing.assert_array_equal(python_model.predict(None, wide), python_model.predict(None, inputs))


def test_log_history_writes_step_metrics(logged):
    history = [{"step": s, "loss": 1.0 / s, "lr": 1e-4 * s} for s in range(1, 6)]
    with tracking.start_run("value-model", run_name="history", tracking_uri=logged["uri"]) as run:
        tracking.log_history(history)
        with pytest.raises(ValueError, match="no 'step'"):
            tracking.log_history([{"loss": 1.0}])
    client = MlflowClient()
    losses = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in losses] == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lr")] == [1, 2, 3, 4, 5]


def test_tracking_uri_prefers_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/elsewhere.db")
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:////tmp/elsewhere.db"


# ---- the latent grid ------------------------------------------------------------------------------------------------
def grid_model(native: int, max_patches: int | None, patch: int = 2, channels: int = 4) -> SimpleNamespace:
    """What check_latent_grid reads of a value model: its head's latent facts (stitchvm/value/head.py)."""
    head = SimpleNamespace(patch_size=patch, latent_channels=channels, native_latent_hw=(native, native),
                           max_latent_side=max_patches * patch if max_patches else None)
    return SimpleNamespace(head=head)


def test_a_table_no_larger_than_the_native_grid_fixes_the_grid():
    world = grid_model(native=8, max_patches=4)  # the embedded world: 8 × 8 latents, a 4 × 4 position table
    assert tracking.fixed_latent_grid(world) == (8, 8) and tracking.model_latent_shape(world) == (4, 8, 8)
    tracking.check_latent_grid(world, (3, 4, 8, 8))
    with pytest.raises(ValueError, match=r"'latents' must be \(B, 4, 8, 8\).*got shape \(3, 4, 16, 16\)"):
        tracking.check_latent_grid(world, (3, 4, 16, 16))
    with pytest.raises(ValueError, match=r"'latents' must be \(B, 4, 8, 8\)"):  # a crop it never saw at that size
        tracking.check_latent_grid(world, (3, 4, 4, 4))
    sd3 = grid_model(native=128, max_patches=192)  # SD3.5-Large: several resolutions
    assert tracking.fixed_latent_grid(sd3) is None and tracking.model_latent_shape(sd3) == (4, -1, -1)
    tracking.check_latent_grid(sd3, (1, 4, 96, 160))


# ---- promotion: the gate, then beating the champion ----------------------------------------------------------------
def gate(spearman: float, passed: bool = True) -> dict:
    return {"sigma": 0.5, "checks": {"spearman_within_prompt": passed, "loss_below_trivial": True},
            "passed": passed, "spearman_within_prompt": spearman, "distill_loss": 0.1, "trivial_loss": 0.2}


@pytest.fixture
def versions(logged, request):
    """A fresh registered model in the real store with `n` versions (all pointing at the logged model's files)."""
    client = MlflowClient()
    name = f"promotion-{request.node.name}".replace("[", "-").replace("]", "")
    client.create_registered_model(name)

    def make(n: int) -> tuple[str, list[str]]:
        return name, [client.create_model_version(name, source=logged["version"].source,
                                                  run_id=logged["run_id"]).version for _ in range(n)]
    return make


def test_the_first_passing_version_becomes_champion_and_records_its_gate(versions):
    name, (v1,) = versions(1)
    assert tracking.promote_if_better(name, v1, gate(0.36)) == {"champion": True}
    version = MlflowClient().get_model_version_by_alias(name, "champion")
    assert version.version == v1 and float(version.tags[tracking.GATE_TAG]) == 0.36
    assert version.tags["gate.passed"] == "True" and version.tags["gate.sigma"] == "0.5"
    assert version.description == "within-prompt Spearman 0.36 at sigma 0.5: gate passed; champion"


def test_a_passing_version_that_does_not_beat_the_champion_stays_a_candidate(versions):
    name, (v1, v2, v3) = versions(3)
    tracking.promote_if_better(name, v1, gate(0.36))
    for v, spearman in ((v2, 0.31), (v3, 0.36)):  # lower, then equal: strictly better is required
        out = tracking.promote_if_better(name, v, gate(spearman))
        assert out == {"champion": False,
                       "champion_reason": f"gate passed but {spearman} <= current champion v{v1}'s 0.36"}
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == v1
    loser = client.get_model_version(name, v2)
    assert float(loser.tags[tracking.GATE_TAG]) == 0.31  # recorded on every evaluated version
    assert loser.description == (f"within-prompt Spearman 0.31 at sigma 0.5: gate passed but 0.31 <= current "
                                 f"champion v{v1}'s 0.36; not champion")


def test_a_better_version_replaces_the_champion_and_a_failed_gate_never_does(versions):
    name, (v1, v2, v3) = versions(3)
    tracking.promote_if_better(name, v1, gate(0.36))
    assert tracking.promote_if_better(name, v2, gate(0.41)) == {"champion": True}
    failed = tracking.promote_if_better(name, v3, gate(0.9, passed=False))
    assert failed == {"champion": False, "champion_reason": "gate failed: spearman_within_prompt"}
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == v2
    assert client.get_model_version(name, v3).tags["gate.failed"] == "spearman_within_prompt"
    # evaluating the champion again keeps it (its own metric is no rival)
    assert tracking.promote_if_better(name, v2, gate(0.41)) == {"champion": True}


def test_a_champion_without_a_recorded_metric_is_replaced_by_a_passing_version(versions):
    name, (v1, v2) = versions(2)
    tracking.promote(name, v1)  # promoted before gate metrics were recorded: nothing to beat
    assert tracking.promote_if_better(name, v2, gate(0.2)) == {"champion": True}
    assert MlflowClient().get_model_version_by_alias(name, "champion").version == v2


# ---- where artifacts go ---------------------------------------------------------------------------------------------
def test_artifacts_go_beside_a_sqlite_store(logged, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.artifact_root("sqlite:////srv/ml/mlflow.db", "my exp") == "/srv/ml/mlruns/my_exp"
    assert tracking.artifact_root("sqlite:///mlflow.db", "stitchvm") == str(tmp_path / "mlruns" / "stitchvm")
    assert tracking.artifact_root("http://127.0.0.1:5000", "stitchvm") is None  # the server decides
    with tracking.start_run("beside-the-store", run_name="where", tracking_uri=logged["uri"]) as run:
        tracking.log_dict({"a": 1}, "a.json")
    location = MlflowClient().get_experiment(run.info.experiment_id).artifact_location
    assert location == str(logged["root"] / "mlruns" / "beside-the-store")
    assert (logged["root"] / "mlruns" / "beside-the-store" / run.info.run_id / "artifacts" / "a.json").is_file()
