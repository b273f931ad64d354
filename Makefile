# Set-up and entry points. `make demo` and `make test` do all installation.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Write a haiku about the sea.

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/adore fetch-model
	@echo "--- full attention:"
	$(VENV)/bin/adore generate --chat --max-new-tokens 64 --prompt "$(PROMPT)"
	@echo "--- ADORE, a cache of 48 slots, up to 4 rebuilt tokens per step:"
	$(VENV)/bin/adore generate --chat --max-new-tokens 64 --prompt "$(PROMPT)" --policy adore --cache-size 48 --rebuild 4
	$(VENV)/bin/adore info --policy adore --cache-size 1024 --max-len 8192

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
