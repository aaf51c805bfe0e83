# The README's commands. Each one first makes sure .venv/ is set up (seconds when it is).
PY := .venv/bin/python

.PHONY: setup demo test

setup:
	bash tools/setup/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests
