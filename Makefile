# kw-backup: `make test` sets everything up and runs the suite; see README.md.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-requirements
# Every shell script in the tree, found by its shebang, for shellcheck.
SHELL_FILES = $(shell grep -rlIE '^\#!(/usr/bin/env |/bin/)(ba|da)?sh' --exclude-dir=.venv --exclude-dir=.git \
                --exclude-dir=.bench --exclude-dir=.demo . )

.PHONY: venv test lint bench demo drill
venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

test: lint
	$(VENV)/bin/pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck $(SHELL_FILES)

demo: venv
	PYTHONPATH=lib $(VENV)/bin/python -m kwbackup.demo $(if $(DEMO_DIR),--dir $(DEMO_DIR))

drill: venv
	$(VENV)/bin/python bin/backup-drill $(DRILL_ARGS)

bench: venv
	$(VENV)/bin/python bench/backup_db
	$(VENV)/bin/python bench/transfer
	$(VENV)/bin/python bench/restore
