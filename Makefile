# The two commands of the README. Both set up what they need first (venv, deps, mosquitto).
.PHONY: demo test lint setup bench

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

bench: setup
	.venv/bin/python bench/run.py
