# `make repro` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both do the set-up first (once; again when a requirements file changes).
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export PATH := $(abspath $(BIN)):$(PATH)

TEST_STAMP := $(VENV)/.setup-test-done

.PHONY: setup setup-test repro test test-e2e bench readme clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-gpu.txt tools/setup.sh
	bash tools/setup.sh
	touch $(STAMP)

setup-test: $(TEST_STAMP)   # system packages only the tests need (chromium, postgresql)

$(TEST_STAMP): $(STAMP) tools/setup.sh
	bash tools/setup.sh --test
	touch $(TEST_STAMP)

repro: setup
	$(BIN)/dvc repro
	@cat metrics/summary.md 2>/dev/null || true

test: setup setup-test   # everything but the whole-pipeline runs (marker e2e)
	$(BIN)/python -m pytest -q -m "not e2e" tests

test-e2e: setup setup-test   # the whole-pipeline runs: real DVC projects, the 896 px model (CI runs both)
	$(BIN)/python -m pytest -q -m e2e tests

bench: setup
	$(BIN)/python -m bench.bench_score
	$(BIN)/python -m bench.bench_client
	$(BIN)/python -m bench.bench_merge
	$(BIN)/python -m bench.bench_browse
	$(BIN)/python -m bench.bench_train_dist
	$(BIN)/python -m bench.bench_paddle_limit

readme:  # copy metrics/summary.md into the README's results section
	python3 tools/update_readme.py

clean-venv:
	rm -rf $(VENV)
