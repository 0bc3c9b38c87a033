"""make demo: the whole flow on this machine alone, explained step by step; nothing left running.

A temporary PostgreSQL with sample data; prod, pi5 and nas are directories under the demo
directory (every place `local`); then backup-db, backup-orchestrator, list-backups, a change
to the data, restore-production-db --local latest --yes (the change is gone), backup-drill.
Where age and rclone are installed, the nas and an offsite directory receive encrypted copies
(a demo key) and the drill restores the offsite one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .drill import temporary_cluster
from .settings import ROOT, SETTINGS

SAMPLE = """
CREATE TABLE schema_migrations (version varchar PRIMARY KEY);
CREATE TABLE users (id bigserial PRIMARY KEY, email varchar NOT NULL UNIQUE, name text,
    created_at timestamp(6) NOT NULL, updated_at timestamp(6) NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL REFERENCES users(id),
    total numeric(12,2) NOT NULL, details jsonb NOT NULL DEFAULT '{}', created_at timestamp(6) NOT NULL,
    updated_at timestamp(6) NOT NULL);
CREATE INDEX index_orders_on_user_id ON orders (user_id);
INSERT INTO schema_migrations
    SELECT to_char(date '2024-01-01' + i, 'YYYYMMDD') || '000000' FROM generate_series(1, 30) i;
INSERT INTO users (email, name, created_at, updated_at)
    SELECT 'customer' || i || '@example.com', 'Customer ' || i, now() - i * interval '1 hour', now()
    FROM generate_series(1, 500) i;
INSERT INTO orders (user_id, total, details, created_at, updated_at)
    SELECT 1 + i % 500, round((random() * 500)::numeric, 2), jsonb_build_object('items', 1 + i % 9),
           now() - i * interval '1 minute', now()
    FROM generate_series(1, 5000) i;
"""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main(argv=None) -> int:
    try:
        return _demo(argv)
    except subprocess.CalledProcessError as exc:
        print(
            f"demo: a step failed: {' '.join(map(str, exc.cmd[:1]))} exited {exc.returncode}; see above",
            file=sys.stderr,
        )
        return 1


def _demo(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--dir", default=str(ROOT / ".demo"), help="where the demo's places live (default .demo)")
    args = p.parse_args(argv)
    base = Path(args.dir).resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True, mode=0o700)
    with temporary_cluster() as server:
        env_file = base / "backup.env"
        settings = {
            "DB_EXEC": "direct",
            "DB_NAME": "kw_app_production",
            "DB_HOST": server["host"],
            "DB_PORT": server["port"],
            "DB_USER": "postgres",
            "PROD_HOST": "local",
            "PROD_DIR": base / "prod",
            "PI5_HOST": "local",
            "PI5_DIR": base / "pi5",
            "NAS_HOST": "local",
            "NAS_DIR": base / "nas",
            "LOG_FILE": base / "orchestrator.log",
            "WORK_DIR": base / "work",
            "DRILL_LOG": base / "drill.log",
            "MIN_DUMP_BYTES": "1024",
        }
        offsite = bool(shutil.which("age-keygen") and shutil.which("rclone"))
        if offsite:
            key = base / "age-key.txt"
            subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
            public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True)
            settings.update(
                AGE_RECIPIENTS=public.stdout.strip(), AGE_IDENTITY_FILE=key, OFFSITE_REMOTE=base / "offsite"
            )
        env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        env_file.chmod(0o600)
        # The demo's env file decides, whatever this shell has set.
        env = {k: v for k, v in os.environ.items() if k not in {s.name for s in SETTINGS} and not k.startswith("PG")}
        # The temporary PostgreSQL takes only its own password, given as libpq's environment.
        env.update(KW_BACKUP_ENV=str(env_file), KW_BACKUP_SYSLOG=str(base / "no-syslog"), PGPASSWORD=server["password"])

        def sql(query: str, database: str = "kw_app_production") -> str:
            psql = ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", server["host"], "-p", server["port"]]
            return subprocess.run(
                [*psql, "-U", "postgres", "-d", database, "-c", query],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()

        def script(name: str, *script_args: str) -> None:
            print(f"$ {name} {' '.join(script_args)}".rstrip(), flush=True)
            subprocess.run([str(ROOT / "bin" / name), *script_args], env=env, check=True)

        say("A temporary PostgreSQL with a small Rails-like database (kw_app_production)")
        sql("CREATE DATABASE kw_app_production", "postgres")
        sql(SAMPLE)
        print(
            f"users: {sql('SELECT count(*) FROM users')}, orders: {sql('SELECT count(*) FROM orders')}; "
            f"places prod, pi5 and nas are directories in {base}"
        )

        say("backup-db on prod: one pass dumps, counts every table's rows, compresses, hashes, verifies")
        script("backup-db")
        say(
            "backup-orchestrator on the pi5: pulls the newest dump, verifies it as it arrives, pushes to the nas, "
            "checks the copy's sha256 there"
            + (
                "; encrypts what leaves the pi5 (age, a demo key) and pushes a "
                "fourth copy offsite (rclone, a directory here)"
                if offsite
                else ""
            )
        )
        script("backup-orchestrator")
        say("list-backups: the same verified dump in every place" + (" (.age: encrypted)" if offsite else ""))
        script("list-backups")
        say("A bad day: someone deletes most orders")
        sql("DELETE FROM orders WHERE id > 100")
        print(f"orders now: {sql('SELECT count(*) FROM orders')}")
        say(
            "restore-production-db --local latest --yes: restored into a new database, row counts checked against "
            "the manifest, then swapped in (the old one is kept)"
        )
        script("restore-production-db", "--local", "latest", "--yes")
        print(f"orders after the restore: {sql('SELECT count(*) FROM orders')} (the change is gone)")
        say(
            f"backup-drill: the {'offsite copy decrypted and' if offsite else 'nas copy'} restored into a throwaway "
            "database on another temporary PostgreSQL, every table compared with the manifest"
        )
        script("backup-drill", "--from", "offsite" if offsite else "nas")
        say(
            f"Done. Every step above was checked; the files are in {base}. The temporary PostgreSQL is stopped and "
            "removed now."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
