"""The offsite tier: any rclone remote (S3, B2, SFTP, a local directory) in OFFSITE_REMOTE.

rclone does the talking (retries, multipart uploads, every storage's API); credentials stay
in its config file (RCLONE_CONFIG), never on a command line. Like the nas, a copy is uploaded
into `.incoming/`, its checksum compared with the pi5's file, and only then moved to its final
name, manifest first: a final name never holds a partial upload, whatever rclone version or
remote. The checksum is the best one the remote offers (sha256, sha1, md5); a remote with
none, and a copy the remote has no checksum of (an S3 multipart upload), is read back
(`--download`). It is a `destinations.Destination`, like the nas.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

from . import dumps, files, names
from .errors import Failed, VerificationError
from .log import log
from .places import Entry, combine_listing, manifest_or_none
from .retention import Calendar
from .run import Cmd, StageFailed, run
from .settings import Settings

INCOMING = ".incoming"
# A dead link fails instead of hanging a night; a remote that is down fails within a minute or so.
RCLONE_OPTIONS = ["--contimeout", "15s", "--timeout", "60s", "--retries", "2", "--low-level-retries", "3", "-q"]
HASHES = ("sha256", "sha1", "md5")  # preferred first; all are computed here (files.digest)
DIRECTORY_NOT_FOUND = 3  # rclone's exit status: a remote path nothing was ever written to


class Offsite:
    """OFFSITE_REMOTE, read and written through rclone only."""

    name = "offsite"
    is_local = False  # a local-directory remote is still reached through rclone

    def __init__(self, remote: str, keep: int, calendar: Calendar, config: str | None = None):
        self.remote = remote.rstrip("/") if remote.rstrip("/") else remote
        self.keep = keep
        self.calendar = calendar
        self.config = config
        self._hash: tuple[str, bool] | None = None
        self.leftovers: list[str] = []  # files in .incoming/ at the last listing: what failed runs left
        self.promoted: list[str] = []
        self._local_hashes: dict[Path, str] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Offsite | None:
        if not settings["OFFSITE_REMOTE"]:
            return None
        calendar = Calendar(*(int(settings[f"OFFSITE_KEEP_{p}"] or 0) for p in ("DAILY", "WEEKLY", "MONTHLY")))
        return cls(settings["OFFSITE_REMOTE"], settings.int("OFFSITE_KEEP"), calendar, settings["RCLONE_CONFIG"])

    @property
    def host(self) -> str:
        return "local" if self.remote.startswith("/") else self.remote.split(":", 1)[0]

    @property
    def dir(self) -> str:
        return self.remote if self.remote.startswith("/") else self.remote.split(":", 1)[1]

    @property
    def label(self) -> str:
        return f"Offsite ({self.remote}{'' if self.remote.endswith(':') else '/'})"

    def path(self, name: str = "", sub: str = "") -> str:
        parts = [p for p in (sub, name) if p]
        if not parts:
            return self.remote
        return self.remote + ("" if self.remote.endswith((":", "/")) else "/") + "/".join(parts)

    def rclone(self, *args: str, name: str) -> Cmd:
        # Debian 12's rclone 1.60 fails every S3 call when AWS_CA_BUNDLE is set (LoadCustomCABundleError): the
        # bundle goes to rclone's own --ca-cert instead, which means the same.
        bundle = os.environ.get("AWS_CA_BUNDLE")
        return Cmd(
            [
                "rclone",
                *(["--config", self.config] if self.config else []),
                *RCLONE_OPTIONS,
                *(["--ca-cert", bundle] if bundle else []),
                *args,
            ],
            name=name,
            env={"AWS_CA_BUNDLE": ""},
        )

    def _run(self, *args: str, name: str, input: bytes | None = None, timeout: float = 3600) -> bytes:
        try:
            return run(self.rclone(*args, name=name), input=input, timeout=timeout)[1]
        except StageFailed as exc:
            raise Failed(
                f"offsite ({self.remote}): {name} failed: {exc.tail or exc.detail}",
                "check the remote (rclone lsd) and the network; the next run catches up",
            ) from exc

    # --- reading ----------------------------------------------------------------------------------
    def listing(self, timeout: float = 60) -> list[Entry]:
        """The dumps at the remote (newest first) with sizes and manifests; Failed when unreachable."""
        # One level down too: what is in .incoming/ comes with the same call.
        code, out, err = run(
            self.rclone(
                "lsjson", "-R", "--max-depth", "2", "--files-only", "--no-mimetype", self.path(), name="list offsite"
            ),
            check=False,
            timeout=timeout,
        )
        if code == DIRECTORY_NOT_FOUND:
            return []
        if code != 0:
            reason = " | ".join(line.strip() for line in err.strip().splitlines()[-2:]) or f"rclone exit {code}"
            raise Failed(
                f"offsite ({self.remote}) unreachable: {reason}",
                "check the network and the rclone remote (rclone lsd REMOTE:)",
            )
        found, sizes = {}, {}
        items = json.loads(out or b"[]")
        self.leftovers = [i["Path"].split("/", 1)[1] for i in items if i["Path"].startswith(INCOMING + "/")]
        for item in items:
            sizes[item["Path"]] = int(item["Size"])
            if names.parse(item["Path"]):
                found[item["Path"]] = Entry(item["Path"], int(item["Size"]), _timestamp(item.get("ModTime", "")))
        present = [n + names.MANIFEST_SUFFIX for n in found if n + names.MANIFEST_SUFFIX in sizes]
        # A manifest over the limit is invalid, and never fetched.
        wanted = [m for m in present if sizes[m] <= dumps.MAX_MANIFEST_BYTES]
        manifests = {m[: -len(names.MANIFEST_SUFFIX)]: {} for m in present if m not in wanted}
        manifests.update(self._manifests(wanted, timeout))
        pins = {n for n in found if n + names.PIN_SUFFIX in sizes}
        return combine_listing(found, manifests, pins)

    def _manifests(self, wanted: list[str], timeout: float) -> dict[str, dict | None]:
        if not wanted:
            return {}
        scratch = Path(tempfile.mkdtemp(prefix="kw-offsite-"))
        try:
            self._run(
                "copy",
                "--files-from-raw",
                "-",
                self.path(),
                str(scratch),
                name="read offsite manifests",
                input="\n".join(wanted).encode(),
                timeout=timeout,
            )
            return {
                m[: -len(names.MANIFEST_SUFFIX)]: manifest_or_none((scratch / m).read_bytes())
                for m in wanted
                if (scratch / m).is_file()
            }
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def free(self, timeout: float = 60) -> int | None:
        """The remote's free space (rclone about); None where the backend does not say (S3, for one)."""
        code, out, _ = run(
            self.rclone("about", "--json", self.path(), name="offsite about"), check=False, timeout=timeout
        )
        try:
            free = json.loads(out).get("free") if code == 0 else None
        except ValueError:
            return None
        return free if isinstance(free, int) else None

    def read(self, name: str) -> Cmd:
        return self.rclone("cat", self.path(name), name="read from offsite")

    def exists(self, name: str) -> bool:
        out = self._run(
            "lsf",
            "--files-only",
            "--files-from-raw",
            "-",
            self.path(),
            name="look offsite",
            input=name.encode(),
            timeout=120,
        )
        return name in out.decode(errors="replace").splitlines()

    # --- writing (the orchestrator) ---------------------------------------------------------------
    def send(self, parcels) -> None:
        """Copy dumps and manifests into the remote's .incoming/, always whole: a copy left there by a failed
        run (perhaps damaged, with the same size and time) is never taken for the file.

        The local files' checksums are computed meanwhile, for check.
        """
        sources = [path for parcel in parcels for path in parcel.paths]
        kind, _ = self._hash_kind()
        hasher = threading.Thread(
            target=lambda: self._local_hashes.update({source: files.digest(source, kind) for source in sources}),
            daemon=True,
        )
        hasher.start()
        try:
            self._upload(sources)
        finally:
            hasher.join()

    def _upload(self, sources: list[Path]) -> None:
        for parent in dict.fromkeys(p.parent for p in sources):
            batch = [p.name for p in sources if p.parent == parent]
            # --s3-disable-checksum: the md5 rclone would record with an S3 multipart upload is its own claim
            # (object metadata), not the server's: without it such a copy has no md5 and is read back in check.
            self._run(
                "copy",
                "--ignore-times",
                "--s3-disable-checksum",
                "--files-from-raw",
                "-",
                str(parent),
                self.path(sub=INCOMING),
                name="upload offsite",
                input="\n".join(batch).encode(),
            )

    def check(self, parcels) -> str:
        """Compare each uploaded copy's checksum with the local file's; VerificationError when one differs."""
        sources = [path for parcel in parcels for path in parcel.paths]
        kind, download = self._hash_kind()
        remote = self._hashsum(kind, download, [p.name for p in sources])
        # A copy the remote has no checksum of (an S3 multipart upload) is read back.
        unknown = [name for name, digest in remote.items() if not digest]
        if unknown and not download:
            remote.update(self._hashsum(kind, True, unknown))
        for source in sources:
            local = self._local_hashes.pop(source, None) or files.digest(source, kind)
            if remote.get(source.name) != local:
                raise VerificationError(
                    f"offsite: the uploaded {source.name} has {kind} {remote.get(source.name)}, not {local}",
                    "the next run sends it again",
                )
        return kind + (" (read back)" if download else f" ({len(unknown)} read back)" if unknown else "")

    def _hashsum(self, kind: str, download: bool, names: list[str]) -> dict[str, str]:
        """{name: digest} of files in .incoming/, the digest empty where the remote has none."""
        out = self._run(
            "hashsum",
            kind,
            *(["--download"] if download else []),
            "--files-from-raw",
            "-",
            self.path(sub=INCOMING),
            name="checksum offsite",
            input="\n".join(names).encode(),
        )
        width = hashlib.new(kind).digest_size * 2  # rclone pads a missing digest with spaces to this width
        return {line[width + 2 :]: line[:width].strip().lower() for line in out.decode(errors="replace").splitlines()}

    def _hash_kind(self) -> tuple[str, bool]:
        if self._hash is None and self.remote.startswith("/"):
            self._hash = ("sha256", False)  # rclone's local backend computes any hash
        if self._hash is None:
            features = json.loads(
                self._run("backend", "features", self.path(), name="offsite features", timeout=120) or b"{}"
            )
            offered = set(features.get("Hashes") or [])
            kind = next((h for h in HASHES if h in offered), None)
            self._hash = (kind, False) if kind else ("sha256", True)
            log.debug("offsite checksums: %s", self._hash)
        return self._hash

    def promote(self, dumps: list[str]) -> None:
        """Move checked copies from .incoming/ to their final names, manifest first, never over a dump."""
        for name in dumps:
            self._run(
                "moveto",
                self.path(name + names.MANIFEST_SUFFIX, INCOMING),
                self.path(name + names.MANIFEST_SUFFIX),
                name="promote offsite",
            )
            self._run("moveto", "--ignore-existing", self.path(name, INCOMING), self.path(name), name="promote offsite")
            self.promoted.append(name)

    def pin(self, pins: dict[str, bytes]) -> None:
        for dump, content in pins.items():
            self._run("rcat", self.path(dump + names.PIN_SUFFIX), name="pin offsite", input=content, timeout=120)

    def unpin(self, dumps: list[str]) -> None:
        if dumps:
            self._delete([d + names.PIN_SUFFIX for d in dumps], name="release offsite pins")

    def finish(self) -> None:
        """Remove what failed runs left in .incoming/ (only the orchestrator, under its lock, writes there)."""
        moved = {n for name in self.promoted for n in (name, name + names.MANIFEST_SUFFIX)}
        stale = [n for n in self.leftovers if n not in moved]
        if not stale:
            return
        code, _, err = run(
            self.rclone("delete", "--files-from-raw", "-", self.path(sub=INCOMING), name="clear offsite .incoming"),
            input="\n".join(stale).encode(),
            check=False,
            timeout=600,
        )
        if code not in (0, DIRECTORY_NOT_FOUND):
            log.warning("offsite: could not clear %s: %s", self.path(sub=INCOMING), err.strip()[-200:])

    def remove(self, dumps: list[str]) -> None:
        if dumps:
            listed = [n for name in dumps for n in (name, name + names.MANIFEST_SUFFIX)]
            self._delete(listed, name="rotate offsite")

    def _delete(self, files: list[str], name: str) -> None:
        """These files at the remote's top level, in one rclone call."""
        self._run(
            "delete",
            "--max-depth",
            "1",
            "--files-from-raw",
            "-",
            self.path(),
            name=name,
            input="\n".join(files).encode(),
        )


def _timestamp(text: str) -> float:
    """rclone's ModTime (RFC 3339, nanoseconds) as a POSIX time; 0 when absent."""
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(trimmed)
    except ValueError:
        return 0.0
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
