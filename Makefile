# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) examples/daemon_demo.py --out demo-output
	@echo; echo "== the same tutorial in-process (import tuned as ag)"
	$(PY) examples/search_algorithms.py --out demo-output/in-process
	$(VENV)/bin/tuned experiments --db demo-output/in-process/tuned-runs/tuned.db

test: $(STAMP)
	$(PY) -m ruff check tuned tests examples benchmarks
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check tuned tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/tutorial.py

clean:
	rm -rf $(VENV) demo-output tuned-runs .pytest_cache .hypothesis
