"""bin/restore-production-db --table ... --into SCHEMA and --beside: tables added to DB_NAME as a new schema, or
the whole dump restored beside it; nothing of DB_NAME is replaced or changed, byte for byte.

prod is the freshly provisioned server over ssh (conftest `remote_prod`: DB_EXEC=docker there, nothing of kw-backup
on its PATH), DB_NAME a copy of the database the module's dump was made from.
"""

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests import world
from tests.conftest import backup_db_dump
from tests.e2e.test_restore_production_db import run_on_a_terminal, staging_dirs, start_restore, stop, wait_for

READER = 'kw tables "reader"'  # a role whose name needs quotes, granted on the restored tables
STALL = "kw_tables_stall"  # granted in the dump only: a session dropping it holds up a load at its GRANT
ITEMS = 'Ünïcode "items"'


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


SOURCE_SQL = f"""
CREATE TABLE {ident(ITEMS)} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id), label text, doubled bigint GENERATED ALWAYS AS (id * 2) STORED);
INSERT INTO {ident(ITEMS)} (user_id, label) SELECT 1 + i % 300, 'ärger ' || i FROM generate_series(1, 50) i;
GRANT SELECT ON users, orders TO {ident(READER)};
GRANT UPDATE (name) ON users TO {ident(READER)};
GRANT SELECT ON schema_migrations TO {STALL};
"""


@pytest.fixture(scope="module")
def source(pg, tmp_path_factory):
    """The Rails-like database with an identity column, a generated one, names that need quotes and grants, and
    backup-db's dump of it. Then the dump alone grants to STALL, so that a session can drop that role."""
    roles = [ident(READER), STALL]
    pg.psql("; ".join(f"CREATE ROLE {r}" for r in roles))
    name = pg.create_db("kw_tables_source", template="kw_template")
    pg.psql(SOURCE_SQL, name)
    dump = backup_db_dump(tmp_path_factory, pg, name)
    pg.psql(f"REVOKE ALL ON schema_migrations FROM {STALL}", name)
    yield name, dump
    pg.drop_db(name)
    pg.psql("; ".join(f"DROP ROLE {r}" for r in roles))


@pytest.fixture
def live(remote_prod, pg, source):
    """DB_NAME: a copy of the source database, its dump in PROD_DIR on prod; dropped with what runs made of it."""
    name = pg.create_db(f"kw_t{uuid.uuid4().hex[:10]}", template=source[0])
    remote_prod.settings["DB_NAME"] = name
    place_dump(remote_prod, source[1])
    yield name
    for made in pg.psql(f"SELECT datname FROM pg_database WHERE datname LIKE '{name}%'").split():
        pg.drop_db(made)


def place_dump(kw, dump) -> None:
    kw.prod_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for suffix in ("", ".json"):
        shutil.copy(f"{dump}{suffix}", kw.prod_dir / (dump.name + suffix))


def restore(kw, *args: str) -> subprocess.CompletedProcess:
    return kw.run("restore-production-db", "--local", "latest", *args)


def fingerprint(pg, dbname: str, *leaving_out: str) -> str:
    """pg_dump's whole SQL of the database, schema and data, but for the schemas `leaving_out` (and the random
    key of pg_dump's \\restrict lines)."""
    out = subprocess.run(
        ["pg_dump", "--no-password", *(f"--exclude-schema={ident(s)}" for s in leaving_out), dbname],
        env={**os.environ, **pg.env},
        capture_output=True,
        check=True,
    ).stdout
    kept = [line for line in out.splitlines() if not line.startswith((b"\\restrict", b"\\unrestrict"))]
    return hashlib.sha256(b"\n".join(kept)).hexdigest()


def content(pg, dbname: str, table: str) -> str:
    return pg.psql(f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t", dbname)


def copy_back(pg, dbname: str, sql: str) -> None:
    """The SQL a run printed, run as its header says: in one transaction, stopping at the first error."""
    psql = ["psql", "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-d", dbname]
    ran = subprocess.run(psql, input=sql, env={**os.environ, **pg.env}, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr


def beside_name(live: str, dump: Path) -> str:
    """<DB_NAME>_at_<the dump's moment>: backup-db's db-YYYY-MM-DD.sql.gz is of that day's midnight."""
    return f"{live}_at_{dump.name[3:13].replace('-', '')}000000"


def temporary(pg, name: str) -> list[str]:
    return [n for n in pg.psql("SELECT datname FROM pg_database").split() if n.startswith(f"{name}_restore_")]


def catalog(pg, dbname: str, schema: str, sql: str) -> str:
    """A catalog query's rows about `schema` (:'schema' in it: its name, :'oid': its oid), as text."""
    literal = "'" + schema.replace("'", "''") + "'"
    oid = f"(SELECT oid FROM pg_namespace WHERE nspname = {literal})"
    return pg.psql(sql.replace(":'schema'", literal).replace(":'oid'", oid), dbname)


# What a restored table brings: its indexes, constraints (a foreign key with the schema it references), owned
# sequences with their values, grants (table and column), identity and generated columns.
INDEXES = "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE schemaname = :'schema'"
CONSTRAINTS = (
    "SELECT string_agg(format('%s %s %s %s', c.relname, con.conname, con.contype, f.relnamespace::regnamespace), "
    "',' ORDER BY c.relname, con.conname) FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid "
    "LEFT JOIN pg_class f ON f.oid = con.confrelid WHERE c.relnamespace = :'oid'"
)
SEQUENCES = (
    "SELECT string_agg(format('%s %s', sequencename, last_value), ',' ORDER BY sequencename) FROM pg_sequences "
    "WHERE schemaname = :'schema'"
)
GRANTS = (
    "SELECT string_agg(format('%s %s', c.relname, c.relacl), ',' ORDER BY c.relname) FROM pg_class c "
    "WHERE c.relnamespace = :'oid' AND c.relkind IN ('r', 'p', 'S')"
)
COLUMNS = (
    "SELECT string_agg(format('%s.%s %s %s %s', c.relname, a.attname, a.attidentity, a.attgenerated, a.attacl), ',' "
    "ORDER BY c.relname, a.attnum) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
    "WHERE c.relnamespace = :'oid' AND c.relkind = 'r' AND a.attnum > 0"
)


def test_tables_with_a_foreign_key_between_them_come_back_in_a_new_schema(remote_prod, pg, live, source):
    """users, orders (which references users), an identity table with a generated column (which references users
    too) and a table whose names need quotes, into a schema whose name needs them too; then the printed SQL brings
    back what an UPDATE without WHERE and a DELETE took."""
    kw = remote_prod
    into = 'Rëstored "2024"; x'
    names = ["users", "orders", ITEMS, 'Odd "Name" table']
    # The source database, but for the tables not restored: what the new schema must hold, as public holds it.
    expected = pg.create_db(f"{live}_expected", template=source[0])
    pg.psql("DROP TABLE schema_migrations, ar_internal_metadata; DROP SEQUENCE invoice_number_seq", expected)
    before = fingerprint(pg, live)
    result = restore(kw, *(a for n in names for a in ("--table", f"public.{n}")), "--into", into, "--yes")
    assert result.returncode == 0, result.stderr
    assert "left out" not in result.stderr
    assert fingerprint(pg, live, into) == before
    assert not temporary(pg, live) and not staging_dirs()
    for name in names:
        assert content(pg, live, f"{ident(into)}.{ident(name)}") == content(pg, expected, ident(name)), name
    for query in (INDEXES, CONSTRAINTS, SEQUENCES, GRANTS, COLUMNS):
        restored = catalog(pg, live, into, query).replace(f"{ident(into)}", "public")
        assert restored == catalog(pg, expected, "public", query)
    assert "orders_user_id_fkey f public" in catalog(pg, expected, "public", CONSTRAINTS)
    grant = f"SELECT has_column_privilege('{READER}', '{ident(into)}.users', 'name', 'UPDATE')"
    assert pg.psql(grant, live) == "t"

    pg.psql(f"UPDATE users SET name = 'oops'; DELETE FROM {ident(ITEMS)} WHERE id > 20; DELETE FROM orders", live)
    copy_back(pg, live, result.stdout)
    for name in names:
        assert content(pg, live, ident(name)) == content(pg, expected, ident(name)), name


def test_one_table_its_foreign_key_to_a_table_not_restored_left_out_saying_so(remote_prod, pg, live, source):
    """Through kamal, whose pg_dump and psql run here: the copy's pipe is this machine's."""
    kw = remote_prod
    kw.settings["DB_EXEC"] = "kamal"
    before = fingerprint(pg, live)
    planned = restore(kw, "--table", "public.orders", "--into", "restored", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "[dry-run] would restore" in planned.stderr and "nothing of" in planned.stderr
    assert fingerprint(pg, live) == before and not temporary(pg, live)
    result = restore(kw, "--table", "public.orders", "--into", "restored", "--yes")
    assert result.returncode == 0, result.stderr
    assert "left out: the foreign key orders_user_id_fkey of public.orders, to public.users" in result.stderr
    assert fingerprint(pg, live, "restored") == before
    assert content(pg, live, "restored.orders") == content(pg, source[0], "public.orders")
    assert catalog(pg, live, "restored", CONSTRAINTS) == "orders orders_pkey p"
    owned = pg.psql("SELECT last_value FROM orders_id_seq", source[0])
    assert catalog(pg, live, "restored", SEQUENCES) == f"orders_id_seq {owned}"
    assert "INSERT INTO public.orders" in result.stdout and "public.users" not in result.stdout
    dumped = [c for c in world.standin_calls(kw.standin_log) if "pg_dump" in c]
    assert dumped[-1][:5] == ["kamal", "accessory", "exec", "--reuse", "--raw"]
    assert '--schema="restored"' in " ".join(dumped[-1])


def test_refusals_change_nothing(remote_prod, pg, live, source, tmp_path):
    kw = remote_prod
    pg.psql("CREATE SCHEMA taken", live)
    beside = pg.create_db(beside_name(live, source[1]))
    before = fingerprint(pg, live)
    refused = {
        "the schema taken exists already": ["--table", "public.users", "--into", "taken"],
        "not a table of db-": ["--table", "public.users", "--table", "public.nope", "--into", "fresh"],
        f"{beside} exists already on prod": ["--beside"],
        "--stop-app and --drop-previous go with a restore that replaces DB_NAME": ["--beside", "--stop-app"],
    }
    for says, args in refused.items():
        result = restore(kw, *args, "--yes")
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr)
    code, err = run_on_a_terminal(kw, "no", "--local", "latest", "--table", "public.users", "--into", "fresh")
    assert code == 5 and f"This adds the schema fresh to the database {live}" in err and "replaces nothing" in err
    copy = tmp_path / "mine.sql.gz"
    shutil.copy(source[1], copy)
    named = kw.run("restore-production-db", "--from-file", str(copy), "--beside", "--yes")
    assert named.returncode == 2 and "mine.sql.gz has no time in its name and no manifest" in named.stderr
    assert fingerprint(pg, live) == before
    assert not temporary(pg, live) and not staging_dirs()


@pytest.fixture(scope="module")
def pagila_dump(tmp_path_factory, pg, pagila_db):
    return backup_db_dump(tmp_path_factory, pg, pagila_db)


def test_a_partitioned_table_comes_with_its_partitions_and_its_sequence(remote_prod, pg, live, pagila_db, pagila_dump):
    """pagila's payment: partitioned by month, its payment_id drawn from a sequence no table owns, foreign keys to
    customer, staff and rental (not restored), a primary key of two columns."""
    kw = remote_prod
    kw.settings["DB_NAME"] = live = pg.create_db(f"{live}_pagila", template=pagila_db)  # dropped with `live`
    place_dump(kw, pagila_dump)  # over the module's dump, made the same day
    before = fingerprint(pg, live)
    result = restore(kw, "--table", "public.payment", "--into", "restored", "--yes")
    assert result.returncode == 0, result.stderr
    for target in ("customer", "staff", "rental"):  # pagila's are the partitions' own
        key = f"payment_p2022_01_{target}_id_fkey of public.payment_p2022_01, to public.{target}"
        assert f"left out: the foreign key {key}, which is not restored" in result.stderr
    assert fingerprint(pg, live, "restored") == before
    partitions = (
        "SELECT string_agg(format('%s %s', c.relname, pg_get_expr(c.relpartbound, c.oid)), ',' ORDER BY c.relname) "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = '{}.payment'::regclass"
    )
    assert pg.psql(partitions.format("restored"), live) == pg.psql(partitions.format("public"), pagila_db)
    by_partition = (
        "SELECT string_agg(format('%s %s', relname, n), ',' ORDER BY relname) FROM "
        "(SELECT c.relname, count(*) AS n FROM {}.payment p JOIN pg_class c ON c.oid = p.tableoid GROUP BY 1) x"
    )
    assert pg.psql(by_partition.format("restored"), live) == pg.psql(by_partition.format("public"), pagila_db)
    assert catalog(pg, live, "restored", SEQUENCES) == "payment_payment_id_seq " + pg.psql(
        "SELECT last_value FROM payment_payment_id_seq", pagila_db
    )
    default = (
        "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'restored.payment'::regclass AND adnum = 1"
    )
    assert pg.psql(default, live) == "nextval('restored.payment_payment_id_seq'::regclass)"
    assert not temporary(pg, live)

    pg.psql("DELETE FROM payment WHERE amount > 5; UPDATE payment SET amount = 0 WHERE customer_id < 100", live)
    copy_back(pg, live, result.stdout)
    assert content(pg, live, "payment") == content(pg, pagila_db, "payment")


def test_beside_the_whole_dump_is_restored_and_checked_and_db_name_is_untouched(remote_prod, pg, live, source):
    kw = remote_prod
    before = fingerprint(pg, live)
    result = restore(kw, "--beside", "--yes")
    assert result.returncode == 0, result.stderr
    beside = beside_name(live, source[1])
    assert f"restored {beside} beside {live}" in result.stderr and "as the manifest says" in result.stderr
    assert fingerprint(pg, live) == before
    assert pg.row_counts(beside) == json.loads(Path(f"{source[1]}.json").read_text())["tables"]
    assert content(pg, beside, ident(ITEMS)) == content(pg, live, ident(ITEMS))
    assert not temporary(pg, live) and not staging_dirs()


def load_waiting(pg, live: str) -> bool:
    """A session of the load into the temporary database waits for a lock."""
    waiting = "SELECT 1 FROM pg_stat_activity WHERE datname LIKE '{}\\_restore\\_%' AND wait_event_type = 'Lock'"
    return pg.psql(waiting.format(live)) == "1"


def test_killed_in_the_load_db_name_is_as_it_was_and_the_next_run_removes_what_was_left(remote_prod, pg, live, source):
    """kill -9 while the load waits at the dump's GRANT to a role another session is dropping; the next run, even
    one that refuses its table, drops the temporary database. (SIGTERM: test_a_schema_made_meanwhile_...)"""
    kw = remote_prod
    before = fingerprint(pg, live)
    holder = world.HeldTransaction(pg, "postgres", f"DROP ROLE {STALL}")
    try:
        proc = start_restore(kw, "--table", "public.users", "--into", "restored")
        wait_for(lambda: load_waiting(pg, live), 120, "the load to wait at the GRANT")
        stop(proc, "SIGKILL")
        proc.wait(60)
        assert temporary(pg, live)
    finally:
        holder.end("ROLLBACK")
    result = restore(kw, "--table", "public.nope", "--into", "restored", "--yes")
    assert result.returncode == 2 and "not a table of" in result.stderr
    assert "a half-made database left by an interrupted restore" in result.stderr
    assert not temporary(pg, live) and not staging_dirs()
    assert fingerprint(pg, live) == before


def copying(pg, live: str, waiting: bool) -> bool:
    """A run's copy session is on DB_NAME (`waiting`: and waits for a lock)."""
    sessions = (
        f"SELECT 1 FROM pg_stat_activity WHERE datname = '{live}' AND application_name LIKE 'kw-backup tables %'"
        + (" AND wait_event_type = 'Lock'" if waiting else "")
    )
    return pg.psql(sessions) == "1"


def test_a_schema_made_meanwhile_is_never_merged_into(remote_prod, pg, live, source):
    """Another session creates the schema after the check before the load: the copy waits on it. SIGTERM then
    ends the copy on the server too (nothing commits later); when the other session commits, exit 2, and its
    schema holds only its own table."""
    kw = remote_prod
    before = fingerprint(pg, live)
    for how in ("SIGTERM", "COMMIT"):
        holder = world.HeldTransaction(pg, live, "CREATE SCHEMA restored; CREATE TABLE restored.theirs (x int)")
        proc = start_restore(kw, "--table", "public.users", "--into", "restored")
        wait_for(lambda: copying(pg, live, waiting=True), 120, "the copy to wait on the other session")
        if how == "SIGTERM":
            stop(proc, how)
            assert proc.wait(60) == 143, "".join(proc.lines)
            wait_for(lambda: not copying(pg, live, waiting=False), 10, "the copy's session to end on the server")
            holder.end("ROLLBACK")
            assert fingerprint(pg, live) == before
        else:
            holder.end("COMMIT")
            assert proc.wait(60) == 2, "".join(proc.lines)
            assert "the schema restored was created in" in "".join(proc.lines)
            theirs = "SELECT string_agg(relname, ',') FROM pg_class WHERE relnamespace = 'restored'::regnamespace"
            assert pg.psql(theirs, live) == "theirs"
            assert fingerprint(pg, live, "restored") == before
        assert not temporary(pg, live) and not staging_dirs()
