"""make install-prod / install-pi5 / uninstall / authorize-pi5 / pi5-keys, into a DESTDIR and over ssh; the
installed cron lines run as cron runs them."""

import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kwbackup.install import Installer
from tests import world


def make(*args, env=None, check=True):
    result = subprocess.run(
        ["make", "-s", *args],
        cwd=world.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env or os.environ.copy(),
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def installed(prod_install):
    """The session's install-prod into a DESTDIR (the one prod's logins find), and what it printed."""
    return prod_install.dest, prod_install.output


@pytest.fixture(scope="module")
def installed_pi5(pi5_install):
    """The session's install-pi5 for BACKUP_USER=pi, into a DESTDIR that pi can reach as it reaches / on a Pi."""
    return pi5_install.dest, pi5_install.output


def test_install_prod_into_destdir_then_a_real_backup_through_the_link(installed, kw, tmp_path):
    dest, output = installed
    assert "done:" in output
    link = dest / "usr/local/bin/backup-db"
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert (dest / "etc/kw-backup/backup.env").stat().st_mode & 0o777 == 0o600
    assert (dest / "var/backups/kw-app").stat().st_mode & 0o777 == 0o700
    assert (dest / "opt/kw-backup/.venv/bin/python").exists()
    assert "0 2 * * * root /usr/local/bin/backup-db" in (dest / "etc/cron.d/kw-backup-prod").read_text()
    assert "/var/log/backup-cron.log {" in (dest / "etc/logrotate.d/kw-backup").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = kw.env()
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # a plain shell: no venv on PATH
    helped = subprocess.run([str(link), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "--keep" in helped.stdout
    backup = subprocess.run([str(link)], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert backup.returncode == 0, backup.stderr
    assert backup.stdout.strip().splitlines()[-1].startswith(str(kw.prod_dir))


def test_a_second_install_changes_nothing_and_keeps_a_changed_env_file(installed):
    dest, _ = installed
    env_file = dest / "etc/kw-backup/backup.env"
    env_file.write_text("PROD_KEEP=5\n")
    again = make("install-prod", f"DESTDIR={dest}")
    assert "nothing changed: already installed" in again.stdout
    assert env_file.read_text() == "PROD_KEEP=5\n"


def test_install_pi5_and_uninstall_keep_the_settings_and_backups(installed_pi5, tmp_path):
    dest = tmp_path / "dest"
    shutil.copytree(installed_pi5[0], dest, symlinks=True)  # a copy of the session's: its venv takes long to make
    make("install-pi5", f"DESTDIR={dest}")
    assert "PI5_HOST=local" in (dest / "etc/kw-backup/backup.env").read_text()
    assert (dest / "etc/logrotate.d/kw-backup").exists()
    assert (dest / "etc/cron.d/kw-backup-pi5").exists() and (dest / "etc/cron.d/kw-backup-drill").exists()
    (dest / "backups/kw-app/db-2024-01-01.sql.gz").write_bytes(b"kept")
    out = make("uninstall-pi5", f"DESTDIR={dest}").stdout
    assert "kept /etc/kw-backup/backup.env, the logs and the backups" in out
    assert not (dest / "etc/logrotate.d/kw-backup").exists() and (dest / "var/log/backup-orchestrator.log").exists()
    assert not (dest / "opt/kw-backup").exists() and not (dest / "usr/local/bin/backup-db").is_symlink()
    assert (dest / "etc/kw-backup/backup.env").exists() and (dest / "backups/kw-app/db-2024-01-01.sql.gz").exists()


def test_remote_install_over_ssh_into_a_destdir_on_prod(ssh_world, installed):
    """The tree copied to prod over ssh and make run there: over the session's install (a new venv takes long), so
    it finds that install complete and changes nothing."""
    dest = installed[0]
    env = {**os.environ, "SSH_CONFIG": str(ssh_world.config)}
    before = world.staging_leftovers()
    result = make("install-prod", "HOST=prod", f"DESTDIR={dest}", env=env)
    assert "installing kw-backup (prod)" in result.stdout and "nothing changed: already installed" in result.stdout
    assert (dest / "usr/local/bin/backup-db").is_symlink() and (dest / "etc/cron.d/kw-backup-prod").exists()
    assert world.staging_leftovers() <= before  # the tree it copied to prod's TMPDIR is gone


def test_missing_prerequisites_are_named_with_their_install_command(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").symlink_to(sys.executable)
    result = subprocess.run(
        ["python3", "-m", "kwbackup.install", "install-prod", "--destdir", str(tmp_path / "d")],
        env={"PATH": str(bare), "PYTHONPATH": str(world.ROOT / "lib")},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "apt-get install rsync" in result.stderr and "pg_dump or docker" in result.stderr


CRON_LINE = re.compile(r"(\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (/\S+)(.*)")
RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def valid_field(field: str, low: int, high: int) -> bool:
    for part in field.split(","):
        base, _, step = part.partition("/")
        if step and not step.isdigit():
            return False
        if base == "*":
            continue
        bounds = base.split("-")
        if not all(b.isdigit() and low <= int(b) <= high for b in bounds) or len(bounds) > 2:
            return False
    return True


@pytest.mark.parametrize("name", ["prod", "pi5", "drill"])
def test_every_cron_line_parses_and_its_command_exists_after_install(installed, installed_pi5, name):
    root = installed[0] if name == "prod" else installed_pi5[0]
    text = (root / f"etc/cron.d/kw-backup-{name}").read_text()
    assert "CRON_TZ=UTC" in text and re.search(r"^PATH=", text, re.M)
    jobs = 0
    for line in text.splitlines():
        if not line.strip() or line.startswith("#") or re.fullmatch(r"[A-Z_]+=\S+", line):
            continue
        m = CRON_LINE.fullmatch(line)
        assert m, line
        assert all(valid_field(m[i + 1], *RANGES[i]) for i in range(5)), line
        assert m[6] in ("root", "pi") and (root / m[7].lstrip("/")).exists(), line
        jobs += 1
    assert jobs == 1


# Five time fields (numeric in cron/), the user, the command; a commented-out job line is a job line too.
JOB_LINE = re.compile(r"(#?(?:[0-9*][0-9*/,-]*\s+){5})(\S+)(\s.*)")


@pytest.mark.parametrize("role", ["prod", "pi5"])
def test_cron_files_keep_their_comments_word_for_word_and_every_job_line_gets_the_user(role, tmp_path):
    Installer(role, "/opt/kw-backup", str(tmp_path), "nightly").cron()
    jobs = 0
    for name in {"prod": ["prod"], "pi5": ["pi5", "drill"]}[role]:
        source = (world.ROOT / "cron" / name).read_text().splitlines()
        installed = (tmp_path / f"etc/cron.d/kw-backup-{name}").read_text().splitlines()
        assert len(installed) == len(source)
        for ours, theirs in zip(source, installed, strict=True):
            job = JOB_LINE.fullmatch(ours)
            assert theirs == (f"{job[1]}nightly{job[3]}" if job else ours)
            jobs += bool(job)
        assert sum(line.startswith("# ") and len(line.split()) > 6 for line in installed) >= 2  # prose, kept
    assert jobs == {"prod": 1, "pi5": 3}[role]  # the drill's weekly line, commented out, too


def cron_file(path: Path) -> tuple[dict[str, str], list[tuple[bool, str, str]]]:
    """A /etc/cron.d file as cron reads it: its variables, and each job's (commented out, user, command)."""
    variables, jobs = {}, []
    for line in path.read_text().splitlines():
        if variable := re.fullmatch(r"([A-Z_]+)=(.*)", line):
            variables[variable[1]] = variable[2]
        elif job := JOB_LINE.fullmatch(line):
            jobs.append((job[1].startswith("#"), job[2], job[3].strip()))
    return variables, jobs


def run_as_cron(dest: Path, variables: dict[str, str], user: str, command: str) -> subprocess.CompletedProcess:
    """`command` as cron runs a job of `user`: `sh -c` in the user's HOME with the cron file's variables, HOME and
    LOGNAME and nothing else, on this machine as the install in `dest` made it. A private mount namespace lays dest's
    /etc, /opt and /usr/local/bin over the real ones (read only) and makes dest's /var/log the upper layer of
    /var/log, so the jobs' logs land in dest."""
    work = Path(tempfile.mkdtemp(prefix="kw-overlay-"))
    home = pwd.getpwnam(user).pw_dir
    environment = {"HOME": home, "LOGNAME": user, "SHELL": "/bin/sh", **variables}
    layers = (
        "work=$1 dest=$2; shift 2; for p in etc opt usr/local/bin; do "
        'mount -t overlay overlay -o "lowerdir=$dest/$p:/$p" "/$p"; done; '
        'mount -t overlay overlay -o "lowerdir=/var/log,upperdir=$dest/var/log,workdir=$work" /var/log; '
        'exec "$@"'
    )
    try:
        return subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-ec",
                layers,
                "sh",
                str(work),
                str(dest),
                "runuser",
                "-u",
                user,
                "--",
                "env",
                "-i",
                *[f"{k}={v}" for k, v in environment.items()],
                "/bin/sh",
                "-c",
                command,
            ],
            cwd=home,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    finally:
        shutil.rmtree(work)


def add_settings(dest: Path, **settings) -> None:
    """Point the installed env file at the test world: appended, so they win; its owner and mode stay."""
    with open(dest / "etc/kw-backup/backup.env", "a") as out:
        out.write("".join(f"{k}={json.dumps(str(v))}\n" for k, v in settings.items()))


def only_job(dest: Path, name: str) -> tuple[dict[str, str], str, str]:
    variables, jobs = cron_file(dest / f"etc/cron.d/kw-backup-{name}")
    active = [(user, command) for commented, user, command in jobs if not commented]
    assert len(active) == 1, jobs
    return variables, *active[0]


def test_the_installed_cron_lines_run_as_written_as_their_users(
    installed, installed_pi5, pi, pg, db, ssh_world, tmp_path
):
    """backup-db's line as root on prod, then the orchestrator's and the drill's as the unprivileged pi on the Pi,
    each exactly as cron runs it, against the test world: PostgreSQL, and prod over sshd with the Pi's rrsync key.
    This is what finds an env file its cron user cannot read (/etc/kw-backup 0700 root)."""
    prod, pi5 = installed[0], installed_pi5[0]
    for dest, user in ((prod, pwd.getpwnam("root")), (pi5, pi)):
        directory, env_file = (dest / "etc/kw-backup").stat(), (dest / "etc/kw-backup/backup.env").stat()
        assert (directory.st_uid, directory.st_mode & 0o777, env_file.st_uid, env_file.st_mode & 0o777) == (
            user.pw_uid,
            0o700,
            user.pw_uid,
            0o600,
        )
    prod_dir = prod / "var/backups/kw-app"
    add_settings(
        prod, DB_EXEC="direct", DB_NAME=db, DB_HOST=pg.sockets, DB_PORT=pg.port, DB_USER="postgres", PROD_DIR=prod_dir
    )
    variables, user, command = only_job(prod, "prod")
    nightly = run_as_cron(prod, variables, user, command)
    assert (nightly.returncode, nightly.stdout + nightly.stderr) == (0, ""), nightly.stderr
    dump = Path((prod / "var/log/backup-cron.log").read_text().splitlines()[-1])  # its path, as backup-db prints it
    assert dump.parent == prod_dir and dump.exists()

    # The Pi's own: its key for prod (restricted as make authorize-pi5 adds it), ssh config, known hosts, the nas.
    mine = Path(tempfile.mkdtemp(prefix="kw-pi-"))
    os.chown(mine, pi.pw_uid, pi.pw_gid)
    key, public = ssh_world.restricted_key(mine, prod_dir, owner="pi")
    recorder = world.Recorder()
    try:
        (mine / "known_hosts").write_text(ssh_world.known_hosts.read_text())
        (mine / "ssh_config").write_text(
            f"Host prod\n  HostName {ssh_world.places['prod'].address}\n  Port {ssh_world.port}\n"
            f"  User {pwd.getpwuid(os.geteuid()).pw_name}\n  IdentityFile {key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {mine / 'known_hosts'}\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n"
        )
        add_settings(
            pi5,
            PROD_HOST="prod",
            PROD_DIR=prod_dir,
            SSH_CONFIG=mine / "ssh_config",
            PI5_DIR=pi5 / "backups/kw-app",
            NAS_HOST="local",
            NAS_DIR=mine / "nas",
            HEALTHCHECKS_URL=f"{recorder.url}/hc/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278",
        )
        variables, user, command = only_job(pi5, "pi5")
        assert user == "pi"
        nightly = run_as_cron(pi5, variables, user, command)
        assert (nightly.returncode, nightly.stdout + nightly.stderr) == (0, ""), nightly.stderr
        assert (pi5 / "var/log/backup-cron.log").read_text() == ""  # --quiet: nothing to warn about
        assert "result=ok" in (pi5 / "var/log/backup-orchestrator.log").read_text().splitlines()[-1]
        assert (pi5 / "backups/kw-app" / dump.name).exists() and (mine / "nas" / dump.name).exists()
        assert [r["path"].split("?")[0] for r in recorder.requests] == [
            "/hc/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278/start",
            "/hc/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278",
        ]

        variables, user, command = only_job(pi5, "drill")
        assert cron_file(pi5 / "etc/cron.d/kw-backup-drill")[1] == [(False, "pi", command), (True, "pi", command)]
        drill = run_as_cron(pi5, variables, user, command)  # and so the weekly line, once uncommented
        assert (drill.returncode, drill.stdout + drill.stderr) == (0, ""), drill.stderr
        report = json.loads((pi5 / "var/log/backup-drill.log").read_text().splitlines()[-1])
        assert (report["dump"], report["result"]) == (dump.name, "ok")

        # The logrotate rule rotates the Pi's logs and makes new ones the cron user can append to.
        rotated = run_as_cron(
            pi5,
            {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            "root",
            f"logrotate --force --state {tmp_path / 'state'} /etc/logrotate.d/kw-backup",
        )
        assert rotated.returncode == 0, rotated.stderr
        fresh = (pi5 / "var/log/backup-orchestrator.log").stat()
        assert (fresh.st_uid, fresh.st_mode & 0o777, fresh.st_size) == (pi.pw_uid, 0o640, 0)
        assert "result=ok" in (pi5 / "var/log/backup-orchestrator.log.1").read_text()
        variables, user, command = only_job(pi5, "pi5")
        assert run_as_cron(pi5, variables, user, command).returncode == 0
        assert "summary: " in (pi5 / "var/log/backup-orchestrator.log").read_text()
    finally:
        recorder.close()
        ssh_world.places["prod"].unauthorize(public)
        shutil.rmtree(mine)


def test_a_reinstall_gives_an_unreadable_env_file_back_to_its_cron_user(installed_pi5, pi):
    """An older install left /etc/kw-backup 0700 root with pi's env file in it: the next install repairs it."""
    etc = installed_pi5[0] / "etc/kw-backup"
    os.chown(etc, 0, 0)
    os.chown(etc / "backup.env", pi.pw_uid, 0)
    etc.chmod(0o700)
    settings = (etc / "backup.env").read_text()
    again = make("install-pi5", f"DESTDIR={installed_pi5[0]}", "BACKUP_USER=pi", "PYTHON=/usr/bin/python3").stdout
    owner = f"pi:{grp.getgrgid(pi.pw_gid).gr_name}"
    assert f"{etc}: mode 0700, owner {owner}" in again and f"{etc / 'backup.env'}: mode 0600, owner {owner}" in again
    assert (etc.stat().st_uid, (etc / "backup.env").stat().st_gid) == (pi.pw_uid, pi.pw_gid)
    assert (etc / "backup.env").read_text() == settings


def test_authorize_pi5_adds_the_restricted_key_once_and_it_works(net, tmp_path):
    key = tmp_path / "id_prod_backup"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    keys_file = net.ssh.places["prod"].authorized_keys
    args = ["authorize-pi5", f"KEY={key}.pub", f"AUTHORIZED_KEYS={keys_file}", f"PROD_DIR={net.prod_dir}"]
    try:
        first = make(*args)
        assert "authorized the pi5 key" in first.stdout
        assert "nothing changed" in make(*args).stdout
        line = [
            entry
            for entry in keys_file.read_text().splitlines()
            if key.with_suffix(".pub").read_text().split()[1] in entry
        ]
        assert line == [f'restrict,command="rrsync -ro {net.prod_dir}" {key.with_suffix(".pub").read_text().strip()}']
        world.synthetic_dump(net.prod_dir, "db-2024-03-10.sql.gz")
        net.settings["SSH_CONFIG"] = str(net.ssh.client_config(tmp_path / "cfg", identity={"prod": key}))
        result = net.run("backup-orchestrator")
        assert result.returncode == 0, result.stderr
        shell = subprocess.run(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-i",
                str(key),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                f"UserKnownHostsFile={net.ssh.known_hosts}",
                "-p",
                str(net.ssh.port),
                "root@127.0.0.2",
                "id",
            ],
            capture_output=True,
            text=True,
        )
        assert shell.returncode != 0 and "uid=" not in shell.stdout
    finally:
        net.ssh.places["prod"].unauthorize(key.with_suffix(".pub").read_text())


def test_pi5_keys_are_made_once(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    out = make("pi5-keys", env=env).stdout
    assert (tmp_path / ".ssh/id_prod_backup").exists() and (tmp_path / ".ssh/id_nas_backup").exists()
    assert "make authorize-pi5 KEY=id_prod_backup.pub" in out
    before = (tmp_path / ".ssh/id_prod_backup").read_bytes()
    assert "exists; kept" in make("pi5-keys", env=env).stdout
    assert (tmp_path / ".ssh/id_prod_backup").read_bytes() == before


def test_install_pi5_with_pitr_adds_the_wal_tier_and_authorize_pi5_tunnel_adds_its_key_once(pitr_install, pi, tmp_path):
    """make install-pi5 PITR=on: Barman pinned in its own venv, PITR_DIR the Pi's with the tunnel's key, the cron
    lines (each parses, runs as pi, and names an installed command) and the tunnel's unit; then prod's side."""
    root = pitr_install.dest
    barman = root / "opt/kw-backup/.venv-barman/bin/barman"
    version = subprocess.run(
        ["runuser", "-u", pi.pw_name, "--", str(barman), "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("3.19.1"), version.stdout + version.stderr
    tier = root / "backups/kw-app-wal"
    key = tier / "ssh/id_tunnel"
    for path, mode in ((tier, 0o700), (tier / "ssh", 0o700), (key, 0o600)):
        st = path.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (pi.pw_uid, mode), path
    text = (root / "etc/cron.d/kw-backup-pi5-pitr").read_text()
    jobs = [CRON_LINE.fullmatch(line) for line in text.splitlines() if re.match(r"[0-9*]", line)]
    assert len(jobs) == 3 and all(jobs)
    for m in jobs:
        assert all(valid_field(m[i + 1], *RANGES[i]) for i in range(5)) and m[6] == "pi", m[0]
        assert (root / m[7].split()[0].lstrip("/")).exists(), m[0]
    unit = (root / "etc/systemd/system/kw-backup-pitr-tunnel.service").read_text()
    assert "User=pi\n" in unit and "ExecStart=/opt/kw-backup/bin/pitr-tunnel --quiet\n" in unit
    assert "Restart=always" in unit

    authorized = tmp_path / "authorized_keys"
    first = make("authorize-pi5-tunnel", f"KEY={key}.pub", f"AUTHORIZED_KEYS={authorized}", "PROD_PG_PORT=5433")
    second = make("authorize-pi5-tunnel", f"KEY={key}.pub", f"AUTHORIZED_KEYS={authorized}", "PROD_PG_PORT=5433")
    assert "nothing changed" in second.stdout, first.stdout + second.stdout
    (line,) = authorized.read_text().splitlines()
    assert line.startswith('restrict,port-forwarding,permitopen="127.0.0.1:5433",command="/bin/false" ssh-ed25519 ')
