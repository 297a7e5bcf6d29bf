# The two commands of the README. Both set up what they need first (venv, deps, mosquitto).
.PHONY: demo test lint setup bench bench-quick

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/qgw demo --duration 30

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy gateway keysource

# Benchmarks (docs/benchmarks.md): the C load generator, every bench/ script (JSON in
# bench/results/), then the plots, docs/benchmarks.md and the README's performance table.
# `make bench BENCH_ARGS=--quick` (or `make bench-quick`) for a short run.
BENCH_ARGS ?=
CC ?= gcc

bench/build/loadgen: bench/loadgen.c
	@mkdir -p bench/build
	$(CC) -O2 -Wall -Wextra -o $@ $< -lmosquitto -lpthread

bench: setup bench/build/loadgen
	@.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q -e '.[bench]'
	.venv/bin/python bench/run.py $(BENCH_ARGS)
	.venv/bin/python bench/report.py

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick
