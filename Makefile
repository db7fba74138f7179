# Creditdesk. The two set-up commands (README.md):
#   make run    install, migrate, load demo data, print the admin login, start web + worker + beat
#   make test   install and run the whole test suite against real PostgreSQL
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: run test bench install db-stop

run: $(INSTALLED)
	$(PY) scripts/creditdesk run

test: $(INSTALLED)
	$(PY) -m pytest $(ARGS)

bench: $(INSTALLED)
	$(PY) bench/run.py $(ARGS)

install: $(INSTALLED)

db-stop:
	$(PY) scripts/creditdesk db-stop

# Reinstalled whenever pyproject.toml changes.
$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Creditdesk needs Python 3.11+: make PYTHON=/path/to/python3.11 ...")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@
