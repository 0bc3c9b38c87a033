"""bin/pull-prod-backups run on the laptop: backup-db on prod, then the pi5's backup-orchestrator, over ssh.

Prod and the pi5 are as deployed: their logins find only what make install-prod and make install-pi5 put
there, each reads its installed env file, and the laptop reaches the pi5 as its unprivileged `pi`, whose
key for prod works only as `rrsync -ro PROD_DIR`.
"""

import json
import os
import re
import subprocess

import pytest

from tests import world

NIGHTLY = re.compile(r"db-\d{4}-\d{2}-\d{2}(-\d{6})?\.sql\.gz")

GATE = """#!/bin/sh
# gate FILE CMD...: hold this link until FILE exists (30 s at most), then run CMD (the link itself).
file=$1
shift
tries=0
until [ -e "$file" ]; do
  tries=$((tries + 1))
  [ "$tries" -le 600 ] || exit 1
  sleep 0.05
done
exec "$@"
"""


@pytest.fixture
def place_env(ssh_world):
    """Writes a place's installed env file for this test only: the old one is put back afterwards."""
    saved = {}

    def write(name, settings):
        env_file = ssh_world.places[name].env_file
        saved.setdefault(name, env_file.read_bytes())
        world.write_env(env_file, settings)

    yield write
    for name, text in saved.items():
        ssh_world.places[name].env_file.write_bytes(text)


@pytest.fixture
def laptop(net, pg, place_env, prod_install, pi5_install):
    """The laptop reaches prod and the pi5 (as pi) over ssh; each runs its installed scripts with its env file."""
    net.settings.update(PI5_HOST="pi@pi5")
    dirs = {key: net.settings[key] for key in ("PROD_DIR", "PI5_DIR", "NAS_DIR")}
    # The remote session does not inherit the test's PG* variables: prod's settings say where PostgreSQL is.
    net.prod_env = {
        "DB_EXEC": "direct",
        "DB_NAME": net.settings["DB_NAME"],
        "DB_HOST": "127.0.0.1",
        "DB_PORT": str(pg.port),
        "DB_USER": "postgres",
        "PROD_DIR": dirs["PROD_DIR"],
        "MIN_DUMP_BYTES": "1024",
    }
    net.pi5_env = {
        "PI5_HOST": "local",
        "PROD_HOST": "prod",
        "NAS_HOST": "nas",
        "SSH_CONFIG": str(net.ssh.config),
        **dirs,
        "LOG_FILE": str(net.tmp / "pi5-orchestrator.log"),
        "MAX_DUMP_AGE_HOURS": net.settings["MAX_DUMP_AGE_HOURS"],
    }
    net.pi5_log = net.tmp / "pi5-orchestrator.log"
    place_env("prod", net.prod_env)
    place_env("pi5", pi5_settings(net))
    net.place_env = place_env
    return net


def pi5_settings(net, **changes):
    """The pi5's settings, its ssh files the Pi's own copies."""
    return net.pi.settings({**net.pi5_env, **changes}, "pi5")


def test_prod_and_the_pi5_run_what_was_installed_there_and_the_pi5_as_pi(laptop, prod_install, pi5_install, pi):
    looked_up = "id -un; for s in backup-db backup-orchestrator verify-backup; do command -v $s; done"
    for place, install in (("prod", prod_install), ("pi@pi5", pi5_install)):
        found = laptop.ssh.ssh(place, looked_up)
        user, *paths = found.stdout.split()
        assert user == ("pi" if place == "pi@pi5" else "root")
        assert paths == [str(install.bin / s) for s in ("backup-db", "backup-orchestrator", "verify-backup")], paths
        assert str(world.ROOT) not in laptop.ssh.ssh(place, "echo $PATH").stdout
    result = laptop.run("pull-prod-backups")
    assert result.returncode == 0, result.stdout + result.stderr
    name = os.path.basename(dump_path(result.stdout, laptop.prod_dir))
    assert (laptop.pi5_dir / name).stat().st_uid == pi.pw_uid and laptop.pi5_log.stat().st_uid == pi.pw_uid


def dump_path(stdout, prod_dir):
    """backup-db's last line of output: the new dump's path on prod."""
    paths = [line for line in stdout.splitlines() if line.startswith(f"{prod_dir}/")]
    assert len(paths) == 1, stdout
    assert NIGHTLY.fullmatch(os.path.basename(paths[0])), paths[0]
    return paths[0]


def copies(name, *directories):
    """The dump and its manifest are in every directory: the same dump, the same manifest."""
    contents = [((d / name).read_bytes(), json.loads((d / (name + ".json")).read_text())) for d in directories]
    return all(one == contents[0] for one in contents)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("pull-prod-backups:") and "error" in line]


def test_a_fresh_dump_on_prod_reaches_the_pi5_and_the_nas_verified(laptop):
    result = laptop.run("pull-prod-backups")
    assert result.returncode == 0, result.stdout + result.stderr
    name = os.path.basename(dump_path(result.stdout, laptop.prod_dir))
    assert copies(name, laptop.prod_dir, laptop.pi5_dir, laptop.nas_dir)
    summary = [line for line in laptop.pi5_log.read_text().splitlines() if "summary" in line]
    assert len(summary) == 1 and name in summary[0]
    assert name in result.stderr and summary[0].split("summary", 1)[1] in result.stderr  # the pi5's output came
    listed = json.loads(laptop.run("list-backups", "--json").stdout)
    assert sorted((row["place"], row["status"]) for row in listed if row["name"] == name) == [
        ("nas", "verified"),
        ("pi5", "verified"),
        ("prod", "verified"),
    ]


def test_the_orchestrators_output_streams_while_it_runs(laptop):
    """The pi5's link to the nas is held shut: what the orchestrator said before it must already be here."""
    dump = world.synthetic_dump(laptop.prod_dir, "db-2024-01-15.sql.gz")
    gate, script = laptop.tmp / "gate-open", laptop.tmp / "gate"
    script.write_text(GATE)
    script.chmod(0o755)
    nas = f"{script} {gate} {world.relay_command(laptop.ssh.places['nas'].address, 10**8)}"
    config = laptop.ssh.client_config(laptop.tmp / "pi5_ssh_config", proxy={"nas": nas})
    laptop.place_env("pi5", pi5_settings(laptop, SSH_CONFIG=str(config)))
    proc = subprocess.Popen(
        [str(world.BIN / "pull-prod-backups"), "--no-dump"],
        env=laptop.env(),
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        before = []
        for line in proc.stderr:  # with --no-dump only the orchestrator talks about the dump
            before.append(line)
            if dump.name in line:
                break
        assert dump.name in "".join(before) and proc.poll() is None, f"nothing streamed while it ran: {before}"
        assert not (laptop.nas_dir / dump.name).exists()
        gate.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + "".join(before) + err
    assert copies(dump.name, laptop.prod_dir, laptop.pi5_dir, laptop.nas_dir)


def test_no_dump_only_runs_the_orchestrator(laptop):
    dump = world.synthetic_dump(laptop.prod_dir, "db-2024-01-15.sql.gz")
    before = sorted(os.listdir(laptop.prod_dir))
    result = laptop.run("pull-prod-backups", "--no-dump")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(laptop.prod_dir)) == before  # backup-db did not run: no new dump, no lock file
    assert copies(dump.name, laptop.prod_dir, laptop.pi5_dir, laptop.nas_dir)


def test_a_failing_backup_db_stops_before_the_orchestrator(laptop, place_env):
    world.synthetic_dump(laptop.prod_dir, "db-2024-01-15.sql.gz")  # what the orchestrator would have pulled
    place_env("prod", {**laptop.prod_env, "DB_NAME": "kw_no_such_database"})
    result = laptop.run("pull-prod-backups")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "kw_no_such_database" in result.stderr  # backup-db's own message, streamed
    assert len(error_lines(result.stderr)) == 1 and "backup-db" in error_lines(result.stderr)[0], result.stderr
    assert not laptop.pi5_log.exists() and not laptop.pi5_dir.exists() and not laptop.nas_dir.exists()


def test_the_exit_status_is_the_failing_steps(laptop):
    """The orchestrator refuses a corrupt dump with 3: pull-prod-backups exits 3 too."""
    dump = world.synthetic_dump(laptop.prod_dir, "db-2024-01-15.sql.gz")
    dump.write_bytes(dump.read_bytes()[:-200])
    result = laptop.run("pull-prod-backups", "--no-dump")
    assert result.returncode == 3, result.stdout + result.stderr
    assert not (laptop.pi5_dir / dump.name).exists() and not (laptop.nas_dir / dump.name).exists()


@pytest.mark.parametrize("unreachable, script", [("pi5", "backup-orchestrator"), ("prod", "backup-db")])
def test_an_unreachable_place_is_one_line_naming_it(laptop, unreachable, script):
    laptop.settings[f"{unreachable.upper()}_HOST"] = "gone"
    result = laptop.run("pull-prod-backups")
    assert result.returncode == 1, result.stdout + result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and unreachable in errors[0] and script in errors[0], result.stderr
    if unreachable == "pi5":  # the dump was made first
        assert NIGHTLY.fullmatch(os.path.basename(dump_path(result.stdout, laptop.prod_dir)))
    else:
        assert not laptop.prod_dir.exists()
    assert not laptop.pi5_log.exists() and not laptop.pi5_dir.exists()


def test_local_places_run_the_scripts_beside_it_with_the_same_env_file(kw):
    """Every place `local` (as in make demo): no ssh; the scripts get the --env-file it was given."""
    env = {k: v for k, v in kw.env().items() if k != "KW_BACKUP_ENV"}
    result = kw.run("pull-prod-backups", "--env-file", str(kw.env_file), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    name = os.path.basename(dump_path(result.stdout, kw.prod_dir))
    assert copies(name, kw.prod_dir, kw.tmp / "pi5", kw.tmp / "nas")
    assert name in (kw.tmp / "orchestrator.log").read_text()


def test_backup_db_on_prod_reaches_postgres_through_its_socket_directory(laptop, pg, place_env):
    """libpq takes a socket directory as host (-h /run/postgresql): the contract's "(local socket)" DB_HOST."""
    place_env("prod", {**laptop.prod_env, "DB_HOST": str(pg.sockets)})
    result = laptop.run("pull-prod-backups")
    assert result.returncode == 0, result.stdout + result.stderr
    name = os.path.basename(dump_path(result.stdout, laptop.prod_dir))
    assert copies(name, laptop.prod_dir, laptop.pi5_dir, laptop.nas_dir)
