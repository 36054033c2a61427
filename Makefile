# Quick start:  make run   (set up, then `dvc repro` on the embedded sample)
#               make test  (set up, then the whole test suite)
# Both install what they need: uv (from PyPI, into .tools/ unless uv is on PATH), then the locked
# Python environment in .venv/. Nothing is installed system-wide except Debian's chromium for tests.

SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GRADIO_ANALYTICS_ENABLED := False
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup run test ui clean-outputs

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

setup: $(UV)
	$(UV) sync --frozen

run: setup
	$(RUN) dvc repro

test: setup
	$(RUN) pytest

# The MLflow UI over the project's store: http://127.0.0.1:5000
ui: setup
	$(RUN) mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

# Remove pipeline outputs (not the MLflow store).
clean-outputs:
	rm -rf data/images data/manifest.csv data/ingest_report.json data/splits pipeline/*.keras pipeline/*.csv pipeline/*.json pipeline/plots
