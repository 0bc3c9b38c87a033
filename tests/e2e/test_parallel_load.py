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
    """Schema dump, and every row in heap order as pg_dump -a writes it (sequences' values included, and large
    objects: their contents, owners, comments and grants)."""
    assert without_restrict(pg_dump(pg, a, "--schema-only")) == without_restrict(pg_dump(pg, b, "--schema-only"))
    assert without_restrict(pg_dump(pg, a, "--data-only")) == without_restrict(pg_dump(pg, b, "--data-only"))


def sorted_rows(sql: bytes) -> dict[str, list[bytes]]:
    """Each table's rows as a COPY block has them, sorted: what is the same whatever order they were loaded in."""
    rows, table, data = {}, None, b""
    for kind, value in parallel_load.events(iter([sql])):
        if kind == "copy":
            table, data = parallel_load.copy_target(value), b""
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
            table, rows = parallel_load.copy_target(value), 0
        elif kind == "data":
            rows += bytes(value).count(b"\n")
        elif kind == "end":
            counts[table] = counts.get(table, 0) + rows - 1
    return counts


@pytest.fixture(scope="module")
def pagila_sql(pg, pagila_db):
    return pg_dump(pg, pagila_db)


@pytest.fixture(scope="module")
def zoo_sql(pg, zoo_db):
    return pg_dump(pg, zoo_db)


@pytest.fixture
def dbs(pg):
    made = []
    yield made
    for name in pg.psql("SELECT datname FROM pg_database WHERE datname LIKE 'kwp_\\_%' ESCAPE '\\'").split():
        pg.drop_db(name)


def loads_like_one_psql_session(pg, sql: bytes, tmp_path, jobs=4):
    """`jobs` sessions load `sql` into what one psql session makes of it: schema, rows, counts, sequences."""
    parallel, code, out, err = load(pg, sql, jobs, str(tmp_path), gz=True)
    try:
        assert code == 0, err
        assert f"loaded with {jobs} sessions" in err and "one session" not in err
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


def large_objects_in_the_data(sql: bytes) -> bytes:
    """The dump as pg_dump 17 and newer lay large objects out: their metadata (BLOB METADATA entries, lo_create)
    and comments among the data's entries, not BLOB entries in the pre-data."""
    start = sql.index(b"--\n-- Name: 424242; Type: BLOB;")
    end = sql.index(b"--\n-- Data for Name: ", start)
    metadata = sql[start:end].replace(b"; Type: BLOB;", b"; Type: BLOB METADATA;")
    sql = sql[:start] + sql[end:]
    at = sql.index(b"--\n-- Data for Name: BLOBS;")
    return sql[:at] + metadata + sql[at:]


@pytest.mark.parametrize("jobs", [2, 4])
@pytest.mark.parametrize("dump", ["as backup-db makes it", "--no-owner", "--no-acl", "pg_dump 17's large objects"])
def test_the_schema_zoo_in_parallel_equals_one_psql_session(pg, zoo_db, zoo_sql, tmp_path, dump, jobs):
    """Every entry type of the zoo has its place (issue 22): large objects with comments and grants, NOT VALID
    constraints on a domain, a table and a foreign key, partitions, inheritance, ... load in parallel, nothing
    in one session, into what one psql session makes of the dump."""
    if dump.startswith("--"):
        sql = pg_dump(pg, zoo_db, dump)
    elif dump.startswith("pg_dump 17"):
        sql = large_objects_in_the_data(zoo_sql)
    else:
        sql = zoo_sql
    assert b"; Type: CHECK CONSTRAINT; " in sql and b"\nCOMMENT ON LARGE OBJECT 424242 " in sql
    assert (b"\nGRANT SELECT ON LARGE OBJECT 424242 " in sql) == (dump != "--no-acl")
    loads_like_one_psql_session(pg, sql, tmp_path, jobs)


# The entry types of pg_dump 15 that neither pagila nor the zoo has (PostgreSQL's regression database has them
# too, but is not installed): an event trigger, casts, operators, text search, foreign data, a view in a
# dependency loop (a dummy view, then a RULE entry replaces it), a CHECK that scans its table (dumped apart: its
# function takes the table's row), NOT VALID CHECKs that recurse into inheritance and partition children, a
# foreign key on a partitioned table, CLUSTER and REPLICA IDENTITY, default privileges.
OTHER_KINDS = """
CREATE EXTENSION postgres_fdw;
CREATE SCHEMA extra;
CREATE TABLE extra.ddl_log (id serial PRIMARY KEY, tag text);
CREATE FUNCTION extra.log_ddl() RETURNS event_trigger LANGUAGE plpgsql
    AS $$ BEGIN INSERT INTO extra.ddl_log (tag) VALUES (tg_tag); END $$;
CREATE EVENT TRIGGER log_ddl ON ddl_command_end EXECUTE FUNCTION extra.log_ddl();
COMMENT ON EVENT TRIGGER log_ddl IS 'logs every DDL after it';
CREATE TYPE extra.mood AS ENUM ('sad', 'ok');
CREATE TYPE extra.floatrange AS RANGE (subtype = float8);
CREATE FUNCTION extra.mood_int(extra.mood) RETURNS int LANGUAGE sql IMMUTABLE
    AS $$ SELECT CASE WHEN $1 = 'sad' THEN 0 ELSE 1 END $$;
CREATE CAST (extra.mood AS int) WITH FUNCTION extra.mood_int(extra.mood);
CREATE AGGREGATE extra.total(int) (sfunc = int4pl, stype = int);
CREATE OPERATOR extra.=== (leftarg = int, rightarg = int, procedure = int4eq);
CREATE OPERATOR FAMILY extra.fam USING btree;
CREATE OPERATOR CLASS extra.rev_int_ops FOR TYPE int USING btree FAMILY extra.fam
    AS OPERATOR 1 >, OPERATOR 3 =, OPERATOR 5 <, FUNCTION 1 btint4cmp(int, int);
CREATE CONVERSION extra.conv FOR 'LATIN1' TO 'UTF8' FROM iso8859_1_to_utf8;
CREATE TEXT SEARCH CONFIGURATION extra.cfg (COPY = pg_catalog.english);
CREATE TEXT SEARCH DICTIONARY extra.dict (TEMPLATE = simple);
CREATE TEXT SEARCH TEMPLATE extra.tmpl (LEXIZE = dsimple_lexize, INIT = dsimple_init);
CREATE TEXT SEARCH PARSER extra.prs (START = prsd_start, GETTOKEN = prsd_nexttoken, END = prsd_end,
    LEXTYPES = prsd_lextype);
CREATE ACCESS METHOD heap2 TYPE TABLE HANDLER heap_tableam_handler;
CREATE PROCEDURE extra.proc() LANGUAGE sql AS 'SELECT 1';
CREATE SERVER elsewhere FOREIGN DATA WRAPPER postgres_fdw OPTIONS (dbname 'nowhere');
CREATE USER MAPPING FOR CURRENT_USER SERVER elsewhere;
CREATE FOREIGN TABLE extra.remote (id int) SERVER elsewhere;
ALTER FOREIGN TABLE extra.remote ADD CONSTRAINT remote_id CHECK (id > 0) NOT VALID;
CREATE TABLE extra.items (id int PRIMARY KEY, mood extra.mood, body text NOT NULL);
INSERT INTO extra.items SELECT g, 'ok', md5(g::text) FROM generate_series(1, 300) g;
CREATE INDEX items_body ON extra.items (body text_pattern_ops);
CREATE INDEX items_rev ON extra.items (id extra.rev_int_ops);
COMMENT ON INDEX extra.items_rev IS 'reversed';
ALTER TABLE extra.items CLUSTER ON items_body;
CREATE UNIQUE INDEX items_body_key ON extra.items (body);
ALTER TABLE extra.items REPLICA IDENTITY USING INDEX items_body_key;
CREATE FUNCTION extra.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER items_touch BEFORE UPDATE ON extra.items FOR EACH ROW EXECUTE FUNCTION extra.touch();
ALTER TABLE extra.items DISABLE TRIGGER items_touch;
CREATE RULE items_kept AS ON DELETE TO extra.items DO INSTEAD NOTHING;
CREATE VIEW extra.looped AS SELECT 1 AS n;
CREATE FUNCTION extra.looped_n() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT n FROM extra.looped; END;
CREATE OR REPLACE VIEW extra.looped AS SELECT extra.looped_n() * 0 + 1 AS n;
CREATE TABLE extra.rows_checked (id int);
INSERT INTO extra.rows_checked VALUES (1), (2);
CREATE FUNCTION extra.row_ok(extra.rows_checked) RETURNS bool LANGUAGE sql IMMUTABLE
    BEGIN ATOMIC SELECT ($1).id > 0; END;
ALTER TABLE extra.rows_checked ADD CONSTRAINT rows_checked_ok CHECK (extra.row_ok(rows_checked.*));
CREATE TABLE extra.a (x int);
CREATE TABLE extra.b (y int);
CREATE TABLE extra.ab (z int) INHERITS (extra.a, extra.b);
INSERT INTO extra.ab VALUES (-1, 2, 3);
ALTER TABLE extra.a ADD CONSTRAINT a_x_positive CHECK (x > 0) NOT VALID;
CREATE TABLE extra.keys (id int PRIMARY KEY);
INSERT INTO extra.keys VALUES (1), (2);
CREATE TABLE extra.parts (id int, k int) PARTITION BY LIST (k);
CREATE TABLE extra.parts_1 PARTITION OF extra.parts FOR VALUES IN (1);
CREATE TABLE extra.parts_2 PARTITION OF extra.parts FOR VALUES IN (2);
INSERT INTO extra.parts VALUES (1, 1), (-2, 2);
ALTER TABLE extra.parts ADD CONSTRAINT parts_id_positive CHECK (id > 0) NOT VALID;
ALTER TABLE extra.parts ADD CONSTRAINT parts_k_fkey FOREIGN KEY (k) REFERENCES extra.keys (id);
ALTER DEFAULT PRIVILEGES IN SCHEMA extra GRANT SELECT ON TABLES TO PUBLIC;
CREATE PUBLICATION extra_tables FOR TABLES IN SCHEMA extra;
"""


def test_every_other_kind_of_entry_loads_in_parallel_as_one_psql_session_does(pg, tmp_path):
    source = pg.create_db(f"kwpl_{uuid.uuid4().hex[:8]}")
    try:
        pg.psql(OTHER_KINDS, source)
        sql = pg_dump(pg, source)
        for kind in (b"EVENT TRIGGER", b"RULE", b"CAST", b"OPERATOR CLASS", b"SERVER", b"CHECK CONSTRAINT"):
            assert b"; Type: " + kind + b"; " in sql, kind
        assert b"\nALTER TABLE extra.rows_checked\n    ADD CONSTRAINT rows_checked_ok CHECK " in sql
        loads_like_one_psql_session(pg, sql, tmp_path, jobs=3)
    finally:
        pg.drop_db(source)


PLAIN = b"""CREATE TABLE t (id int PRIMARY KEY, v text);
COPY public.t (id, v) FROM stdin;
1\tone
2\t\\\\.
\\.
CREATE INDEX t_v ON t (v);
"""


def without_restrict(sql: bytes) -> bytes:
    return b"\n".join(line for line in sql.split(b"\n") if not line.startswith((b"\\restrict", b"\\unrestrict")))


@pytest.mark.parametrize(
    "case",
    [
        "no headers",
        "meta-command",
        "meta-command amid the data",
        "unknown post-data",
        "a constraint rewritten",
        "rows after the post-data",
    ],
)
def test_what_cannot_be_split_runs_in_one_session_saying_so(pg, pagila_sql, zoo_sql, tmp_path, case):
    """SQL pg_dump did not write (a file edited by hand) runs in the dump's order in one session, which says why."""
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
    elif case == "unknown post-data":
        sql = pagila_sql.replace(b"; Type: TRIGGER; Schema: public;", b"; Type: NEW KIND; Schema: public;", 1)
        says = "the post-data runs in one session, in the dump's order: an entry of type NEW KIND"
    elif case == "a constraint rewritten":  # on one line: not pg_dump's
        sql = zoo_sql.replace(b"ALTER TABLE public.readings\n    ADD", b"ALTER TABLE public.readings ADD")
        says = (
            "the post-data runs in one session, in the dump's order: a constraint it cannot read "
            "(CHECK CONSTRAINT public.readings readings_reading_positive)"
        )
    else:  # a table's data moved to the end
        start = zoo_sql.index(b"--\n-- Data for Name: marker;")
        end = zoo_sql.index(b"--\n", zoo_sql.index(b"\n\\.\n", start))
        sql = zoo_sql[:start] + zoo_sql[end:] + zoo_sql[start:end]
        says = "loading the rest in one session, in the dump's order: a COPY outside a TABLE DATA entry (COPY "
        says += "public.marker  FROM stdin;)"
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
        # How many cuts depends on when a session idles (fewer on a loaded machine): at least one of long_rows.
        assert out.count(b"COPY public.long_rows ") >= 2, out
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
