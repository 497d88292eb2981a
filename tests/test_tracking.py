"""The value model through real MLflow: sqlite tracking + registry in a temporary folder, loaded in a fresh process."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stitchvm.stages import tracking
from stitchvm.value.model import StitchedValueModel

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
    model = StitchedValueModel(backbone, reward, i=2, j=1)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


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
    ("strings as latents", lambda x: {**x, "latents": x["latents"].astype(str)}, r"'latents' must hold real numbers"),
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
