"""The pi5's link to prod's PostgreSQL: an ssh tunnel from a unix socket in PITR_DIR to prod's
127.0.0.1:PROD_PG_PORT, with a key of its own that prod allows this one forward and nothing else.

A unix socket rather than a local TCP port: no port to choose or collide with, and its 0700
directory keeps every other local user off prod's database. libpq reaches it as
host=PITR_DIR/tunnel port=PROD_PG_PORT.
"""

from __future__ import annotations

from ..places import ssh_base
from ..settings import Settings
from .barman import Tier


def command(settings: Settings) -> list[str]:
    """The tunnel's ssh, in the foreground until the link drops (systemd starts it again; ssh_base's keepalives
    notice a dead link within 30 s)."""
    tier = Tier(settings)
    port = settings["PROD_PG_PORT"]
    return [
        *ssh_base(settings["SSH_CONFIG"]),
        "-i",
        str(tier.key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ExitOnForwardFailure=yes",  # a forward prod refuses ends the tunnel, so systemd's restart shows it
        "-o",
        "StreamLocalBindUnlink=yes",  # the socket a killed tunnel left is replaced
        "-o",
        "StreamLocalBindMask=0177",
        "-C",  # WAL compresses well: the prototype's tunnel carried a third of the bytes
        "-N",
        "-T",
        "-L",
        f"{tier.socket}:127.0.0.1:{port}",
        "--",
        settings["PROD_HOST"],
    ]


def authorized_options(port: str) -> str:
    """What prod's authorized_keys allows the tunnel key: one forward, no shell, no command, no other port."""
    return f'restrict,port-forwarding,permitopen="127.0.0.1:{port}",command="/bin/false"'
