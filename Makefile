# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all style clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch: the pinned wheel installs from the local wheel cache where one exists.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRL_EXPERIMENTAL_SILENCE=1 $(BIN)/hf-taskdistill demo --output_dir demo_output

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-all: install
	$(BIN)/python -m pytest -q

style: install
	$(BIN)/ruff check hf_taskdistill tests benchmarks && $(BIN)/ruff format --check hf_taskdistill tests benchmarks

clean:
	rm -rf $(VENV) demo_output .pytest_cache
