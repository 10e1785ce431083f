# One command each: `make replicate` (gemma-2b-it, needs HF access; GPU recommended),
# `make demo` (offline real-model demo on CPU), `make test` (the test suite, offline, CPU: tests/unit,
# tests/integration, tests/real_model; tests/gpu skips without CUDA), `make test-unit` (tests/unit only, fast).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRANSFORMERS_SPEC ?= transformers==5.17.0
DATA ?= $(if $(REFUSAL_DIRECTION_DATA),$(REFUSAL_DIRECTION_DATA),../shared/datasets)
RUN ?= runs/gemma-2b-it
DEMO_RUN ?= runs/qwen2.5-coder-0.5b-instruct

.PHONY: install test test-unit test-fast replicate demo fetch-model bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	REFUSAL_DIRECTION_DATA=$(DATA) $(PY) -m pytest -q -rs

test-unit: install
	REFUSAL_DIRECTION_DATA=$(DATA) $(PY) -m pytest -q -rs tests/unit

test-fast: install
	REFUSAL_DIRECTION_DATA=$(DATA) $(PY) -m pytest -q -m "not real_model"

replicate: install
	$(PY) -m refusal_direction replicate --model google/gemma-2b-it --out $(RUN) \
		$(if $(wildcard $(DATA)),--data-dir $(DATA),)

demo: install
	$(PY) -m refusal_direction demo --out $(DEMO_RUN) $(if $(wildcard $(DATA)),--data-dir $(DATA),)

fetch-model: install
	$(PY) -m refusal_direction fetch-model qwen2.5-coder-0.5b-instruct

bench: install
	$(PY) -m refusal_direction bench

lint: install
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache
