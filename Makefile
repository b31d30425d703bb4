# One command sets up and runs the main job; one runs the tests.
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip

.PHONY: install run test lint clean

install: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

# The main job on the embedded default (static full configuration until the GRPO controller lands).
run: install
	$(PY) -m lvlm_ctrl.evaluate controller=static data.split=test data.limit=2000

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m pip install -q ruff && $(PY) -m ruff check lvlm_ctrl tests experiments

clean:
	rm -rf outputs .pytest_cache
