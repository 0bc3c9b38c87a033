"""Places: where dumps live. A place is this machine (`local`) or an ssh destination.

ssh always runs with BatchMode (never a password prompt in cron), a connect timeout,
keep-alives (a dead link fails instead of hanging), and `-F $SSH_CONFIG` when set.
Remote commands are argument lists that plumbum quotes for the remote shell.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from plumbum.commands.base import shquote_list

from .run import Cmd
from .settings import PLACES, Settings

LABELS = {"prod": "Production Server", "pi5": "Raspberry Pi 5", "nas": "CM3588 NAS",
          "old-prod": "Old Production Server"}
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=10",
               "-o", "ServerAliveCountMax=3"]


def ssh_base(ssh_config: str | None) -> list[str]:
    return ["ssh", *(["-F", ssh_config] if ssh_config else []), *SSH_OPTIONS]


@dataclass(frozen=True)
class Place:
    name: str  # prod, pi5, nas, old-prod
    host: str  # `local` or an ssh destination
    dir: str  # absolute, or ~/ for that place's home
    keep: int | None
    ssh_config: str | None = None

    @property
    def is_local(self) -> bool:
        return self.host == "local"

    @property
    def label(self) -> str:
        where = self.host.split("@", 1)[-1]
        return f"{LABELS[self.name]} ({where}:{self.dir.rstrip('/')}/)"

    def local_dir(self) -> Path:
        """The directory on this machine (local places only)."""
        assert self.is_local, self.name
        return Path(os.path.expanduser(self.dir))

    def remote_path(self, name: str = "") -> str:
        """A path for commands run on the place: `~/x` becomes relative to the login's home."""
        base = self.dir[2:] if self.dir.startswith("~/") else self.dir
        return f"{base.rstrip('/')}/{name}" if name else base

    def command(self, argv: list[str], name: str = "") -> Cmd:
        """A command run on this place: as is when local, through ssh otherwise."""
        if self.is_local:
            return Cmd(argv, name=name)
        remote = " ".join(shquote_list([str(a) for a in argv]))
        return Cmd([*ssh_base(self.ssh_config), "--", self.host, remote], name=name or f"ssh {self.name}: {argv[0]}")


def place(settings: Settings, name: str) -> Place:
    prefix = PLACES[name]
    keep = settings[f"{prefix}_KEEP"] if f"{prefix}_KEEP" in settings.names() else None
    return Place(name, settings[f"{prefix}_HOST"], settings[f"{prefix}_DIR"],
                 int(keep) if keep else None, settings["SSH_CONFIG"])
