"""What the contract asks of every script: --help, --env-file, --verbose, --quiet, and exit 2 on bad settings."""

import pytest

from tests import world

SCRIPTS = [
    "backup-db",
    "backup-orchestrator",
    "list-backups",
    "pull-prod-backups",
    "restore-production-db",
    "setup-fresh-production-db",
    "migrate-database-to-new-prod",
    "backup-drill",
    "verify-backup",
    "backup-report",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_common_flags(kw, script):
    result = world.run_script(script, "--help", env=kw.env())
    assert result.returncode == 0, result.stderr
    for flag in ("--help", "--env-file", "--verbose", "--quiet"):
        assert flag in result.stdout, (script, flag)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_setting_is_exit_2_naming_it(kw, script):
    kw.settings["NAS_KEEP"] = "zero"
    args = {"verify-backup": ["x.sql.gz"], "restore-production-db": ["--local", "latest"]}.get(script, [])
    result = world.run_script(script, *args, env=kw.env())
    assert result.returncode == 2 and "NAS_KEEP" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
