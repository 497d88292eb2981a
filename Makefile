# Two commands for a fresh machine: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# Both create or reuse the virtual environment in $(VENV).
# GPU users: bring your own CUDA torch with `make setup TORCH="torch==2.X.Y --index-url https://download.pytorch.org/whl/cu128"`
# (or TORCH= to keep a torch already in the venv); the CPU pin below is what CI uses.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stitchvm-installed

export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: setup demo test clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(strip $(TORCH)),$(PY) -m pip install -q $(TORCH))
	grep -v '^torch==' requirements/constraints.txt > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[pipeline,dev]"
	touch $(STAMP)

setup: $(STAMP)

# the DVC pipeline (dvc.yaml) on params.yaml; the venv's bin first on PATH so `python` in the stage commands is the
# venv's; a second `make demo` re-runs nothing
demo: setup
	export PATH="$(abspath $(VENV))/bin:$$PATH" && dvc repro && dvc metrics show

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) data reports checkpoints dvc.lock dvc_plots mlruns mlflow.db
