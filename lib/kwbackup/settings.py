"""The contract's settings: defaults, precedence (flags > environment > env file), validation.

Everything is validated when loaded, before any script touches a file, a database or a
host: a bad value raises UsageError (exit 2) naming the setting.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from .errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_ENV_FILE = Path("/etc/kw-backup/backup.env")

PLACES = {"prod": "PROD", "pi5": "PI5", "nas": "NAS", "old-prod": "OLD_PROD"}

# A host is `local` or [user@]host: a name, an alias or an address, never an option or shell syntax.
HOST_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?(?:[A-Za-z0-9][A-Za-z0-9._-]*|[0-9A-Fa-f:]+:[0-9A-Fa-f:.]*)")
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# <DB_NAME>_before_restore_<YYYYMMDDHHMMSS> must fit PostgreSQL's 63-byte identifiers.
DB_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,32}")
DB_EXEC_MODES = ("docker", "kamal", "direct")
AGE_RECIPIENT_RE = re.compile(r"age1[02-9ac-hj-np-z]{58}")
# A remote of the rclone config and a path in it, or a local directory; nothing that rclone would parse as options.
RCLONE_REMOTE_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*:|/)[^\s\0]*")
DOCKER_IMAGE_RE = re.compile(r"[a-z0-9][a-z0-9._/-]*(?::[A-Za-z0-9_][A-Za-z0-9_.-]*)?(?:@sha256:[0-9a-f]{64})?")


def _positive_int(value: str) -> str | None:
    return None if value.isdigit() and int(value) > 0 else "must be a positive integer"


def _non_negative_int(value: str) -> str | None:
    return None if value.isdigit() else "must be a whole number of bytes"


def _percent(value: str) -> str | None:
    try:
        return None if float(value) > 0 else "must be a positive number"
    except ValueError:
        return "must be a positive number"


def _number(value: str) -> str | None:
    try:
        return None if float(value) >= 0 else "must be a number, 0 or more"
    except ValueError:
        return "must be a number, 0 or more"


def _positive_number(value: str) -> str | None:
    return _percent(value)


def _minutes(value: str) -> str | None:
    return None if value.isdigit() else "must be a whole number of minutes"


def _jobs(value: str) -> str | None:
    return None if value.isdigit() and 1 <= int(value) <= 64 else "must be a whole number from 1 to 64"


def _docker_image(value: str) -> str | None:
    if DOCKER_IMAGE_RE.fullmatch(value):
        return None
    return "must be a docker image reference such as postgres:17"


def _on_off(value: str) -> str | None:
    return None if value in ("on", "off") else "must be on or off"


def _pitr_dir(value: str) -> str | None:
    # Its paths go into libpq connection strings and Barman's config unquoted, and the tunnel's unix socket
    # (PITR_DIR/tunnel/.s.PGSQL.<port>) must fit the kernel's 107-byte limit.
    if not value.startswith("/") or re.search(r"[\s'\"\\%=#;]", value):
        return "must be an absolute path without spaces, quotes, backslashes or any of % = # ;"
    if len(value) > 80:
        return "must be at most 80 characters (the tunnel's socket lives in it)"
    return None


def _port(value: str) -> str | None:
    return None if value.isdigit() and 0 < int(value) < 65536 else "must be a TCP port (1-65535)"


def _place_dir(value: str) -> str | None:
    if "\n" in value or "\0" in value:
        return "must be a single line"
    if value.startswith("/") or value.startswith("~/"):
        return None
    return "must be an absolute path or start with ~/ (that place's home)"


def _absolute(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


def _host(value: str) -> str | None:
    if value == "local" or HOST_RE.fullmatch(value):
        return None
    return "must be `local` or [user@]host (no spaces, no leading -, no shell characters)"


def _db_host(value: str) -> str | None:
    if value.startswith("/") and "\n" not in value:
        return None  # libpq's socket directory
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*|[0-9A-Fa-f:]+:[0-9A-Fa-f:.]*", value):
        return None
    return "must be a host name, an address or a socket directory (an absolute path)"


def _db_exec(value: str) -> str | None:
    return None if value in DB_EXEC_MODES else f"must be one of {', '.join(DB_EXEC_MODES)}"


def _db_name(value: str) -> str | None:
    if DB_NAME_RE.fullmatch(value):
        return None
    return "must be letters, digits and _ (at most 33, so that the _before_restore_ name fits)"


def _plain_name(value: str) -> str | None:
    return None if NAME_RE.fullmatch(value) else "must be letters, digits, _ . and - only"


def _url(value: str) -> str | None:
    return None if re.fullmatch(r"https?://\S+", value) else "must be an http(s) URL"


def _age_recipients(value: str) -> str | None:
    if all(AGE_RECIPIENT_RE.fullmatch(key) for key in value.split()):
        return None
    return "must be age public keys (age1..., as age-keygen -y prints them), separated by spaces"


def _rclone_remote(value: str) -> str | None:
    if RCLONE_REMOTE_RE.fullmatch(value):
        return None
    return (
        "must be NAME:PATH with NAME a remote of your rclone config (rclone config), or an absolute "
        "directory; not a :backend,option=...: string (those can carry passwords)"
    )


def _command(value: str) -> str | None:
    try:
        return None if shlex.split(value) else "must not be empty"
    except ValueError as exc:
        return f"cannot be split into arguments ({exc})"


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    check: Callable[[str], str | None] | None = None
    secret: bool = False
    echo_bad_value: bool = True  # False: a wrong value may be a secret pasted in the wrong place


SETTINGS = [
    Setting("DB_NAME", "kw_app_production", _db_name),
    Setting("DB_EXEC", "docker", _db_exec),
    Setting("DB_CONTAINER", "kw-app-postgres", _plain_name),
    Setting("KAMAL_ACCESSORY", "postgres", _plain_name),
    Setting("DB_USER", "postgres", _plain_name),
    Setting("DB_HOST", None, _db_host),
    Setting("DB_PORT", "5432", _port),
    Setting("KAMAL_DESTINATION", "production", _plain_name),
    Setting("SSH_CONFIG", None, _absolute),
    Setting("WORK_DIR", "/tmp", _absolute),
    Setting("LOG_FILE", "/var/log/backup-orchestrator.log", _absolute),
    Setting("APP_STOP_CMD", "kamal app stop -d {KAMAL_DESTINATION}", _command),
    Setting("APP_START_CMD", "kamal app start -d {KAMAL_DESTINATION}", _command),
    Setting("HEALTHCHECKS_URL", None, _url, secret=True),
    Setting("APPSIGNAL_PUSH_API_KEY", None, secret=True),
    Setting("APPSIGNAL_CHECKIN_IDENTIFIER", None),
    Setting("APPSIGNAL_FRONTEND_API_KEY", None, secret=True),
    Setting("APPSIGNAL_ENDPOINT", "https://appsignal-endpoint.net", _url),
    Setting("NOTIFY_URLS", None, secret=True),
    Setting("SIZE_CHANGE_ALERT_PCT", "50", _percent),
    Setting("MIN_DUMP_BYTES", "1024", _non_negative_int),
    Setting("MIN_FREE_DUMPS", "2", _number),
    Setting("ROW_DROP_ALERT_PCT", "50", _percent),
    Setting("MAX_DUMP_AGE_HOURS", "26", _positive_number),
    Setting("FUTURE_SLACK_MINUTES", "60", _minutes),
    Setting("RESTORE_JOBS", None, _jobs),
    Setting("PROD_HOST", "ubuntu@146.59.44.70", _host),
    Setting("PROD_DIR", "/var/backups/kw-app", _place_dir),
    Setting("PROD_KEEP", "2", _positive_int),
    Setting("PI5_HOST", "pi@pi5.local", _host),
    Setting("PI5_DIR", "/backups/kw-app", _place_dir),
    Setting("PI5_KEEP", "3", _positive_int),
    Setting("NAS_HOST", "user@nas.local", _host),
    Setting("NAS_DIR", "/backups/kw-app", _place_dir),
    Setting("NAS_KEEP", "3", _positive_int),
    *[
        Setting(f"{p}_KEEP_{period}", None, _non_negative_int)
        for p in ("PROD", "PI5", "NAS")
        for period in ("DAILY", "WEEKLY", "MONTHLY")
    ],
    Setting("OFFSITE_REMOTE", None, _rclone_remote, echo_bad_value=False),
    Setting("OFFSITE_KEEP", "3", _positive_int),
    *[Setting(f"OFFSITE_KEEP_{period}", None, _non_negative_int) for period in ("DAILY", "WEEKLY", "MONTHLY")],
    Setting("RCLONE_CONFIG", None, _absolute),
    Setting("AGE_RECIPIENTS", None, _age_recipients, echo_bad_value=False),
    Setting("AGE_IDENTITY_FILE", None, _absolute),
    Setting("OLD_PROD_HOST", "deploy@51.68.141.247", _host),
    Setting("OLD_PROD_DIR", "~/baza_dump/sql", _place_dir),
    Setting("DRILL_DATABASE_URL", None, secret=True),
    Setting("DRILL_SQL", None),
    Setting("DRILL_LOG", None, _absolute),
    Setting("DRILL_PG_BINDIR", None, _absolute),
    Setting("DRILL_DOCKER_IMAGE", None, _docker_image),
    Setting("HISTORY_FILE", None, _absolute),
    Setting("PITR", "off", _on_off),
    Setting("PITR_DIR", "/backups/kw-app-wal", _pitr_dir),
    Setting("PROD_PG_PORT", "5432", _port),
    Setting("PITR_WINDOW_DAYS", "7", _positive_int),
    Setting("PITR_BASE_BACKUP_DAYS", "7", _positive_int),
    Setting("PITR_MAX_LAG_MINUTES", "15", _positive_int),
    Setting("PITR_PROD_WAL_KEEP_GB", "5", _positive_number),
    Setting("HC_PITR_URL", None, _url, secret=True),
]
BY_NAME = {s.name: s for s in SETTINGS}


def find_env_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """The env file in the contract's order; an explicitly named one must exist."""
    named = explicit or environ.get("KW_BACKUP_ENV")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            source = "--env-file" if explicit else "KW_BACKUP_ENV"
            raise UsageError(f"{source}: no such env file: {path}")
        return path
    for candidate in (ROOT / ".env", SYSTEM_ENV_FILE):
        if candidate.is_file():
            return candidate
    return None


class Settings:
    """Validated settings; `s["NAME"]` is the value (None when unset and without default)."""

    def __init__(self, values: dict[str, str | None], given: set[str], env_file: Path | None):
        self._values = values
        self.given = given
        self.env_file = env_file

    def __getitem__(self, name: str) -> str | None:
        return self._values[name]

    def names(self) -> set[str]:
        return set(self._values)

    def int(self, name: str) -> int:
        return int(self._values[name])

    def is_given(self, name: str) -> bool:
        """True when the operator set it (flag, environment or env file), not a default."""
        return name in self.given

    def command(self, name: str) -> list[str]:
        return shlex.split(self._values[name])

    def secrets(self) -> list[str]:
        return [v for s in SETTINGS if s.secret and (v := self._values.get(s.name))]


def load(
    overrides: Mapping[str, str | None] | None = None,
    env_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge flags over the environment over the env file, apply defaults, validate all."""
    environ = os.environ if environ is None else environ
    path = find_env_file(env_file, environ)
    from_file = {k: v for k, v in dotenv_values(path).items() if v is not None} if path else {}
    values: dict[str, str | None] = {}
    given: set[str] = set()
    for setting in SETTINGS:
        name = setting.name
        for layer in (overrides or {}, environ, from_file):
            value = layer.get(name)
            if value is not None and value != "":
                values[name] = value
                given.add(name)
                break
        else:
            values[name] = setting.default
    for setting in SETTINGS:
        value = values[setting.name]
        if value is not None and isinstance(value, str) and "{" in value and setting.name not in given:
            values[setting.name] = value.format(**values)
    for setting in SETTINGS:
        value = values[setting.name]
        if value is None or setting.check is None:
            continue
        problem = setting.check(str(value))
        if problem:
            shown = repr(value) if setting.echo_bad_value and not setting.secret else "(hidden)"
            raise UsageError(f"setting {setting.name}={shown} {problem}", "fix it in the env file or the environment")
    return Settings(values, given, path)
