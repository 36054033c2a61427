# Quick start:  make run   (set up, then `dvc repro` on the embedded sample)
#               make test  (set up, then the whole test suite)
# Both install what they need: uv (from PyPI, into .tools/ unless uv is on PATH), then the locked
# Python environment in .venv/. Nothing is installed system-wide except Debian's chromium for tests.

SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen
# No telemetry or start-up chatter settings here: `cleanmessy` sets them for itself and the tools
# it starts (console.QUIET_ENVIRONMENT), and DVC's analytics are off in .dvc/config.

.PHONY: setup browser postgres run test test-fast ui serve api docker real grid clean-outputs

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

# --compile-bytecode: every module compiled once, here. Python otherwise compiles TensorFlow's,
# MLflow's and DVC's sources again in every process that cannot write __pycache__
# (PYTHONDONTWRITEBYTECODE, as in many containers, or a read-only venv): 3-10 s of each command.
setup: $(UV)
	$(UV) sync --frozen --compile-bytecode

run: setup
	$(RUN) cleanmessy check   # what DVC would choke on: a params alias bomb, a named pipe in the source
	$(RUN) dvc repro

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	else echo "no apt-get: install Chromium at /usr/bin/chromium for the browser test"; fi

# PostgreSQL's server programs for the team-server tests, which start their own throwaway cluster on a
# free port (Debian's package may also set up and start its default cluster; the tests do not use it).
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	else echo "no apt-get: install PostgreSQL's server programs for the team-server test"; fi

# The linter first (ruff, configured in pyproject.toml), then the whole suite: CI's command.
test: setup browser postgres
	$(RUN) ruff check src tests bench
	$(RUN) pytest

# The edit loop, a few minutes: the linter, every test not marked slow (the code's own tests), and one
# smoke test of each server (marked smoke: the app, the REST API, the MLflow UI, a tracking server);
# none of them needs Chromium or PostgreSQL.
FAST = -m "smoke or not slow"
test-fast: setup
	$(RUN) ruff check src tests bench
	$(RUN) pytest $(FAST)

# The Gradio app for the model at the `production` stage: http://127.0.0.1:7860 (SERVE_PORT).
# `make serve FEEDBACK=on`: users can correct a label; the photos are kept in data/feedback/ and the
# next `dvc repro` (`make run`) trains on them.
SERVE_PORT ?= 7860
FEEDBACK ?= off
serve: setup
	$(if $(filter-out on off,$(FEEDBACK)),$(error FEEDBACK must be on or off, not "$(FEEDBACK)"))
	$(RUN) cleanmessy serve --stage production --port $(SERVE_PORT)$(if $(filter on,$(FEEDBACK)), --feedback)

# A Docker image of the model at `production`: `mlflow models generate-dockerfile` writes the build
# context into DOCKER_DIR, then `docker build` where a Docker daemon answers (else one line says why
# not, and how to build it elsewhere). `docker run -p 8080:8080 clean-vs-messy` serves it on port 8080.
DOCKER_DIR ?= build/docker
DOCKER_TAG ?= clean-vs-messy
docker: setup
	$(RUN) cleanmessy docker --stage production --dir $(DOCKER_DIR) --tag $(DOCKER_TAG)

# The best configuration for real photos (experiments/real-photos.yaml), as a DVC experiment:
# make real SOURCE=path/to/photos (a folder of <class>/<image>, e.g. the Kaggle
# messy-vs-clean-room download's images/).
real: setup
	@test -n "$(SOURCE)" || { echo "usage: make real SOURCE=path/to/photos"; exit 2; }
	flags="$$($(RUN) cleanmessy exp-flags experiments/real-photos.yaml)" && \
	name="$$($(RUN) cleanmessy exp-name experiments/real-photos.yaml -S ingest.source=$(SOURCE))" && \
	set -f && $(RUN) dvc exp run -n "$$name" -S ingest.source=$(SOURCE) $$flags  # set -f: no globbing of [[...]]

# A grid of experiments through DVC's queue, JOBS at a time, then the comparison:
# make grid GRID="train.learning_rate=0.0005 train.learning_rate=0.002" JOBS=2
# (needs a commit: `dvc exp run` experiments are based on HEAD). Each is named after its change
# (`cleanmessy exp-name`: lr-0.002); all names are checked before any is queued, and a name that
# this commit's experiments already have is refused.
GRID ?= train.learning_rate=0.0005 train.learning_rate=0.001 train.learning_rate=0.002
JOBS ?= 2
grid: setup
	$(RUN) cleanmessy exp-name --each $(addprefix -S ,$(GRID))
	for change in $(GRID); do name="$$($(RUN) cleanmessy exp-name -S "$$change")" && \
	  $(RUN) dvc exp run --queue -n "$$name" -S "$$change" || exit 1; done
	$(RUN) dvc queue start -j $(JOBS)
	while $(RUN) dvc queue status | grep -qE 'Running|Queued'; do sleep 5; done
	$(RUN) dvc queue status
	! $(RUN) dvc queue status | grep -q Failed  # a failed experiment fails the grid (`dvc queue logs NAME`)
	$(RUN) dvc exp show --only-changed --drop 'Created|.*/|roc_auc|auroc|flag_.*'

# The MLflow UI over the project's store; prints the link to the runs (UI_PORT=5000 by default)
UI_PORT ?= 5000
ui: setup
	$(RUN) cleanmessy ui --port $(UI_PORT)

# The REST API: MLflow's scoring server (as `mlflow models serve` runs it) for the version at
# `production` when it starts (a moved alias is served after a restart), offline, on
# http://127.0.0.1:5001/invocations (API_PORT)
API_PORT ?= 5001
api: setup
	$(RUN) cleanmessy api --stage production --port $(API_PORT)

# Remove pipeline outputs (not the MLflow store).
clean-outputs:
	rm -rf data/images data/manifest.csv data/ingest_report.json data/splits pipeline/*.keras pipeline/*.csv pipeline/*.json pipeline/plots
