"""Dumps: manifests, and the one-pass streaming checks of pg_dump's plain SQL.

`DumpScanner` reads the uncompressed SQL as it streams by, in large chunks (bytes.find and
bytes.count, never line by line in Python): it counts the rows of every table's COPY data,
notes the versions in the header, and keeps the tail to check pg_dump's completion line.
`verify_file` reads a dump once: sha256 and size of the file while a decompressor feeds a
scanner.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from . import __version__, files, names
from .errors import Failed, VerificationError
from .run import CHUNK, Cmd, StageFailed, Tap, pipeline

COMPLETION_LINE = b"-- PostgreSQL database dump complete"
TAIL_BYTES = 64 * 1024
HEAD_BYTES = 8 * 1024
COPY_HEADER_RE = re.compile(r"COPY (?P<table>.+?) (?:\(.*\) )?FROM stdin;")
IDENT = r'"(?:[^"]|"")*"|[^."\s]+'
QUALIFIED_RE = re.compile(rf"(?P<schema>{IDENT})\.(?P<table>{IDENT})")
TERMINATOR = b"\\.\n"


def _unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def table_key(copy_target: str) -> str:
    """`schema.table` (unquoted) for the target of a COPY line."""
    m = QUALIFIED_RE.fullmatch(copy_target)
    if not m:
        return _unquote(copy_target)
    return f"{_unquote(m['schema'])}.{_unquote(m['table'])}"


def completion_problem(tail: bytes) -> str | None:
    """None when pg_dump's completion line is the last meaningful line, else what is wrong."""
    for raw in reversed(tail.split(b"\n")):
        line = raw.strip()
        if not line or line == b"--" or line.startswith(b"\\unrestrict "):
            continue
        if line == COMPLETION_LINE:
            return None
        shown = line[:60].decode(errors="replace")
        return f"pg_dump's completion line is missing (the dump ends with {shown!r})"
    return "the dump is empty"


class DumpScanner(Tap):
    """Watches pg_dump's plain SQL stream: COPY row counts, versions, completion, CRC32."""

    name = "dump check"

    def __init__(self):
        self.tables: dict[str, int] = {}
        self.copying: str | None = None  # the table whose COPY data is streaming
        self.rows = 0
        self.partial = b""  # an incomplete line that may still turn out to matter
        self.mid_line = False  # inside a line that is known not to matter
        self.size = 0
        self.crc = 0
        self.head = b""
        self.tail = b""

    def __call__(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        self.crc = zlib.crc32(chunk, self.crc)
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self.tail = chunk[-TAIL_BYTES:] if len(chunk) >= TAIL_BYTES else (self.tail + chunk)[-TAIL_BYTES:]
        self._scan(self.partial + chunk if self.partial else chunk)
        return chunk

    def _scan(self, buf: bytes) -> None:
        self.partial = b""
        pos, n = 0, len(buf)
        while pos < n:
            if self.mid_line:
                newline = buf.find(b"\n", pos)
                if newline < 0:
                    return
                if self.copying is not None:
                    self.rows += 1
                pos, self.mid_line = newline + 1, False
            elif self.copying is not None:
                pos = self._scan_copy(buf, pos)
            else:
                pos = self._scan_sql(buf, pos)

    def _scan_copy(self, buf: bytes, pos: int) -> int:
        """At a line start inside COPY data: count rows up to the `\\.` line or the chunk's end."""
        if buf.startswith(TERMINATOR, pos):
            return self._end_copy(pos + len(TERMINATOR))
        end = buf.find(b"\n" + TERMINATOR, pos)
        if end >= 0:
            self.rows += buf.count(b"\n", pos, end + 1)
            return self._end_copy(end + 1 + len(TERMINATOR))
        last_newline = buf.rfind(b"\n", pos)
        if last_newline >= 0:
            self.rows += buf.count(b"\n", pos, last_newline + 1)
            pos = last_newline + 1
        rest = buf[pos:]
        if TERMINATOR.startswith(rest):
            self.partial = rest  # may be the start of the terminator line
        else:
            self.mid_line = True
        return len(buf)

    def _end_copy(self, pos: int) -> int:
        self.tables[self.copying] = self.tables.get(self.copying, 0) + self.rows
        self.copying, self.rows = None, 0
        return pos

    def _scan_sql(self, buf: bytes, pos: int) -> int:
        """At a line start in SQL: find the next COPY header line."""
        if buf.startswith(b"COPY ", pos):
            newline = buf.find(b"\n", pos)
            if newline < 0:
                self.partial = buf[pos:]
                return len(buf)
            m = COPY_HEADER_RE.fullmatch(buf[pos:newline].decode(errors="replace"))
            if m:
                self.copying, self.rows = table_key(m["table"]), 0
            return newline + 1
        found = buf.find(b"\nCOPY ", pos)
        if found >= 0:
            return found + 1
        last_newline = buf.rfind(b"\n", pos)
        start = last_newline + 1 if last_newline >= 0 else pos
        rest = buf[start:]
        if rest and (rest.startswith(b"COPY ") or b"COPY ".startswith(rest)):
            self.partial = rest
        elif rest:
            self.mid_line = True
        return len(buf)

    def problem(self) -> str | None:
        """What makes the scanned stream an invalid dump, or None."""
        if self.copying is not None:
            return f"the dump stops inside the data of table {self.copying}"
        return completion_problem(self.tail + self.partial)

    def version(self, label: str) -> str | None:
        m = re.search(rb"^-- Dumped " + label.encode() + rb" version (\S+)", self.head, re.M)
        return m.group(1).decode() if m else None


class HashingWriter(Tap):
    """Last stage of a dump pipeline: sha256 and size of the bytes as they go to a file."""

    def __init__(self, out: files.AtomicFile):
        self.out = out
        self.name = f"write {out.final.name}"
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.last8 = b""

    def __call__(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.size += len(chunk)
        self.last8 = (self.last8 + chunk)[-8:]
        self.out.write(chunk)
        return None


@dataclass
class Manifest:
    file: str
    bytes: int
    sha256: str
    created_at: str
    database: str
    server_version: str | None
    pg_dump_version: str | None
    tables: dict[str, int] = field(default_factory=dict)
    tool_version: str = __version__
    # Only in an encrypted copy's manifest: method, recipients (public keys), and the plain dump's
    # file, bytes and sha256, checked once it is decrypted. bytes and sha256 above are the encrypted file's.
    encryption: dict | None = None

    def to_json(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "encryption" or v is not None}
        return (json.dumps(fields, indent=2, ensure_ascii=False) + "\n").encode()

    def plain(self) -> Manifest:
        """The manifest of the decrypted dump (itself when not encrypted)."""
        if not self.encryption:
            return self
        return replace(self, file=self.encryption["plain_file"], bytes=self.encryption["plain_bytes"],
                       sha256=self.encryption["plain_sha256"], encryption=None)

    @classmethod
    def from_json(cls, data: bytes, source: str = "manifest") -> Manifest:
        try:
            raw = json.loads(data)
            manifest = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
            if manifest.encryption is not None:
                manifest.plain()  # its plain_* fields must be there
            return manifest
        except (ValueError, TypeError, KeyError) as exc:
            raise VerificationError(f"{source} is not a valid manifest ({exc})") from exc

    def write_beside(self, directory: Path) -> Path:
        return files.write_atomic(directory, self.file + names.MANIFEST_SUFFIX, self.to_json())


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_manifest(dump_path: Path) -> Manifest | None:
    path = Path(str(dump_path) + names.MANIFEST_SUFFIX)
    if not path.exists():
        return None
    return Manifest.from_json(path.read_bytes(), str(path))


def decompressor() -> list[str]:
    """pigz decompresses in its own threads (read, write, check) where installed."""
    return ["pigz", "-dc"] if shutil.which("pigz") else ["gzip", "-dc"]


class FileChunks:
    """Iterable of a file's chunks that hashes and sizes them on the way.

    With `growing`, it follows a file another process is still writing (rsync --inplace):
    at the end of the data it waits until `growing` is set, then reads what is left.
    `abandon` stops it early.
    """

    def __init__(self, path: Path, growing: threading.Event | None = None, abandon: threading.Event | None = None):
        self.path = Path(path)
        self.name = f"read {self.path.name}"
        self.growing_done = growing
        self.abandon = abandon or threading.Event()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def __iter__(self):
        while self.growing_done is not None and not self.path.exists():
            if self.growing_done.is_set() or self.abandon.wait(0.005):
                return
        with open(self.path, "rb", buffering=0) as f:
            while not self.abandon.is_set():
                # Seen before the read: everything written before the writer ended is in it.
                writer_done = self.growing_done is None or self.growing_done.is_set()
                chunk = f.read(CHUNK)
                if chunk:
                    self.sha256.update(chunk)
                    self.size += len(chunk)
                    yield chunk
                elif writer_done:
                    return
                else:
                    time.sleep(0.005)


@dataclass
class Verified:
    path: Path
    size: int
    sha256: str
    manifest: Manifest | None
    tables: dict[str, int]

    @property
    def status(self) -> str:
        return "verified" if self.manifest else "unverified"


def check_stream(reader: FileChunks, compressed: bool, shown: str) -> DumpScanner:
    """Decompress and scan what `reader` yields; VerificationError when it is no valid dump."""
    scanner = DumpScanner()
    steps = [Cmd(decompressor(), name="gzip stream check"), scanner] if compressed else [scanner]
    try:
        pipeline(steps, stdin=reader)
    except StageFailed as exc:
        if exc.stage == reader.name:
            raise Failed(f"{shown}: cannot read: {exc.detail}") from exc
        raise VerificationError(f"{shown}: corrupt gzip stream ({exc.tail or exc.detail})",
                                "use another copy (list-backups)") from exc
    problem = scanner.problem()
    if problem:
        raise VerificationError(f"{shown}: incomplete dump: {problem}", "use another copy (list-backups)")
    return scanner


def verify_file(path: Path, manifest: Manifest | None = None, use_manifest: bool = True,
                reader: FileChunks | None = None, name: str | None = None) -> Verified:
    """Check a dump in one pass; VerificationError (exit 3) says what is wrong with it.

    `reader` may be a FileChunks following a file still being received; `name` is the
    dump's final name when `path` is a temporary one.
    """
    path = Path(path)
    if reader is None and not path.is_file():
        raise Failed(f"{path}: no such dump", "check the name with list-backups")
    if manifest is None and use_manifest:
        manifest = read_manifest(path)
    reader = reader or FileChunks(path)
    name = name or path.name
    scanner = check_stream(reader, name.endswith(".gz"), str(path) if name == path.name else name)
    digest = reader.sha256.hexdigest()
    if manifest is not None:
        check_against_manifest(name, manifest, reader.size, digest, scanner.tables)
    return Verified(path, reader.size, digest, manifest, scanner.tables)


def check_against_manifest(path, manifest: Manifest, size: int, sha256: str, tables: dict[str, int]) -> None:
    if manifest.file != Path(path).name:
        raise VerificationError(f"{path}: its manifest describes {manifest.file}")
    if manifest.bytes != size:
        raise VerificationError(f"{path}: size {size} differs from the manifest's {manifest.bytes}",
                                "the copy is damaged or incomplete: use another copy")
    if manifest.sha256 != sha256:
        raise VerificationError(f"{path}: sha256 differs from the manifest's",
                                "the copy is damaged: use another copy")
    if manifest.tables and manifest.tables != tables:
        differ = sorted(k for k in set(manifest.tables) | set(tables) if manifest.tables.get(k) != tables.get(k))
        raise VerificationError(f"{path}: row counts differ from the manifest's for {', '.join(differ[:5])}")


OWNER_RE = re.compile(rb"^ALTER [A-Z ]+ .* OWNER TO (\"(?:[^\"]|\"\")+\"|[^\s;]+);$", re.M)
EXTENSION_RE = re.compile(rb"^CREATE EXTENSION IF NOT EXISTS (\"(?:[^\"]|\"\")+\"|[^\s;]+)", re.M)


class _Enough(Exception):
    """Raised by HeadReader once it has read what it needs."""


class HeadReader(Tap):
    """Keeps the SQL before the first COPY: the schema, with owners and extensions."""

    name = "head"

    def __init__(self, limit: int = 256 * 1024 * 1024):
        self.limit = limit
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        start = max(0, len(self.data) - 8)
        self.data += chunk
        found = self.data.find(b"\nCOPY ", start)
        if found >= 0 or len(self.data) > self.limit:
            del self.data[found if found >= 0 else self.limit:]
            raise _Enough()


def requirements(path: Path) -> dict:
    """Roles, extensions and pg_dump version a dump needs, from its schema part (before any data)."""
    head = HeadReader()
    steps = [Cmd([*decompressor(), "--", str(path)], name="gzip stream check"), head] if str(path).endswith(".gz") \
        else [Cmd(["cat", "--", str(path)], name="read"), head]
    try:
        pipeline(steps)
    except StageFailed as exc:
        if not isinstance(exc.__cause__, _Enough):
            raise VerificationError(f"{path}: cannot read the dump's schema ({exc.tail or exc.detail})") from exc
    return needs(bytes(head.data))


def needs(schema: bytes) -> dict:
    """Roles, extensions and pg_dump version named in a dump's schema part (its SQL before the first COPY)."""
    found = schema.find(b"\nCOPY ")
    data = schema[: found if found >= 0 else len(schema)]
    roles = {_unquote(m.decode()) for m in OWNER_RE.findall(data)}
    extensions = {_unquote(m.decode()) for m in EXTENSION_RE.findall(data)}
    version = re.search(rb"^-- Dumped by pg_dump version (\S+)", data, re.M)
    return {"roles": sorted(roles), "extensions": sorted(extensions),
            "pg_dump_version": version.group(1).decode() if version else None}


def verify_quick(path: Path) -> Verified:
    """With a manifest: size and sha256 in one read (the content was checked whole when it was made)."""
    manifest = read_manifest(Path(path))
    if manifest is None:
        return verify_file(path)
    reader = FileChunks(Path(path))
    for _ in reader:
        pass
    check_against_manifest(path, manifest, reader.size, reader.sha256.hexdigest(), manifest.tables)
    return Verified(Path(path), reader.size, reader.sha256.hexdigest(), manifest, manifest.tables)


COPY_TAG_RE = re.compile(r"COPY (\d+)")


def copy_counts(psql_echo: bytes) -> dict[str, int]:
    """Rows each COPY loaded, from psql -e output: the echoed COPY statement, then its `COPY n` tag."""
    counts: dict[str, int] = {}
    table = None
    for line in psql_echo.decode(errors="replace").splitlines():
        if m := COPY_HEADER_RE.fullmatch(line):
            table = table_key(m["table"])
        elif table and (m := COPY_TAG_RE.fullmatch(line)):
            counts[table] = counts.get(table, 0) + int(m[1])
            table = None
    return counts
