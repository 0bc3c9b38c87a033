from datetime import UTC, datetime, timedelta

import pytest

from kwbackup import fresh, names, settings, sources, staging
from kwbackup.errors import Failed, UsageError, VerificationError
from kwbackup.offsite import Offsite
from kwbackup.places import Entry, Place
from tests import world
from tests.damage import spoil

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


@pytest.mark.parametrize(
    "manifest, why",
    [
        ({"file": "db-2024-01-03.sql.gz", "bytes": 100}, "its size 90 differs from its manifest's 100"),
        ({}, "its manifest is unreadable"),
        ({"file": "db-2024-01-02.sql.gz", "bytes": 90}, "its manifest describes db-2024-01-02.sql.gz"),
    ],
)
def test_latest_is_the_newest_dump_and_a_bad_one_stops_it_never_an_older_one(manifest, why):
    origin = Listed(Entry("db-2024-01-03.sql.gz", 90, manifest=manifest), entry("db-2024-01-01.sql.gz", 100, 100))
    source = sources.Source("--from-nas", origin)
    with pytest.raises(VerificationError, match=f"db-2024-01-03.sql.gz on nas failed verification: {why}"):
        sources.resolve(source, CLOCK)
    assert source.name == "db-2024-01-03.sql.gz" and source.chosen_as_latest  # for naming_a_copy
    with pytest.raises(Failed, match="no dump on nas"):
        sources.resolve(sources.Source("--from-nas", Listed()), CLOCK)


def test_latest_takes_a_newest_dump_without_a_manifest_unverified_saying_so(caplog):
    origin = Listed(entry("db-2024-01-03.sql.gz", 50, None), entry("db-2024-01-01.sql.gz", 100, 100))
    assert sources.resolve(sources.Source("--from-nas", origin), CLOCK).name == "db-2024-01-03.sql.gz"
    assert "db-2024-01-03.sql.gz on nas has no manifest: taking it unverified" in caplog.text


def test_a_named_dump_is_taken_as_named_and_a_missing_one_is_not():
    origin = Listed(entry("db-2024-01-03.sql.gz", 90, 100), entry("db-2024-01-01.sql.gz", 100, 100))
    named = sources.resolve(sources.Source("--from-nas", origin, "db-2024-01-01.sql.gz"), CLOCK)
    assert named.name == "db-2024-01-01.sql.gz" and not named.chosen_as_latest
    with pytest.raises(Failed, match="db-2024-01-02.sql.gz is not on nas"):
        sources.resolve(sources.Source("--from-nas", origin, "db-2024-01-02.sql.gz"), CLOCK)


NEWEST, OLDER = "db-2024-01-03.sql.gz", "db-2024-01-02.sql.gz"


@pytest.fixture
def places(tmp_path):
    """prod, pi5 and the nas as local directories; prod's newest dump damaged (longer than its manifest says)."""
    dirs = {p: tmp_path / p for p in ("prod", "pi5", "nas")}
    world.synthetic_dump(dirs["prod"], OLDER, rows=10)
    spoil(world.synthetic_dump(dirs["prod"], NEWEST, rows=10), "junk")
    config = {f"{p.upper()}_{k}": v for p, d in dirs.items() for k, v in (("HOST", "local"), ("DIR", str(d)))}
    return dirs, config


def restore_latest(config: dict) -> pytest.ExceptionInfo:
    """restore-production-db --local latest as far as the dump's choice: its one failure line."""
    s = make(**config)
    source = sources.choose(s, local="latest")
    with pytest.raises(VerificationError) as failed, sources.naming_a_copy(s, source, "restore-production-db"):
        sources.resolve(source, names.Clock.from_settings(s))
    return failed


def test_a_failed_newest_dump_names_a_verified_copy_of_it_elsewhere(places):
    dirs, config = places
    world.synthetic_dump(dirs["nas"], NEWEST, rows=10)
    line = restore_latest(config).value.line()
    assert line == (
        f"{NEWEST} on prod failed verification: its size {(dirs['prod'] / NEWEST).stat().st_size} differs from "
        f"its manifest's {(dirs['nas'] / NEWEST).stat().st_size} (damaged or incomplete) -- a verified copy of "
        f"{NEWEST} is on nas: restore-production-db --from-nas {NEWEST}"
    )


def test_without_a_copy_it_names_the_newest_verified_dump_leaving_the_choice_of_an_older_one(places):
    dirs, config = places
    world.synthetic_dump(dirs["nas"], "db-2024-01-01.sql.gz", rows=10)
    hint = restore_latest(config).value.hint
    assert hint == (
        f"no place holds a verified copy of {NEWEST}; the newest verified dump is {OLDER} on prod, older: "
        f"only if you choose it: restore-production-db --local {OLDER}"
    )
    for name in (OLDER, NEWEST):
        (dirs["prod"] / name).unlink()
    (dirs["nas"] / "db-2024-01-01.sql.gz.json").unlink()
    world.synthetic_dump(dirs["prod"], NEWEST, rows=10, manifest=False)
    (dirs["prod"] / f"{NEWEST}.json").write_text("{}")
    assert restore_latest(config).value.hint == (
        f"no place holds a verified copy of {NEWEST}, nor any other verified dump (list-backups)"
    )


def test_a_place_that_cannot_be_listed_then_is_warned_about_and_hides_nothing(places, caplog):
    dirs, config = places
    world.synthetic_dump(dirs["pi5"], NEWEST, rows=10)
    config["NAS_HOST"] = "127.0.0.9"  # nothing listens there
    failed = restore_latest(config)
    assert failed.value.message.startswith(f"{NEWEST} on prod failed verification: its size")
    assert failed.value.hint == f"a verified copy of {NEWEST} is on pi5: restore-production-db --from-pi5 {NEWEST}"
    assert f"could not look for a verified copy of {NEWEST} on nas: nas (127.0.0.9) unreachable" in caplog.text


def test_a_later_failure_of_the_newest_dump_names_the_copy_too_and_a_named_dumps_does_not(places):
    dirs, config = places
    world.synthetic_dump(dirs["nas"], OLDER, rows=10)
    s = make(**config)
    chosen = sources.Source("--from-nas", sources.origin(s, "nas"))
    with pytest.raises(VerificationError) as failed, sources.naming_a_copy(s, chosen, "backup-drill"):
        sources.resolve(chosen, CLOCK)
        raise VerificationError(f"{OLDER}: sha256 differs from the manifest's", "use another copy")
    assert failed.value.line() == (
        f"{OLDER}: sha256 differs from the manifest's -- a verified copy of {OLDER} is on prod: "
        f"backup-drill --from prod --dump {OLDER}"
    )
    named = sources.Source("--from-nas", sources.origin(s, "nas"), OLDER)
    with pytest.raises(VerificationError) as failed, sources.naming_a_copy(s, named, "backup-drill"):
        sources.resolve(named, CLOCK)
        raise VerificationError(f"{OLDER}: sha256 differs from the manifest's", "use another copy")
    assert failed.value.hint == "use another copy"


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
    scripts = [v for m in (staging, fresh) for k, v in vars(m).items() if k.endswith("_SCRIPT")]
    assert len(scripts) >= 8  # every *_SCRIPT constant, a new one included
    for script in (*scripts, staging.DECOMPRESS_INTO, staging.READ_IF_THERE):
        assert "verify-backup" not in script and "python" not in script and "kw-backup" not in script


def test_latest_never_takes_a_future_dated_name(caplog):
    origin = Listed(entry("db-2024-02-01.sql.gz", 100, 100), entry("db-2024-01-02.sql.gz", 100, 100))
    assert sources.resolve(sources.Source("--from-nas", origin), CLOCK).name == "db-2024-01-02.sql.gz"
    assert "passing over db-2024-02-01.sql.gz on nas: it is dated ahead of this clock" in caplog.text


def test_a_copy_is_the_same_dump_encrypted_or_not(places, tmp_path):
    """An offsite copy is `<dump>.age`: its failure names the plain copy the nas holds, and the other way round."""
    dirs, config = places
    offsite = tmp_path / "offsite"
    spoil(world.synthetic_dump(offsite, f"{NEWEST}.age", rows=10), "junk")
    world.synthetic_dump(dirs["nas"], NEWEST, rows=10)
    s = make(**config, OFFSITE_REMOTE=str(offsite))
    source = sources.choose(s, from_offsite="latest")
    with pytest.raises(VerificationError) as failed, sources.naming_a_copy(s, source, "restore-production-db"):
        sources.resolve(source, CLOCK)
    assert failed.value.hint == f"a verified copy of {NEWEST}.age is on nas: restore-production-db --from-nas {NEWEST}"
    (offsite / f"{NEWEST}.age").write_bytes((offsite / f"{NEWEST}.age").read_bytes()[:-4])  # whole again
    nas = sources.choose(s, from_nas="latest")  # the nas's copy is the one a later check finds damaged
    with pytest.raises(VerificationError) as failed, sources.naming_a_copy(s, nas, "restore-production-db"):
        sources.resolve(nas, CLOCK)
        raise VerificationError(f"{NEWEST}: corrupt gzip stream", "use another copy")
    assert failed.value.hint.endswith(f"is on offsite: restore-production-db --from-offsite {NEWEST}.age")


def test_a_file_here_is_read_directly_and_one_over_ssh_is_not():
    here = "/work/kw_app_production-20240115-143100.sql.gz"
    assert sources.local_path(sources.Source("--from-file", path=here, name="x.sql.gz")) == here
    assert sources.local_path(sources.Source("--at", path=here, name="x.sql.gz")) == here  # a moment recovered here
    assert sources.local_path(sources.Source("--from-ssh", path=f"kamal@old:{here}", name="x.sql.gz")) is None
    assert sources.reader(sources.Source("--at", path=here, name="x.sql.gz"), None) == []
