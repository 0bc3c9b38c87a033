# kw-backup: `make test` sets everything up and runs the suite; see README.md.
PYTHON ?= python3
VENV := .venv
# make test's pytest-xdist workers: the tests mostly wait on sshd and PostgreSQL, so 3 suit 2 cores. Each test
# file runs on one worker, in order (--dist loadfile): a module's world is built once and its tests build on each
# other (xdist_group no longer groups under pytest 9: xdist 3.8 sets a node id pytest 9 no longer reads).
TEST_JOBS ?= 3
STAMP := $(VENV)/.installed-requirements
# Every shell script in the tree, found by its shebang, for shellcheck.
SHELL_FILES = $(shell grep -rlIE '^\#!(/usr/bin/env |/bin/)(ba|da)?sh' --exclude-dir=.venv --exclude-dir=.git \
                --exclude-dir=.bench --exclude-dir=.demo . )

.PHONY: venv venv-barman test test-unit lint bench demo drill install-prod install-pi5 uninstall-prod uninstall-pi5 \
        authorize-pi5 authorize-pi5-tunnel pi5-keys
# The prerequisites of a target run in the order written: the system packages before the venv.
.NOTPARALLEL:
PREFIX ?= /opt/kw-backup
# stdlib only: runs with the system's python3 before the venv exists
INSTALL = PYTHONPATH=lib $(PYTHON) -m kwbackup.install
venv: $(STAMP)

# Barman for a laptop that recovers the nas's copy of the WAL tier (--at ... --from-nas), and for the tests; a pi5
# gets its own with make install-pi5 PITR=on.
BARMAN_VENV := .venv-barman
BARMAN_STAMP := $(BARMAN_VENV)/.installed-requirements
venv-barman: $(BARMAN_STAMP)

$(BARMAN_STAMP): requirements-barman.txt
	test -x $(BARMAN_VENV)/bin/python || $(PYTHON) -m venv $(BARMAN_VENV)
	$(BARMAN_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-barman.txt
	touch $(BARMAN_STAMP)

# The tools too (requirements-dev.txt); an install's venv gets requirements.txt alone.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# The system packages a target needs (system-packages.txt): as root, apt-get installs the missing ones;
# otherwise the apt-get line is printed and make stops (exit 2).
system-packages-%:
	@sh tools/system-packages $*

test: system-packages-test lint venv-barman
	$(VENV)/bin/pytest -n $(TEST_JOBS) --dist loadfile --durations=25

# The fast loop: tests/unit only, no root needed.
test-unit: system-packages-unit venv
	$(VENV)/bin/pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck $(SHELL_FILES)

demo: system-packages-demo venv
	PYTHONPATH=lib $(VENV)/bin/python -m kwbackup.demo $(if $(DEMO_DIR),--dir $(DEMO_DIR))

drill: venv
	$(VENV)/bin/python bin/backup-drill $(DRILL_ARGS)

bench: venv
	$(VENV)/bin/python bench/backup_db
	$(VENV)/bin/python bench/transfer
	$(VENV)/bin/python bench/restore
	$(VENV)/bin/python bench/offsite
	$(VENV)/bin/python bench/pitr
	$(VENV)/bin/python bench/pitr_restore

install-prod install-pi5 uninstall-prod uninstall-pi5:
	$(INSTALL) $@ --prefix "$(PREFIX)" --destdir "$(DESTDIR)" --host "$(HOST)" --user "$(BACKUP_USER)" --pitr "$(PITR)"

authorize-pi5:
	$(INSTALL) authorize-pi5 --key "$(KEY)" --authorized-keys "$(AUTHORIZED_KEYS)" --prod-dir "$(PROD_DIR)"

authorize-pi5-tunnel:
	$(INSTALL) authorize-pi5-tunnel --key "$(KEY)" --authorized-keys "$(AUTHORIZED_KEYS)" --port "$(PROD_PG_PORT)"

pi5-keys:
	$(INSTALL) pi5-keys
