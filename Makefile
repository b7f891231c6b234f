# Two commands on a fresh clone: `make demo` trains a LoRA on a tiny model made on the spot; `make test` runs
# the tests. Both create .venv on first use (torch pinned to the CPU build first; GPU users install their own),
# with the versions of constraints.txt, the ones the suite passed with.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lorakit demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
