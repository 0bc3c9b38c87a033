import pytest

from kwbackup import settings
from kwbackup.errors import UsageError


def load(environ=None, overrides=None, file_text=None, tmp_path=None):
    environ = dict(environ or {})
    if file_text is not None:
        path = tmp_path / "backup.env"
        path.write_text(file_text)
        environ["KW_BACKUP_ENV"] = str(path)
    else:
        environ.setdefault("KW_BACKUP_ENV", "")
    return settings.load(overrides, environ=environ)


def test_defaults_are_the_contracts(monkeypatch, tmp_path):
    s = load(file_text="", tmp_path=tmp_path)
    assert s["DB_NAME"] == "kw_app_production"
    assert s["DB_EXEC"] == "docker"
    assert s["PROD_KEEP"] == "2" and s["PI5_KEEP"] == "3" and s["NAS_KEEP"] == "3"
    assert s["PROD_HOST"] == "ubuntu@146.59.44.70"
    assert s["OLD_PROD_DIR"] == "~/baza_dump/sql"
    assert s["APP_STOP_CMD"] == "kamal app stop -d production"
    assert s["MIN_DUMP_BYTES"] == "1024" and s["SIZE_CHANGE_ALERT_PCT"] == "50"
    assert not s.is_given("DB_NAME")


def test_flags_beat_environment_beat_env_file(tmp_path):
    text = "PROD_KEEP=5\nNAS_KEEP=6\nPI5_KEEP=7\n"
    s = load({"NAS_KEEP": "8", "PI5_KEEP": "9"}, {"PI5_KEEP": "10"}, text, tmp_path)
    assert (s["PROD_KEEP"], s["NAS_KEEP"], s["PI5_KEEP"]) == ("5", "8", "10")
    assert s.is_given("PROD_KEEP")


def test_app_commands_follow_kamal_destination(tmp_path):
    s = load(file_text="KAMAL_DESTINATION=staging\n", tmp_path=tmp_path)
    assert s.command("APP_START_CMD") == ["kamal", "app", "start", "-d", "staging"]


def test_named_env_file_must_exist(tmp_path):
    with pytest.raises(UsageError, match="no such env file"):
        settings.load(environ={"KW_BACKUP_ENV": str(tmp_path / "missing.env")})
    with pytest.raises(UsageError, match="--env-file"):
        settings.load(env_file=str(tmp_path / "missing.env"), environ={})


@pytest.mark.parametrize(
    "name, value",
    [
        ("PROD_KEEP", "0"),
        ("PROD_KEEP", "abc"),
        ("NAS_KEEP", "-1"),
        ("PI5_KEEP", "2.5"),
        ("PROD_DIR", "backups"),
        ("NAS_DIR", "./x"),
        ("PI5_DIR", "~backups"),
        ("DB_EXEC", "bogus"),
        ("DB_PORT", "0"),
        ("DB_PORT", "http"),
        ("PROD_HOST", "-oProxyCommand=touch /tmp/x"),
        ("NAS_HOST", "user@nas; rm -rf /"),
        ("PI5_HOST", "pi 5"),
        ("PROD_HOST", "$(reboot)"),
        ("OLD_PROD_HOST", "a@b@c"),
        ("DB_NAME", "kw-app"),
        ("DB_NAME", "x" * 34),
        ("DB_CONTAINER", "a b"),
        ("MIN_DUMP_BYTES", "1k"),
        ("WORK_DIR", "tmp"),
        ("SIZE_CHANGE_ALERT_PCT", "lots"),
        ("AGE_RECIPIENTS", "ssh-ed25519 AAAA"),
        ("AGE_RECIPIENTS", "age1short"),
        ("AGE_IDENTITY_FILE", "key.txt"),
        ("OFFSITE_REMOTE", ":sftp,host=x,pass=secret:dir"),
        ("OFFSITE_REMOTE", "relative/dir"),
        ("OFFSITE_REMOTE", "-vv"),
        ("OFFSITE_REMOTE", "b2:my bucket"),
        ("OFFSITE_KEEP", "0"),
        ("OFFSITE_KEEP_MONTHLY", "x"),
        ("RCLONE_CONFIG", "rclone.conf"),
        ("RESTORE_JOBS", "0"),
        ("RESTORE_JOBS", "auto"),
        ("RESTORE_JOBS", "65"),
    ],
)
def test_bad_values_name_the_setting(tmp_path, name, value):
    with pytest.raises(UsageError) as caught:
        load({name: value}, tmp_path=tmp_path, file_text="")
    assert caught.value.exit_status == 2
    assert name in caught.value.line()


@pytest.mark.parametrize(
    "host",
    ["local", "ubuntu@146.59.44.70", "pi5", "user@nas.local", "deploy@old-prod", "backup_user@10.0.0.1", "fe80::1"],
)
def test_good_hosts(tmp_path, host):
    assert load({"PROD_HOST": host}, tmp_path=tmp_path, file_text="")["PROD_HOST"] == host


def test_secret_values_are_not_shown(tmp_path):
    with pytest.raises(UsageError) as caught:
        load({"HEALTHCHECKS_URL": "not-a-url-secret123"}, tmp_path=tmp_path, file_text="")
    assert "secret123" not in caught.value.line()
    s = load({"APPSIGNAL_PUSH_API_KEY": "k3y"}, tmp_path=tmp_path, file_text="")
    assert "k3y" in s.secrets()


def test_env_file_beside_bin_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "ROOT", tmp_path)
    monkeypatch.setattr(settings, "SYSTEM_ENV_FILE", tmp_path / "etc.env")
    (tmp_path / "etc.env").write_text("PROD_KEEP=4\n")
    assert settings.load(environ={})["PROD_KEEP"] == "4"
    (tmp_path / ".env").write_text("PROD_KEEP=3\n")
    assert settings.load(environ={})["PROD_KEEP"] == "3"


@pytest.mark.parametrize(
    "value, ok",
    [
        ("/var/run/postgresql", True),
        ("10.0.0.5", True),
        ("db.internal", True),
        ("user@db", False),
        ("-h", False),
        ("a b", False),
    ],
)
def test_db_host_is_a_host_or_a_socket_directory(tmp_path, value, ok):
    if ok:
        assert load({"DB_HOST": value}, tmp_path=tmp_path, file_text="")["DB_HOST"] == value
    else:
        with pytest.raises(UsageError, match="DB_HOST"):
            load({"DB_HOST": value}, tmp_path=tmp_path, file_text="")


@pytest.mark.parametrize(
    "name, value",
    [
        ("OFFSITE_REMOTE", "b2-kw:kw-backups/kw-app"),
        ("OFFSITE_REMOTE", "/mnt/usb/kw-app"),
        ("OFFSITE_REMOTE", "box:"),
        (
            "AGE_RECIPIENTS",
            "age1ze4x5d64ttjyzduq86mzr6k94j0q98hwtgymglau7y2epzua35aswaa8jv "
            "age1dmqvxr5vuf6y57gwdsyzy4le80nqvjadv7ftkfmqe8m78xqgzdesnkh46y",
        ),
    ],
)
def test_good_offsite_and_encryption_values(tmp_path, name, value):
    assert load({name: value}, tmp_path=tmp_path, file_text="")[name] == value
