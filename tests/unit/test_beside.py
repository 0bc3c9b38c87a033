"""beside.py's pure parts: the options, the moment a dump's data is from, which tables a dump's schema part
declares, the copy's pipe, and the SQL that copies rows back."""

import json
import subprocess
from datetime import UTC, datetime, timedelta, timezone

import pytest

from kwbackup import beside
from kwbackup.errors import UsageError
from kwbackup.sources import Source


@pytest.mark.parametrize(
    "tables, into, flags, says",
    [
        (["public.users"], None, {}, "--table and --into go together"),
        (None, "restored", {}, "--table and --into go together"),
        (["public.users"], "restored", {"beside": True}, "--beside restores the whole database"),
        (["public.users"], "restored", {"stop_app": True}, "--stop-app and --drop-previous go with"),
        (None, None, {"beside": True, "drop_previous": True}, "--stop-app and --drop-previous go with"),
        (["users"], "restored", {}, "'users' is not SCHEMA.NAME"),
        (["public.users"], "", {}, "a schema name has 1 to 63 bytes"),
        (["public.users"], "ü" * 32, {}, "a schema name has 1 to 63 bytes"),
        (["public.users"], "pg_restored", {}, "names beginning pg_ are PostgreSQL's own"),
        (["public.users"], "re\nstored", {}, "a control character"),
    ],
)
def test_options_that_do_not_go_together_are_usage_errors(tables, into, flags, says):
    options = {"beside": False, "stop_app": False, "drop_previous": False, **flags}
    with pytest.raises(UsageError, match=says):
        beside.check_options(tables, into, options["beside"], options["stop_app"], options["drop_previous"])


@pytest.mark.parametrize("into", ['Rëstored "2024"; x', "ü" * 31 + "x", "x.y"])
def test_any_name_postgresql_keeps_whole_is_a_schema_name(into):
    beside.check_options(["public.users", 'odd.Odd "Name" table'], into, False, False, False)
    beside.check_options(None, None, True, False, False)


def test_the_moment_of_a_dump_is_the_time_in_its_name_in_utc():
    assert beside.moment_of(Source("--local", name="db-2024-01-15-023001.sql.gz.age")) == datetime(
        2024, 1, 15, 2, 30, 1, tzinfo=UTC
    )
    assert beside.beside_name(
        "kw_app_production", datetime(2024, 1, 15, 3, 30, 1, tzinfo=timezone(timedelta(hours=1)))
    ) == ("kw_app_production_at_20240115023001")


def test_a_file_named_otherwise_takes_its_manifests_created_at_else_none(tmp_path):
    dump = tmp_path / "mine.sql.gz"
    dump.write_bytes(b"")
    source = Source("--from-file", path=str(dump), name=dump.name)
    assert beside.moment_of(source) is None
    manifest = {"file": dump.name, "bytes": 0, "sha256": "0" * 64, "created_at": "2024-01-15T02:00:07Z", "tables": {}}
    manifest.update(database="kw", server_version="15.8", pg_dump_version="15.8")
    (tmp_path / "mine.sql.gz.json").write_text(json.dumps(manifest))
    assert beside.moment_of(source) == datetime(2024, 1, 15, 2, 0, 7, tzinfo=UTC)


HEAD = b"""
--
-- Name: payment; Type: TABLE; Schema: public; Owner: postgres
--
-- Name: a.b; Type: TABLE; Schema: odd; Owner: -
--
-- Name: users_id_seq; Type: SEQUENCE; Schema: public; Owner: postgres
"""


def test_the_tables_a_dumps_schema_part_declares():
    keys = ["public.payment", "odd.a.b", "public.users_id_seq", "public.nope", "odd.a"]
    assert beside.not_in_dump(keys, HEAD) == ["public.users_id_seq", "public.nope", "odd.a"]


def copy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", beside.COPY_SCRIPT, "sh", *args], capture_output=True, text=True)


def test_the_copy_sends_its_last_sql_only_when_the_dump_ended_well():
    """$3 words are the dump's command, the rest the loader's, each word whole whatever it holds."""
    done = copy("BEGIN;", "COMMIT;", "3", "printf", "%s|%s\\n", "a b 'c'", "sh", "-c", 'cat; echo "$0"', "x y")
    assert done.returncode == 0 and done.stdout == "BEGIN;\na b 'c'|\nCOMMIT;\nx y\n"
    cut = copy("BEGIN;", "COMMIT;", "3", "sh", "-c", "echo partial; exit 1", "cat")
    assert cut.returncode == 0 and cut.stdout == "BEGIN;\npartial\n"


def test_a_table_comes_after_those_it_references_and_a_cycle_keeps_its_order():
    refs = [["orders", "users"], ["items", "orders"], ["users", "users"], ["a", "b"], ["b", "a"], ["x", "gone"]]
    assert beside.referenced_first(["items", "orders", "users", "b", "a", "x"], refs) == [
        "users",
        "orders",
        "items",
        "a",
        "b",
        "x",
    ]


def table(**given) -> dict:
    found = {
        "name": "orders",
        "key": "public.orders",
        "label": "'public.orders'",
        "restored": '"Rë ""x""".orders',
        "live": "public.orders",
        "live_schema": "public",
        "exists": True,
        "pk": ["id"],
        "columns": [["id", False], ["total", False]],
    }
    return {**found, **given}


def test_the_copy_back_sql_by_primary_key():
    sql = beside.copy_back_sql("kw", "kw-backup: public.orders of db-x.sql.gz", '"Rë ""x"""', [table()])
    restored = '"Rë ""x""".orders'
    assert (
        f"INSERT INTO public.orders (id, total)\nSELECT r.id, r.total FROM {restored} r "
        "WHERE NOT EXISTS (SELECT 1 FROM public.orders l WHERE l.id = r.id);"
    ) in sql
    assert (
        f"UPDATE public.orders l SET (total) = ROW(r.total)\nFROM {restored} r "
        "WHERE l.id = r.id AND ROW(l.total)::text IS DISTINCT FROM ROW(r.total)::text;"
    ) in sql
    assert '-- When done: DROP SCHEMA "Rë ""x""" CASCADE;' in sql


def test_an_identity_generated_always_is_inserted_overriding_and_never_updated():
    sql = beside.copy_back_sql(
        "kw", "c", "s", [table(pk=["id"], columns=[["id", True], ["total", False], ["n", True]])]
    )
    assert "INSERT INTO public.orders (id, total, n) OVERRIDING SYSTEM VALUE" in sql
    assert "SET (total) = ROW(r.total)" in sql


def test_without_a_primary_key_or_a_live_table_the_sql_says_what_to_do_by_hand():
    no_key = beside.copy_back_sql("kw", "c", "s", [table(pk=None)])
    assert "INSERT INTO" not in no_key and "UPDATE public" not in no_key
    assert '-- SELECT id, total FROM "Rë ""x""".orders EXCEPT ALL SELECT id, total FROM public.orders;' in no_key
    gone = beside.copy_back_sql("kw", "c", "s", [table(exists=False, columns=None)])
    assert '-- ALTER TABLE "Rë ""x""".orders SET SCHEMA public;' in gone and "SELECT" not in gone


def test_a_name_with_a_line_break_stays_inside_its_comment():
    sql = beside.copy_back_sql("kw", "c", "s", [table(key="public.a\nDROP TABLE users;", exists=False, columns=None)])
    assert "\nDROP TABLE users;" not in sql
