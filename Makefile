# Two commands on a fresh machine:  make run   (set up + run the pipeline on generated data)
#                                   make test  (the test suite)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.seqclust-installed

.PHONY: setup run test lint bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/seqclust warmup
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/seqclust run --conf conf/local.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check lib tests jobs bench

bench: $(STAMP)
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/sessionize.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/kmeans.py

clean:
	rm -rf out build spark-warehouse .pytest_cache
