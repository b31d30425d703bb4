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

# The main job on the embedded default: profile VAL val questions at all 225 configurations
# (measured latency; resumes if stopped), train the GRPO controller on that profile (W&B offline
# run under $(RUN)/train/wandb), evaluate it on TEST test questions at 10 budgets. 16 min on 2 cores (fresh clone, with install).
RUN ?= outputs/run
VAL ?= 150
TEST ?= 1000
run: install
	$(PY) -m lvlm_ctrl.profile data.split=val data.limit=$(VAL) profile.path=$(RUN)/profile-val-$(VAL) \
		hydra.run.dir=$(RUN)/profile
	$(PY) -m lvlm_ctrl.train controller=grpo budget=uniform data.limit=$(VAL) \
		profile.path=$(RUN)/profile-val-$(VAL) hydra.run.dir=$(RUN)/train
	$(PY) -m lvlm_ctrl.evaluate controller=grpo ckpt=$(RUN)/train/checkpoints/best.ckpt \
		data.split=test data.limit=$(TEST) hydra.run.dir=$(RUN)/eval

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m pip install -q ruff && $(PY) -m ruff check lvlm_ctrl tests experiments

clean:
	rm -rf outputs .pytest_cache
