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

# The main job on the embedded default:
#  1. profile VAL val questions at all 225 configurations, latency measured (resumes if stopped);
#  2. answer ANSWERS val questions at every configuration in batches (latency=predicted, so it
#     needs the latency model fitted on step 1) and give them step 1's measured latencies
#     (profile_bootstrap): more questions to learn from, with this machine's latency tails;
#  3. train the GRPO controller on that profile (W&B offline run under $(RUN)/train/wandb);
#  4. evaluate it on TEST test questions at 10 budgets (measured latency).
# About 25 min on 2 cores from a fresh clone, install included.
RUN ?= outputs/run
VAL ?= 150
ANSWERS ?= 500
TEST ?= 1000
run: install
	$(PY) -m lvlm_ctrl.profile data.split=val data.limit=$(VAL) profile.path=$(RUN)/profile-val-$(VAL) \
		hydra.run.dir=$(RUN)/profile
	$(PY) -m lvlm_ctrl.latency_model profile.path=$(RUN)/profile-val-$(VAL) output=$(RUN)/latency_model.json \
		hydra.run.dir=$(RUN)/latency_model
	$(PY) -m lvlm_ctrl.profile data.split=val data.limit=$(ANSWERS) latency=predicted \
		latency.model=$(RUN)/latency_model.json profile.batch_size=64 model.experts_implementation=grouped_mm \
		profile.path=$(RUN)/answers-val-$(ANSWERS) hydra.run.dir=$(RUN)/answers
	$(PY) -m lvlm_ctrl.profile_bootstrap $(RUN)/answers-val-$(ANSWERS) $(RUN)/profile-val-$(VAL) \
		$(RUN)/train-profile.parquet
	$(PY) -m lvlm_ctrl.train controller=grpo budget=uniform data.limit=$(ANSWERS) \
		profile.path=$(RUN)/train-profile.parquet hydra.run.dir=$(RUN)/train
	$(PY) -m lvlm_ctrl.evaluate controller=grpo ckpt=$(RUN)/train/checkpoints/best.ckpt \
		data.split=test data.limit=$(TEST) hydra.run.dir=$(RUN)/eval

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m pip install -q ruff && $(PY) -m ruff check lvlm_ctrl tests experiments

clean:
	rm -rf outputs .pytest_cache
