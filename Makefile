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

# Benchmarks: build the C load generator (bench/loadgen.c), then run every bench/ script
# (JSON in bench/results/). `make bench BENCH_ARGS=--quick` (or `make bench-quick`) is short.
BENCH_ARGS ?=
CC ?= gcc

bench/build/loadgen: bench/loadgen.c
	@mkdir -p bench/build
	$(CC) -O2 -Wall -Wextra -o $@ $< -lmosquitto

bench: setup bench/build/loadgen
	.venv/bin/python bench/run.py $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick
