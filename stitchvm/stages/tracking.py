"""MLflow tracking and Model Registry for stitched value models: the only module of the library that imports mlflow
(with `value_pyfunc.py`, the model-from-code file it logs).

A trained value model is published as an MLflow pyfunc so that consumers load it with nothing but
`mlflow.pyfunc.load_model("models:/stitchvm-value@champion")`. The logged artifact is the `save_pretrained` folder
(trainable weights + config.json); the frozen backbone head and reward model are rebuilt from the specs recorded in
that config when the model is loaded, so they are never serialised a second time. The pyfunc is logged as a model
from code (`value_pyfunc.py`), so loading it runs stitchvm's code and unpickles nothing.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from numbers import Real

import mlflow
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.entities import Metric, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec

from stitchvm.value.model import StitchedValueModel

ARTIFACT_KEY = "value_model"  # the key of the save_pretrained folder in the pyfunc's artifacts
PYFUNC_CODE = os.path.join(os.path.dirname(__file__), "value_pyfunc.py")  # the model from code that log_value_model logs
GATE_TAG = "gate.spearman_within_prompt"  # the version tag promotion compares: the gate's metric at gate.sigma
EXAMPLE_PROMPTS = ("a red square", "two blue circles")  # the input example's prompts (any text is a valid prompt)
INPUT_NDIM = {"latents": 4, "t": 1, "prompts": 1}  # what ValueModelPyfunc.predict expects, key -> ndim
REQUIREMENTS = ("stitchvm", "torch", "diffusers", "transformers", "safetensors")
MAX_METRICS_PER_BATCH = 1000  # the tracking API's limit for one log_batch call


# ---- the pyfunc ---------------------------------------------------------------------------------------------------
class ValueModelPyfunc(mlflow.pyfunc.PythonModel):
    """V(z_t, t, prompt) behind MLflow's pyfunc interface.

    Input: a dict of arrays `{"latents": float32 (B, C, H, W), "t": float32 (B,), "prompts": str (B,)}` (MLflow
    passes a named tensor signature's input to `predict` as such a dict). Output: float32 (B,) values.
    Through `PyFuncModel.predict` MLflow first enforces the signature, which demands float32 exactly (MLflow 3.17's
    tensor enforcement has no dtype conversion); called directly, `predict` also converts float16/float64 inputs.
    """

    # `predict` deliberately has no type hint on `model_input`: MLflow 3 derives a signature and a validator from
    # that hint but only understands `list[...]` inputs, so a `dict[str, np.ndarray]` hint only produces warnings.
    # The input is checked by the tensor signature (log_value_model) and by `check_inputs` below.

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the value model from the logged save_pretrained folder (frozen parts from their specs)."""
        self.model = StitchedValueModel.from_pretrained(context.artifacts[ARTIFACT_KEY]).eval()

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        """(B,) float32 values for a batch of noisy latents, their noise levels and their prompts."""
        latents, t, prompts = check_inputs(model_input)
        check_latent_grid(self.model, latents.shape)
        device = next(self.model.stitch.parameters()).device
        with torch.no_grad():
            values = self.model(torch.as_tensor(latents, dtype=torch.float32, device=device),
                                torch.as_tensor(t, dtype=torch.float32, device=device),
                                [str(p) for p in prompts])
        return values.float().cpu().numpy()


def check_inputs(model_input) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a pyfunc input dict and return (latents, t, prompts) as arrays.

    MLflow's schema enforcement only runs when the model is called through `PyFuncModel.predict`; direct callers of
    `ValueModelPyfunc.predict` (and a batch-size mismatch, which a per-tensor schema with -1 cannot express) still
    need a clear error here instead of a shape error deep inside the transformer.
    """
    if not isinstance(model_input, dict):
        raise ValueError(f"the value model takes a dict with keys {list(INPUT_NDIM)}, got {type(model_input).__name__}")
    arrays = {key: _input_array(model_input, key) for key in INPUT_NDIM}
    shapes = {key: a.shape for key, a in arrays.items()}
    if len({s[0] for s in shapes.values()}) != 1:
        raise ValueError("inputs 'latents', 't' and 'prompts' must have the same batch size, got shapes "
                         + ", ".join(f"{k!r} {s}" for k, s in shapes.items()))
    if shapes["t"][0] == 0:
        raise ValueError("the batch is empty: give at least one latent, its t and its prompt")
    latents, t = (_float32(arrays[key], key) for key in ("latents", "t"))
    bad = int((~np.isfinite(latents)).sum())
    if bad:  # after the conversion: a float64 beyond float32's range is an inf here
        raise ValueError(f"input 'latents' holds {bad} non-finite values (NaN, inf or beyond float32)")
    if not np.isfinite(t).all():
        raise ValueError("input 't' holds NaN or inf: give each latent's noise level in [0, 1]")
    if ((t < 0) | (t > 1)).any():
        raise ValueError(f"input 't' must lie in [0, 1] (0 clean, 1 pure noise), got {t.min():.4g} to {t.max():.4g}")
    prompts = arrays["prompts"]
    if not all(isinstance(p, str) for p in prompts.tolist()):
        raise ValueError(f"input 'prompts' must hold strings, got dtype {prompts.dtype}")
    return latents, t, prompts


def _input_array(model_input: dict, key: str) -> np.ndarray:
    """`model_input[key]` as an array of the dimensions INPUT_NDIM gives it."""
    if key not in model_input:
        raise ValueError(f"input {key!r} is missing: the value model needs keys {list(INPUT_NDIM)}, "
                         f"got {sorted(map(str, model_input))[:8]}")
    try:
        a = np.asarray(model_input[key])
    except (ValueError, TypeError):  # ragged nested lists; numpy's own message is long and names no input
        raise ValueError(f"input {key!r} is not a rectangular array") from None
    if a.ndim != INPUT_NDIM[key]:
        raise ValueError(f"input {key!r} must have {INPUT_NDIM[key]} dimensions, got shape {a.shape}")
    return a


def _float32(a: np.ndarray, key: str) -> np.ndarray:
    """A float32 view or copy of a float input. Any float converts (float64 is numpy's default; the value model
    computes in float32 anyway); integers, booleans, strings and objects are refused rather than guessed at."""
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"input {key!r} must hold floats (float32, float64 or float16), got dtype {a.dtype}")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: the finite check names it
        return a.astype(np.float32, copy=False)


def check_latent_grid(model: StitchedValueModel, shape: tuple[int, ...]) -> None:
    """Latents the backbone head can read: its channels, and its fixed latent grid where it has one, else a grid
    divisible by its patch size and within its position-embedding table."""
    c, (h, w) = shape[1], shape[2:]
    if c != latent_channels(model):
        raise ValueError(f"input 'latents' must have {latent_channels(model)} channels (B, C, H, W), got shape "
                         f"{tuple(shape)}")
    fixed = fixed_latent_grid(model)
    if fixed is not None and (h, w) != fixed:
        raise ValueError(f"input 'latents' must be (B, {c}, {fixed[0]}, {fixed[1]}) (the backbone's latent grid), "
                         f"got shape {tuple(shape)}")
    p, most = model.head.patch_size, model.head.max_latent_side or 0
    if h % p or w % p or (most and (h > most or w > most)):
        raise ValueError(f"input 'latents' must have H and W divisible by {p}" + (f" and at most {most}" if most else "")
                         + f" (the backbone's latent grid), got shape {tuple(shape)}")


def native_latent_grid(model: StitchedValueModel) -> tuple[int, int]:
    """(H, W) of the latents the backbone was built for (its default image size over the VAE's scale)."""
    return model.head.native_latent_hw


def fixed_latent_grid(model: StitchedValueModel) -> tuple[int, int] | None:
    """The one latent grid the model reads, or None when it reads several.

    SD3's position table covers grids up to pos_embed_max_size patches and is centre-cropped for smaller ones. When
    that largest grid is the native one (the embedded world: 8 × 8 latents, a 4 × 4 table), a smaller grid would only
    read a crop of positions the model never saw at that size and a larger one fails inside the transformer, so the
    native grid is the model's only grid. Real SD3 tables are larger than their native grid (several resolutions).
    """
    native, most = native_latent_grid(model), model.head.max_latent_side or 0
    return native if most and native == (most, most) else None


def model_latent_shape(model: StitchedValueModel) -> tuple[int, int, int]:
    """(C, H, W) for the signature: the fixed grid where the model has one, else -1 for a free H and W."""
    return (latent_channels(model), *(fixed_latent_grid(model) or (-1, -1)))


def input_example(model: StitchedValueModel, latent_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Two valid inputs of the signature's `latent_shape` (a free H or W: the native one), the example MLflow stores
    beside the signature."""
    c, *hw = latent_shape
    h, w = (n if n > 0 else native for n, native in zip(hw, native_latent_grid(model)))
    latents = np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32)
    return {"latents": latents, "t": np.array([0.25, 0.75], dtype=np.float32), "prompts": np.array(EXAMPLE_PROMPTS)}


def value_model_signature(latent_shape: tuple[int, int, int]) -> ModelSignature:
    """The tensor signature of ValueModelPyfunc for latents of shape (C, H, W) (-1 for a free size)."""
    c, h, w = latent_shape
    inputs = Schema([
        TensorSpec(np.dtype(np.float32), (-1, c, h, w), "latents"),
        TensorSpec(np.dtype(np.float32), (-1,), "t"),
        # np.dtype(str) is accepted by TensorSpec (size-less "<U0"; a sized "<U12" is refused). Enforcement strips
        # the size of a "<U..." array before comparing, so any numpy string array passes and the signature JSON
        # says dtype "str"; an object array of Python strings does not pass (convert with np.asarray(x, dtype=str)).
        TensorSpec(np.dtype(str), (-1,), "prompts"),
    ])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]))


def latent_channels(model: StitchedValueModel) -> int:
    """Channels of the latents the backbone head reads (the VAE's latent channels)."""
    return model.head.latent_channels


def pip_requirements() -> list[str]:
    """The value model's run-time requirements, pinned to the versions installed here.

    Passed explicitly so that MLflow skips its slow requirement inference (which imports and traces the model).
    A local version label (torch's `+cu128`) is dropped: it names a wheel index, not a release.
    """
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


# ---- logging and the registry ------------------------------------------------------------------------------------
def log_value_model(model: StitchedValueModel, artifact_name: str = "value_model",
                    registered_name: str | None = "stitchvm-value", alias: str | None = "candidate",
                    latent_shape: tuple[int, int, int] | None = None,
                    profile: str | None = None) -> ModelVersion | ModelInfo:
    """Log `model` as a pyfunc (a model from code, with a signature and an input example) in the active run; register
    it as `registered_name`, with a description and tags (the stitch pair, the backbone and reward sources, `profile`
    when given), and point `alias` at it.

    `latent_shape` (C, H, W) goes into the signature; by default the model's (model_latent_shape: its fixed grid, or
    -1 for a free H and W). Returns the registered ModelVersion, or the ModelInfo when `registered_name` is None (then
    nothing is registered and `alias` is ignored: an alias belongs to a registered model).
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_value_model needs an active MLflow run: call it inside `with start_run(...)`")
    shape = tuple(latent_shape) if latent_shape is not None else model_latent_shape(model)
    if len(shape) != 3:
        raise ValueError(f"latent_shape must be (C, H, W), got {shape}")
    with tempfile.TemporaryDirectory(prefix="stitchvm-value-") as tmp:
        folder = os.path.join(tmp, ARTIFACT_KEY)  # MLflow keeps the folder's name: make it a stable one
        model.save_pretrained(folder)
        info = mlflow.pyfunc.log_model(
            name=artifact_name, python_model=PYFUNC_CODE, artifacts={ARTIFACT_KEY: folder},
            signature=value_model_signature(shape), input_example=input_example(model, shape),
            pip_requirements=pip_requirements(), registered_model_name=registered_name)
    if registered_name is None:
        return info
    model_version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in value_model_tags(model, profile).items():
        client.set_model_version_tag(registered_name, model_version, key, value)
    client.update_model_version(registered_name, model_version, description=value_model_description(model, shape))
    if alias is not None:
        client.set_registered_model_alias(registered_name, alias, model_version)
    return client.get_model_version(registered_name, model_version)


def value_model_tags(model: StitchedValueModel, profile: str | None = None) -> dict[str, str]:
    """A registered version's tags at logging: what it stitches (searchable in the registry), and the profile."""
    tags = {"stitch.i": str(model.i), "stitch.j": str(model.j), "backbone": model.backbone_spec.source,
            "reward": model.reward_spec.source, "context": model.context}
    return tags | ({"profile": profile} if profile else {})


def value_model_description(model: StitchedValueModel, latent_shape: tuple[int, int, int]) -> str:
    """One line saying what a freshly logged version is; evaluation replaces it with its verdict."""
    return (f"V(z_t, t, prompt): blocks 1..{model.i} of {model.backbone_spec.source} stitched into block {model.j} of "
            f"{model.reward_spec.source}; latents (B, {', '.join(map(str, latent_shape))}); not evaluated yet")


def promote(name: str, version: str | int, alias: str = "champion") -> ModelVersion:
    """Point `alias` of registered model `name` at `version` (e.g. candidate -> champion); returns that version."""
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, str(version))
    return client.get_model_version(name, str(version))


def promote_if_better(name: str, version: str | int, gate: dict, alias: str = "champion") -> dict:
    """Record an evaluated version's gate on it (tags `gate.*` and a one-line description) and point `alias` at it
    when the gate passed and its gate metric strictly beats the current `alias` version's (or there is none).

    `gate`: {"sigma", "spearman_within_prompt" (the gate metric), "passed", optionally "checks": {name: bool} and more
    numbers, each tagged `gate.<key>`}. Returns {"champion": bool} plus "champion_reason" when not promoted.
    """
    client, version = MlflowClient(), str(version)
    current = alias_version(client, name, alias)
    promoted, reason = champion_decision(version, gate, current)
    for key, value in gate_tags(gate).items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=gate_description(gate, promoted, reason))
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    return {"champion": promoted} | ({} if promoted else {"champion_reason": reason})


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at, or None when the alias (or the registered model) does not exist yet."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def champion_decision(version: str, gate: dict, current: ModelVersion | None) -> tuple[bool, str | None]:
    """(promote?, why not): the gate must pass and the gate metric strictly beat the current champion's tag.

    A champion without the tag (promoted before gate metrics were recorded) gives nothing to beat: the new version
    replaces it, as any passing version did then.
    """
    metric = gate["spearman_within_prompt"]
    if not gate["passed"]:
        failed = [k for k, ok in gate.get("checks", {}).items() if not ok]
        return False, "gate failed" + (f": {', '.join(failed)}" if failed else "")
    if current is None or str(current.version) == version or GATE_TAG not in current.tags:
        return True, None
    best = float(current.tags[GATE_TAG])
    if metric > best:
        return True, None
    return False, f"gate passed but {metric:.4g} <= current champion v{current.version}'s {best:.4g}"


def gate_tags(gate: dict) -> dict[str, str]:
    """Version tags `gate.<key>` of a gate's numbers and verdict; the failed checks as one list."""
    tags = {f"gate.{k}": str(v) for k, v in gate.items() if k != "checks"}
    failed = [k for k, ok in gate.get("checks", {}).items() if not ok]
    return tags | ({"gate.failed": ", ".join(failed)} if failed else {})


def gate_description(gate: dict, promoted: bool, reason: str | None) -> str:
    """One line: the gate metric, and the version is champion or why not (the reason names the verdict)."""
    return (f"within-prompt Spearman {gate['spearman_within_prompt']:.4g} at sigma {gate['sigma']}: "
            + ("gate passed; champion" if promoted else f"{reason}; not champion"))


# ---- runs and metrics --------------------------------------------------------------------------------------------
def tracking_uri(default: str = "sqlite:///mlflow.db") -> str:
    """The tracking URI to use: `MLFLOW_TRACKING_URI` if set, else `default` (a local sqlite file, which also
    serves the Model Registry; the plain `./mlruns` file store does not support aliases)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default


_env_tracking_uri = tracking_uri  # `start_run` has a parameter of the same name


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local sqlite store keeps its artifacts: `mlruns/<experiment>` beside the database.

    MLflow's own default is `./mlruns` of whatever directory the process runs in, so a stage started elsewhere (a
    Dagster run, a test) scattered artifacts away from the store. MLflow resolves every local artifact location to an
    absolute path before storing it (`resolve_uri_if_local`), so a store-relative root cannot be recorded: moving the
    store still needs the artifacts moved with it to the same absolute place. None (the server's or MLflow's default)
    for any other store.
    """
    if not uri.startswith("sqlite:///"):
        return None
    database = os.path.abspath(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return os.path.join(os.path.dirname(database), "mlruns", re.sub(r"[^\w.-]", "_", experiment))


@contextmanager
def start_run(experiment: str, run_name: str | None = None, tracking_uri: str | None = None,
              artifact_location: str | None = None, run_id: str | None = None) -> Iterator[Run]:
    """Point tracking and the registry at one URI, select (or create) `experiment` and run inside it
    (`run_id` resumes an existing run, e.g. evaluation logging onto its training run).

    `artifact_location` is used only when the experiment is created here; by default artifacts go beside a local
    sqlite store (artifact_root), wherever the working directory is.
    """
    uri = tracking_uri if tracking_uri is not None else _env_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    location = artifact_location if artifact_location is not None else artifact_root(uri, experiment)
    experiment_id = (found.experiment_id if found is not None
                     else client.create_experiment(experiment, artifact_location=location))
    mlflow.set_experiment(experiment_id=experiment_id)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        yield run


def log_history(history: list[dict], prefix: str = "train") -> None:
    """Log a training history (one dict per step; its `step` key gives the step) as `prefix/key` metrics.

    All rows go to the active run in batches of up to 1000 metrics: one database transaction per batch instead of
    one per step, which is what keeps a few thousand steps quick on sqlite.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_history needs an active MLflow run: call it inside `with start_run(...)`")
    metrics = history_metrics(history, prefix, timestamp_ms=int(time.time() * 1000))
    client = MlflowClient()
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])


def history_metrics(history: list[dict], prefix: str, timestamp_ms: int) -> list[Metric]:
    """Flatten history rows into MLflow Metrics; a row without a `step` or with a non-numeric value is an error."""
    metrics = []
    for n, row in enumerate(history):
        if "step" not in row:
            raise ValueError(f"history row {n} has no 'step' key: {sorted(row)}")
        step = int(row["step"])
        for key, value in row.items():
            if key == "step":
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"history row {n} (step {step}): {key!r} is {value!r}, not a number")
            name = f"{prefix}/{key}" if prefix else key
            metrics.append(Metric(key=name, value=float(value), timestamp=timestamp_ms, step=step))
    return metrics


def log_params(params: dict) -> None:
    """Log flat `{name: value}` params to the active run."""
    mlflow.log_params(params)


def log_metrics(metrics: dict[str, float]) -> None:
    """Log `{name: value}` metrics to the active run."""
    mlflow.log_metrics(metrics)


def log_dict(data: dict, name: str) -> None:
    """Log a JSON-serialisable dict as the artifact `name` of the active run."""
    mlflow.log_dict(data, name)


def current_tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def log_png(png: bytes, name: str) -> None:
    """Log PNG bytes as an artifact of the active run under `name`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(png)
        mlflow.log_artifact(path)


# ---- LoRA adapters (training-time alignment) ---------------------------------------------------------------------
def log_adapter(folder: str | os.PathLike, artifact_path: str = "adapter", registered_name: str | None = None,
                alias: str | None = None, description: str | None = None) -> ModelVersion | None:
    """Log a saved LoRA adapter folder (peft format) as artifacts of the active run under `artifact_path`; register it
    as a version of `registered_name` (source: the logged folder) and point `alias` at it. Returns the ModelVersion
    (None when `registered_name` is None). The adapter is not a pyfunc: consumers download the folder
    (`mlflow.artifacts.download_artifacts(version.source)`) and load it with `stitchvm.models.lora.LoraPolicy.load`.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_adapter needs an active MLflow run: call it inside `with start_run(...)`")
    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
    if registered_name is None:
        return None
    client = MlflowClient()
    try:
        client.get_registered_model(registered_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(registered_name, description=description)
    version = client.create_model_version(registered_name, source=mlflow.get_artifact_uri(artifact_path),
                                          run_id=run.info.run_id, description=description)
    if alias is not None:
        client.set_registered_model_alias(registered_name, alias, str(version.version))
    return client.get_model_version(registered_name, str(version.version))


# ---- reports (the guidance stage) ----------------------------------------------------------------------------------
def log_report(experiment: str, report: dict, name: str, pngs: dict[str, bytes] | None = None,
               metrics: dict[str, float] | None = None, run_id: str | None = None, run_name: str | None = None,
               tracking_uri: str | None = None) -> str:
    """Log a JSON report as artifact `name`, PNGs (artifact path -> bytes, e.g. "guidance/dps-tweedie.png") and
    metrics onto run `run_id` (e.g. the training's run), or onto a new run `run_name`; returns the run id."""
    with start_run(experiment, run_name=run_name, tracking_uri=tracking_uri, run_id=run_id) as run:
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_dict(report, name)
        for path, png in (pngs or {}).items():
            folder, _, file = path.rpartition("/")
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, file)
                with open(local, "wb") as f:
                    f.write(png)
                mlflow.log_artifact(local, artifact_path=folder or None)
        return run.info.run_id
