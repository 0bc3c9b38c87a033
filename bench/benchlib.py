"""What the database benchmarks share: the cluster under .bench/pg, the ~1 GB database, timing.

The database (pgbench -i -s 50 plus a text-heavy table with a jsonb column) is built once in a
PostgreSQL 15 cluster under .bench/pg, run by the unprivileged `postgres` user when started as
root; later runs reuse it and start it if stopped. It carries the comment 'built' when complete.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests import world  # noqa: E402

BENCH = ROOT / ".bench"
DB = "kw_bench"
# Settings the environment would override an env file with, and the tests' own variables.
SCRUBBED = ("KW_", "PG", "DB_", "PROD_")
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "order invoice customer delivery payment refund warehouse shipment address street city postal code phone email "
    "account balance discount coupon product category price quantity status pending shipped cancelled returned "
    "Kraków Gdańsk Łódź zażółć gęślą jaźń"
).split()
NOTES_SQL = """
CREATE TABLE notes (id bigserial PRIMARY KEY, account_id int NOT NULL, title text NOT NULL, body text NOT NULL,
    meta jsonb NOT NULL, created_at timestamptz NOT NULL);
WITH v AS (SELECT %(words)s::text[] AS w, cardinality(%(words)s::text[]) AS n)
INSERT INTO notes (account_id, title, body, meta, created_at)
SELECT 1 + (random() * 4999999)::int,
       initcap(w[1 + floor(n * random())::int] || ' ' || w[1 + floor(n * random())::int]),
       (SELECT string_agg(w[1 + floor(n * random() ^ 2)::int], ' ' ORDER BY g) FROM generate_series(1, 30 + i %% 50) g),
       jsonb_build_object('tags', jsonb_build_array(w[1 + i %% n], w[1 + (i * 7) %% n]),
                          'score', round(random()::numeric, 4),
                          'ip', format('10.%%s.%%s.%%s', i %% 256, (i / 256) %% 256, i %% 199),
                          'agent', 'Mozilla/5.0 (X11; Linux x86_64) Firefox/' || (100 + i %% 30), 'items', i %% 17,
                          'note', md5(i::text)),
       timestamptz '2024-01-01' + i * interval '37 seconds'
FROM v, generate_series(1, %(rows)d) i;
CREATE INDEX notes_account_id ON notes (account_id);
"""


class BenchPostgres(world.Postgres):
    """world.Postgres kept in .bench/pg: initialised once, then started when found stopped."""

    def ensure_running(self) -> None:
        conf = self.data / "postgresql.conf"
        if not conf.exists():
            shutil.rmtree(self.base, ignore_errors=True)
            print(f"initialising a PostgreSQL 15 cluster in {self.base} ...", flush=True)
            self.start()
            return
        self.port = int(re.findall(r"^port = (\d+)", conf.read_text(), re.M)[-1])
        status = subprocess.run(
            [str(world.PG_BIN / "pg_ctl"), "-D", str(self.data), "status"], user=self.user, capture_output=True
        )
        if status.returncode != 0:
            self.run_server()

    def settle(self) -> None:
        """Write dirty pages now (server and OS), so that the next measurement does not pay for them."""
        self.psql("CHECKPOINT")
        os.sync()


def start_cluster() -> BenchPostgres:
    """The bench cluster, running."""
    BENCH.mkdir(mode=0o755, exist_ok=True)
    BENCH.chmod(0o755)
    pg = BenchPostgres(BENCH / "pg")
    pg.ensure_running()
    return pg


def mark_built(pg: BenchPostgres) -> None:
    """Vacuum (hint bits, visibility map, statistics) and mark DB complete, then settle."""
    pg.psql("VACUUM ANALYZE", DB)
    pg.psql(f"COMMENT ON DATABASE {DB} IS 'built'", DB)
    pg.settle()  # write the build's dirty pages now, not during the first measurement


def ensure_database(pg: BenchPostgres, scale: int, rows: int, rebuild: bool) -> None:
    built = pg.psql(f"SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '{DB}'")
    if built == "built" and not rebuild:
        return
    print(f"building {DB}: pgbench -i -s {scale} and {rows} notes (minutes) ...", flush=True)
    started = time.monotonic()
    pg.drop_db(DB)
    pg.create_db(DB)
    env = {**os.environ, **pg.env}
    subprocess.run(
        [str(world.PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), DB], env=env, check=True, capture_output=True
    )
    words = "ARRAY[" + ", ".join(f"'{w}'" for w in WORDS) + "]"
    pg.psql(NOTES_SQL % {"words": words, "rows": rows}, DB)
    mark_built(pg)
    print(f"built in {time.monotonic() - started:.0f}s", flush=True)


def database_bytes(pg: BenchPostgres, db: str = DB) -> int:
    return int(pg.psql(f"SELECT pg_database_size('{db}')"))


def clean_env(pg: BenchPostgres) -> dict[str, str]:
    """This process's environment without settings that would override an env file, plus the cluster's PG*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)} | pg.env
    # The scripts start under the project's python, as installed, not through a version manager's shim.
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"
    return env


def add_scale_options(p) -> None:
    p.add_argument("--rebuild", action="store_true", help="drop and rebuild the benchmark database")
    p.add_argument("--scale", type=int, default=50, help="pgbench scale factor (default 50)")
    p.add_argument("--rows", type=int, default=400_000, help="rows of the text-heavy table (default 400000)")


def shell(pipeline: str) -> list[str]:
    return ["bash", "-o", "pipefail", "-c", pipeline]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a command to completion; (wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
