"""make install-prod / install-pi5 / uninstall-* / authorize-pi5 / pi5-keys.

Standard library only: it runs with the system's python3 before the project's venv exists.
Idempotent: every step compares before it writes and says what it changed; a second run
says that nothing changed. DESTDIR is honoured (packaging and tests); the links in
/usr/local/bin are relative so they work inside DESTDIR and at the final place.
"""

from __future__ import annotations

import argparse
import filecmp
import grp
import hashlib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2]
# requirements-dev.txt: the installed Makefile names it (make venv); the installed venv is made from requirements.txt.
SHIPPED = [
    "bin",
    "lib",
    "cron",
    "docs",
    "requirements.txt",
    "requirements-dev.txt",
    "requirements-barman.txt",
    ".env.example",
    "Makefile",
    "README.md",
]
SCRIPTS = [
    "backup-db",
    "backup-orchestrator",
    "list-backups",
    "pull-prod-backups",
    "restore-production-db",
    "setup-fresh-production-db",
    "migrate-database-to-new-prod",
    "backup-drill",
    "verify-backup",
    "backup-report",
    "setup-pitr",
    "pitr-status",
    "pitr-cron",
    "pitr-base-backup",
    "pitr-barman",
    "pitr-tunnel",
    "pitr-recover",
]
CRON = {"prod": ["prod"], "pi5": ["pi5", "drill"]}
PITR_CRON = "pi5-pitr"
TUNNEL_UNIT = "/etc/systemd/system/kw-backup-pitr-tunnel.service"
TUNNEL_UNIT_TEXT = """# kw-backup (make install-pi5 PITR=on): the pi5's ssh tunnel to prod's PostgreSQL (the WAL tier).
# It forwards the unix socket PITR_DIR/tunnel/.s.PGSQL.<PROD_PG_PORT> to prod's 127.0.0.1:PROD_PG_PORT
# with the key PITR_DIR/ssh/id_tunnel (on prod: make authorize-pi5-tunnel KEY=id_tunnel.pub).
[Unit]
Description=kw-backup: ssh tunnel to prod's PostgreSQL for the WAL tier
Wants=network-online.target
After=network-online.target

[Service]
User={user}
ExecStart={prefix}/bin/pitr-tunnel --quiet
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
"""
ENV_FILE = "/etc/kw-backup/backup.env"
CRON_LOG = "/var/log/backup-cron.log"  # where the lines of cron/ send what the scripts print
# A job line, or a commented-out one: five numeric time fields, then the user field (cron/ uses no names).
CRON_JOB = re.compile(r"^(#?(?:[0-9*][0-9*/,-]*[ \t]+){5})\S+(?=[ \t])", re.M)
LOGROTATE = """# kw-backup (make install-{role}): the logs its cron jobs write
{paths} {{
    weekly
    rotate 8
    compress
    delaycompress
    missingok
    notifempty
    create 0640 {user} {group}
}}
"""
PUBLIC_KEY_RE = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+( [^\n]*)?")


class Installer:
    def __init__(self, role: str, prefix: str, destdir: str, user: str | None, pitr: bool = False):
        self.role = role
        self.pitr = pitr or (role == "pi5" and _setting(Path(destdir or "/") / ENV_FILE.lstrip("/"), "PITR") == "on")
        self.prefix = prefix
        self.root = Path(destdir or "/")
        self.user = user or ("pi" if role == "pi5" and _user_exists("pi") else "root")
        self.changes: list[str] = []

    def at(self, path: str) -> Path:
        """`path` (absolute on the target system) inside DESTDIR."""
        return self.root / path.lstrip("/")

    def changed(self, what: str) -> None:
        self.changes.append(what)
        print(f"  {what}", flush=True)

    def install(self) -> None:
        print(f"installing kw-backup ({self.role}) into {self.at(self.prefix)}", flush=True)
        self.check_prerequisites()
        os.umask(0o022)  # the code and its venv readable by the backup user, whatever umask sudo passed on
        self.copy_tree()
        self.make_venv()
        self.link_scripts()
        self.env_file()
        self.backup_dir()
        self.logs()
        self.cron()
        if self.pitr:
            self.wal_tier()
        print(
            "nothing changed: already installed" if not self.changes else f"done: {len(self.changes)} changes",
            flush=True,
        )

    def check_prerequisites(self) -> None:
        if os.geteuid() == 0 and not _user_exists(self.user):
            sys.exit(
                f"kw-backup install: BACKUP_USER {self.user} does not exist here: create it (adduser "
                f"{self.user}) or name another"
            )
        missing = []
        if self.role == "prod" and not (shutil.which("pg_dump") or shutil.which("docker")):
            missing.append("pg_dump or docker (apt-get install postgresql-client, or install Docker)")
        if not shutil.which("rsync"):
            missing.append("rsync (apt-get install rsync)")
        if subprocess.run([sys.executable, "-c", "import ensurepip, venv"], capture_output=True).returncode:
            missing.append("python3-venv (apt-get install python3-venv)")
        if missing:
            sys.exit("kw-backup install: missing: " + "; ".join(missing))
        if self.role == "pi5":
            for tool, needed_for in (("age", "AGE_RECIPIENTS (encryption)"), ("rclone", "OFFSITE_REMOTE")):
                if not shutil.which(tool):
                    print(
                        f"  note: {tool} is not installed; it is needed only with {needed_for} "
                        f"(apt-get install {tool})",
                        flush=True,
                    )

    def copy_tree(self) -> None:
        target = self.at(self.prefix)
        target.mkdir(parents=True, exist_ok=True)
        wanted = set()
        for item in SHIPPED:
            source = SOURCE / item
            for path in [source] if source.is_file() else sorted(source.rglob("*")):
                if "__pycache__" in path.parts or path.is_dir():
                    continue
                relative = path.relative_to(SOURCE)
                wanted.add(relative)
                dest = target / relative
                mode = 0o755 if path.stat().st_mode & 0o111 else 0o644  # readable by the backup user
                if dest.exists() and filecmp.cmp(path, dest, shallow=False) and dest.stat().st_mode & 0o777 == mode:
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
                dest.chmod(mode)
                self.changed(f"installed {dest}")
        for item in ("bin", "lib", "cron"):
            for path in sorted((target / item).rglob("*")) if (target / item).exists() else []:
                if path.is_file() and "__pycache__" not in path.parts and path.relative_to(target) not in wanted:
                    path.unlink()
                    self.changed(f"removed {path} (no longer shipped)")

    def make_venv(self) -> None:
        self.venv(self.at(self.prefix) / ".venv", "requirements.txt")

    def venv(self, venv: Path, requirements: str, *pip_options: str) -> None:
        """A venv from pinned requirements, made again only when they changed."""
        digest = hashlib.sha256((SOURCE / requirements).read_bytes()).hexdigest()
        stamp = venv / ".kw-backup-requirements"
        if stamp.exists() and stamp.read_text().strip() == digest:
            return
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", *pip_options]
        subprocess.run([*pip, "-r", str(SOURCE / requirements)], check=True)
        stamp.write_text(digest + "\n")
        self.changed(f"made the venv {venv} from {requirements}")

    def link_scripts(self) -> None:
        links = self.at("/usr/local/bin")
        links.mkdir(parents=True, exist_ok=True)
        for script in SCRIPTS:
            link = links / script
            target = os.path.relpath(self.at(self.prefix) / "bin" / script, links)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(target)
            self.changed(f"linked {link} -> {target}")

    def env_file(self) -> None:
        """The settings hold secrets, and the cron line runs as the backup user: the directory and the file are
        the backup user's alone (root reads them anyway)."""
        path = self.at(ENV_FILE)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.own(path.parent, 0o700)
        if not path.exists():  # the operator's settings: never overwritten
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                text = (SOURCE / ".env.example").read_text()
                if self.role == "pi5":
                    text = text.replace("PI5_HOST=pi@pi5.local", "PI5_HOST=local")
                out.write(text)
            self.changed(f"wrote {path} from .env.example: edit it")
        self.own(path, 0o600)

    def backup_dir(self) -> None:
        setting = "PROD_DIR" if self.role == "prod" else "PI5_DIR"
        directory = _setting(self.at(ENV_FILE), setting) or (
            "/var/backups/kw-app" if self.role == "prod" else "/backups/kw-app"
        )
        path = self.at(directory)
        if not path.is_dir():
            path.mkdir(parents=True, mode=0o700)
            self.changed(f"made the backup directory {path}")
        self.own(path, 0o700)

    def log_files(self) -> tuple[list[str], list[str]]:
        """What the cron user appends to: the logs to rotate, and the run history (kept whole: backup-report
        reads it), each where the env file puts it, defaulting as the scripts do."""
        env = self.at(ENV_FILE)
        log_file = _setting(env, "LOG_FILE") or "/var/log/backup-orchestrator.log"
        beside = os.path.dirname(log_file)
        history = _setting(env, "HISTORY_FILE") or f"{beside}/backup-history.jsonl"
        if self.role == "prod":  # backup-db logs to syslog
            return [CRON_LOG], [history]
        return [CRON_LOG, log_file, _setting(env, "DRILL_LOG") or f"{beside}/backup-drill.log"], [history]

    def logs(self) -> None:
        rotated, kept = self.log_files()
        group = "adm" if _group_exists("adm") else None  # Debian's group for reading logs
        for name in rotated + kept:
            path = self.at(name)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
                self.changed(f"made the log {path}")
            self.own(path, 0o640, group)
        rule = LOGROTATE.format(
            role=self.role, paths=" ".join(rotated), user=self.user, group=group or _primary_group(self.user)
        )
        self.write_if_different(self.at("/etc/logrotate.d/kw-backup"), rule, 0o644)

    def cron(self) -> None:
        for name in CRON[self.role]:
            text = CRON_JOB.sub(rf"\g<1>{self.user}", (SOURCE / "cron" / name).read_text())
            self.write_if_different(self.at(f"/etc/cron.d/kw-backup-{name}"), text, 0o644)

    def wal_tier(self) -> None:
        """PITR=on: Barman in a venv of its own, PITR_DIR with the tunnel's key, the cron lines, the tunnel's unit."""
        # --no-deps: every package Barman runs is pinned there (psycopg2-binary for its psycopg2).
        self.venv(self.at(self.prefix) / ".venv-barman", "requirements-barman.txt", "--no-deps")
        pitr_dir = self.at(_setting(self.at(ENV_FILE), "PITR_DIR") or "/backups/kw-app-wal")
        for directory in (pitr_dir, pitr_dir / "ssh"):
            if not directory.is_dir():
                directory.mkdir(parents=True, mode=0o700)
                self.changed(f"made {directory}")
            self.own(directory, 0o700)
        key = pitr_dir / "ssh" / "id_tunnel"
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pi5-wal-tunnel", "-f", str(key)], check=True
            )
            self.changed(f"made the tunnel key {key}: on prod, make authorize-pi5-tunnel KEY={key.name}.pub")
        self.own(key, 0o600)
        self.own(key.with_suffix(".pub"), 0o644)
        text = CRON_JOB.sub(rf"\g<1>{self.user}", (SOURCE / "cron" / PITR_CRON).read_text())
        self.write_if_different(self.at(f"/etc/cron.d/kw-backup-{PITR_CRON}"), text, 0o644)
        unit = TUNNEL_UNIT_TEXT.format(user=self.user, prefix=self.prefix)
        self.write_if_different(self.at(TUNNEL_UNIT), unit, 0o644)
        if self.root == Path("/") and shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
            subprocess.run(["systemctl", "daemon-reload"], check=False)
            subprocess.run(["systemctl", "enable", "--now", Path(TUNNEL_UNIT).name], check=False)
        else:
            print(f"  start the tunnel: systemctl enable --now {Path(TUNNEL_UNIT).name}", flush=True)

    def write_if_different(self, path: Path, text: str, mode: int) -> None:
        if path.exists() and path.read_text() == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        self.changed(f"wrote {path}")

    def own(self, path: Path, mode: int, group: str | None = None) -> None:
        """`path` of `mode`, owned by the backup user and its group (or `group`) when installing as root."""
        st = path.stat()
        uid, gid = st.st_uid, st.st_gid
        if os.geteuid() == 0:
            uid = pwd.getpwnam(self.user).pw_uid
            gid = grp.getgrnam(group).gr_gid if group else pwd.getpwnam(self.user).pw_gid
        if (st.st_mode & 0o777, st.st_uid, st.st_gid) == (mode, uid, gid):
            return
        os.chown(path, uid, gid)
        path.chmod(mode)
        self.changed(f"{path}: mode {mode:04o}, owner {pwd.getpwuid(uid).pw_name}:{grp.getgrgid(gid).gr_name}")

    def uninstall(self) -> None:
        for script in SCRIPTS:
            link = self.at("/usr/local/bin") / script
            if link.is_symlink():
                link.unlink()
                self.changed(f"removed {link}")
        for name in [*CRON[self.role], *([PITR_CRON] if self.role == "pi5" else [])]:
            self._remove(self.at(f"/etc/cron.d/kw-backup-{name}"))
        if self.role == "pi5":
            self._remove(self.at(TUNNEL_UNIT))
        self._remove(self.at("/etc/logrotate.d/kw-backup"))
        if self.at(self.prefix).exists():
            shutil.rmtree(self.at(self.prefix))
            self.changed(f"removed {self.at(self.prefix)}")
        print(f"kept {ENV_FILE}, the logs and the backups", flush=True)

    def _remove(self, path: Path) -> None:
        if path.exists():
            path.unlink()
            self.changed(f"removed {path}")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _primary_group(user: str) -> str:
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def _setting(env_file: Path, name: str) -> str | None:
    if not env_file.exists():
        return None
    for line in env_file.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == name and value.strip():
            return shlex.split(value)[0] if value.strip()[0] in "\"'" else value.strip()
    return None


def _public_key(target: str, key_file: str) -> str:
    key = Path(key_file).read_text().strip()
    if not PUBLIC_KEY_RE.fullmatch(key) or "\n" in key:
        sys.exit(f"{target}: {key_file} is not one ssh public key")
    return key


def _authorize_once(target: str, key: str, options: str, authorized_keys: str | None, what: str, allows: str) -> None:
    """Append `options key` to authorized_keys once; the same key with other options is the operator's to edit."""
    path = Path(authorized_keys or Path.home() / ".ssh" / "authorized_keys")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = path.read_text().splitlines() if path.exists() else []
    line = f"{options} {key}"
    if line in existing:
        print(f"the {what} is already authorized in {path}; nothing changed")
        return
    if any(key.split()[1] in other.split() for other in existing):
        sys.exit(f"{target}: {path} already has this key with other options; edit that line by hand")
    with open(path, "a") as out:
        out.write(("" if not existing or path.read_text().endswith("\n") else "\n") + line + "\n")
    path.chmod(0o600)
    print(f"authorized the {what} in {path}: {allows}")


def authorize_pi5(key_file: str, authorized_keys: str | None, prod_dir: str | None) -> None:
    """Add the pi5's key to authorized_keys once, restricted to reading PROD_DIR through rrsync."""
    key = _public_key("authorize-pi5", key_file)
    prod_dir = prod_dir or _setting(Path(ENV_FILE), "PROD_DIR") or "/var/backups/kw-app"
    if not prod_dir.startswith("/") or re.search(r"[\s\"'\\]", prod_dir):
        sys.exit(f"authorize-pi5: PROD_DIR {prod_dir!r} must be an absolute path without spaces or quotes")
    options = f'restrict,command="rrsync -ro {prod_dir}"'
    allows = f"read-only rsync of {prod_dir}, nothing else"
    _authorize_once("authorize-pi5", key, options, authorized_keys, "pi5 key", allows)


def authorize_pi5_tunnel(key_file: str, authorized_keys: str | None, port: str | None) -> None:
    """Add the pi5's tunnel key once: one forward to 127.0.0.1:PROD_PG_PORT, no shell, no command, nothing else."""
    key = _public_key("authorize-pi5-tunnel", key_file)
    port = port or _setting(Path(ENV_FILE), "PROD_PG_PORT") or "5432"
    if not port.isdigit() or not 0 < int(port) < 65536:
        sys.exit(f"authorize-pi5-tunnel: PROD_PG_PORT {port!r} is not a TCP port")
    # command=: `restrict` still lets a key run a command without a terminal; this one may only forward.
    options = f'restrict,port-forwarding,permitopen="127.0.0.1:{port}",command="/bin/false"'
    allows = f"a forward to 127.0.0.1:{port}, nothing else"
    _authorize_once("authorize-pi5-tunnel", key, options, authorized_keys, "pi5 tunnel key", allows)


def pi5_keys(home: str | None) -> None:
    ssh = Path(home or Path.home()) / ".ssh"
    ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, comment, what in (
        ("id_prod_backup", "pi5-backup", "on prod: make authorize-pi5 KEY=id_prod_backup.pub"),
        (
            "id_nas_backup",
            "pi5-to-nas",
            "on the nas: add it to the backup user's "
            "~/.ssh/authorized_keys (ssh-copy-id -i ~/.ssh/id_nas_backup user@nas.local)",
        ),
    ):
        key = ssh / name
        if key.exists():
            print(f"{key} exists; kept")
        else:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)], check=True)
            print(f"made {key}")
        print(f"  {key}.pub: {what}")


def remote(target: str, host: str, make_args: list[str]) -> None:
    """Copy this tree to HOST over ssh and run the same make target there with sudo."""
    ssh = ["ssh", *(["-F", os.environ["SSH_CONFIG"]] if os.environ.get("SSH_CONFIG") else []), "-o", "BatchMode=yes"]
    staging = subprocess.run(
        # In the login's TMPDIR when it has one (where mktemp itself would put it), else /tmp.
        [*ssh, host, shlex.join(["sh", "-c", 'mktemp -d "${TMPDIR:-/tmp}/kw-backup-install.XXXXXXXX"'])],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        rsync_e = " ".join(shlex.quote(a) for a in ssh)
        subprocess.run(
            ["rsync", "-a", "-e", rsync_e, *[str(SOURCE / item) for item in SHIPPED], f"{host}:{staging}/"], check=True
        )
        command = [
            "sh",
            "-c",
            'if [ "$(id -u)" = 0 ]; then exec "$@"; else exec sudo "$@"; fi',
            "sh",
            "make",
            "-C",
            staging,
            target,
            *make_args,
        ]
        done = subprocess.run([*ssh, "-t" if sys.stdin.isatty() else "-T", host, shlex.join(command)])
        if done.returncode:
            sys.exit(done.returncode)
    finally:
        subprocess.run([*ssh, host, shlex.join(["rm", "-rf", "--", staging])], check=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument(
        "action",
        choices=[
            "install-prod",
            "install-pi5",
            "uninstall-prod",
            "uninstall-pi5",
            "authorize-pi5",
            "authorize-pi5-tunnel",
            "pi5-keys",
        ],
    )
    p.add_argument("--pitr", default="", help="on: the WAL tier too (install-pi5)")
    p.add_argument("--port", default="", help="PROD_PG_PORT (authorize-pi5-tunnel)")
    p.add_argument("--prefix", default="/opt/kw-backup")
    p.add_argument("--destdir", default="")
    p.add_argument("--host", default="")
    p.add_argument("--user", default="", help="the backup user (owner of the backups; cron's user)")
    p.add_argument("--key", default="")
    p.add_argument("--authorized-keys", default="")
    p.add_argument("--prod-dir", default="")
    args = p.parse_args(argv)
    if args.host:
        make_args = (
            [f"PREFIX={args.prefix}"]
            + ([f"DESTDIR={args.destdir}"] if args.destdir else [])
            + ([f"BACKUP_USER={args.user}"] if args.user else [])
            + ([f"PITR={args.pitr}"] if args.pitr else [])
        )
        remote(args.action, args.host, make_args)
    elif args.action == "authorize-pi5":
        if not args.key:
            p.error("authorize-pi5 needs KEY=file.pub")
        authorize_pi5(args.key, args.authorized_keys or None, args.prod_dir or None)
    elif args.action == "authorize-pi5-tunnel":
        if not args.key:
            p.error("authorize-pi5-tunnel needs KEY=file.pub")
        authorize_pi5_tunnel(args.key, args.authorized_keys or None, args.port or None)
    elif args.action == "pi5-keys":
        pi5_keys(None)
    else:
        verb, role = args.action.split("-", 1)
        installer = Installer(role, args.prefix, args.destdir, args.user or None, pitr=args.pitr == "on")
        installer.install() if verb == "install" else installer.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
