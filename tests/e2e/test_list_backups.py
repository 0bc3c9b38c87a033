"""bin/list-backups run on the laptop, as a user would, against the real sshd places."""

import json
import os
import pwd
import re
import shutil
import uuid
from datetime import UTC, datetime

import pytest

from tests import world

LINE = re.compile(
    r"  (?P<name>\S+) {2,}(?P<size>(?P<number>\d+(?:\.\d+)?)(?P<unit>B|kB|MB|GB|TB)) {2,}"
    r"(?P<time>\d{4}-\d{2}-\d{2} \d{2}:\d{2})  (?P<status>verified|unverified|SIZE MISMATCH|FUTURE)"
    r"(?P<pinned>  pinned)?"
)
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
JSON_KEYS = {"place", "host", "dir", "name", "bytes", "created_at", "sha256", "status", "pinned"}


def dump(directory, name, when, manifest=True, **kw):
    """A valid dump made at `when` (UTC): the manifest's created_at and the file's mtime say so."""
    path = world.synthetic_dump(directory, name, manifest=manifest, **kw)
    if manifest:
        meta = directory / (name + ".json")
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "created_at": f"{when:%Y-%m-%dT%H:%M:%SZ}"}))
    os.utime(path, (when.timestamp(), when.timestamp()))
    return path


def at(text):
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def block(output, host, directory):
    """The lines under the heading `<label> (<host>:<dir>/):`."""
    ends = f" ({host}:{str(directory).rstrip('/')}/):"
    matching = [h for h in world.listing_blocks(output) if h.endswith(ends)]
    assert len(matching) == 1, f"no single heading ending {ends!r} in:\n{output}"
    return world.listing_blocks(output)[matching[0]]


def rows(lines):
    """The dump lines, parsed; every line naming a dump must have the contract's form."""
    dumps = [m for line in lines if (m := LINE.fullmatch(line))]
    assert len(dumps) == len([line for line in lines if re.search(r"(db-|kw_app_production-)\d", line)]), lines
    return dumps


@pytest.fixture
def laptop(net):
    """The laptop: prod, pi5 and nas all over ssh through their aliases."""
    net.settings.update(PI5_HOST="pi5")
    net.user = pwd.getpwuid(os.geteuid()).pw_name
    return net


@pytest.fixture
def prod_dumps(laptop):
    """Dumps on prod, newest first, with every status; and files that are not dumps."""
    d = laptop.prod_dir
    dump(d, "db-2024-01-15-010000.sql.gz", at("2024-01-15 01:00"), rows=25000, random_bytes=True)
    dump(d, "db-2024-01-15.sql.gz", at("2024-01-15 00:07"), rows=6000, random_bytes=True)
    mismatch = dump(d, "db-2024-01-10.sql.gz", at("2024-01-10 02:05"))
    with open(mismatch, "ab") as f:
        f.write(b"\0" * 100)  # grown after its manifest was written
    os.utime(mismatch, (at("2024-01-10 02:05").timestamp(),) * 2)
    dump(d, "db-2024-01-09.sql.gz", at("2024-01-09 00:00"), manifest=False)
    dump(d, "kw_app_production-20240102-093000.sql.gz", at("2024-01-02 09:30"), manifest=False)
    for foreign in (
        "notes.txt",
        "db-2024-01-16.sql.gz.partial",
        ".db-2024-01-17.sql.gz.tmp",
        "db-2024-13-01.sql.gz",
        "db-2024-01-18.sql.gz.json",
        "latest.sql.gz",
    ):
        (d / foreign).write_text("{}")
    (d / "db-2024-01-19.sql.gz").mkdir()
    return d


def test_text_lists_every_place_newest_first_with_size_time_and_status(laptop, prod_dumps):
    laptop.settings["PROD_HOST"] = f"{laptop.user}@prod"
    dump(laptop.pi5_dir, "db-2024-01-14.sql.gz", at("2024-01-14 02:06"))
    dump(laptop.nas_dir, "db-2024-01-13.sql.gz", at("2024-01-13 02:07"))
    dump(laptop.nas_dir, "db-2024-01-14.sql.gz", at("2024-01-14 02:06"))
    result = laptop.run("list-backups")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0] == f"Production Server (prod:{prod_dumps}/):"
    assert len(world.listing_blocks(out)) == 3, out
    prod = rows(block(out, "prod", prod_dumps))
    assert [(m["name"], m["time"], m["status"]) for m in prod] == [
        ("db-2024-01-15-010000.sql.gz", "2024-01-15 01:00", "verified"),
        ("db-2024-01-15.sql.gz", "2024-01-15 00:07", "verified"),
        ("db-2024-01-10.sql.gz", "2024-01-10 02:05", "SIZE MISMATCH"),
        ("db-2024-01-09.sql.gz", "2024-01-09 00:00", "unverified"),
        ("kw_app_production-20240102-093000.sql.gz", "2024-01-02 09:30", "unverified"),
    ], out
    for m in prod:  # human-readable: rounded, within 5% of the real size
        actual = (prod_dumps / m["name"]).stat().st_size
        assert abs(float(m["number"]) * UNITS[m["unit"]] - actual) <= 0.05 * actual, (m["size"], actual)
    assert prod[0]["size"].endswith("MB") and prod[1]["size"].endswith("kB"), out
    assert [(m["name"], m["time"], m["status"]) for m in rows(block(out, "pi5", laptop.pi5_dir))] == [
        ("db-2024-01-14.sql.gz", "2024-01-14 02:06", "verified")
    ]
    assert [m["name"] for m in rows(block(out, "nas", laptop.nas_dir))] == [
        "db-2024-01-14.sql.gz",
        "db-2024-01-13.sql.gz",
    ]


def test_json_is_one_array_with_exactly_the_contract_keys(laptop, prod_dumps):
    dump(laptop.nas_dir, "db-2024-01-14.sql.gz", at("2024-01-14 02:06"))
    result = laptop.run("list-backups", "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert isinstance(found, list) and all(set(row) == JSON_KEYS for row in found), found
    prod = [row for row in found if row["place"] == "prod"]
    assert [row["name"] for row in prod] == [
        "db-2024-01-15-010000.sql.gz",
        "db-2024-01-15.sql.gz",
        "db-2024-01-10.sql.gz",
        "db-2024-01-09.sql.gz",
        "kw_app_production-20240102-093000.sql.gz",
    ]
    for row in prod:
        manifest = prod_dumps / (row["name"] + ".json")
        assert row["host"].rsplit("@", 1)[-1] == "prod" and row["dir"].rstrip("/") == str(prod_dumps)
        assert row["bytes"] == (prod_dumps / row["name"]).stat().st_size
        created = datetime.fromisoformat(row["created_at"].replace("Z", "+00:00"))
        assert created.utcoffset().total_seconds() == 0, row
        if manifest.exists():
            assert created == datetime.fromisoformat(
                json.loads(manifest.read_text())["created_at"].replace("Z", "+00:00")
            )
            assert row["sha256"] == json.loads(manifest.read_text())["sha256"]
        else:
            assert row["sha256"] is None and row["status"] == "unverified"
            assert created == datetime.fromtimestamp((prod_dumps / row["name"]).stat().st_mtime, UTC)
    assert [row["status"] for row in prod] == ["verified", "verified", "SIZE MISMATCH", "unverified", "unverified"]
    nas = [row for row in found if row["place"] == "nas"]
    assert [(row["name"], row["status"], row["dir"].rstrip("/")) for row in nas] == [
        ("db-2024-01-14.sql.gz", "verified", str(laptop.nas_dir))
    ]
    assert {row["place"] for row in found} == {"prod", "nas"}  # the empty pi5 adds no row


def test_only_lists_the_named_places(laptop, prod_dumps):
    dump(laptop.pi5_dir, "db-2024-01-14.sql.gz", at("2024-01-14 02:06"))
    dump(laptop.nas_dir, "db-2024-01-13.sql.gz", at("2024-01-13 02:06"))
    result = laptop.run("list-backups", "--only", "nas", "pi5")
    assert result.returncode == 0, result.stderr
    assert len(world.listing_blocks(result.stdout)) == 2, result.stdout
    assert [m["name"] for m in rows(block(result.stdout, "pi5", laptop.pi5_dir))] == ["db-2024-01-14.sql.gz"]
    assert [m["name"] for m in rows(block(result.stdout, "nas", laptop.nas_dir))] == ["db-2024-01-13.sql.gz"]
    as_json = laptop.run("list-backups", "--json", "--only", "prod")
    assert {row["place"] for row in json.loads(as_json.stdout)} == {"prod"}
    bad = laptop.run("list-backups", "--only", "laptop")
    assert bad.returncode == 2 and bad.stdout == ""


@pytest.fixture
def old_prod_home():
    """A migration-dump directory under the login's home, given as ~/... (as OLD_PROD_DIR's default)."""
    relative = f"kwtest-{uuid.uuid4().hex[:8]}/sql"
    home = pwd.getpwuid(os.geteuid()).pw_dir
    yield f"~/{relative}", os.path.join(home, relative)
    shutil.rmtree(os.path.join(home, relative.split("/")[0]), ignore_errors=True)


def test_old_prod_is_listed_only_when_its_host_is_set(laptop, old_prod_home):
    setting, directory = old_prod_home
    os.makedirs(directory)
    for name, when in (
        ("kw_app_production-20240103-120000.sql", "2024-01-03 12:00"),
        ("kw_app_production-20240110-093000.sql", "2024-01-10 09:30"),
        ("kw_app_production-20231231-235900.sql", "2023-12-31 23:59"),
    ):
        with open(os.path.join(directory, name), "w") as f:
            f.write("-- PostgreSQL database dump\n" * 100)
        os.utime(os.path.join(directory, name), (at(when).timestamp(),) * 2)
    laptop.settings["OLD_PROD_DIR"] = setting
    without = laptop.run("list-backups")
    assert without.returncode == 0 and "old-prod" not in without.stdout
    assert len(world.listing_blocks(without.stdout)) == 3
    laptop.settings["OLD_PROD_HOST"] = "old-prod"
    result = laptop.run("list-backups")
    assert result.returncode == 0, result.stderr
    assert len(world.listing_blocks(result.stdout)) == 4, result.stdout
    assert [(m["name"], m["time"], m["status"]) for m in rows(block(result.stdout, "old-prod", setting))] == [
        ("kw_app_production-20240110-093000.sql", "2024-01-10 09:30", "unverified"),
        ("kw_app_production-20240103-120000.sql", "2024-01-03 12:00", "unverified"),
        ("kw_app_production-20231231-235900.sql", "2023-12-31 23:59", "unverified"),
    ], result.stdout
    only = json.loads(laptop.run("list-backups", "--json", "--only", "old-prod").stdout)
    assert [(r["place"], r["sha256"], r["bytes"]) for r in only] == [("old-prod", None, 2800)] * 3


def test_an_unreachable_place_is_shown_and_the_others_still_listed(laptop, prod_dumps):
    laptop.settings["NAS_HOST"] = "gone"
    dump(laptop.pi5_dir, "db-2024-01-14.sql.gz", at("2024-01-14 02:06"))
    result = laptop.run("list-backups")
    assert result.returncode == 1, result.stdout + result.stderr
    nas = block(result.stdout, "gone", laptop.nas_dir)
    assert len(nas) == 1 and nas[0].startswith("  unreachable: ") and "Connection refused" in nas[0], nas
    assert len(rows(block(result.stdout, "prod", prod_dumps))) == 5
    assert [m["name"] for m in rows(block(result.stdout, "pi5", laptop.pi5_dir))] == ["db-2024-01-14.sql.gz"]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "nas" in errors[0], result.stderr
    as_json = laptop.run("list-backups", "--json")
    assert as_json.returncode == 1
    assert {row["place"] for row in json.loads(as_json.stdout)} == {"prod", "pi5"}


def test_a_place_whose_directory_does_not_exist_yet_has_no_dumps(laptop, prod_dumps):
    laptop.settings["NAS_DIR"] = str(laptop.tmp / "nas-not-made-yet")
    result = laptop.run("list-backups")
    assert result.returncode == 0, result.stderr
    for host, directory in (("pi5", laptop.pi5_dir), ("nas", laptop.tmp / "nas-not-made-yet")):
        lines = block(result.stdout, host, directory)
        assert rows(lines) == [] and not any("unreachable" in line for line in lines), lines
        assert not directory.exists()  # listing never creates anything
    assert len(rows(block(result.stdout, "prod", prod_dumps))) == 5


BARRIER = """#!/bin/sh
# barrier DIR COUNT NAME CMD...: join DIR, wait until COUNT connections joined, then run CMD (the link).
dir=$1 count=$2 name=$3
shift 3
: > "$dir/$name.$$"
tries=0
while [ "$(ls "$dir" | wc -l)" -lt "$count" ]; do
  tries=$((tries + 1))
  [ "$tries" -le 300 ] || { echo "barrier: only $(ls "$dir" | tr '\\n' ' ')asked at once" >&2; exit 1; }
  sleep 0.05
done
exec "$@"
"""


def test_the_places_are_asked_at_the_same_time(laptop, prod_dumps):
    """Each place's link opens only once all three are being opened: asking one after another
    would leave the first waiting for the others, which never come, and it would fail."""
    barrier, joined = laptop.tmp / "barrier", laptop.tmp / "joined"
    barrier.write_text(BARRIER)
    barrier.chmod(0o755)
    joined.mkdir()
    proxies = {
        name: f"{barrier} {joined} 3 %n {world.relay_command(laptop.ssh.places[name].address, 10**8)}"
        for name in ("prod", "pi5", "nas")
    }
    laptop.settings["SSH_CONFIG"] = str(laptop.ssh.client_config(laptop.tmp / "ssh_config", proxy=proxies))
    result = laptop.run("list-backups")
    assert result.returncode == 0, f"the places were not asked at the same time:\n{result.stdout}{result.stderr}"
    assert len(rows(block(result.stdout, "prod", prod_dumps))) == 5
    assert sorted(p.split(".")[0] for p in os.listdir(joined)) == ["nas", "pi5", "prod"]
