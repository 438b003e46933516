# The README's commands. Each target creates/updates .venv itself, so a fresh clone needs only
# Python >= 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= demo_workdir
# Parity tests compare against PyTorch transformers; 2.13.0 is the CPU build the dev machines
# carry. Library users never need torch.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -n auto --maxprocesses=4

.PHONY: install dev demo test lint format docs bench figures clean study

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,parity]"
	touch $@ $(VENV)/.installed

$(VENV)/.docs-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e ".[docs]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

demo: install
	$(VENV)/bin/attnzoo-train --config configs/lm_tiny.py --workdir $(DEMO_DIR)/lm
	$(VENV)/bin/attnzoo-generate --workdir $(DEMO_DIR)/lm --prompt "ROMEO:" --max_new_tokens 200 \
		--sampler top_k --top_k 10 --temperature 0.8
	$(VENV)/bin/attnzoo-train --config configs/mt_tiny.py --workdir $(DEMO_DIR)/mt
	printf "%s\n" "In the days when the judges judged, there was a famine in the land." \
		"Naomi said to her two daughters-in-law, Go, return each of you to her mother's house." \
		| $(VENV)/bin/attnzoo-translate --workdir $(DEMO_DIR)/mt
	$(VENV)/bin/attnzoo-eval --workdir $(DEMO_DIR)/mt --split validation --max_sentences 40
	@echo "demo: trained configs/lm_tiny.py and configs/mt_tiny.py for 600 steps each (a few minutes:"
	@echo "  the translations above are still rough). What the 30-minute recipes reach (BLEU on the"
	@echo "  Bible test split, nats/byte on Hamlet) and the commands that reproduce them: README.md,"
	@echo "  'Recorded results' (benchmarks/RESULTS.md has the curves)."

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright --pythonpath $(PY)  # basic mode over attnzoo/: pyproject [tool.pyright]

format: dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# API reference from the docstrings, plus the README, notebook figures and benchmark results:
# open site/index.html. --strict turns every mkdocs/mkdocstrings warning into a failure.
docs: $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench: dev
	$(PY) -m benchmarks.run --markdown benchmarks/RESULTS.md

# Positional encodings vs evaluation length (26 min measured on 2 CPU cores): one LM per kind; writes
# benchmarks/positions.{jsonl,md,png} and its section of benchmarks/RESULTS.md
study: dev
	$(PY) -m benchmarks.positions

figures: dev
	$(PY) notebooks/make_figures.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache site
