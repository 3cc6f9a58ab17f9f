# `make demo` runs the daemon on its embedded defaults; `make test` runs the test suite.
# Both build .venv on first use (torch from the machine's local wheel cache, ~1 min).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_QUIET := --quiet --disable-pip-version-check --no-warn-script-location

.PHONY: demo test test-faults test-unit lint bench-ingest bench-inference bench-pipeline bench-scaling demo-model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# pip's own exit status decides (a full disk once left a half-installed venv stamped as
	@# installed); its noise about ignored links is filtered from what it printed.
	$(BIN)/pip install $(PIP_QUIET) -e '.[dev]' > $(VENV)/pip.log 2>&1 \
		|| { grep -v "is ignored: it is neither" $(VENV)/pip.log; exit 1; }
	@grep -v "is ignored: it is neither" $(VENV)/pip.log || true
	$(BIN)/python -c "import dicomai, torch, pynetdicom, highdicom"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dicomai --config deploy/demo.toml demo

test: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/faults $(PYTEST_ARGS)

# Crash, outage, load and bad-input tests (docs/reliability.md): ~6 min on 2 cores.
test-faults: $(STAMP)
	$(BIN)/python -m pytest tests/faults $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dicomai workers tests
	$(BIN)/ruff format --check dicomai workers tests

# All architectures but vit_l_16 and efficientnet_b7 (BENCH_ARGS=--include-huge adds them).
bench-inference: $(STAMP)
	$(BIN)/python bench/inference.py $(BENCH_ARGS)

# Worker path against plain torch (tensors and DICOM files through JobRunner), GFLOP/s vs peak.
bench-pipeline: $(STAMP)
	$(BIN)/python bench/pipeline.py $(BENCH_ARGS)

# 1 vs 2 worker processes on one SQL queue, each pinned to its share of the cores.
bench-scaling: $(STAMP)
	$(BIN)/python bench/scaling.py $(BENCH_ARGS)

demo-model: $(STAMP)
	$(BIN)/dicomai train-demo models/demo-chest-nodule

clean:
	rm -rf $(VENV) .pytest_cache var
