"""pull-prod-backups: run backup-db on prod and backup-orchestrator on the pi5, output streamed."""

from __future__ import annotations

from .errors import Failed
from .log import log
from .places import Place, place
from .run import Cmd, passthrough
from .settings import ROOT, Settings

SSH_FAILED = 255


def _step(target: Place, script: str, env_file: str | None) -> Cmd:
    if target.is_local:  # the script beside this one, with the same settings
        return Cmd([str(ROOT / "bin" / script), *(["--env-file", env_file] if env_file else [])], name=script)
    return target.command([script], name=f"{script} on {target.name}")  # the one on its PATH, its own env file


def pull_prod_backups(settings: Settings, env_file: str | None, dump: bool = True) -> int:
    steps = [("prod", "backup-db")] if dump else []
    steps.append(("pi5", "backup-orchestrator"))
    for name, script in steps:
        target = place(settings, name)
        log.info("running %s on %s (%s)", script, name, target.host)
        status = passthrough(_step(target, script, env_file))
        if status == SSH_FAILED and not target.is_local:
            raise Failed(
                f"could not reach {name} ({target.host}) to run {script}",
                "check the network, the ssh key and SSH_CONFIG",
            )
        if status != 0:
            log.error("error: %s on %s failed (exit %d); see its output above", script, name, status)
            return status
    return 0
