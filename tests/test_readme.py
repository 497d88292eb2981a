"""The README runs as written: its consumer snippet (the Python blocks that load the registered value model), run
unchanged in a fresh process against the MLflow store of a real pipeline run (the session's DVC project on the reduced
default profile: the embedded world, whose latents are the README's 4 × 8 × 8)."""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from test_dvc import REGISTERED, needs_dvc

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"-?\d+\.\d*(?:e[-+]?\d+)?"


def python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def consumer_snippets() -> list[str]:
    """The README's blocks that consume the registered model (the others use the library directly)."""
    return [b for b in python_blocks((ROOT / "README.md").read_text()) if "mlflow.pyfunc.load_model" in b]


def test_the_readme_has_a_consumer_snippet_that_prints():
    (snippet,) = consumer_snippets()
    assert "models:/stitchvm-value@" in snippet and "print(" in snippet


@pytest.fixture(scope="module")
def store(dvc_project, tmp_path_factory) -> Path:
    """A folder holding a copy of the DVC project's mlflow.db (the snippet's relative `sqlite:///mlflow.db`), so that
    promoting here leaves the session's store as the pipeline left it; the artifacts are read where they are (MLflow
    recorded their absolute paths). The reduced profile's 12 training steps rarely pass the default gate, so when the
    pipeline made no champion, the candidate is promoted here explicitly: the snippet loads `@champion`."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copy2(dvc_project["root"] / "mlflow.db", folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    aliases = client.get_registered_model(REGISTERED).aliases
    if "champion" not in aliases:
        client.set_registered_model_alias(REGISTERED, "champion", aliases["candidate"])
    return folder


@needs_dvc
@pytest.mark.e2e
def test_the_readme_consumer_snippet_runs_as_written(store):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the snippet names its own store
    env.update(HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    for snippet in consumer_snippets():
        run = subprocess.run([sys.executable, "-c", snippet], cwd=store, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
        values = [float(x) for x in re.findall(NUMBER, run.stdout)]
        assert len(values) == 4 and all(math.isfinite(v) for v in values), run.stdout
