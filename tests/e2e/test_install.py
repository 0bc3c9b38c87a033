"""make install-prod / install-pi5 / uninstall / authorize-pi5 / pi5-keys, into a DESTDIR and over ssh."""

import os
import re
import subprocess
import sys

import pytest

from tests import world


def make(*args, env=None, check=True):
    result = subprocess.run(["make", "-s", *args], cwd=world.ROOT, capture_output=True, text=True, timeout=600,
                            env=env or os.environ.copy(), stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """One install-prod into a DESTDIR (making the venv takes a few seconds)."""
    dest = tmp_path_factory.mktemp("dest")
    first = make("install-prod", f"DESTDIR={dest}")
    return dest, first.stdout


def test_install_prod_into_destdir_then_a_real_backup_through_the_link(installed, kw, tmp_path):
    dest, output = installed
    assert "done:" in output
    link = dest / "usr/local/bin/backup-db"
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert (dest / "etc/kw-backup/backup.env").stat().st_mode & 0o777 == 0o600
    assert (dest / "var/backups/kw-app").stat().st_mode & 0o777 == 0o700
    assert (dest / "opt/kw-backup/.venv/bin/python").exists()
    assert "0 2 * * * root /usr/local/bin/backup-db" in (dest / "etc/cron.d/kw-backup-prod").read_text()
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


def test_install_pi5_and_uninstall_keep_the_settings_and_backups(tmp_path):
    dest = tmp_path / "dest"
    make("install-pi5", f"DESTDIR={dest}")
    assert "PI5_HOST=local" in (dest / "etc/kw-backup/backup.env").read_text()
    assert (dest / "etc/logrotate.d/kw-backup").exists()
    assert (dest / "etc/cron.d/kw-backup-pi5").exists() and (dest / "etc/cron.d/kw-backup-drill").exists()
    (dest / "backups/kw-app/db-2024-01-01.sql.gz").write_bytes(b"kept")
    out = make("uninstall-pi5", f"DESTDIR={dest}").stdout
    assert "kept /etc/kw-backup/backup.env and the backups" in out
    assert not (dest / "opt/kw-backup").exists() and not (dest / "usr/local/bin/backup-db").is_symlink()
    assert (dest / "etc/kw-backup/backup.env").exists() and (dest / "backups/kw-app/db-2024-01-01.sql.gz").exists()


def test_remote_install_over_ssh_into_a_destdir_on_prod(ssh_world, tmp_path):
    dest = tmp_path / "remote-dest"
    env = {**os.environ, "SSH_CONFIG": str(ssh_world.config)}
    result = make("install-prod", "HOST=prod", f"DESTDIR={dest}", env=env)
    assert "installing kw-backup (prod)" in result.stdout
    assert (dest / "usr/local/bin/backup-db").is_symlink() and (dest / "etc/cron.d/kw-backup-prod").exists()
    assert not [n for n in os.listdir("/tmp") if n.startswith("kw-backup-install.")]


def test_missing_prerequisites_are_named_with_their_install_command(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").symlink_to(sys.executable)
    result = subprocess.run(["python3", "-m", "kwbackup.install", "install-prod", "--destdir", str(tmp_path / "d")],
                            env={"PATH": str(bare), "PYTHONPATH": str(world.ROOT / "lib")}, capture_output=True,
                            text=True)
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
def test_every_cron_line_parses_and_its_command_exists_after_install(installed, name, tmp_path):
    dest, _ = installed
    pi5_dest = tmp_path / "pi5"
    if name != "prod":
        make("install-pi5", f"DESTDIR={pi5_dest}")
    root = dest if name == "prod" else pi5_dest
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


def test_authorize_pi5_adds_the_restricted_key_once_and_it_works(net, tmp_path):
    key = tmp_path / "id_prod_backup"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    keys_file = net.ssh.places["prod"].authorized_keys
    args = ["authorize-pi5", f"KEY={key}.pub", f"AUTHORIZED_KEYS={keys_file}", f"PROD_DIR={net.prod_dir}"]
    try:
        first = make(*args)
        assert "authorized the pi5 key" in first.stdout
        assert "nothing changed" in make(*args).stdout
        line = [entry for entry in keys_file.read_text().splitlines() if key.with_suffix(".pub").read_text().split()[1]
                in entry]
        assert line == [f'restrict,command="rrsync -ro {net.prod_dir}" {key.with_suffix(".pub").read_text().strip()}']
        world.synthetic_dump(net.prod_dir, "db-2024-03-10.sql.gz")
        net.settings["SSH_CONFIG"] = str(net.ssh.client_config(tmp_path / "cfg", identity={"prod": key}))
        result = net.run("backup-orchestrator")
        assert result.returncode == 0, result.stderr
        shell = subprocess.run(["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o",
                                "BatchMode=yes", "-o", f"UserKnownHostsFile={net.ssh.known_hosts}", "-p",
                                str(net.ssh.port), "root@127.0.0.2", "id"], capture_output=True, text=True)
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
