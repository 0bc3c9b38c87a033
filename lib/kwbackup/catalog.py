"""The SQL of a restore, run by the server itself: checks, the lock, the swap and what it carries over.

Every value (a database name) reaches the server as a psql variable (`:'target'`), every
identifier is quoted by the server (`format('%I')`), and nothing the catalog holds (settings,
grants) is parsed here. The table queries are shared with the drill.
"""

from __future__ import annotations

import json

from .database import Database

# Every table with data of its own: (schema, table, the server's quoted `schema.table`).
TABLES = (
    "SELECT n.nspname, c.relname, format('%I.%I', n.nspname, c.relname) FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
)
# The timestamp columns that say how recent the data is: (quoted table, quoted column).
RECENT_COLUMNS = (
    "SELECT format('%I.%I', table_schema, table_name), quote_ident(column_name) "
    "FROM information_schema.columns WHERE column_name IN ('created_at', 'updated_at') "
    "AND data_type LIKE 'timestamp%' AND table_schema NOT IN ('pg_catalog', 'information_schema')"
)


def newest_record_sql(columns: list[list[str]]) -> str:
    """The newest of the RECENT_COLUMNS rows' values (identifiers as the server quoted them)."""
    return (
        "SELECT max(m) FROM ("
        + " UNION ALL ".join(f"SELECT max({c})::timestamp AS m FROM {t}" for t, c in columns)
        + ") x"
    )


# One restore per database at a time, whichever machine runs it: a session-level advisory lock of
# a psql session that lives as long as the run (a killed run's lock goes with its connection).
LOCK = "SELECT pg_try_advisory_lock(hashtext('kw-backup restore'), hashtext(:'target'));\n"

# What the target server has: its version, roles, extensions, data directory and the target database.
TARGET = """
SELECT current_setting('server_version_num'), current_setting('server_version'),
       (SELECT json_agg(rolname) FROM pg_roles), (SELECT json_agg(name) FROM pg_available_extensions),
       current_setting('data_directory'),
       (SELECT json_build_array(pg_database_size(oid), pg_get_userbyid(datdba)) FROM pg_database
        WHERE datname = :'target');
"""

# The new database, with the old one's encoding and collation when there is one.
CREATE = """
SELECT coalesce((SELECT format('CREATE DATABASE %I TEMPLATE template0 ENCODING %L LC_COLLATE %L LC_CTYPE %L',
                               :'new', pg_encoding_to_char(encoding), datcollate, datctype)
                 FROM pg_database WHERE datname = :'target'),
                format('CREATE DATABASE %I TEMPLATE template0', :'new'))
\\gexec
"""

# What interrupted runs left: their half-made databases. DROP waits for a swap still running on
# the server (it holds the database's lock), after which a database it renamed is no longer here.
LEFTOVERS = (
    "SELECT datname FROM pg_database WHERE starts_with(datname, :'target' || '_restore_') "
    "AND substr(datname, length(:'target') + 10) ~ '^[0-9]{14}$' ORDER BY 1;\n"
)
DROP = "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', :'name')\n\\gexec\n"

HOLDS_TABLES = f"SELECT EXISTS ({TABLES});\n"

# The swap: one statement, so once the server has it, it completes or rolls back whatever happens
# to the client. Sessions on the target are ended and the renames retried until none is left (a
# rename waits up to 5 s for ended sessions and blocks new ones while it holds the database's
# lock), so no connection flag is ever committed that a kill could leave behind. The new database
# gets the old one's owner, settings (pg_db_role_setting rows: per-role ones, list values),
# grants and connection limit. No NOTICE is sent: sending one to a vanished client would abort
# the transaction.
SWAP = """
SET client_min_messages = warning;
SET application_name = 'kw-backup swap';
SELECT set_config('kw.target', :'target', false), set_config('kw.new', :'new', false),
       set_config('kw.previous', :'previous', false);
DO $swap$
DECLARE
  target text := current_setting('kw.target');
  restored pg_database;
  old pg_database;
  item record;
BEGIN
  IF current_setting('server_version_num')::int >= 140000 THEN
    PERFORM set_config('client_connection_check_interval', '0', true);
  END IF;
  SELECT * INTO STRICT restored FROM pg_database WHERE datname = current_setting('kw.new');
  SELECT * INTO old FROM pg_database WHERE datname = target;
  IF old.oid IS NOT NULL THEN
    FOR attempt IN 1..12 LOOP
      PERFORM pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = target AND pid <> pg_backend_pid();
      BEGIN
        EXECUTE format('ALTER DATABASE %I RENAME TO %I', target, current_setting('kw.previous'));
        EXIT;
      EXCEPTION WHEN object_in_use THEN
        IF attempt = 12 THEN RAISE; END IF;
      END;
    END LOOP;
  END IF;
  EXECUTE format('ALTER DATABASE %I RENAME TO %I', restored.datname, target);
  IF old.oid IS NULL THEN
    RETURN;
  END IF;
  EXECUTE format('ALTER DATABASE %I OWNER TO %I', target, pg_get_userbyid(old.datdba));
  EXECUTE format('ALTER DATABASE %I CONNECTION LIMIT %s', target, old.datconnlimit);
  DELETE FROM pg_db_role_setting WHERE setdatabase = restored.oid;
  INSERT INTO pg_db_role_setting SELECT restored.oid, setrole, setconfig FROM pg_db_role_setting
    WHERE setdatabase = old.oid;
  IF old.datacl IS NOT NULL THEN
    FOR item IN SELECT DISTINCT grantee FROM aclexplode(acldefault('d', old.datdba)) LOOP
      EXECUTE format('REVOKE ALL ON DATABASE %I FROM %s', target,
                     CASE item.grantee WHEN 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(item.grantee)) END);
    END LOOP;
    FOR item IN SELECT * FROM aclexplode(old.datacl) LOOP
      EXECUTE format('GRANT %s ON DATABASE %I TO %s%s', item.privilege_type, target,
                     CASE item.grantee WHEN 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(item.grantee)) END,
                     CASE WHEN item.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
  END IF;
END
$swap$;
"""

# After a lost connection: wait for a swap still running on the server, then say whether it happened.
SWAPPED = """
DO $wait$
BEGIN
  FOR i IN 1..600 LOOP
    PERFORM pg_stat_clear_snapshot();  -- else pg_stat_activity stays as this transaction first saw it
    EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'kw-backup swap'
                          AND state <> 'idle' AND pid <> pg_backend_pid());
    PERFORM pg_sleep(0.1);
  END LOOP;
END
$wait$;
SELECT NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'new')
       AND EXISTS (SELECT 1 FROM pg_database WHERE datname = :'target');
"""


class Target:
    """What the target server has for a dump: version, roles, extensions, the target database."""

    def __init__(self, row: list[str]):
        version_num, self.version, roles, extensions, self.data_dir, database = row
        self.major = int(version_num) // 10000
        self.roles = set(json.loads(roles or "[]"))
        self.extensions = set(json.loads(extensions or "[]"))
        size, self.owner = json.loads(database) if database else (0, None)
        self.exists = bool(database)
        self.size = int(size)


def target(db: Database, name: str) -> Target:
    return Target(db.sql(TARGET, target=name)[0])


def holds_tables(db: Database, name: str) -> bool:
    if not db.sql("SELECT 1 FROM pg_database WHERE datname = :'target';\n", target=name):
        return False
    return db.sql(HOLDS_TABLES, dbname=name)[0][0] == "t"


def leftovers(db: Database, name: str) -> list[str]:
    return [row[0] for row in db.sql(LEFTOVERS, target=name)]


def drop(db: Database, name: str) -> None:
    db.sql(DROP, name=name)


def create(db: Database, new: str, name: str) -> None:
    db.sql(CREATE, new=new, target=name)


def swap(db: Database, name: str, new: str, previous: str) -> None:
    db.sql(SWAP, target=name, new=new, previous=previous)


def swapped(db: Database, name: str, new: str) -> bool:
    return db.sql(SWAPPED, target=name, new=new)[-1][0] == "t"


def tables(db: Database, dbname: str) -> list[list[str]]:
    return db.sql(TABLES + ";\n", dbname=dbname)


def own_rows_sql(quoted_tables: list[str]) -> str:
    """Each table's own rows (FROM ONLY: a parent's never include its children's), as a COPY block of
    pg_dump holds them; the names as the server quoted them (TABLES)."""
    return " UNION ALL ".join(f"SELECT {i}, count(*) FROM ONLY {t}" for i, t in enumerate(quoted_tables))


def own_rows(db: Database, dbname: str, tables: list[list[str]]) -> dict[str, int]:
    """`schema.table` -> its own rows, for rows of TABLES."""
    if not tables:
        return {}
    rows = db.sql(own_rows_sql([quoted for _, _, quoted in tables]) + ";\n", dbname=dbname)
    return {f"{tables[int(i)][0]}.{tables[int(i)][1]}": int(n) for i, n in rows}


def newest_record(db: Database, dbname: str) -> str | None:
    columns = db.sql(RECENT_COLUMNS + ";\n", dbname=dbname)
    return db.sql(newest_record_sql(columns) + ";\n", dbname=dbname)[0][0] if columns else None


def size_of(db: Database, name: str) -> int:
    return int(db.sql("SELECT pg_database_size(:'name');\n", name=name)[0][0])
