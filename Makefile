# The two commands of the README. Both set up what they need first (venv, deps, mosquitto).
.PHONY: demo test lint setup bench bench-quick bench-deps bench-report

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

# Benchmarks: build the C load generator (bench/loadgen.c), install the `bench` extra
# (matplotlib, for the plots) when missing, run every bench/ script (JSON in bench/results/),
# then bench/report.py regenerates the plots, docs/benchmarks.md and the README's performance
# table. About 12 minutes; `make bench BENCH_ARGS=--quick` (or `make bench-quick`) about 4.
# `make bench-report` redoes only the report from the committed JSON.
BENCH_ARGS ?=
CC ?= gcc

bench/build/loadgen: bench/loadgen.c
	@mkdir -p bench/build
	$(CC) -O2 -Wall -Wextra -o $@ $< -lmosquitto

bench-deps: setup
	@.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q -e '.[bench]'

bench: bench-deps bench/build/loadgen
	.venv/bin/python bench/run.py $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick

bench-report: bench-deps
	.venv/bin/python bench/report.py
