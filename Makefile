# carclf: `make demo` runs the whole pipeline on the embedded data set; `make test` runs the tests.
# uv is installed on first use when it is missing, so a fresh machine needs only Python >= 3.10.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := python3 -m uv
endif
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench bench-transfer chaos clean manifests

# Bytecode is compiled at install: every Ray worker imports torch, timm and Ray, and where
# PYTHONDONTWRITEBYTECODE is set (as in many CI images) importing them from source took each
# worker 3x as long (measured: the Ray test suite twice as long).
.venv/.installed: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
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

# cluster/kuberay/rayservice.yaml from serve/config.yaml (the tests check it is up to date).
manifests: install
	$(PY) -m serve.kuberay

# Benchmarks, JSON and Markdown into bench/results/: the data loader against the training step,
# and serving (HTTP against in-process, onnxruntime against eager) on efficientnet_b0 at 224 px,
# the model of issue 7's goals (BENCH_BUNDLE=path/to/bundle benchmarks a bundle of yours instead);
# the search: ASHA + Optuna against random search (FIFO) with the same number of trials; and
# the collapse labels of the ablation demo, every labelled trial rerun unstopped.
# Last, the fine-tuning levers on real photos (bench-transfer below; hours on 2 cores).
BENCH_BUNDLE ?=
bench: install
	OMP_NUM_THREADS=1 $(PY) bench/data_bench.py
	OMP_NUM_THREADS=1 $(PY) -m bench.serve_bench $(if $(BENCH_BUNDLE),$(BENCH_BUNDLE),--arch efficientnet_b0)
	OMP_NUM_THREADS=1 $(PY) bench/tune_bench.py
	$(PY) -m bench.collapse_bench
	$(PY) -m bench.transfer_bench --data $(TRANSFER_DATA) $(TRANSFER_ARGS)

# Every fine-tuning lever of jobs/configs/finetune-cpu.yaml against its own linear probe on real
# photos, over three seeded splits, into bench/results/transfer.{json,md}: about 3.5 min per run
# on 2 cores for 420 photos (Lite2's runs about 3x that), 35 levers x 3 seeds. Runs already in
# the JSON are skipped, so an interrupted measurement continues where it stopped; the levers run
# in the order given, e.g. TRANSFER_ARGS="--levers lr=3e-4 lr=3e-5 center-crop lite1 ema=0.99
# randaugment-m9 progressive bn=train layer_decay=none head_lr=x10 freeze=1 lite2".
# TRANSFER_DATA=path/to/ImageFolder; TRANSFER_ARGS="--levers recipe lr=1e-4 --seeds 0 1 2 3".
TRANSFER_DATA ?= ../shared/data/stanford-body-dev
TRANSFER_ARGS ?=
bench-transfer: install
	$(PY) -m bench.transfer_bench --data $(TRANSFER_DATA) $(TRANSFER_ARGS)

# The chaos suite (issue 14) on a toy bundle, into bench/results/chaos.{json,md}: overload at 1x
# and 10x of the saturation throughput, a classifier replica killed under load, a short soak
# (RSS of every Serve process), the hostile-input list; the load client on a CPU of its own.
# Then the overload again with the client on the server's CPUs, into bench/results/shared-cpus.
# 127.0.0.1 only, at most ~9 min on 2 cores. Every size is a flag:
# CHAOS_ARGS="--soak-s 120 --app ingress.num_replicas=1" make chaos.
CHAOS_ARGS ?=
chaos: install
	OMP_NUM_THREADS=1 $(PY) -m bench.chaos $(CHAOS_ARGS)
	OMP_NUM_THREADS=1 $(PY) -m bench.chaos $(CHAOS_ARGS) --client-cpus 0 \
		--skip replica_kill soak --out bench/results/shared-cpus
