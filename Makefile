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

.PHONY: setup demo test test-e2e world clean gpu-check

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(strip $(TORCH)),$(PY) -m pip install -q $(TORCH))
	grep -v '^torch==' requirements/constraints.txt > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[pipeline,dev]"
	touch $(STAMP)

setup: $(STAMP)

# the DVC pipeline (dvc.yaml) on params.yaml, then a short summary (the evaluation table, guidance and alignment
# results, where the outputs are; all metrics: dvc metrics show); the venv's bin first on PATH so `python` in the
# stage commands is the venv's; a second `make demo` re-runs nothing
demo: setup
	export PATH="$(abspath $(VENV))/bin:$$PATH" && dvc repro && $(PY) -m stitchvm summary

# two lanes (the `e2e` marker, pyproject.toml): `make test` the fast one, unit and integration tests on tiny models
# (a few minutes on 2 cores); `make test-e2e` one end-to-end pass per front-end (DVC repro + exp run, Dagster in-process
# and CLI, the stages on S3 (moto), the wheel). pytest's exit code 5 (nothing collected) fails either lane.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e"

test-e2e: setup
	$(PY) -m pytest -q -p no:cacheprovider -m e2e

# The prepared GPU check (one H100, <= 8 minutes; stitchvm/benchmarks/gpu_check.py): the arch profile in bfloat16 at
# 512² and 1024², seconds per sample and peak memory of unguided / DPS-Tweedie / DPS-StitchVM, value-model training
# samples/s; writes reports/gpu_check.json. Exit 2 without CUDA. No setup prerequisite (it would install the CPU torch
# pin): run `make setup TORCH=...` first, or point PY at a Python with CUDA torch (make gpu-check PY=python).
gpu-check:
	$(PY) -m stitchvm.benchmarks.gpu_check --profile arch --out reports/gpu_check.json

# Retrain the embedded world (about 45 minutes on 2 cores with nothing else running; docs/results.md). Its stages are frozen in dvc.yaml, so that neither
# `dvc repro` (even with -f) nor `make clean && make demo` rebuilds the shipped weights by accident.
FROZEN := frozen: true  \# shipped weights
world: setup
	sed -i 's/^    $(FROZEN)/    frozen: false  \# shipped weights/' dvc.yaml
	export PATH="$(abspath $(VENV))/bin:$$PATH" && { dvc repro -f world_report; status=$$?; \
	  sed -i 's/^    frozen: false  \# shipped weights/    $(FROZEN)/' dvc.yaml; exit $$status; }

# generated local state only: dvc.lock, reports/ and the shipped world are tracked and stay
clean:
	rm -rf $(VENV) data checkpoints dvc_plots mlruns mlflow.db
