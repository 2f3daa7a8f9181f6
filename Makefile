# Everyday commands. `make demo` and `make test` create .venv on first use and are safe to repeat.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# kedro-telemetry would try to reach the network on every command.
export KEDRO_DISABLE_TELEMETRY := true
# This machine's pip configuration names index folders that do not exist: pip warns once per package.
QUIET_PIP := grep -v "^WARNING: Location 'file:" || true

.PHONY: help install install-dev demo test lint viz viz-build mlflow-ui bench bench-peers clean-outputs

help:
	@echo "make demo         build, train and evaluate the whole default flow on the CPU"
	@echo "make test         run the test suite"
	@echo "make viz          serve the pipeline lineage (kedro viz) on http://127.0.0.1:4141"
	@echo "make viz-build    a static kedro-viz site in build/ (git-ignored)"
	@echo "make mlflow-ui    serve the MLflow tracking UI on http://127.0.0.1:5000"
	@echo "make bench        benchmarks (KD loss, distill step, rollouts, the demo stage by stage, Sinkhorn; ~25 min, docs/benchmarks.md)"
	@echo "make lint         ruff"
	@echo "make clean-outputs  delete data/ outputs, mlflow.db and mlruns/ (asks first)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first and exactly: the CPU wheel on local disk. Any looser request lets pip resolve
# the newest CUDA build (several GB).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -e . 2>&1 | $(QUIET_PIP)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | $(QUIET_PIP)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The report is the last thing the demo shows: the newest version of data/08_reporting/report_compact.md,
# one narrow table per benchmark (the wide report.md, with every column and the notes, is beside it).
demo: install
	$(BIN)/kedro run
	@echo; cat "$$(ls -d data/08_reporting/report_compact.md/*/ | tail -n 1)report_compact.md"
	@echo "Full report: $$(ls -d data/08_reporting/report.md/*/ | tail -n 1)report.md"

test: install-dev
	$(BIN)/python -m pytest

# Each script writes benchmarks/results/<name>.json and .md; docs/benchmarks.md quotes them.
bench: install
	$(BIN)/python benchmarks/kd_loss.py
	$(BIN)/python benchmarks/distill_step.py --objectives all
	$(BIN)/python benchmarks/demo_stages.py
	$(BIN)/python benchmarks/rollouts.py
	$(BIN)/python benchmarks/sinkhorn.py

# The KD losses benchmarks/kd_loss.py sets beside the project's (TRL, torchtune), in .bench-peers/ with --no-deps:
# their own requirements would replace this project's torch.
bench-peers: install
	$(BIN)/python -m pip install -q --no-deps --target .bench-peers trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
		xxhash==4.1.0 multiprocess==0.70.19 torchtune==0.6.1 torchao==0.11.0 sentencepiece==0.2.3 \
		tiktoken==0.14.0 blobfile==3.3.0 2>&1 | $(QUIET_PIP)

lint: install-dev
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments

viz: install-dev
	$(BIN)/kedro viz run --no-browser --host 127.0.0.1 --port 4141

# kedro-viz writes its static site to build/ at the project root (it has no option for another folder).
viz-build: install-dev
	$(BIN)/kedro viz build

# MLflow 3 opens an experiment on its GenAI overview: the address printed first opens its training runs.
mlflow-ui: install
	@echo "Training runs: $$(PYTHONPATH=src $(BIN)/python -c 'from warmup_distill_kedro.tracking import runs_page_url; print(runs_page_url("."))')"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --workers 1 --host 127.0.0.1 --port 5000

clean-outputs:
	@read -p "Delete every output under data/ (not 01_raw), mlflow.db and mlruns/? [y/N] " ok && [ "$$ok" = y ]
	find data -mindepth 2 -not -name .gitkeep -not -path 'data/01_raw/*' -delete
	rm -rf mlflow.db mlruns
