"""How PostgreSQL is reached: DB_EXEC = direct | docker | kamal.

Each mode turns "run pg_dump/psql with these arguments" into one argument list:
- direct: pg_dump/psql on the database host, `-h/-p` from DB_HOST/DB_PORT (libpq's PG*
  variables and ~/.pgpass are honoured; a password is never put on a command line);
- docker: `docker exec -i $DB_CONTAINER ...` on the database host;
- kamal:  `kamal accessory exec --reuse --raw|-i -d $KAMAL_DESTINATION $KAMAL_ACCESSORY ...`
  where the script runs (kamal reaches the host itself; it joins the words for a remote
  shell, so each is quoted).
For docker and direct the command is wrapped in ssh when the database host is not local.
"""

from __future__ import annotations

import os

from plumbum.commands.base import shquote_list

from .places import Place
from .run import Cmd, run
from .settings import Settings


class Database:
    def __init__(self, settings: Settings, host: Place | None = None):
        self.settings = settings
        self.mode = settings["DB_EXEC"]
        self.host = host  # where docker/direct commands run; None: this machine
        self.name = settings["DB_NAME"]

    def _tool(self, tool: str, args: list[str], output: bool) -> Cmd:
        s = self.settings
        if self.mode == "direct":
            argv = [tool]
            if s["DB_HOST"]:
                argv += ["-h", s["DB_HOST"]]
            if s.is_given("DB_PORT") or "PGPORT" not in os.environ:
                argv += ["-p", s["DB_PORT"]]
            if s.is_given("DB_USER") or "PGUSER" not in os.environ:
                argv += ["-U", s["DB_USER"]]
            argv += args
        elif self.mode == "docker":
            argv = ["docker", "exec", "-i", s["DB_CONTAINER"], tool, "-U", s["DB_USER"], *args]
        else:
            inner = shquote_list([tool, "-U", s["DB_USER"], *args])
            mode_flag = "--raw" if output else "-i"
            return Cmd(
                [
                    "kamal",
                    "accessory",
                    "exec",
                    "--reuse",
                    mode_flag,
                    "-d",
                    s["KAMAL_DESTINATION"],
                    s["KAMAL_ACCESSORY"],
                    *inner,
                ],
                name=tool,
            )
        if self.host is None or self.host.is_local:
            return Cmd(argv, name=tool)
        return self.host.command(argv, name=f"{tool} on {self.host.name}")

    def dump(self) -> Cmd:
        """pg_dump of DB_NAME as plain SQL on stdout."""
        return self.pg_dump(self.name)

    def pg_dump(self, dbname: str, *options: str) -> Cmd:
        """pg_dump of `dbname` as plain SQL on stdout, with `options`."""
        return self._tool("pg_dump", ["--no-password", "--format=plain", *options, dbname], output=True)

    def psql(self, dbname: str, *args: str, output: bool = False, quiet: bool = True) -> Cmd:
        """psql on `dbname` that stops at the first error, reading SQL from stdin."""
        return self._tool(
            "psql",
            ["--no-password", "-X", *(["-q"] if quiet else []), "-v", "ON_ERROR_STOP=1", "-d", dbname, *args],
            output=output,
        )

    def shell(self, argv: list[str], name: str = "") -> Cmd:
        """Any command where PostgreSQL runs (its container for docker and kamal), e.g. df."""
        s = self.settings
        if self.mode == "docker":
            argv = ["docker", "exec", "-i", s["DB_CONTAINER"], *argv]
        elif self.mode == "kamal":
            return Cmd(
                [
                    "kamal",
                    "accessory",
                    "exec",
                    "--reuse",
                    "--raw",
                    "-d",
                    s["KAMAL_DESTINATION"],
                    s["KAMAL_ACCESSORY"],
                    *shquote_list(argv),
                ],
                name=name or argv[0],
            )
        if self.host is None or self.host.is_local:
            return Cmd(argv, name=name or argv[0])
        return self.host.command(argv, name=name or f"{argv[0]} on {self.host.name}")

    def sql(
        self, script: str, dbname: str = "postgres", timeout: float | None = 600, **variables: str
    ) -> list[list[str]]:
        """Rows of a psql script fed on stdin, its values given as psql variables (`:'name'` in the script)."""
        assigned = [arg for name, value in variables.items() for arg in ("-v", f"{name}={value}")]
        cmd = self.psql(dbname, "-A", "-t", "-F", "\t", *assigned)
        _, out, _ = run(cmd, input=script.encode(), timeout=timeout)
        return [line.split("\t") for line in out.decode().splitlines() if line]
