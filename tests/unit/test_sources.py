from datetime import UTC, datetime, timedelta

import pytest

from kwbackup import names, settings, sources, staging
from kwbackup.errors import Failed, UsageError, VerificationError
from kwbackup.offsite import Offsite
from kwbackup.places import Entry, Place

CLOCK = names.Clock(datetime(2024, 1, 4, tzinfo=UTC), timedelta(minutes=60))


@pytest.fixture(autouse=True)
def no_env_file(monkeypatch, tmp_path):
    monkeypatch.setattr(settings, "ROOT", tmp_path)
    monkeypatch.setattr(settings, "SYSTEM_ENV_FILE", tmp_path / "none")


def make(**values):
    return settings.load(values, environ={"KW_BACKUP_ENV": ""})


class Listed:
    """An origin whose listing is given (resolve only lists)."""

    name, dir, is_local, label = "nas", "/backups/kw-app", False, "CM3588 NAS (nas:/backups/kw-app/)"

    def __init__(self, *entries: Entry):
        self.entries = list(entries)

    def listing(self, timeout: float = 60) -> list[Entry]:
        return self.entries


def entry(name: str, size: int, manifest_bytes: int | None) -> Entry:
    manifest = None if manifest_bytes is None else {"file": name, "bytes": manifest_bytes}
    return Entry(name, size, manifest=manifest)


def test_place_and_offsite_are_origins():
    for origin in (Place("nas", "local", "/tmp", 3), Offsite("/tmp/offsite", 3, None)):
        assert all(callable(getattr(origin, m)) for m in ("listing", "read", "exists"))
        assert isinstance(origin.name, str) and isinstance(origin.dir, str) and isinstance(origin.label, str)


def test_latest_passes_over_bad_dumps_saying_why(caplog):
    origin = Listed(
        entry("db-2024-01-03.sql.gz", 90, 100),
        entry("db-2024-01-02.sql.gz", 50, None),
        entry("db-2024-01-01.sql.gz", 100, 100),
    )
    chosen = sources.resolve(sources.Source("--from-nas", origin), CLOCK)
    assert chosen.name == "db-2024-01-01.sql.gz"
    text = caplog.text
    assert "passing over db-2024-01-03.sql.gz on nas" in text and "its size 90 differs from its manifest's 100" in text
    assert "passing over db-2024-01-02.sql.gz on nas" in text and "it has no manifest" in text


def test_latest_with_only_bad_dumps_is_a_verification_failure_naming_one():
    origin = Listed(entry("db-2024-01-03.sql.gz", 90, 100))
    with pytest.raises(VerificationError, match="db-2024-01-03.sql.gz failed verification: its size 90"):
        sources.resolve(sources.Source("--from-nas", origin), CLOCK)
    with pytest.raises(Failed, match="no dump on nas"):
        sources.resolve(sources.Source("--from-nas", Listed()), CLOCK)


def test_choose_takes_keywords_and_refuses_what_is_not_a_source(tmp_path):
    s = make(NAS_HOST="local", NAS_DIR=str(tmp_path))
    chosen = sources.choose(s, from_nas="latest")
    assert chosen.option == "--from-nas" and chosen.origin.name == "nas" and chosen.name == "latest"
    with pytest.raises(UsageError, match="is not a dump name"):
        sources.choose(s, local="../x")
    with pytest.raises(UsageError, match="is not USER@HOST:/PATH"):
        sources.choose(s, from_ssh="-oProxyCommand=x:/a")
    with pytest.raises(UsageError, match="say where the dump is"):
        sources.choose(s)


def test_remote_scripts_use_stock_tools_only():
    """What runs on prod: a POSIX shell, coreutils, gzip/pigz, flock, openssl or sha256sum; nothing of kw-backup."""
    for script in (
        staging.DECOMPRESS_INTO,
        staging.HEAD_SCRIPT,
        staging.SUM_SCRIPT,
        staging.KEEP_SCRIPT,
        staging.CLEAN_STAGING_SCRIPT,
        staging.HOLD_SCRIPT,
        staging.READ_IF_THERE,
    ):
        assert "verify-backup" not in script and "python" not in script and "kw-backup" not in script


def test_latest_never_takes_a_future_dated_name(caplog):
    origin = Listed(entry("db-2024-02-01.sql.gz", 100, 100), entry("db-2024-01-02.sql.gz", 100, 100))
    assert sources.resolve(sources.Source("--from-nas", origin), CLOCK).name == "db-2024-01-02.sql.gz"
    assert "passing over db-2024-02-01.sql.gz on nas: it is dated ahead of this clock" in caplog.text
