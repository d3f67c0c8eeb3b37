# bone-health: `make repro` runs the pipeline on the embedded phantom, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE ?= 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: repro exp plots test test-fast params install postgres ui server bench lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	test -d .dvc || dvc init -q
	dvc config core.analytics false
	dvc repro
	@echo
	@echo "Results:"
	@echo "  prepared store + validation report: data/prepared/ (report.json)"
	@echo "  cortex localiser: localiser/ (metrics.json, examples.png, oof_boxes.csv; the fold localisers in folds/)"
	@echo "  headline metrics: reports/headline.json, reports/gradcam/headline.json, localiser/headline.json   (make exp, dvc metrics show)"
	@echo "  every figure: reports/metrics.json, reports/gradcam/metrics.json"
	@echo "  plots: learning curves, ROC, PR, calibration, confusion, Grad-CAM sheets   (make plots: offline HTML)"
	@echo "  Grad-CAM overlays: reports/gradcam/"
	@echo "  MLflow runs + registry: mlruns/  -> open the UI with: make ui"

# `dvc exp show` cut to what people compare (it prints ~250 columns): the headline metrics of
# every experiment and only the params that differ between the rows.  Dropped: the deps' hashes
# (columns named by path, and train.out's `models`) and Created.  The kept names are headline.json's
# (src/evaluation/report.py HEADLINE, src/explain/oof_explain.py HEADLINE; a test keeps them equal).
# More rows or an order: make exp EXP_ARGS="-A --sort-by auc".
EXP_KEEP := ^(auc|auc_lo|auc_hi|sens|spec|bal_acc|brier|ece|chain_auc|cam_in)$$
EXP_DROP := .*/|^models$$|^Created$$
exp: $(STAMP)
	dvc exp show --no-pager --only-changed --keep '$(EXP_KEEP)' --drop '$(EXP_DROP)' $(EXP_ARGS)

# dvc_plots/index.html: every plot of dvc.yaml on one page that needs no network (docs/vega/).
plots: $(STAMP)
	dvc plots show $(PLOTS_ARGS)

test: $(STAMP) postgres
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The edit-test loop: everything but the tests marked slow (servers, several processes, kills).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# params.yaml is rendered from the schema (src/core/config.py): defaults and their comments live there.
params: $(STAMP)
	$(BIN)/python -m src.core.params_file --write params.yaml

# The shared-storage tests start a real PostgreSQL; install Debian's server when it is missing.
# Best effort: without it those tests skip and say why.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) ; } || \
	  echo "PostgreSQL not installed: its tests will be skipped"

ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db \
	  --host 127.0.0.1 --port $${PORT:-5000} --workers 1

# A shared tracking server: BACKEND_STORE_URI=postgresql+psycopg://user:pw@db/mlflow for a team,
# HOST=0.0.0.0 to accept other machines (put it behind authentication first).
BACKEND_STORE_URI ?= sqlite:///mlruns/mlflow.db
ARTIFACTS ?= mlruns/artifacts
server: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri $(BACKEND_STORE_URI) \
	  --artifacts-destination $(ARTIFACTS) --host $${HOST:-127.0.0.1} --port $${PORT:-5000} --workers 1

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Re-record the exact versions that passed, after changing pyproject.toml.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^bone-health' > constraints.txt

clean:
	rm -rf data/prepared models reports tune
