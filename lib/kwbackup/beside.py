"""Restores that replace nothing: chosen tables into a new schema of DB_NAME, or the whole dump beside it.

Both go the safe way of restore.py (the dump verified, loaded into <DB_NAME>_restore_<ts>, every table's
rows checked) and never swap. `--table ... --into SCHEMA` then moves the tables into SCHEMA inside that
temporary database (ALTER TABLE ... SET SCHEMA carries indexes, constraints, owned sequences, triggers and
grants; partitions and inheritance children come along; foreign keys to tables left behind are dropped there)
and copies SCHEMA into DB_NAME in one transaction, which commits only after pg_dump ended well and every
table's rows equal the dump's; the temporary database is dropped whatever happens. `--beside` renames the
checked database to <DB_NAME>_at_<YYYYMMDDHHMMSS>, the moment its data is from (UTC).
"""

from __future__ import annotations

import json
import unicodedata
from datetime import UTC, datetime

from . import catalog, cli, dumps, names, restore, sources, staging
from .database import Database
from .errors import Failed, KwError, UsageError, VerificationError
from .log import dry, log
from .run import Cmd, run
from .settings import Settings
from .sources import Source

NAMEDATALEN = 63  # PostgreSQL's longest identifier, in bytes: a longer one would be cut, not refused

# The chosen tables (`schema.table` as manifests name them, a JSON array in :'keys') and every table that
# inherits from them: a partitioned table's rows are its partitions'.
MEMBERS = """
WITH RECURSIVE tree AS (
  SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND n.nspname || '.' || c.relname IN (SELECT jsonb_array_elements_text(:'keys'::jsonb))
  UNION
  SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid
)
SELECT oid FROM tree
"""

# In the temporary database, before anything moves: how each key resolves, whether SCHEMA is free there,
# the members, the foreign keys that will be left out and those among the members.
PLAN = f"""
WITH members AS (
  SELECT c.oid, n.nspname, c.relname, c.relkind
  FROM ({MEMBERS}) m JOIN pg_class c ON c.oid = m.oid JOIN pg_namespace n ON n.oid = c.relnamespace
)
SELECT jsonb_build_object(
  'matches', (SELECT jsonb_object_agg(k, (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                         WHERE c.relkind IN ('r', 'p') AND n.nspname || '.' || c.relname = k))
              FROM jsonb_array_elements_text(:'keys'::jsonb) k),
  'schema_taken', EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = :'into'),
  'members', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'key', nspname || '.' || relname, 'schema', nspname, 'name', relname, 'kind', relkind,
                'restored', format('%I.%I', :'into', relname),
                'root', NOT EXISTS (SELECT 1 FROM pg_inherits i JOIN members p ON p.oid = i.inhparent
                                    WHERE i.inhrelid = members.oid)) ORDER BY nspname, relname), '[]')
              FROM members),
  'clashes', (SELECT coalesce(jsonb_agg(relname), '[]')
              FROM (SELECT relname FROM members GROUP BY relname HAVING count(*) > 1) same),
  -- A partition's foreign keys come from its parent's: only the topmost one among the members is named.
  'left_out', (SELECT coalesce(jsonb_agg(jsonb_build_array(con.conname, a.nspname || '.' || a.relname,
                                                           fn.nspname || '.' || f.relname)
                                ORDER BY a.nspname, a.relname, con.conname), '[]')
               FROM pg_constraint con JOIN members a ON a.oid = con.conrelid
               JOIN pg_class f ON f.oid = con.confrelid JOIN pg_namespace fn ON fn.oid = f.relnamespace
               WHERE con.contype = 'f' AND con.confrelid NOT IN (SELECT oid FROM members)
                 AND NOT EXISTS (SELECT 1 FROM pg_constraint up JOIN members u ON u.oid = up.conrelid
                                 WHERE up.oid = con.conparentid)),
  'references', (SELECT coalesce(jsonb_agg(jsonb_build_array(a.relname, b.relname)), '[]')
                 FROM pg_constraint con JOIN members a ON a.oid = con.conrelid JOIN members b ON b.oid = con.confrelid
                 WHERE con.contype = 'f' AND con.conparentid = 0)
);
"""

# In the temporary database: the members moved into the new schema :'into'. The generated statements name
# relations as regclass prints them with an empty search_path: schema-qualified, quoted by the server.
MOVE = f"""
SET search_path = '';
BEGIN;
CREATE TEMP TABLE kw_members ON COMMIT DROP AS {MEMBERS};
-- A foreign key with one end among the members and the other outside (a partition's, through the topmost
-- constraint of its family) goes: copied, it would tie DB_NAME's own tables to the restored ones.
WITH RECURSIVE family AS (
  SELECT oid, oid AS top FROM pg_constraint WHERE contype = 'f' AND conparentid = 0
  UNION ALL
  SELECT c.oid, family.top FROM pg_constraint c JOIN family ON c.conparentid = family.oid
)
SELECT DISTINCT format('ALTER TABLE %s DROP CONSTRAINT %I', top.conrelid::regclass, top.conname)
FROM family JOIN pg_constraint c ON c.oid = family.oid JOIN pg_constraint top ON top.oid = family.top
WHERE (c.conrelid IN (SELECT oid FROM pg_temp.kw_members)) <> (c.confrelid IN (SELECT oid FROM pg_temp.kw_members))
\\gexec
-- A member whose parent stays behind is detached (a partition) or cut loose (inheritance): copied as it is,
-- it would be attached to DB_NAME's own table.
SELECT format(CASE WHEN c.relispartition THEN 'ALTER TABLE %1$s DETACH PARTITION %2$s'
                   ELSE 'ALTER TABLE %2$s NO INHERIT %1$s' END, i.inhparent::regclass, i.inhrelid::regclass)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhrelid IN (SELECT oid FROM pg_temp.kw_members) AND i.inhparent NOT IN (SELECT oid FROM pg_temp.kw_members)
\\gexec
SELECT format('CREATE SCHEMA %I', :'into')
\\gexec
SELECT format('COMMENT ON SCHEMA %I IS %L', :'into', :'comment')
\\gexec
-- A sequence a member's default draws on that no table owns (pagila's kind) goes along, so the restored
-- tables never draw on DB_NAME's; owned ones move with their table.
SELECT DISTINCT format('ALTER SEQUENCE %s SET SCHEMA %I', s.oid::regclass, :'into')
FROM pg_attrdef a JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = a.oid
JOIN pg_class s ON s.oid = d.refobjid AND d.refclassid = 'pg_class'::regclass AND s.relkind = 'S'
WHERE a.adrelid IN (SELECT oid FROM pg_temp.kw_members)
  AND NOT EXISTS (SELECT 1 FROM pg_depend o WHERE o.classid = 'pg_class'::regclass AND o.objid = s.oid
                  AND o.refclassid = 'pg_class'::regclass AND o.deptype IN ('a', 'i'))
\\gexec
SELECT format('ALTER TABLE %s SET SCHEMA %I', oid::regclass, :'into') FROM pg_temp.kw_members
\\gexec
COMMIT;
"""

# $1: SQL sent before pg_dump's, $2: SQL sent after it, $3: how many of the arguments after $3 are pg_dump's
# command; the rest are psql's. $2 (which ends in COMMIT) reaches psql only when pg_dump ended well, so a cut
# stream never commits: psql's session ends inside its transaction and the server rolls it back.
COPY_SCRIPT = r"""
first=$1 last=$2 n=$3
shift 3
total=$#
dump() {
  i=0
  for a in "$@"; do i=$((i + 1)); if [ "$i" -le "$n" ]; then set -- "$@" "$a"; fi; done
  shift "$total"
  "$@"
}
load() { shift "$n"; exec "$@"; }
{ printf '%s\n' "$first"; dump "$@" && printf '%s\n' "$last"; } | load "$@"
"""
COPY_FIRST = "SET application_name = :'kw_app';\nBEGIN;\n"
# After pg_dump's SQL (its search_path is empty): every copied table's own rows against :'kw_expected'
# (the dump's), inside the transaction, so a wrong count commits nothing.
COUNTS_DIFFER = "kw-backup: copied row counts differ from the dump"
COPY_LAST = f"""
SET LOCAL kw.expected TO :'kw_expected';
SET LOCAL kw.schema TO :'kw_into';
DO $check$
DECLARE
  item record;
  found bigint;
  wrong text;
BEGIN
  FOR item IN SELECT e.key AS t, e.value::bigint AS n
              FROM pg_catalog.jsonb_each_text(pg_catalog.current_setting('kw.expected')::jsonb) e LOOP
    EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM ONLY %I.%I', pg_catalog.current_setting('kw.schema'),
                              item.t) INTO found;
    IF found <> item.n THEN
      wrong := pg_catalog.concat_ws(', ', wrong, pg_catalog.format('%s (%s rows, expected %s)', item.t, found, item.n));
    END IF;
  END LOOP;
  IF wrong IS NOT NULL THEN
    RAISE EXCEPTION '{COUNTS_DIFFER}: %', wrong;
  END IF;
END
$check$;
COMMIT;
"""
# In DB_NAME: whether the schema :'into' is there, and whether it is this run's (its comment names :'token').
COPIED = """
SELECT CASE WHEN strpos(coalesce(obj_description(oid, 'pg_namespace'), ''), :'token') > 0 THEN 'ours' ELSE 'other'
       END FROM pg_namespace WHERE nspname = :'into';
"""
# Ends this run's copy session on DB_NAME (prod's psql outlives a dropped link): it must not commit later.
STOP = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :'app' "
    "AND datname = :'name' AND pid <> pg_backend_pid();\n"
)
# In DB_NAME after the copy, for each restored table that is no member's child (:'tables': name, schema):
# the names as the server quotes them, the primary key and the columns both copies have (not generated ones),
# each with whether DB_NAME's is an identity GENERATED ALWAYS.
COPY_BACK = """
SELECT jsonb_build_object('schema', quote_ident(:'into'), 'tables', coalesce(jsonb_agg(jsonb_build_object(
  'name', t.name,
  'key', t.schema || '.' || t.name,
  'label', quote_literal(t.schema || '.' || t.name),
  'restored', format('%I.%I', :'into', t.name),
  'live', format('%I.%I', t.schema, t.name),
  'live_schema', quote_ident(t.schema),
  'exists', l.oid IS NOT NULL,
  'pk', (SELECT jsonb_agg(quote_ident(a.attname) ORDER BY k.i)
         FROM pg_constraint p, unnest(p.conkey) WITH ORDINALITY k(attnum, i), pg_attribute a
         WHERE p.conrelid = r.oid AND p.contype = 'p' AND a.attrelid = r.oid AND a.attnum = k.attnum),
  'columns', (SELECT jsonb_agg(jsonb_build_array(quote_ident(a.attname), la.attidentity = 'a') ORDER BY a.attnum)
              FROM pg_attribute a JOIN pg_attribute la ON la.attrelid = l.oid AND la.attname = a.attname
                AND la.attnum > 0 AND NOT la.attisdropped AND la.attgenerated = ''
              WHERE a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '')
)), '[]'))
FROM jsonb_to_recordset(:'tables'::jsonb) AS t(name text, schema text)
JOIN pg_class r ON r.relname = t.name AND r.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = :'into')
LEFT JOIN (pg_class l JOIN pg_namespace ln ON ln.oid = l.relnamespace)
  ON ln.nspname = t.schema AND l.relname = t.name AND l.relkind IN ('r', 'p');
"""
RENAME = "SELECT format('ALTER DATABASE %I RENAME TO %I', :'new', :'beside')\n\\gexec\n"
DATABASE_EXISTS = "SELECT 1 FROM pg_database WHERE datname = :'name';\n"
SCHEMA_EXISTS = "SELECT 1 FROM pg_namespace WHERE nspname = :'into';\n"


def check_options(
    tables: list[str] | None, into: str | None, beside: bool, stop_app: bool, drop_previous: bool
) -> None:
    """restore-production-db's --table/--into/--beside against each other and the flags of a replacing restore."""
    if bool(tables) != (into is not None):
        raise UsageError("--table and --into go together", "--table SCHEMA.NAME [--table ...] --into NEW_SCHEMA")
    if beside and tables:
        raise UsageError("--beside restores the whole database: it does not go with --table/--into")
    if (tables or beside) and (stop_app or drop_previous):
        raise UsageError(
            "--stop-app and --drop-previous go with a restore that replaces DB_NAME",
            "--table and --beside replace nothing: leave them out",
        )
    for key in tables or []:
        if "." not in key:
            raise UsageError(
                f"--table {key!r} is not SCHEMA.NAME", "name it as list-backups --tables does: public.orders"
            )
    if into is not None:
        _check_schema_name(into)


def _check_schema_name(into: str) -> None:
    if not into or len(into.encode()) > NAMEDATALEN:
        raise UsageError(f"--into {into!r}: a schema name has 1 to {NAMEDATALEN} bytes")
    if into.startswith("pg_"):
        raise UsageError(f"--into {into!r}: names beginning pg_ are PostgreSQL's own", "choose another name")
    if any(unicodedata.category(ch) == "Cc" for ch in into):
        raise UsageError(f"--into {into!r}: a control character in a schema name", "choose another name")


def moment_of(source: Source) -> datetime | None:
    """When a dump's data is from, in UTC: the time in its name, else (a --from-file path named otherwise) its
    manifest's created_at; None without either."""
    parsed = names.parse(source.name)
    if parsed:
        return parsed.when
    raw = sources.manifest_bytes(source) if source.option == "--from-file" else None
    if raw is None:
        return None
    created = datetime.fromisoformat(dumps.Manifest.from_json(raw, source.name + names.MANIFEST_SUFFIX).created_at)
    return created.astimezone(UTC) if created.tzinfo else created.replace(tzinfo=UTC)


def beside_name(name: str, moment: datetime) -> str:
    return f"{name}_at_{moment.astimezone(UTC):%Y%m%d%H%M%S}"


def restore_beside(
    settings: Settings,
    source: Source,
    *,
    yes: bool,
    dry_run: bool,
    moment: datetime | None = None,
    keep_as: str | None = None,
) -> None:
    """restore-production-db --beside: the whole dump restored and checked as <DB_NAME>_at_<moment>, beside
    DB_NAME, which is not touched. `moment` (--at's target, timezone-aware) names it; else the dump's own
    (moment_of)."""
    with restore.on_prod(settings, source) as op:
        at = moment or moment_of(source)
        if at is None:
            raise UsageError(
                f"--beside: {source.name} has no time in its name and no manifest, so the restored database "
                "cannot be named for the moment its data is from",
                "rename the file db-YYYY-MM-DD-HHMMSS.sql.gz for when it was dumped (UTC), then run again",
            )
        beside = beside_name(op.name, at)
        if op.db.sql(DATABASE_EXISTS, name=beside):
            raise UsageError(f"{beside} exists already on prod", f"drop it first (DROP DATABASE {beside}) if it can go")
        with restore.verified(settings, op, source, dry_run=dry_run, keep_as=keep_as) as (dump, target):
            if dry_run:
                dry(
                    "would restore %s into %s, check its row counts, then rename it %s; %s is not touched",
                    dump.name,
                    op.new,
                    beside,
                    op.name,
                )
                return
            restore.confirm(
                op.name,
                yes,
                f"This adds the database {beside} beside {op.name} and replaces nothing. Type {op.name} to go on: ",
            )
            renamed = False
            try:
                restore.load_checked(settings, op, dump, restore.expected_size(dump, target))
                _rename(op, beside)
                renamed = True
            finally:
                if not renamed:
                    _drop_temporary(op)
            log.info("restored %s beside %s, which is as it was", beside, op.name)


def _rename(op: restore.OnProd, beside: str) -> None:
    """The checked database renamed in one statement; a name taken meanwhile is exit 2 with nothing added."""
    try:
        op.db.sql(RENAME, new=op.new, beside=beside)
    except Failed as exc:
        if op.db.sql(DATABASE_EXISTS, name=beside) and op.db.sql(DATABASE_EXISTS, name=op.new):
            raise UsageError(
                f"{beside} was created on prod meanwhile; nothing was added", "drop it if it can go, then run again"
            ) from exc
        raise


def _drop_temporary(op: restore.OnProd) -> None:
    """The temporary database dropped, a stop signal held off until it is."""
    with cli.shielded():
        restore.drop_scratch(op.db, op.new, f"dropped the temporary database {op.new}")


def restore_tables(
    settings: Settings,
    source: Source,
    tables: list[str],
    into: str,
    *,
    yes: bool,
    dry_run: bool,
    moment: datetime | None = None,
    keep_as: str | None = None,
) -> None:
    """restore-production-db --table ... --into SCHEMA: those tables (`schema.table` as manifests name them)
    added to DB_NAME as the new schema `into`, nothing else of DB_NAME touched; then the SQL that compares and
    copies rows back, on stdout. `moment` (--at's target) is noted in the schema's comment."""
    keys = list(dict.fromkeys(tables))
    with restore.on_prod(settings, source) as op:
        _check_live(op, into)
        with restore.verified(settings, op, source, dry_run=dry_run, keep_as=keep_as) as (dump, target):
            _check_in_dump(op, dump, keys)
            if dry_run:
                dry(
                    "would restore %s into %s, check its row counts, move %s (with their partitions) into a new "
                    "schema %s there, copy it into %s in one transaction, check its row counts and drop %s; "
                    "nothing of %s is replaced",
                    dump.name,
                    op.new,
                    ", ".join(keys),
                    into,
                    op.name,
                    op.new,
                    op.name,
                )
                return
            restore.confirm(
                op.name,
                yes,
                f"This adds the schema {into} to the database {op.name} (the tables {', '.join(keys)} of "
                f"{dump.name}) and replaces nothing. Type {op.name} to go on: ",
            )
            at = moment or moment_of(source)
            comment = f"kw-backup: {', '.join(keys)} of {dump.name}" + (
                f" (data of {at.astimezone(UTC):%F %T} UTC)" if at else ""
            )
            try:
                restore.load_checked(settings, op, dump, restore.expected_size(dump, target))
                members = _move(op, keys, into, f"{comment}, restored through {op.new}")
                _copy(settings, op, into, _expected(op, dump, into, members))
            finally:
                _drop_temporary(op)
            _print_copy_back(op, into, comment, members)


def _check_live(op: restore.OnProd, into: str) -> None:
    """DB_NAME there, SCHEMA not (both exit 2), before anything is done."""
    if not op.db.sql(DATABASE_EXISTS, name=op.name):
        raise UsageError(f"{op.name} does not exist on prod: there is nothing to add tables to", "restore it whole")
    if op.db.sql(SCHEMA_EXISTS, op.name, into=into):
        raise UsageError(f"the schema {into} exists already in {op.name}", "choose another --into; nothing was changed")


def _check_in_dump(op: restore.OnProd, dump: staging.Staged, keys: list[str]) -> None:
    """Each key a table of the dump (exit 2 naming those that are not), before anything is loaded: its manifest's
    tables, else (a partitioned table has no rows of its own, a dump may have no manifest) its schema part."""
    unsure = [k for k in keys if k not in (dump.tables or {})]
    if not unsure:
        return
    _, head, _ = run(
        op.prod.script(staging.HEAD_SCRIPT, dump.path, str(staging.HEAD_LIMIT), name="read the dump's schema"),
        timeout=600,
    )
    missing = not_in_dump(unsure, head) if len(head) < staging.HEAD_LIMIT else []  # cut short: the load tells
    if missing:
        raise UsageError(f"not a table of {dump.name}: {', '.join(missing)}", "list-backups --tables names them")


def not_in_dump(keys: list[str], head: bytes) -> list[str]:
    """The keys (`schema.table`) that no table entry of pg_dump's schema part declares (its `-- Name: table;
    Type: TABLE; Schema: schema;` lines: either side of any dot may be the schema's)."""
    text = head.decode(errors="replace")

    def declared(key: str) -> bool:
        return any(
            f"\n-- Name: {key[i + 1 :]}; Type: TABLE; Schema: {key[:i]}; " in text
            for i, c in enumerate(key)
            if c == "."
        )

    return [k for k in keys if not declared(k)]


def _json(db: Database, script: str, dbname: str, **variables: str):
    return json.loads(db.sql(script, dbname, **variables)[0][0])


def _move(op: restore.OnProd, keys: list[str], into: str, comment: str) -> dict:
    """The tables moved into `into` in the temporary database; the plan (members, foreign keys)."""
    plan = _json(op.db, PLAN, op.new, keys=json.dumps(keys), into=into)
    missing = [k for k in keys if plan["matches"][k] == 0]
    if missing:
        raise UsageError(f"not a table of the dump: {', '.join(missing)}", "list-backups --tables names them")
    ambiguous = [k for k in keys if plan["matches"][k] > 1]
    if ambiguous:
        raise UsageError(
            f"names more than one table of the dump (a dot in a schema's or table's name): {', '.join(ambiguous)}",
            "restore the whole dump --beside and take the table from there",
        )
    if plan["schema_taken"]:
        raise UsageError(f"the dump has a schema {into} of its own", "choose another --into")
    if plan["clashes"]:
        raise UsageError(
            f"tables of the same name would meet in {into}: {', '.join(plan['clashes'])}",
            "restore them in separate runs, each --into a schema of its own",
        )
    for name, table, target in plan["left_out"]:
        log.warning("left out: the foreign key %s of %s, to %s, which is not restored", name, table, target)
    op.db.sql(MOVE, op.new, keys=json.dumps(keys), into=into, comment=comment)
    return plan


def _expected(op: restore.OnProd, dump: staging.Staged, into: str, plan: dict) -> dict[str, int]:
    """Each moved table's rows (by its name in `into`) as the manifest has them; counted in the temporary
    database (already checked like the whole restore) where it has none."""
    tables = [m for m in plan["members"] if m["kind"] == "r"]
    counted = dump.tables or {}
    uncounted = [[into, m["name"], m["restored"]] for m in tables if m["key"] not in counted]
    own = catalog.own_rows(op.db, op.new, uncounted)
    return {m["name"]: counted.get(m["key"], own.get(f"{into}.{m['name']}")) for m in tables}


def _copy(settings: Settings, op: restore.OnProd, into: str, expected: dict[str, int]) -> None:
    """The schema copied from the temporary database into DB_NAME in one transaction (CREATE SCHEMA in it is
    the atomic check that the name is still free), committed only once pg_dump ended well and every table's
    rows are as `expected`. A signal or a lost link ends the session on the server: nothing commits later."""
    app = f"kw-backup tables {op.stamp}"
    options = [f"--schema={_pattern(into)}"]
    variables = ["-v", f"kw_app={app}", "-v", f"kw_into={into}", "-v", f"kw_expected={json.dumps(expected)}"]
    # docker and direct: pg_dump and psql both on prod, the SQL never crosses the network; kamal runs here.
    tool = op.db if op.db.mode == "kamal" else Database(settings, None)
    dump_argv = tool.pg_dump(op.new, *options).argv
    load_argv = tool.psql(op.name, *variables).argv
    args = [COPY_FIRST, COPY_LAST, str(len(dump_argv)), *dump_argv, *load_argv]
    name = f"copy {into} into {op.name}"
    cmd = (
        Cmd(["sh", "-c", COPY_SCRIPT, "sh", *args], name=name)
        if op.db.mode == "kamal"
        else (op.prod.script(COPY_SCRIPT, *args, name=name))
    )
    log.info("copying the schema %s into %s in one transaction", into, op.name)
    try:
        code, _, err = run(cmd, check=False, timeout=None)
    except BaseException:
        if _stop(op, app, into) == "ours":
            log.warning("the server had committed the copy: the schema %s is complete and its rows checked", into)
        raise
    copied = _stop(op, app, into) if code else _copied(op, into)
    if copied == "ours":
        if code:
            log.warning("the link was lost, but the server committed the copy: %s is complete and checked", into)
        return
    if COUNTS_DIFFER in err:
        raise VerificationError(f"{staging.last_error(err)}; {op.name} is as it was", "see the error")
    if copied == "other":
        raise UsageError(
            f"the schema {into} was created in {op.name} meanwhile; nothing was added", "choose another --into"
        )
    raise Failed(
        f"copying {into} into {op.name} failed: {staging.last_error(err)}", f"{op.name} is as it was; see the error"
    )


def _pattern(name: str) -> str:
    """pg_dump's pattern for exactly `name`: inside double quotes every character is literal, a quote doubled."""
    return '"' + name.replace('"', '""') + '"'


def _copied(op: restore.OnProd, into: str) -> str | None:
    """'ours' when the schema is in DB_NAME by this run (its comment names the temporary database), 'other'
    when by someone else, None when it is not there."""
    rows = op.db.sql(COPIED, op.name, into=into, token=op.new)
    return rows[0][0] if rows else None


def _stop(op: restore.OnProd, app: str, into: str) -> str | None:
    """This run's copy session on DB_NAME ended; then whether the copy had committed (_copied). Unknown (None)
    when prod cannot be reached: a copy still running there commits only complete and checked."""
    try:
        op.db.sql(STOP, app=app, name=op.name)
        return _copied(op, into)
    except KwError as exc:
        log.error("could not end the copy's session on prod: %s", exc.message)
        return None


def _print_copy_back(op: restore.OnProd, into: str, comment: str, plan: dict) -> None:
    """The SQL that compares the restored tables with DB_NAME's and copies rows back, on stdout."""
    roots = [m for m in plan["members"] if m["root"]]
    found = _json(
        op.db,
        COPY_BACK,
        op.name,
        into=into,
        tables=json.dumps([{"name": m["name"], "schema": m["schema"]} for m in roots]),
    )
    by_name = {t["name"]: t for t in found["tables"]}
    order = referenced_first([m["name"] for m in roots], plan["references"])
    print(copy_back_sql(op.name, comment, found["schema"], [by_name[n] for n in order]), end="")


def referenced_first(tables: list[str], references: list[list[str]]) -> list[str]:
    """`tables` ordered so that each comes after those it references (`references`: [table, referenced] pairs),
    as rows must be copied back; a cycle keeps the given order."""
    ordered: list[str] = []

    def visit(table: str, path: frozenset) -> None:
        if table in ordered or table in path:
            return
        for referencing, referenced in references:
            if referencing == table and referenced in tables:
                visit(referenced, path | {table})
        ordered.append(table)

    for table in tables:
        visit(table, frozenset())
    return ordered


def _comment(text: str) -> str:
    """A comment line, whatever line breaks a name holds."""
    return "-- " + " ".join(text.splitlines())


def copy_back_sql(dbname: str, comment: str, schema: str, tables: list[dict]) -> str:
    """For each restored table (COPY_BACK's objects, every name as the server quoted it): the counts side by
    side, the rows DB_NAME's table lacks inserted and the columns that differ set back, by primary key."""
    lines = [
        _comment(f"{comment}: in the schema {schema} of {dbname}."),
        "-- Review before you run it: the UPDATEs set back every column that differs, changes made since the dump",
        "-- included (narrow their SET or WHERE to what was damaged); rows added since are left alone.",
        f"-- psql -X -1 -v ON_ERROR_STOP=1 -d {dbname} -f this-file.sql",
        _comment(f"When done: DROP SCHEMA {schema} CASCADE;"),
    ]
    for table in tables:
        lines += ["", _comment(f"{table['key']} (restored: {table['restored']})"), *_table_sql(dbname, table)]
    return "\n".join(lines) + "\n"


def _table_sql(dbname: str, t: dict) -> list[str]:
    restored, live = t["restored"], t["live"]
    if not t["exists"]:
        return [
            _comment(f"{live} is not in {dbname} (dropped since?). To put the restored one in its place:"),
            _comment(f"ALTER TABLE {restored} SET SCHEMA {t['live_schema']};"),
        ]
    columns = [name for name, _ in t["columns"] or []]
    key = t["pk"] or []
    counts = [
        f'SELECT {t["label"]} AS "table", (SELECT count(*) FROM {live}) AS live',
        f"       (SELECT count(*) FROM {restored}) AS restored",
    ]
    if not key or not set(key) <= set(columns):
        listed = ", ".join(columns)
        return [
            ",\n".join(counts) + ";",
            "-- no primary key both copies have, so no row can be matched: compare by hand, e.g.",
            _comment(f"SELECT {listed} FROM {restored} EXCEPT ALL SELECT {listed} FROM {live};"),
        ]
    match = " AND ".join(f"l.{c} = r.{c}" for c in key)
    missing = f"NOT EXISTS (SELECT 1 FROM {live} l WHERE {match})"
    # An identity GENERATED ALWAYS takes a value only with OVERRIDING SYSTEM VALUE, and none in an UPDATE.
    settable = [name for name, always in t["columns"] if name not in key and not always]
    differ = f"{_row('l', settable)}::text IS DISTINCT FROM {_row('r', settable)}::text"  # any type, json too
    counts.append(f"       (SELECT count(*) FROM {restored} r WHERE {missing}) AS missing_in_live")
    if settable:
        counts.append(f"       (SELECT count(*) FROM {restored} r JOIN {live} l ON {match} WHERE {differ}) AS changed")
    overriding = " OVERRIDING SYSTEM VALUE" if any(always for _, always in t["columns"]) else ""
    sql = [
        ",\n".join(counts) + ";",
        "-- the rows it lacks, by primary key:",
        f"INSERT INTO {live} ({', '.join(columns)}){overriding}",
        f"SELECT {', '.join('r.' + c for c in columns)} FROM {restored} r WHERE {missing};",
    ]
    if settable:
        sql += [
            "-- the columns that differ, set back by primary key:",
            f"UPDATE {live} l SET ({', '.join(settable)}) = {_row('r', settable)}",
            f"FROM {restored} r WHERE {match} AND {differ};",
        ]
    return sql


def _row(alias: str, columns: list[str]) -> str:
    return f"ROW({', '.join(f'{alias}.{c}' for c in columns)})"
