# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo demo-cluster test quick lint bench soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# "compat": the package's folder on sys.path through a .pth line, not an import hook
	# (about 30 ms less at every start of tunectl); the default mode where it is gone.
	$(PY) -m pip install --quiet -e '.[test,plot,dask]' --config-settings editable_mode=compat \
		2>/dev/null || $(PY) -m pip install --quiet -e '.[test,plot,dask]'
	$(PY) -m compileall -q tuned
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) examples/daemon_demo.py --out demo-output
	@echo; echo "== the same tutorial in-process (import tuned as ag)"
	rm -rf demo-output/in-process/tuned-runs  # this run's experiments only, not earlier demos'
	$(PY) examples/search_algorithms.py --out demo-output/in-process
	$(VENV)/bin/tuned experiments --db demo-output/in-process/tuned-runs/tuned.db

# The tutorial's Hyperband run on a local Dask cluster (a scheduler and two workers).
demo-cluster: $(STAMP)
	$(PY) examples/cluster_demo.py --out demo-output/cluster

test: $(STAMP)
	$(PY) -m ruff check tuned tests examples benchmarks
	$(PY) -m pytest

# The tests without the SIGKILL soaks and the fuzzing (`slow`): for a quick round while working.
quick: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check tuned tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/tutorial.py

# The crash-safety tests at the issue's full counts, with their figures printed.
soak: $(STAMP)
	TUNED_KILLS=50 TUNED_EQUIVALENCE_KILLS=20 TUNED_SOAK_TRIALS=1000 TUNED_FUZZ_FRAMES=10000 \
		$(PY) -m pytest -s -q -m slow tests/

clean:
	rm -rf $(VENV) demo-output tuned-runs .pytest_cache .hypothesis
