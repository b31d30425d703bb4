# One command sets up and runs the main job; one runs the tests.
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip

.PHONY: install run test test-full lint clean

install: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,optuna,launchers]"
	touch $@

# The main job on the embedded default: the design card's command, then the evaluation.
#  1. python -m lvlm_ctrl.train controller=grpo budget=uniform: when outputs/profiles/tiny_moe/
#     easy_vqa-val-$(ANSWERS) holds no profile, it prepares one first (VAL questions timed at every
#     configuration, the latency model, ANSWERS questions answered in batches, their latencies
#     bootstrapped), then trains the GRPO controller (W&B offline run under $(RUN)/train/wandb);
#  2. evaluate its best.ckpt on TEST test questions at 10 budgets (measured latency, calibrated).
# About 25 min on 2 cores from a fresh clone, install included; a second run reuses the profile.
STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
RUN ?= outputs/run/$(STAMP)
VAL ?= 80
ANSWERS ?= 500
TEST ?= 1000
TRAIN_ARGS ?=
run: install
	$(PY) -m lvlm_ctrl.train controller=grpo budget=uniform profile.measured=$(VAL) data.limit=$(ANSWERS) \
		hydra.run.dir=$(RUN)/train $(TRAIN_ARGS)
	$(PY) -m lvlm_ctrl.evaluate controller=grpo ckpt=$(RUN)/train/checkpoints/best.ckpt \
		data.split=test data.limit=$(TEST) hydra.run.dir=$(RUN)/eval

# The fast suite (tests marked slow left out); test-full runs everything, as CI does.
test: install
	$(PY) -m pytest -m "not slow"

test-full: install
	$(PY) -m pytest

lint: install
	$(PY) -m pip install -q ruff && $(PY) -m ruff check lvlm_ctrl tests experiments

clean:
	rm -rf outputs .pytest_cache
