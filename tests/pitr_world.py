"""The WAL tier's world: prod's PostgreSQL as the postgres image has it, the pi5 where `pi` runs what
make install-pi5 PITR=on installed, and the tunnel between them through a real sshd, as deployed.

- prod: a PostgreSQL 15 of its own (1 MB WAL segments: the tests fill and lose segments in seconds) whose
  pg_hba.conf is the image's for connections from outside (`host all all all scram-sha-256`, no replication
  line for the network), published on 127.0.0.1:<port>; an sshd place whose login finds only the docker
  stand-in (DB_EXEC=docker reaches the server as the container would) and nothing of kw-backup.
- the pi5: an sshd place where `pi` logs in and finds the PITR install; its env file is this world's.
- the WAL tier in a short directory of the Pi's (the tunnel's socket path must fit 107 bytes), its tunnel key
  authorized on prod by `make authorize-pi5-tunnel`, and the Pi's ssh config holding no other key.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests import world

ADDRESSES = (f"127.0.1.{n}" for n in itertools.count(10))
IMAGE_HBA = (
    "# as the official postgres image has it for connections from outside the container\n"
    "local all all trust\nlocal replication all trust\nhost all all all scram-sha-256\n"
)


class PitrWorld:
    def __init__(self, base: Path, ssh_world: world.SshWorld, pi, install: world.Install):
        self.base, self.ssh_world, self.pi, self.install = base, ssh_world, pi, install
        self.name = f"pitr{next(_NUMBERS)}"
        self.pg = world.Postgres(Path(tempfile.mkdtemp(prefix="kwtest-pitr-pg-")), initdb_args=("--wal-segsize=1",))
        self.dir = Path(tempfile.mkdtemp(prefix="kwp-"))  # PITR_DIR
        self.tunnel: subprocess.Popen | None = None

    # --- building it --------------------------------------------------------------------------------
    def start(self) -> PitrWorld:
        self.pg.start()
        (self.pg.data / "pg_hba.conf").write_text(IMAGE_HBA)
        self.pg.psql("SELECT pg_reload_conf()")
        self.pg.create_db("kw_app_production")
        bin_dir = self.base / "prod-bin"
        bin_dir.mkdir()
        (bin_dir / "docker").symlink_to(world.STANDINS / "docker")
        self.prod = self.ssh_world.add_place(
            f"{self.name}-prod",
            next(ADDRESSES),
            f"{bin_dir}:/usr/bin:/bin",
            {**self.pg.env, "STANDIN_LOG": str(self.base / "docker.log")},
        )
        self.pi5 = self.ssh_world.add_place(
            f"{self.name}-pi5", next(ADDRESSES), f"{self.install.bin}:{world.SYSTEM_PATH}", {}
        )
        self.pi5.authorized_keys.chmod(0o644)  # sshd reads it as pi, who logs in there
        self.home = self.base / "pi"
        self.home.mkdir(mode=0o700)
        self._tier_as_installed()
        self.pi5_settings = {
            "PITR": "on",
            "PITR_DIR": str(self.dir),
            "PROD_PG_PORT": str(self.pg.port),
            "PROD_HOST": f"{self.name}-prod",
            "SSH_CONFIG": str(self._pi_ssh_config()),
            "LOG_FILE": str(self.home / "backup-orchestrator.log"),
            "PITR_PROD_WAL_KEEP_GB": "0.05",
        }
        self.write_pi5_env()
        self.pi_own(self.home)
        return self

    def _tier_as_installed(self) -> None:
        """What make install-pi5 PITR=on makes of PITR_DIR: 0700, the Pi's, with the tunnel's key."""
        (self.dir / "ssh").mkdir(mode=0o700)
        self.pi_own(self.dir)
        self.dir.chmod(0o700)
        key = self.dir / "ssh" / "id_tunnel"
        subprocess.run(
            ["runuser", "-u", self.pi.pw_name, "--", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
            check=True,
        )
        done = subprocess.run(
            [
                "make",
                "-s",
                "authorize-pi5-tunnel",
                f"KEY={key}.pub",
                f"AUTHORIZED_KEYS={self.prod.authorized_keys}",
                f"PROD_PG_PORT={self.pg.port}",
            ],
            cwd=world.ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        self.tunnel_key = key

    def _pi_ssh_config(self) -> Path:
        """The Pi's ssh config: prod's address and host key, and no key but what a command names."""
        known = self.home / "known_hosts"
        shutil.copyfile(self.ssh_world.known_hosts, known)
        config = self.home / "ssh_config"
        config.write_text(
            f"Host {self.name}-prod\n  HostName {self.prod.address}\n  Port {self.ssh_world.port}\n  User root\n"
            f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  IdentitiesOnly yes\n  LogLevel ERROR\n"
        )
        return config

    def write_pi5_env(self, **changes: str) -> None:
        self.pi5_settings.update(changes)
        world.write_env(self.pi5.env_file, self.pi5_settings)
        self.pi_own(self.pi5.env_file)

    def pi_own(self, *paths: Path) -> None:
        for path in paths:
            for entry in [path, *(path.rglob("*") if path.is_dir() else [])]:
                os.chown(entry, self.pi.pw_uid, self.pi.pw_gid, follow_symlinks=False)

    # --- running it ---------------------------------------------------------------------------------
    def laptop_settings(self, **extra: str) -> dict[str, str]:
        """The laptop's env: prod and the pi5 over ssh with root's key (DB_EXEC=docker on prod)."""
        return {
            "PITR": "on",
            "PITR_DIR": str(self.dir),
            "PROD_PG_PORT": str(self.pg.port),
            "PROD_HOST": f"{self.name}-prod",
            "PI5_HOST": f"{self.pi.pw_name}@{self.name}-pi5",
            "DB_EXEC": "docker",
            "SSH_CONFIG": str(self.ssh_world.config),
            "LOG_FILE": str(self.base / "laptop.log"),
            "PITR_PROD_WAL_KEEP_GB": "0.05",
            "WORK_DIR": str(self.base),
            **extra,
        }

    def laptop(
        self, script: str, *args: str, timeout: float = 600, at: str | None = None, **extra: str
    ) -> subprocess.CompletedProcess:
        """A script on the laptop; `at` moves the laptop's clock (world.clocked), never the pi5's or prod's."""
        return world.run_script(script, *args, env=self.laptop_env(**extra), timeout=timeout, at=at)

    def laptop_env(self, **extra: str) -> dict[str, str]:
        """The environment a laptop script runs with: a plain shell's, its env file written with `extra`."""
        env_file = world.write_env(self.base / "laptop.env", self.laptop_settings(**extra))
        return {"PATH": world.SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "KW_BACKUP_ENV": str(env_file)}

    def pi_argv(self, script: str, *args: str) -> tuple[list[str], dict[str, str]]:
        env = {
            "PATH": f"{self.install.bin}:{world.SYSTEM_PATH}",
            "HOME": self.pi.pw_dir,
            "USER": self.pi.pw_name,
            "LOGNAME": self.pi.pw_name,
            "KW_BACKUP_ENV": str(self.pi5.env_file),
            "KW_BACKUP_SYSLOG": str(self.base / "no-syslog"),
        }
        return ["runuser", "-u", self.pi.pw_name, "--", str(self.install.bin / script), *args], env

    def on_pi(self, script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """An installed script run by `pi` as its cron line would, with the pi5's env file."""
        argv, env = self.pi_argv(script, *args)
        try:
            return subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as hung:  # what it said and what ran then, not only that it hung
            ps = subprocess.run(["ps", "-ww", "-u", self.pi.pw_name, "-o", "pid,ppid,etimes,args"], capture_output=True)
            raise AssertionError(
                f"{script} {' '.join(args)} ran over {timeout:.0f}s; it said:\n{(hung.stderr or b'').decode()}\n"
                f"the pi's processes:\n{ps.stdout.decode()}"
            ) from hung

    def start_tunnel(self) -> None:
        """The tunnel as its systemd unit runs it (ExecStart: pitr-tunnel, as pi)."""
        argv, env = self.pi_argv("pitr-tunnel", "--quiet")
        self.tunnel_log = self.base / "tunnel.log"
        self.tunnel = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=open(self.tunnel_log, "ab"), stderr=subprocess.STDOUT
        )
        socket = self.dir / "tunnel" / f".s.PGSQL.{self.pg.port}"
        for _ in range(200):
            if socket.exists() or self.tunnel.poll() is not None:
                break
            time.sleep(0.05)
        assert socket.exists(), f"the tunnel did not come up: {self.tunnel_log.read_text()}"

    def stop_tunnel(self) -> None:
        if self.tunnel and self.tunnel.poll() is None:
            self.tunnel.send_signal(signal.SIGTERM)
            self.tunnel.wait(10)
        # ssh leaves its socket behind: start_tunnel waits for a new one, not this one
        (self.dir / "tunnel" / f".s.PGSQL.{self.pg.port}").unlink(missing_ok=True)

    def prod_sql(self, sql: str, db: str = "postgres") -> str:
        return self.pg.psql(sql, db)

    def stop(self) -> None:
        self.stop_tunnel()
        # Barman's receive-wal runs in the background as pi: stop it with the tier.
        subprocess.run(["pkill", "-u", self.pi.pw_name, "-f", f"{self.dir}/"], check=False)
        self.pg.stop()
        for sshd in (getattr(self, "prod", None), getattr(self, "pi5", None)):
            if sshd:
                sshd.stop()
        shutil.rmtree(self.pg.base, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


_NUMBERS = itertools.count(1)
