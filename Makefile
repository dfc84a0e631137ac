# carclf: `make demo` runs the whole pipeline on the embedded data set; `make test` runs the tests.
# uv is installed on first use when it is missing, so a fresh machine needs only Python >= 3.10.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := python3 -m uv
endif
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench clean

.venv/.installed: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	touch $@

install: .venv/.installed

demo: install
	.venv/bin/carclf demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: install
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

clean:
	rm -rf runs .pytest_cache

# Benchmarks, JSON and Markdown into bench/results/: the data loader against the training step,
# and serving (HTTP against in-process, onnxruntime against eager) on efficientnet_b0 at 224 px,
# the model of issue 7's goals (BENCH_BUNDLE=path/to/bundle benchmarks a bundle of yours instead);
# and the search: ASHA + Optuna against random search (FIFO) with the same number of trials.
BENCH_BUNDLE ?=
bench: install
	OMP_NUM_THREADS=1 $(PY) bench/data_bench.py
	OMP_NUM_THREADS=1 $(PY) -m bench.serve_bench $(if $(BENCH_BUNDLE),$(BENCH_BUNDLE),--arch efficientnet_b0)
	OMP_NUM_THREADS=1 $(PY) bench/tune_bench.py
