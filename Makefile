# Two commands on a fresh clone: `make demo` trains a LoRA on a tiny model made on the spot; `make test` runs
# the tests. Both create .venv on first use (torch pinned to the CPU build first; GPU users install their own),
# with the versions of constraints.txt, the ones the suite passed with. `make ui` serves the web app over the
# demo's files.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test ui

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lorakit demo

test: $(VENV)/.installed
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		echo "make test: no chromium found: the browser tests will be SKIPPED (install it: apt-get install chromium)"
	$(PY) -m pytest -q

ui: $(VENV)/.installed
	test -f lorakit-demo/dataset.toml || $(VENV)/bin/lorakit demo
	$(VENV)/bin/lorakit ui --root lorakit-demo
