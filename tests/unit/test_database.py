import pytest

from kwbackup import settings
from kwbackup.database import Database
from kwbackup.places import Place


def make(environ=None, **values):
    return settings.load(values, environ={"KW_BACKUP_ENV": "", **(environ or {})})


@pytest.fixture(autouse=True)
def no_env_file(monkeypatch, tmp_path):
    monkeypatch.setattr(settings, "ROOT", tmp_path)
    monkeypatch.setattr(settings, "SYSTEM_ENV_FILE", tmp_path / "none")
    for name in ("PGPORT", "PGUSER", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)


def test_docker_dump_and_restore_command_lines():
    db = Database(make(DB_EXEC="docker", DB_NAME="kw_app_production"))
    assert db.dump().argv == [
        "docker",
        "exec",
        "-i",
        "kw-app-postgres",
        "pg_dump",
        "-U",
        "postgres",
        "--no-password",
        "--format=plain",
        "kw_app_production",
    ]
    assert db.psql("kw_new").argv == [
        "docker",
        "exec",
        "-i",
        "kw-app-postgres",
        "psql",
        "-U",
        "postgres",
        "--no-password",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        "kw_new",
    ]


def test_kamal_command_lines_quote_for_kamals_remote_shell():
    db = Database(make(DB_EXEC="kamal", KAMAL_DESTINATION="staging", KAMAL_ACCESSORY="db"))
    assert db.dump().argv == [
        "kamal",
        "accessory",
        "exec",
        "--reuse",
        "--raw",
        "-d",
        "staging",
        "db",
        "pg_dump",
        "-U",
        "postgres",
        "--no-password",
        "--format=plain",
        "kw_app_production",
    ]
    assert db.psql("kw_new").argv[:8] == ["kamal", "accessory", "exec", "--reuse", "-i", "-d", "staging", "db"]


def test_direct_uses_host_and_port_but_honours_libpq_variables():
    db = Database(make(DB_EXEC="direct", DB_HOST="10.0.0.5", DB_PORT="5433"))
    assert db.dump().argv[:7] == ["pg_dump", "-h", "10.0.0.5", "-p", "5433", "-U", "postgres"]
    plain = Database(make(DB_EXEC="direct"))
    assert plain.dump().argv[:5] == ["pg_dump", "-p", "5432", "-U", "postgres"]


def test_direct_leaves_port_and_user_to_libpq_when_set_there(monkeypatch):
    monkeypatch.setenv("PGPORT", "6000")
    monkeypatch.setenv("PGUSER", "backup")
    assert Database(make(DB_EXEC="direct")).dump().argv[:2] == ["pg_dump", "--no-password"]


def test_docker_on_a_remote_prod_goes_through_ssh_with_batch_mode():
    prod = Place("prod", "ubuntu@146.59.44.70", "/var/backups/kw-app", 2, "/etc/kw-backup/ssh_config")
    cmd = Database(make(DB_EXEC="docker"), prod).psql("kw_x")
    assert cmd.argv[:2] == ["ssh", "-F"] and "BatchMode=yes" in cmd.argv and "ConnectTimeout=10" in cmd.argv
    assert cmd.argv[-2:] == [
        "ubuntu@146.59.44.70",
        "docker exec -i kw-app-postgres psql -U postgres --no-password -X -q -v ON_ERROR_STOP=1 -d kw_x",
    ]


def test_no_password_ever_reaches_a_command_line(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "hunter2")
    for mode in ("docker", "kamal", "direct"):
        db = Database(make({"PGPASSWORD": "hunter2"}, DB_EXEC=mode))
        assert not any("hunter2" in arg for arg in db.dump().argv + db.psql("x").argv)
