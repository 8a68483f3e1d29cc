# The two set-up commands of the README: `make demo` and `make test`.
# Both create (or reuse) .venv, install torch==2.13.0 only when no torch is importable (a GPU
# machine's own torch is kept: the venv sees system packages), then the project with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adacache_fx-installed

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[demo,test,export]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adacache-fx demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
