"""setup-fresh-production-db and migrate-database-to-new-prod: a dump fetched to WORK_DIR, then restored.

Both download to a private directory in WORK_DIR on this machine, verify there, and hand the
file to the restore engine (which uploads it to prod's /tmp and restores the safe way).
Everything temporary is removed at the end, here, on prod and on old-prod, also on failure.
"""

from __future__ import annotations

from pathlib import Path

from . import crypto, dumps, names, restore, sources
from .download import fetch, fetch_dump, local_dump, work_dir
from .errors import Failed, UsageError
from .log import dry, log
from .pitr import moment
from .places import Multiplexer, Place, place
from .run import run
from .settings import Settings

SCRIPT = "setup-fresh-production-db"  # how a failed newest dump's message names the command to run instead


def setup_fresh(
    settings: Settings,
    *,
    origin: str | None = None,
    from_file: str | None = None,
    from_ssh: str | None = None,
    dump: str | None = None,
    at: str | None = None,
    keep_dump: bool = False,
    yes: bool = False,
    dry_run: bool = False,
    force: bool = False,
) -> None:
    """The dump (from `origin` nas|pi5|offsite, a file, USER@HOST:/PATH, or else the first place that has one)
    fetched here, verified, and restored into DB_NAME; refused when DB_NAME holds tables unless `force`.
    With `at`, the moment of the WAL tier at `origin` (default the pi5) instead, streamed to prod as it is."""
    if at is not None:
        options = dict(yes=yes, dry_run=dry_run, refuse_tables=not force)
        moment.restore_at(settings, at, origin or "pi5", keep_dump, options)
        return
    wanted = names.require(dump or "latest", "--dump")
    with Multiplexer() as shared, work_dir(settings["WORK_DIR"]) as local:
        if from_file or from_ssh:
            path = _given_dump(settings, shared, local, from_file, from_ssh)
            _verify_and_restore_fresh(settings, path, yes=yes, dry_run=dry_run, force=force)
            return
        chosen = (
            sources.resolve_naming_a_copy(
                settings,
                sources.Source(f"--from-{origin}", sources.origin(settings, origin, shared), wanted),
                SCRIPT,
                shared,
            )
            if origin
            else sources.first_good(settings, shared, wanted)
        )
        # A failure that the checks here or on prod find names a verified copy too, as one the listing shows.
        with sources.naming_a_copy(settings, chosen, SCRIPT, shared):
            path = fetch_dump(chosen.origin, chosen.name, local, settings)
            _verify_and_restore_fresh(settings, path, yes=yes, dry_run=dry_run, force=force)


def _given_dump(
    settings: Settings, shared: Multiplexer, local: Path, from_file: str | None, from_ssh: str | None
) -> Path:
    """A dump given by path, here (decrypted when it is a `.age`): a file on this machine, or USER@HOST:/PATH."""
    if from_file:
        return local_dump(Path(from_file), local, settings)
    source = sources.choose(settings, from_ssh=from_ssh)
    host, _, remote = source.path.partition(":")
    reader = shared(Place("old-prod", host, "/", None, settings["SSH_CONFIG"]))
    return fetch(
        reader.command(["cat", "--", remote], name=f"read from {host}"),
        local,
        names.plain_name(source.name),
        identity_file=sources.key_for(settings, source),
    )


def _verify_and_restore_fresh(settings: Settings, path: Path, *, yes: bool, dry_run: bool, force: bool) -> None:
    verified = dumps.verify_file(path)
    log.info("verified %s here: %s", path.name, verified.status)
    restore.restore(
        settings,
        sources.Source("--from-file", path=str(path), name=path.name),
        yes=yes,
        dry_run=dry_run,
        refuse_tables=not force,
    )


# In old-prod's TMPDIR when its login has one (where mktemp itself would put it), else /tmp.
COMPRESS_SCRIPT = r"""
set -e
dir=$(mktemp -d "${TMPDIR:-/tmp}/kw-migrate.XXXXXXXX")
gzip -c -- "$1" > "$dir/$2"
echo "$dir"
"""


def migrate(
    settings: Settings, *, dump: str | None = None, dry_run: bool = False, yes: bool = False, keep_dump: bool = False
) -> None:
    """old-prod's newest migration dump (or `dump`) compressed there, fetched here, verified, restored into DB_NAME."""
    if dump:
        names.require(dump, "--dump", allow_latest=False)
    local = Path(settings["WORK_DIR"])
    local.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing one (often /tmp) is left as it is
    with Multiplexer() as shared:
        old = shared(place(settings, "old-prod"))
        listing = [e for e in old.listing() if not names.parse(e.name).nightly]
        if not listing:
            raise Failed(f"no kw_app_production-*.sql[.gz] dump in {old.dir} on old-prod")
        chosen = next((e for e in listing if e.name == dump), None) if dump else listing[0]
        if chosen is None:
            raise Failed(f"{dump} is not in {old.dir} on old-prod", "list-backups --only old-prod")
        log.info("migrating %s from old-prod", chosen.name)
        key = crypto.identity(settings, chosen.name) if names.is_encrypted(chosen.name) else None
        remote, temp_dir = old.remote_path(chosen.name), None
        try:
            if not names.parse(chosen.name).compressed:  # compressed into a temporary copy; the original stays
                gz = chosen.name + ".gz"
                _, out, _ = run(old.script(COMPRESS_SCRIPT, remote, gz, name="gzip on old-prod"), timeout=None)
                temp_dir = out.decode().strip()
                remote = f"{temp_dir}/{gz}"
            path = fetch(
                old.command(["cat", "--", remote], name="read from old-prod"),
                local,
                "migration-dump.sql.gz",
                chosen.size or None,
                identity_file=key,
            )
        finally:
            if temp_dir:
                run(old.command(["rm", "-rf", "--", temp_dir], name="cleanup on old-prod"), check=False, timeout=60)
        try:
            _verify_and_restore(settings, chosen.name, path, dry_run=dry_run, yes=yes, keep_dump=keep_dump)
        finally:
            path.unlink(missing_ok=True)


def _verify_and_restore(
    settings: Settings, original: str, path: Path, *, dry_run: bool, yes: bool, keep_dump: bool
) -> None:
    verified = dumps.verify_file(path)
    log.info("verified the migration dump: %s, %d tables", verified.status, len(verified.tables))
    if dry_run:
        dry("downloaded and verified %s; would upload it to prod and restore it into %s", original, settings["DB_NAME"])
        return
    restore.restore(
        settings,
        sources.Source("--from-file", path=str(path), name=path.name),
        yes=yes,
        dry_run=False,
        keep_as=_kept_name(original) if keep_dump else None,
    )


def _kept_name(original: str) -> str:
    plain = names.plain_name(original)
    name = plain if plain.endswith(".gz") else plain + ".gz"
    if not names.parse(name):
        raise UsageError(f"cannot keep {original} under a dump name")
    return name
