"""The pi5 trusts nothing it cannot check: what a broken or compromised prod serves, over the real sshd.

Junk whose manifest matches it, a dump whose rows differ from its manifest, manifests of the wrong
types or sizes, names the pi5 or the nas already hold with other bytes, future-dated names, and
nights missed while prod still kept them. Every failure: the right exit status, one line, and no
good dump lost anywhere.
"""

import gzip
import json
import os
import subprocess

import pytest

from tests import damage, world

GOOD = ["db-2024-03-07.sql.gz", "db-2024-03-08.sql.gz", "db-2024-03-09.sql.gz"]
NAME = "db-2024-03-10.sql.gz"


def orchestrate(kw, *args, **kwargs):
    return kw.run("backup-orchestrator", *args, timeout=240, **kwargs)


def contents(directory):
    """Every file under its final name, with its bytes."""
    return (
        {
            n: (directory / n).read_bytes()
            for n in sorted(os.listdir(directory))
            if (directory / n).is_file() and not n.startswith(".")
        }
        if directory.exists()
        else {}
    )


def errors(result):
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.fixture
def good_nights(net):
    """Three good nights on the pi5 and the nas, as earlier runs left them."""
    for name in GOOD:
        world.synthetic_dump(net.pi5_dir, name)
        world.synthetic_dump(net.nas_dir, name)
    return net


def junk(directory, name, payload: bytes) -> None:
    """A file under a dump's name with a manifest that matches its bytes: all a manifest can promise."""
    world.synthetic_dump(directory, name)
    (directory / name).write_bytes(payload)
    damage.forge_manifest(directory / name)


def without_a_row(directory, name) -> None:
    """A well-formed dump with one row less than its manifest says, the manifest's size and sha256 made to match."""
    path = world.synthetic_dump(directory, name, rows=1000)
    sql = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(sql.replace(b"\n7\t" + b"x" * 96 + b"\n", b"\n", 1)))
    damage.forge_manifest(path)


def sql_without_completion(directory, name) -> bytes:
    sql = gzip.decompress(world.synthetic_dump(directory, name).read_bytes())
    return gzip.compress(sql.split(b"-- PostgreSQL database dump complete")[0])


@pytest.mark.parametrize("how", ["random bytes", "gzip of no dump", "no completion line", "a row missing"])
def test_junk_whose_manifest_matches_it_is_never_promoted_or_pushed(good_nights, how):
    net = good_nights
    if how == "a row missing":
        without_a_row(net.prod_dir, NAME)
    else:
        payload = {
            "random bytes": lambda: os.urandom(50_000),
            "gzip of no dump": lambda: gzip.compress(os.urandom(40_000).hex().encode()),
            "no completion line": lambda: sql_without_completion(net.tmp, NAME),
        }[how]()
        junk(net.prod_dir, NAME, payload)
    pi5_before, nas_before = contents(net.pi5_dir), contents(net.nas_dir)
    result = orchestrate(net)
    assert result.returncode == 3, result.stderr
    assert len(errors(result)) == 1 and NAME in errors(result)[0], result.stderr
    if how == "a row missing":
        assert "row counts differ" in errors(result)[0]
    assert contents(net.pi5_dir) == pi5_before and contents(net.nas_dir) == nas_before
    assert os.listdir(net.pi5_dir / ".incoming") == []
    assert "result=failed (VerificationError)" in result.stderr


def test_three_junk_nights_never_rotate_a_good_dump_away(good_nights):
    net = good_nights
    net.settings.update(PI5_KEEP="3", NAS_KEEP="3")
    pi5_before, nas_before = contents(net.pi5_dir), contents(net.nas_dir)
    for day in ("10", "11", "12"):
        junk(net.prod_dir, f"db-2024-03-{day}.sql.gz", os.urandom(20_000))
        result = orchestrate(net)
        assert result.returncode == 3, result.stderr
    assert contents(net.pi5_dir) == pi5_before and contents(net.nas_dir) == nas_before


@pytest.mark.parametrize("where", ["pi5", "nas"])
def test_a_name_already_held_with_other_bytes_is_never_replaced(good_nights, where):
    net = good_nights
    world.synthetic_dump(net.prod_dir, NAME, rows=1200)
    held = net.pi5_dir if where == "pi5" else net.nas_dir
    world.synthetic_dump(held, NAME, rows=800, manifest=where == "nas")  # another dump under the same name
    before = contents(held)
    result = orchestrate(net)
    assert result.returncode == 3, result.stderr
    assert len(errors(result)) == 1 and f"{where} already holds {NAME} with other bytes" in errors(result)[0]
    assert contents(held) == before  # byte for byte as it was
    if where == "nas":  # the pi5 took prod's good dump; only the nas's copy is left alone
        assert (net.pi5_dir / NAME).read_bytes() == (net.prod_dir / NAME).read_bytes()
    assert not (net.nas_dir / ".incoming").exists() or os.listdir(net.nas_dir / ".incoming") == []


def test_the_same_bytes_under_the_same_name_are_not_a_conflict(good_nights):
    net = good_nights
    world.synthetic_dump(net.prod_dir, NAME)
    (net.pi5_dir / NAME).write_bytes((net.prod_dir / NAME).read_bytes())  # copied by hand, without its manifest
    result = orchestrate(net)
    assert result.returncode == 0, result.stderr
    assert json.loads((net.pi5_dir / (NAME + ".json")).read_text()) == json.loads(
        (net.prod_dir / (NAME + ".json")).read_text()
    )
    assert (net.nas_dir / NAME).read_bytes() == (net.prod_dir / NAME).read_bytes()


OLDER = GOOD[1]  # older than the pi5's newest: never pulled, still compared every run


@pytest.fixture
def recorder():
    server = world.Recorder()
    yield server
    server.close()


def restamped(data: bytes) -> bytes:
    """The same dump under another time in its gzip header: still valid, the same size, other bytes."""
    return data[:4] + b"\x01\x02\x03\x04" + data[8:]


@pytest.mark.parametrize(
    ("bytes_on_prod", "manifest"),
    [
        ("the same size", "prod's own"),
        ("the same size", "none"),
        ("another size", "prod's own"),
        ("another size", "none"),
        ("another size", "one that lies"),  # the same size under a lying manifest passes: see _compare_held
    ],
)
def test_an_older_name_the_pi5_holds_with_other_bytes_is_a_conflict_every_run(
    good_nights, recorder, bytes_on_prod, manifest
):
    net = good_nights
    net.settings["NOTIFY_URLS"] = f"json://{recorder.url[7:]}/notify"
    for name in GOOD[1:]:  # prod keeps 2: the newest is the pi5's newest, so nothing is new
        world.synthetic_dump(net.prod_dir, name)
    held = net.pi5_dir / OLDER
    if bytes_on_prod == "the same size":
        (net.prod_dir / OLDER).write_bytes(restamped(held.read_bytes()))
    else:
        world.synthetic_dump(net.prod_dir, OLDER, rows=1200)
    if manifest == "prod's own":
        damage.forge_manifest(net.prod_dir / OLDER)
    elif manifest == "none":
        (net.prod_dir / (OLDER + ".json")).unlink()
    else:  # it describes the pi5's copy, not the file beside it
        (net.prod_dir / (OLDER + ".json")).write_bytes((net.pi5_dir / (OLDER + ".json")).read_bytes())
    before = {d: contents(d) for d in (net.prod_dir, net.pi5_dir, net.nas_dir)}
    result = orchestrate(net)
    assert result.returncode == 3, result.stderr
    assert len(errors(result)) == 1 and f"pi5 already holds {OLDER} with other bytes than prod's" in errors(result)[0]
    assert "nothing to pull" in result.stderr
    note = json.loads([r for r in recorder.requests if r["path"].startswith("/notify")][-1]["body"])
    assert "FAILED" in note["title"] and OLDER in note["message"] and "prod's" in note["message"]
    assert {d: contents(d) for d in before} == before  # every copy byte for byte as it was
    assert os.listdir(net.pi5_dir / ".incoming") == []


@pytest.mark.parametrize("manifest", ["prod's own", "none", "one of other bytes"])
def test_an_older_name_held_with_the_same_bytes_is_said_only_in_debug(good_nights, manifest):
    net = good_nights
    for name in GOOD[1:]:
        world.synthetic_dump(net.prod_dir, name)  # the pi5's bytes: the same name makes the same dump
    if manifest == "none":
        (net.prod_dir / (OLDER + ".json")).unlink()
    elif manifest == "one of other bytes":  # a wrong manifest is no cheap "same": prod's file is read, and matches
        (net.prod_dir / (OLDER + ".json")).write_bytes((net.pi5_dir / (GOOD[0] + ".json")).read_bytes())
    planned = orchestrate(net, "--dry-run")
    assert planned.returncode == 0 and f"would compare prod's {OLDER} with the pi5's copy" in planned.stderr
    before = {d: contents(d) for d in (net.prod_dir, net.pi5_dir, net.nas_dir)}
    result = orchestrate(net)
    assert result.returncode == 0, result.stderr
    assert OLDER not in result.stderr  # only a debug line says it
    assert {d: contents(d) for d in before} == before
    assert os.listdir(net.pi5_dir / ".incoming") == []


def test_nights_missed_while_prod_kept_them_are_caught_up(net):
    world.synthetic_dump(net.pi5_dir, "db-2024-03-08.sql.gz")
    for name in ("db-2024-03-08.sql.gz", "db-2024-03-09.sql.gz", NAME):
        world.synthetic_dump(net.prod_dir, name)
    result = orchestrate(net)
    assert result.returncode == 0, result.stderr
    for name in ("db-2024-03-09.sql.gz", NAME):
        assert f"pulled and verified {name}" in result.stderr
        for directory in (net.pi5_dir, net.nas_dir):
            assert (directory / name).read_bytes() == (net.prod_dir / name).read_bytes()
    assert "pulled and verified db-2024-03-08" not in result.stderr


def test_a_future_dated_name_on_prod_never_freezes_the_nightly_pulls(net):
    future = "db-2024-03-20.sql.gz"  # prod's clock jumped ten days ahead for one night
    world.synthetic_dump(net.prod_dir, future)
    world.synthetic_dump(net.prod_dir, NAME)
    first = orchestrate(net, at="2024-03-10 03:00:00")
    assert first.returncode == 0, first.stderr
    warnings = [line for line in first.stderr.splitlines() if future in line]
    assert warnings and "dated ahead of this clock" in warnings[0] and "result=ok-with-warnings" in first.stderr
    assert future not in os.listdir(net.pi5_dir) and future not in os.listdir(net.nas_dir)
    assert (net.nas_dir / NAME).exists()

    world.synthetic_dump(net.prod_dir, "db-2024-03-11.sql.gz")  # the next night is pulled as usual
    second = orchestrate(net, at="2024-03-11 03:00:00")
    assert second.returncode == 0, second.stderr
    assert "pulled and verified db-2024-03-11.sql.gz" in second.stderr
    assert (net.nas_dir / "db-2024-03-11.sql.gz").exists() and future not in os.listdir(net.nas_dir)

    listed = net.run("list-backups", "--only", "prod", at="2024-03-11 03:05:00")
    lines = [line for line in listed.stdout.splitlines() if future in line]
    assert len(lines) == 1 and lines[0].rstrip().endswith("FUTURE"), listed.stdout
    as_json = json.loads(net.run("list-backups", "--json", "--only", "prod", at="2024-03-11 03:05:00").stdout)
    assert [row["status"] for row in as_json if row["name"] == future] == ["FUTURE"]


def test_future_dated_dumps_neither_count_nor_go_in_rotation(net):
    for name in ("db-2024-03-08.sql.gz", "db-2024-03-09.sql.gz", "db-2024-04-01.sql.gz"):
        world.synthetic_dump(net.pi5_dir, name)
    world.synthetic_dump(net.prod_dir, NAME)
    net.settings.update(PI5_KEEP="2", NAS_KEEP="2")
    result = orchestrate(net, at="2024-03-10 03:00:00")
    assert result.returncode == 0, result.stderr
    dumps_left = sorted(n for n in os.listdir(net.pi5_dir) if n.endswith(".gz"))
    # KEEP 2 counts 03-09 and 03-10; the future-dated one is neither counted nor removed (nor pushed)
    assert dumps_left == ["db-2024-03-09.sql.gz", NAME, "db-2024-04-01.sql.gz"]
    assert "db-2024-04-01.sql.gz in " in result.stderr and "is future-dated" in result.stderr
    assert "db-2024-04-01.sql.gz" not in os.listdir(net.nas_dir)


# --- manifests that are not manifests ------------------------------------------------------------


@pytest.mark.parametrize("change", [{"tables": [["public.t", 1000]]}, {"bytes": "big"}, {"sha256": 42}])
def test_a_manifest_of_the_wrong_types_fails_verification_not_in_a_traceback(good_nights, change):
    net = good_nights
    world.synthetic_dump(net.prod_dir, NAME)
    manifest = net.prod_dir / (NAME + ".json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **change}))
    result = orchestrate(net)
    assert result.returncode == 3, result.stderr
    assert "not a valid manifest" in errors(result)[0] and "Traceback" not in result.stderr
    assert NAME not in os.listdir(net.pi5_dir)
    listed = net.run("list-backups", "--only", "prod")
    assert "Traceback" not in listed.stderr
    assert [line for line in listed.stdout.splitlines() if NAME in line][0].endswith("SIZE MISMATCH")
    check = net.run("verify-backup", str(net.prod_dir / NAME))
    assert check.returncode == 3 and "not a valid manifest" in check.stderr and "Traceback" not in check.stderr


def test_a_40_mb_manifest_is_refused_from_the_listing_before_it_is_fetched(good_nights):
    net = good_nights
    world.synthetic_dump(net.prod_dir, NAME)
    manifest = net.prod_dir / (NAME + ".json")
    manifest.write_bytes(manifest.read_bytes().rstrip() + b" " * (40 << 20))
    result = orchestrate(net)
    assert result.returncode == 3, result.stderr
    assert "more than a manifest may be" in errors(result)[0]
    assert os.listdir(net.pi5_dir / ".incoming") == [] and NAME not in os.listdir(net.pi5_dir)
    listed = net.run("list-backups", "--only", "prod")
    assert [line for line in listed.stdout.splitlines() if NAME in line][0].endswith("SIZE MISMATCH")


# --- bounded memory ------------------------------------------------------------------------------


def gzipped_line(path, head: bytes, megabytes: int) -> None:
    """A gzip file of `head` followed by one line of `megabytes` MB with no newline, streamed (never in memory)."""
    with open(path, "wb") as out:
        pigz = subprocess.Popen(["pigz", "-1", "-c"], stdin=subprocess.PIPE, stdout=out)
        pigz.stdin.write(head)
        block = b"x" * (1 << 20)
        for _ in range(megabytes):
            pigz.stdin.write(block)
        pigz.stdin.close()
        assert pigz.wait() == 0


# Runs a command and prints its descendants' peak resident memory (KiB) on stderr's last line.
PEAK = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "sys.stderr.write(f'peak {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n'); sys.exit(code)"
)


@pytest.mark.parametrize(
    "head",
    [b"--\n-- PostgreSQL database dump\n--\n\nCOPY ", b"--\n-- PostgreSQL database dump\n\n"],
    ids=["a COPY line", "another line"],
)
def test_one_300_mb_line_fails_verification_in_bounded_memory(kw, tmp_path, head):
    path = tmp_path / NAME
    gzipped_line(path, head, 300)
    result = subprocess.run(
        [world.PYTHON, "-c", PEAK, str(world.BIN / "verify-backup"), str(path)],
        env=kw.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr
    peak_mb = int(result.stderr.splitlines()[-1].split()[1]) // 1024
    assert peak_mb < 150, f"verify-backup peaked at {peak_mb} MB"
    assert len(errors(result)) == 1 and "Traceback" not in result.stderr
