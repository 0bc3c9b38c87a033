"""lib/kwbackup/parallel_load.py on real dumps and a real PostgreSQL: the parallel load gives exactly
what one psql session gives, falls back to one session where it cannot split, and fails loudly."""

import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from kwbackup import dumps, parallel_load

PROGRAM = parallel_load.__file__


def pg_dump(pg, db, *args):
    out = subprocess.run(
        ["pg_dump", "--no-password", *args, db], env={**os.environ, **pg.env}, capture_output=True, check=True
    )
    return out.stdout


def load(pg, sql: bytes, jobs=4, tmp=None, gz=False, options=()):
    """A fresh database loaded by the program from a file; (database, exit status, stdout, stderr)."""
    name = pg.create_db(f"kwpl_{uuid.uuid4().hex[:8]}")
    path = os.path.join(tmp, f"{name}.sql" + (".gz" if gz else ""))
    with open(path, "wb") as f:
        f.write(gzip.compress(sql, 1) if gz else sql)
    session = ["psql", "-X", "--no-password", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-d", name]
    done = subprocess.run(
        [sys.executable, PROGRAM, "--jobs", str(jobs), "--session", json.dumps(session), "--dump", path, *options],
        env={**os.environ, **pg.env},
        capture_output=True,
    )
    return name, done.returncode, done.stdout, done.stderr.decode()


def single(pg, sql: bytes):
    name = pg.create_db(f"kwps_{uuid.uuid4().hex[:8]}")
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d", name],
        input=sql,
        env={**os.environ, **pg.env},
        check=True,
        capture_output=True,
    )
    return name


def same_database(pg, a, b):
    """Schema dump, and every row in heap order as pg_dump -a writes it (sequences' values included)."""
    assert without_restrict(pg_dump(pg, a, "--schema-only")) == without_restrict(pg_dump(pg, b, "--schema-only"))
    assert without_restrict(pg_dump(pg, a, "--data-only")) == without_restrict(pg_dump(pg, b, "--data-only"))


def sorted_rows(sql: bytes) -> dict[str, list[bytes]]:
    """Each table's rows as a COPY block has them, sorted: what is the same whatever order they were loaded in."""
    rows, table, data = {}, None, b""
    for kind, value in parallel_load.events(iter([sql])):
        if kind == "copy":
            table, data = dumps.table_key(dumps.COPY_HEADER_RE.fullmatch(value.decode().strip())["table"]), b""
        elif kind == "data":
            data += bytes(value)
        elif kind == "end":
            rows.setdefault(table, []).extend(data.split(b"\n")[:-2])  # without the `\.` line
    return {t: sorted(r) for t, r in rows.items()}


def rows_in(sql: bytes) -> dict[str, int]:
    """Each COPY block's rows, as the dump has them."""
    counts, table, rows = {}, None, 0
    for kind, value in parallel_load.events(iter([sql])):
        if kind == "copy":
            table, rows = dumps.table_key(dumps.COPY_HEADER_RE.fullmatch(value.decode().strip())["table"]), 0
        elif kind == "data":
            rows += bytes(value).count(b"\n")
        elif kind == "end":
            counts[table] = counts.get(table, 0) + rows - 1
    return counts


@pytest.fixture(scope="module")
def pagila_sql(pg, pagila_db):
    return pg_dump(pg, pagila_db)


@pytest.fixture
def dbs(pg):
    made = []
    yield made
    for name in pg.psql("SELECT datname FROM pg_database WHERE datname LIKE 'kwp_\\_%' ESCAPE '\\'").split():
        pg.drop_db(name)


def loads_like_one_psql_session(pg, sql: bytes, tmp_path):
    """Four sessions load `sql` into what one psql session makes of it: schema, rows, counts, sequences."""
    parallel, code, out, err = load(pg, sql, 4, str(tmp_path), gz=True)
    try:
        assert code == 0, err
        assert "loaded with 4 sessions" in err and "one session" not in err
        reference = single(pg, sql)
        same_database(pg, parallel, reference)
        assert dumps.copy_counts(out) == rows_in(sql)
        sequences = "SELECT string_agg(format('%s %s', sequencename, last_value), ',' ORDER BY 1) FROM pg_sequences"
        assert pg.psql(sequences, parallel) == pg.psql(sequences, reference)
    finally:
        for name in (parallel, locals().get("reference")):
            if name:
                pg.drop_db(name)


def test_pagila_in_four_sessions_equals_one_psql_session(pg, pagila_sql, tmp_path):
    assert pagila_sql.count(b"Type: INDEX ATTACH") > 50 and b"\\restrict " in pagila_sql
    loads_like_one_psql_session(pg, pagila_sql, tmp_path)


def test_a_dump_loading_via_the_partition_root_equals_one_psql_session(pg, pagila_db, tmp_path):
    """pg_dump --load-via-partition-root: each partition's rows are a COPY into the root, in sessions
    side by side; the rows still reach the same partitions in the same order."""
    sql = pg_dump(pg, pagila_db, "--load-via-partition-root")
    assert sql.count(b"\nCOPY public.payment (") > 5 and b"\nCOPY public.payment_p2022_01 " not in sql
    loads_like_one_psql_session(pg, sql, tmp_path)


def test_tablespace_settings_reach_every_session(pg, tmp_path):
    """pg_dump's `SET default_tablespace` before an entry holds in whichever session runs it."""
    location = Path(tempfile.mkdtemp(prefix="kwtest-ts-"))  # the server's user must reach it
    if pg.user:
        shutil.chown(location, pg.user)
    space = f"kwts_{uuid.uuid4().hex[:6]}"
    source = pg.create_db(f"kwpl_{uuid.uuid4().hex[:8]}")
    made = []
    try:
        pg.psql(f"CREATE TABLESPACE {space} LOCATION '{location}'")
        pg.psql(
            f"CREATE TABLE a (id int PRIMARY KEY USING INDEX TABLESPACE {space}, v text) TABLESPACE {space};"
            f"CREATE INDEX a_v ON a (v) TABLESPACE {space}; CREATE TABLE b (id int PRIMARY KEY, v text);"
            "CREATE INDEX b_v ON b (v); INSERT INTO a SELECT i, md5(i::text) FROM generate_series(1, 3000) i;"
            "INSERT INTO b SELECT i, md5(i::text) FROM generate_series(1, 3000) i;",
            source,
        )
        sql = pg_dump(pg, source)
        assert f"SET default_tablespace = {space};".encode() in sql
        name, code, _, err = load(pg, sql, 3, str(tmp_path))
        made.append(name)
        assert code == 0, err
        where = (
            "SELECT string_agg(relname || ':' || coalesce(t.spcname, '-'), ',' ORDER BY relname) FROM pg_class c "
            "LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace WHERE relname IN ('a', 'a_pkey', 'a_v', 'b', "
            "'b_pkey', 'b_v')"
        )
        assert pg.psql(where, name) == f"a:{space},a_pkey:{space},a_v:{space},b:-,b_pkey:-,b_v:-"
    finally:
        for db in [source, *made]:
            pg.drop_db(db)
        pg.psql(f"DROP TABLESPACE IF EXISTS {space}")
        shutil.rmtree(location, ignore_errors=True)


PLAIN = b"""CREATE TABLE t (id int PRIMARY KEY, v text);
COPY public.t (id, v) FROM stdin;
1\tone
2\t\\\\.
\\.
CREATE INDEX t_v ON t (v);
"""


def without_restrict(sql: bytes) -> bytes:
    return b"\n".join(line for line in sql.split(b"\n") if not line.startswith((b"\\restrict", b"\\unrestrict")))


@pytest.mark.parametrize("case", ["no headers", "meta-command", "meta-command amid the data", "unknown post-data"])
def test_what_cannot_be_split_runs_in_one_session_saying_so(pg, pagila_sql, tmp_path, case):
    if case == "no headers":
        sql, says = PLAIN, "loading the rest in one session, in the dump's order: no pg_dump entry header"
    elif case == "meta-command":  # a dump from before \restrict, with a meta-command psql would run
        sql = without_restrict(pagila_sql).replace(
            b"\n--\n-- Data for Name: actor;", b"\n\\set kw 1\n--\n-- Data for Name: actor;", 1
        )
        says = "loading the rest in one session, in the dump's order: a psql meta-command in the dump (\\set kw 1)"
    elif case == "meta-command amid the data":  # other sessions have loaded tables, in transactions still open
        sql = without_restrict(pagila_sql).replace(
            b"\n--\n-- Data for Name: rental;", b"\n\\set kw 1\n--\n-- Data for Name: rental;", 1
        )
        says = "loading the rest in one session, in the dump's order: a psql meta-command in the dump (\\set kw 1)"
    else:
        sql = pagila_sql.replace(b"; Type: TRIGGER; Schema: public;", b"; Type: NEW KIND; Schema: public;", 1)
        says = "the post-data runs in one session, in the dump's order: an entry of type NEW KIND"
    name, code, out, err = load(pg, sql, 4, str(tmp_path))
    try:
        assert code == 0, err
        assert says in err
        reference = single(pg, sql)
        same_database(pg, name, reference)
        assert dumps.copy_counts(out) == rows_in(sql)
    finally:
        pg.drop_db(name)
        if "reference" in locals():
            pg.drop_db(reference)


LONG_ROWS = """
CREATE TABLE long_rows (id int PRIMARY KEY, body text, note text);
INSERT INTO long_rows SELECT i, repeat(md5(i::text), 50000 + i), CASE WHEN i % 2 = 0 THEN E'tab\\there' END
FROM generate_series(1, 12) i;
INSERT INTO long_rows SELECT i, md5(i::text), CASE WHEN i % 3 = 0 THEN E'back\\\\slash\\nnewline' END
FROM generate_series(13, 200000) i;
"""


def test_copy_blocks_cut_where_a_session_lags_load_the_same_rows(pg, pagila_db, tmp_path):
    """With a tiny queue every lagging session's block is cut after a row and goes on in an idle one:
    the rows are those of one psql session's load (in another heap order), the counts the dump's."""
    source = pg.create_db(f"kwpl_{uuid.uuid4().hex[:8]}")
    made = []
    try:
        pg.psql(f"CREATE DATABASE {source}_t TEMPLATE {pagila_db}")  # pagila and rows longer than a read
        made.append(f"{source}_t")
        pg.psql(LONG_ROWS, f"{source}_t")
        sql = pg_dump(pg, f"{source}_t")
        name, code, out, err = load(pg, sql, 3, str(tmp_path), gz=True, options=["--queue-bytes", "1"])
        made.append(name)
        assert code == 0, err
        assert re.search(r"in \d+ COPY statements \(blocks cut where a session lagged\)", err), err
        assert out.count(b"COPY public.long_rows ") >= 10, out  # one for each MiB read, nearly
        reference = single(pg, sql)
        made.append(reference)
        assert without_restrict(pg_dump(pg, name, "--schema-only")) == without_restrict(
            pg_dump(pg, reference, "--schema-only")
        )
        assert sorted_rows(pg_dump(pg, name, "--data-only")) == sorted_rows(pg_dump(pg, reference, "--data-only"))
        assert dumps.copy_counts(out) == rows_in(sql)
        sequences = "SELECT string_agg(format('%s %s', sequencename, last_value), ',' ORDER BY 1) FROM pg_sequences"
        assert pg.psql(sequences, name) == pg.psql(sequences, reference)
    finally:
        for db in [source, *made]:
            pg.drop_db(db)


@pytest.mark.parametrize("damage", ["bad row", "duplicate key", "truncated"])
def test_a_failing_session_or_a_damaged_dump_is_named(pg, pagila_sql, tmp_path, damage):
    gz = False
    if damage == "bad row":
        sql = pagila_sql.replace(b"\n1\tFirst1\tLast1\t", b"\nnot-a-number\tFirst1\tLast1\t", 1)
        code_wanted, says = 1, "loading TABLE DATA public.actor: "
    elif damage == "duplicate key":  # the rows load; the primary key cannot be made
        sql = pagila_sql.replace(b"\n2\tFirst2\tLast2\t", b"\n1\tFirst2\tLast2\t", 1)
        code_wanted, says = 1, "loading CONSTRAINT public.actor actor_pkey: "
    else:
        sql, gz = pagila_sql, True
    name, code, _, err = load(pg, sql, 4, str(tmp_path), gz=gz)
    try:
        if damage == "truncated":
            path = tmp_path / f"{name}.sql.gz"
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            pg.drop_db(name)
            name = pg.create_db(name)
            session = ["psql", "-X", "--no-password", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-d", name]
            done = subprocess.run(
                [sys.executable, PROGRAM, "--jobs", "3", "--session", json.dumps(session), "--dump", str(path)],
                env={**os.environ, **pg.env},
                capture_output=True,
            )
            code, err = done.returncode, done.stderr.decode()
            code_wanted, says = parallel_load.DAMAGED, "decompressing failed: "
        assert code == code_wanted, err
        assert says in err.strip().splitlines()[-1], err
    finally:
        pg.drop_db(name)


def test_a_loader_whose_caller_is_gone_stops_with_its_sessions(pg, pagila_sql, tmp_path):
    """A killed restore or drill (or a dropped ssh link) closes the loader's stdout: it stops its sessions and
    exits, instead of waiting for ever with them on prod."""
    name = pg.create_db(f"kwpl_{uuid.uuid4().hex[:8]}")
    path = tmp_path / "pagila.sql"
    path.write_bytes(pagila_sql)
    session = ["psql", "-X", "--no-password", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-d", name]
    loader = subprocess.Popen(
        [sys.executable, PROGRAM, "--jobs", "2", "--session", json.dumps(session), "--dump", str(path)],
        env={**os.environ, **pg.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert loader.stdout.readline().startswith(b"COPY ")  # loading
    loader.stdout.close()
    try:
        assert loader.wait(30) != 0
    finally:
        loader.kill()
    sessions = subprocess.run(["pgrep", "-f", f"-d {name}$"], capture_output=True, text=True).stdout.split()
    assert not sessions, "psql sessions outlived their loader"


def test_the_stream_splitter_keeps_every_byte_at_any_chunking(pagila_sql):
    """events(): lines outside COPY, COPY data in pieces, the `\\.` line last, at any chunk boundaries."""
    sql = without_restrict(pagila_sql)[:400_000]
    sql = sql[: sql.rindex(b"\n\\.\n") + 4]
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(sql)), 40)) + [len(sql)]
        pieces = [sql[a:b] for a, b in zip([0] + cuts[:-1], cuts, strict=True)]
        seen, copies, data = [], 0, b""
        for kind, value in parallel_load.events(iter(pieces)):
            if kind == "copy":
                copies += 1
                seen.append(value)
            elif kind == "data":
                data += bytes(value)
                seen.append(value)
            elif kind == "end":
                assert data == b"\\.\n" or data.endswith(b"\n\\.\n")
                data = b""
            elif kind == "line":
                seen.append(value)
            else:
                assert value is None
        assert b"".join(seen) == sql
        assert copies == sql.count(b"\nCOPY ")
