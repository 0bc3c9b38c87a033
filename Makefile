# kw-backup: `make test` sets everything up and runs the suite; see README.md.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-requirements
# Every shell script in the tree, found by its shebang, for shellcheck.
SHELL_FILES = $(shell grep -rlIE '^\#!(/usr/bin/env |/bin/)(ba|da)?sh' --exclude-dir=.venv --exclude-dir=.git \
                --exclude-dir=.bench --exclude-dir=.demo . )

.PHONY: venv test lint bench demo drill install-prod install-pi5 uninstall-prod uninstall-pi5 authorize-pi5 \
        pi5-keys
PREFIX ?= /opt/kw-backup
# stdlib only: runs with the system's python3 before the venv exists
INSTALL = PYTHONPATH=lib $(PYTHON) -m kwbackup.install
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
	$(VENV)/bin/python bench/offsite

install-prod install-pi5 uninstall-prod uninstall-pi5:
	$(INSTALL) $@ --prefix "$(PREFIX)" --destdir "$(DESTDIR)" --host "$(HOST)" --user "$(BACKUP_USER)"

authorize-pi5:
	$(INSTALL) authorize-pi5 --key "$(KEY)" --authorized-keys "$(AUTHORIZED_KEYS)" --prod-dir "$(PROD_DIR)"

pi5-keys:
	$(INSTALL) pi5-keys
