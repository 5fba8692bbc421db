# Two commands on a fresh machine:  make run   (set up + run the pipeline on generated data)
#                                   make test  (the test suite)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.seqclust-installed

.PHONY: setup run test test-fast test-dag lint bench clean airflow compat mutation

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[local,dev]"
	@# resolves Delta's jars once (Ivy's ~60 lines go to the log, not the terminal) and lists them
	@# for later starts, which then skip the resolution
	$(BIN)/seqclust warmup 2>$(VENV)/warmup.log || { cat $(VENV)/warmup.log; exit 1; }
	touch $(STAMP)

TEST_WORKERS ?= 2

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/seqclust run --conf conf/demo.yaml

# two workers (pytest-xdist), a test file each at a time (--dist loadfile: a module's fixture,
# such as test_e2e's full run, is built once): the suite is mostly small Spark jobs and
# subprocesses that leave a core idle (with the compat venvs, Airflow, the real DAG run, the
# stream and Kafka tests: docs/BENCHMARKS.md has the latest time). Three workers on 2 cores
# were slower (the long tests' JVMs overlap: a load of 7, measured); TEST_WORKERS=N
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# the Airflow DAG tests alone, the run for real among them (airflow dags test, a spark-submit per
# stage; needs `make airflow`; part of `make test` too): about 7 minutes on 2 cores
test-dag: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_dags.py

# the tests that need no Spark (generators, config, tokens, k rule, metrics oracles): seconds
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not spark" tests

# style, formatting and types (mypy over the package, not strict: zero errors); CI runs it before the tests
lint: $(STAMP)
	$(BIN)/ruff check lib tests jobs bench dags notebooks
	$(BIN)/ruff format --check lib tests jobs bench dags notebooks
	$(BIN)/mypy lib/seqclust --ignore-missing-imports

# mutmut over the core computations, scored by the Spark-free oracle tests (~20 min; not in CI)
mutation: $(STAMP)
	PYTHON=$(BIN)/python .ci/mutation

bench: $(STAMP)
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/sessionize.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/kmeans.py

# Airflow in its own environment (its pins are not ours; the DAG file does not import seqclust):
# tests/test_dags.py loads the DAGs with it. CI runs this before `make test`.
AIRFLOW_VENV := .venv-airflow
airflow: $(AIRFLOW_VENV)/.installed
$(AIRFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet "apache-airflow>=2.10,<4" apache-airflow-providers-apache-spark apache-airflow-providers-databricks
	touch $@

# The compatibility matrix: one venv per runtime library set in .ci/compat/ (Databricks LTS ML
# sets on open-source Spark 3.5 and 4.0; a Spark 4.2 set with PyTorch and no TensorFlow, about
# 6 GB with torch's CUDA wheels), seqclust installed without its dependencies, Delta's
# jars for that Spark line fetched once. tests/test_e2e.py repeats its run in each (skips,
# saying so, when a venv is missing). CI runs this before `make test`.
COMPAT_SETS := $(basename $(notdir $(wildcard .ci/compat/*.txt)))
compat: $(COMPAT_SETS:%=.venv-compat/%/.installed)
.venv-compat/%/.installed: .ci/compat/%.txt setup.py
	rm -rf .venv-compat/$*
	$(PYTHON) -m venv .venv-compat/$*
	.venv-compat/$*/bin/pip install --quiet --upgrade pip
	.venv-compat/$*/bin/pip install --quiet -r $< "pytest>=8"
	.venv-compat/$*/bin/pip install --quiet --no-deps -e .
	.venv-compat/$*/bin/seqclust warmup 2>.venv-compat/$*/warmup.log || { cat .venv-compat/$*/warmup.log; exit 1; }
	touch $@

clean:
	rm -rf out build spark-warehouse .pytest_cache
