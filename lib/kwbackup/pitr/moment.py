"""The laptop's side of --at: a moment recovered where the WAL tier is, as a dump Source for the safe restore.

--from-pi5 (the default): the pi5 recovers it with its installed pitr-recover --hold (in this process
when PI5_HOST=local) into PITR_DIR/recovered/; the restore streams that dump from there as it would any
pi5 dump while pitr-recover holds it, and it goes when this run lets go, ends or dies. --from-nas: the
base backup and the WAL the moment needs are fetched from the nas copy (NAS_DIR/wal/) into WORK_DIR and
recovered on this machine, with its Barman and its PostgreSQL of the base backup's major.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from .. import beside, files, restore
from ..download import work_dir
from ..errors import Failed, LockHeld, UsageError, VerificationError
from ..log import log
from ..places import Multiplexer, Place, place
from ..run import Cmd, run
from ..settings import Settings
from ..sources import Source
from ..transfer import remote_spec, rsync_base
from . import nas as pitr_nas
from . import pi5 as pi5_side
from . import recover, status
from .barman import SERVER, Tier
from .recover import Recovered, Target, Window

EXIT_AS = {2: UsageError, 3: VerificationError, 4: LockHeld}


@contextmanager
def moment_source(settings: Settings, text: str, where: str, shared: Multiplexer):
    """(the Source of the moment `text` recovered at `where`, pi5 or nas, and what the recovery reached)."""
    if settings["PITR"] != "on":
        raise UsageError("--at needs the WAL tier, and PITR is off", "set PITR=on (and PITR_DIR) in the env file")
    target = recover.parse_time(text)
    if where == "pi5":
        pi5 = shared(place(settings, "pi5"))
        with recover.moment_on_pi5(settings, text, held=True) if pi5.is_local else _on_pi5(pi5, text) as recovered:
            _said(recovered)
            yield Source("--at", replace(pi5, dir=str(recovered.path.parent)), recovered.path.name), recovered
        return
    with work_dir(settings["WORK_DIR"]) as work:
        recovered = _from_nas(settings, target, shared, work)
        _said(recovered)
        yield Source("--at", path=str(recovered.path), name=recovered.path.name), recovered


def _said(recovered: Recovered) -> None:
    steps = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in recovered.seconds.items())
    log.info(
        "the moment %s: the newest transaction replayed before it is from %s (base backup %s; %s)",
        recovered.target,
        recover.stamp(recovered.reached),
        recovered.base_backup,
        steps,
    )


# --- the pi5 ---------------------------------------------------------------------------------------------------
@contextmanager
def _on_pi5(pi5: Place, text: str):
    """pitr-recover --hold on the pi5 over ssh: the moment it recovered, there until this block ends."""
    with pi5_side.held_there(pi5, ["pitr-recover", "--at", text, "--hold"], "pitr-recover", EXIT_AS) as line:
        yield _parse(line.decode(errors="replace").strip())


def _parse(line: str) -> Recovered:
    found = json.loads(line)

    def when(text: str | None) -> datetime | None:
        return datetime.fromisoformat(text).astimezone(UTC) if text else None

    return Recovered(
        Path(found["dir"]) / found["name"],
        Target(when(found["target"])),
        when(found["reached"]),
        found["base_backup"],
        found["seconds"],
    )


# --- the nas copy, recovered here ----------------------------------------------------------------------------
def _from_nas(settings: Settings, target: Target, shared: Multiplexer, work: Path) -> Recovered:
    nas = shared(place(settings, "nas"))
    (copy,) = [p for p in pitr_nas.tier_places(settings, ["nas"])]
    copy = replace(copy, control_dir=nas.control_dir)
    section = pitr_nas.read_section(settings, copy)
    if section.error:
        raise Failed(f"the nas's copy of the WAL tier is unreachable: {section.error}", "check the nas, or --from-pi5")
    state = section.state
    window = Window(state.recoverable_from, state.recoverable_to, live=False)
    window.check(target, datetime.now(UTC))
    tier = Tier(settings, str(work / "tier"))
    tier.make_dirs()
    home = tier.server_home
    home.mkdir(mode=0o700, exist_ok=True)
    _fetch(copy, home, ["meta/", f"wals/{SERVER}-xlog.db"], work / "meta.list", recursive=True)
    held = status.read(home)
    chosen = recover.choose_backup(held, target)
    archived = {w.name for w in held.listed}
    wanted = [f"base/{chosen.backup_id}/"] + [
        f"wals/{w.name[:16]}/{w.name}" if w.name in archived else f"streaming/{w.name}"
        for w in recover.wals_from(held, chosen)
    ]
    _fetch(copy, home, wanted, work / "wanted.list", recursive=True)
    tier.record_prod_major(recover.major_of(home, chosen.backup_id))
    out = files.own_subdir(work, "out")
    return recover.recover(settings, tier, work, target, window, out)


def _fetch(copy: Place, home: Path, paths: list[str], listing: Path, recursive: bool) -> None:
    """rsync `paths` (relative to the nas copy's Barman home) into `home`."""
    listing.write_text("".join(f"{p}\n" for p in paths))
    source = pitr_nas._server_home(copy)
    argv = [
        *rsync_base(copy),
        "-t",
        *(["-r"] if recursive else []),
        "--chmod=D700,F600",
        f"--files-from={listing}",
        remote_spec(copy, source.rstrip("/") + "/"),
        f"{home}/",
    ]
    code, _, err = run(Cmd(argv, name="rsync from the nas"), check=False, timeout=6 * 3600)
    if code:
        lines = err.strip().splitlines()
        raise Failed(
            f"fetching the WAL tier from the nas failed: {lines[-1] if lines else f'rsync exit {code}'}",
            "check the nas (list-backups --point-in-time), or --from-pi5",
        )


def restore_at(
    settings: Settings,
    text: str,
    where: str,
    keep_dump: bool,
    options: dict,
    tables: list[str] | None = None,
    into: str | None = None,
    whole_beside: bool = False,
) -> None:
    """restore-production-db --at (setup-fresh-production-db --at): the moment restored the safe way, or only
    `tables` into the new schema `into`, or whole beside DB_NAME; kept on prod as a dump with `keep_dump`."""
    with Multiplexer() as shared, moment_source(settings, text, where, shared) as (source, recovered):
        keep_as = source.name if keep_dump else None
        if tables:
            beside.restore_tables(
                settings, source, tables, into, yes=options["yes"], dry_run=options["dry_run"],
                moment=recovered.moment, keep_as=keep_as,
            )  # fmt: skip
        elif whole_beside:
            beside.restore_beside(
                settings, source, yes=options["yes"], dry_run=options["dry_run"], moment=recovered.moment,
                keep_as=keep_as,
            )  # fmt: skip
        else:
            about = (
                f"The moment {recovered.target}: the newest transaction replayed before it is from "
                f"{recover.stamp(recovered.reached)}.\n"
            )
            restore.restore(settings, source, keep_as=keep_as, about=about, **options)
