# Two commands on a fresh clone: `make demo` trains a LoRA on a tiny model made on the spot; `make test` runs
# the tests. Both create .venv on first use (torch pinned to the CPU build first; GPU users install their own).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lorakit demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
