"""setup-fresh-production-db and migrate-database-to-new-prod: a dump fetched to WORK_DIR, then restored.

Both download to a private directory in WORK_DIR on this machine, verify there, and hand the
file to the restore engine (which uploads it to prod's /tmp and restores the safe way).
Everything temporary is removed at the end, here, on prod and on old-prod, also on failure.
"""

from __future__ import annotations

from pathlib import Path

from . import crypto, dumps, names, restore
from .download import fetch, fetch_dump, local_dump, work_dir
from .errors import Failed, KwError, UsageError
from .log import dry, log
from .offsite import Offsite
from .places import Multiplexer, Place, place
from .run import run
from .settings import Settings


def pick(origin: Place | Offsite, wanted: str) -> restore.Source:
    return restore.resolve(restore.Source(f"--from-{origin.name}", origin, wanted))


def default_source(settings: Settings, shared: Multiplexer, wanted: str) -> restore.Source:
    """Latest on the nas; the pi5 when the nas is unreachable or empty; then offsite if set (saying so)."""
    offsite = Offsite.from_settings(settings)
    try:
        return pick(shared(place(settings, "nas")), wanted)
    except KwError as exc:
        log.warning("the nas has no usable dump (%s); taking the pi5 instead", exc.message)
    try:
        return pick(shared(place(settings, "pi5")), wanted)
    except KwError as exc:
        if offsite is None:
            raise
        log.warning("the pi5 has no usable dump either (%s); taking the offsite copy", exc.message)
    return pick(offsite, wanted)


def setup_fresh(settings: Settings, args) -> None:
    wanted = names.require(args.dump or "latest", "--dump")
    with Multiplexer() as shared, work_dir(settings["WORK_DIR"]) as local:
        if args.from_file:
            path = local_dump(Path(args.from_file), local, settings)
        elif args.from_ssh:
            source = restore.source_from_args(settings, args)
            host, _, remote = source.path.partition(":")
            origin = shared(Place("old-prod", host, "/", None, settings["SSH_CONFIG"]))
            name = Path(remote).name
            key = crypto.identity(settings, name) if names.is_encrypted(name) else None
            path = fetch(origin.command(["cat", "--", remote], name=f"read from {host}"), local,
                         names.plain_name(name), identity_file=key)
        else:
            if args.from_offsite:
                chosen = pick(restore.offsite_or_fail(settings), wanted)
            elif args.from_nas or args.from_pi5:
                chosen = pick(shared(place(settings, "nas" if args.from_nas else "pi5")), wanted)
            else:
                chosen = default_source(settings, shared, wanted)
            path = fetch_dump(chosen.place, chosen.name, local, settings)
        verified = dumps.verify_file(path)
        log.info("verified %s here: %s", path.name, verified.status)
        restore.restore(settings, restore.Source("--from-file", path=str(path), name=path.name), yes=args.yes,
                        dry_run=args.dry_run, refuse_tables=not args.force)


COMPRESS_SCRIPT = r"""
set -e
dir=$(mktemp -d /tmp/kw-migrate.XXXXXXXX)
gzip -c -- "$1" > "$dir/$2"
echo "$dir"
"""


def migrate(settings: Settings, args) -> None:
    if args.dump:
        names.require(args.dump, "--dump", allow_latest=False)
    local = Path(settings["WORK_DIR"])
    local.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing one (often /tmp) is left as it is
    with Multiplexer() as shared:
        old = shared(place(settings, "old-prod"))
        listing = [e for e in old.listing() if not names.parse(e.name).nightly]
        if not listing:
            raise Failed(f"no kw_app_production-*.sql[.gz] dump in {old.dir} on old-prod")
        chosen = next((e for e in listing if e.name == args.dump), None) if args.dump else listing[0]
        if chosen is None:
            raise Failed(f"{args.dump} is not in {old.dir} on old-prod", "list-backups --only old-prod")
        log.info("migrating %s from old-prod", chosen.name)
        key = crypto.identity(settings, chosen.name) if names.is_encrypted(chosen.name) else None
        remote, temp_dir = old.remote_path(chosen.name), None
        try:
            if not names.parse(chosen.name).compressed:  # compressed into a temporary copy; the original stays
                gz = chosen.name + ".gz"
                _, out, _ = run(old.script(COMPRESS_SCRIPT, remote, gz, name="gzip on old-prod"), timeout=None)
                temp_dir = out.decode().strip()
                remote = f"{temp_dir}/{gz}"
            path = fetch(old.command(["cat", "--", remote], name="read from old-prod"), local,
                         "migration-dump.sql.gz", chosen.size or None, identity_file=key)
        finally:
            if temp_dir:
                run(old.command(["rm", "-rf", "--", temp_dir], name="cleanup on old-prod"), check=False, timeout=60)
        try:
            _verify_and_restore(settings, args, chosen.name, path)
        finally:
            path.unlink(missing_ok=True)


def _verify_and_restore(settings: Settings, args, original: str, path: Path) -> None:
    verified = dumps.verify_file(path)
    log.info("verified the migration dump: %s, %d tables", verified.status, len(verified.tables))
    if args.dry_run:
        dry("downloaded and verified %s; would upload it to prod and restore it into %s", original,
            settings["DB_NAME"])
        return
    restore.restore(settings, restore.Source("--from-file", path=str(path), name=path.name), yes=args.yes,
                    dry_run=False, keep_as=_kept_name(original) if args.keep_dump else None)


def _kept_name(original: str) -> str:
    plain = names.plain_name(original)
    name = plain if plain.endswith(".gz") else plain + ".gz"
    if not names.parse(name):
        raise UsageError(f"cannot keep {original} under a dump name")
    return name
