"""Dumps: manifests, and the one-pass streaming checks of pg_dump's plain SQL.

`DumpScanner` reads the uncompressed SQL as it streams by, in large chunks (bytes.find and
bytes.count, never line by line in Python): it counts the rows of every table's COPY data,
notes the versions in the header, and keeps the tail to check pg_dump's completion line. Its
memory is bounded whatever the content: no line is ever held whole.
`verify_file` is the one check of a dump file, used by the pull, verify-backup, the restores
and the drill: it reads the file once, sha256 and size while a decompressor (and, for an
encrypted copy, age) feeds the scanner, and compares everything with the manifest.
A manifest is validated by type and size (at most 1 MiB) before anything trusts it.
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

from . import __version__, files, names, parallel_load
from .errors import Failed, VerificationError
from .run import CHUNK, Cmd, StageFailed, Tap, pipeline

COMPLETION_LINE = b"-- PostgreSQL database dump complete"
TAIL_BYTES = 64 * 1024
HEAD_BYTES = 8 * 1024
# A COPY header names a table and its columns: far below this even at PostgreSQL's 1600 columns.
LINE_LIMIT = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20
SHA256_RE = re.compile(r"[0-9a-f]{64}")
DATA_HEADER = b"-- Data for Name: "
# The lines of SQL the scanner reads (it skips every other): COPY, the TABLE DATA entry header that names
# its rows, and the statements that name roles (owners, grantees, policies' roles).
ROLE_LINES = (
    b"ALTER ",
    b"GRANT ",
    b"REVOKE ",
    b"CREATE POLICY ",
    b"SET SESSION AUTHORIZATION ",
    b"CREATE USER MAPPING ",
)
SQL_LINES = (b"COPY ", DATA_HEADER, *ROLE_LINES)
SQL_LINE_RE = re.compile(b"\n(?=" + b"|".join(re.escape(p) for p in SQL_LINES) + b")")
ROLE = rb'"(?:[^"]|"")*"|[a-z_][a-z0-9_$]*'
ROLES = rb"(?:" + ROLE + rb")(?:, (?:" + ROLE + rb"))*"
ROLE_RES = (
    re.compile(rb" OWNER TO (" + ROLE + rb");$"),
    re.compile(rb" TO (" + ROLES + rb")(?: WITH GRANT OPTION)?(?: GRANTED BY " + ROLE + rb")?;$"),  # GRANT
    re.compile(rb"^REVOKE .* FROM (" + ROLES + rb")(?: GRANTED BY " + ROLE + rb")?;$"),
    re.compile(rb"^ALTER DEFAULT PRIVILEGES FOR ROLE (" + ROLE + rb") "),
    re.compile(rb"^CREATE POLICY .* TO (" + ROLES + rb")(?: USING .*| WITH CHECK .*)?;?$"),
    re.compile(rb"^CREATE USER MAPPING FOR (" + ROLE + rb") SERVER "),
)
SESSION_AUTHORIZATION_RE = re.compile(rb"^SET SESSION AUTHORIZATION '((?:[^']|'')*)';$")
NOT_ROLES = {"public", "current_user", "session_user", "current_role"}  # keywords, unquoted
TERMINATOR = b"\\.\n"


def _unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def roles_named(line: bytes) -> set[str]:
    """The roles a line of pg_dump's SQL names (an owner, grantees, a policy's roles), as the catalog has them."""
    found = set()
    for pattern in ROLE_RES:
        if m := pattern.search(line):
            found |= {_unquote(r.decode(errors="replace")) for r in re.findall(ROLE, m.group(1))}
    if m := SESSION_AUTHORIZATION_RE.match(line):
        found.add(m.group(1).replace(b"''", b"'").decode(errors="replace"))
    return {r for r in found if r not in NOT_ROLES}


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

    def __init__(self, crc: bool = False):
        self.tables: dict[str, int] = {}
        self.copying: str | None = None  # the table whose COPY data is streaming
        self.data_header: bytes | None = None  # the TABLE DATA entry header the next COPY belongs to
        self.roles: set[str] = set()  # the roles the SQL names: a server restoring it needs them
        self.rows = 0
        self.partial = b""  # an incomplete line that may still turn out to matter
        self.mid_line = False  # inside a line that is known not to matter
        self.size = 0
        self.crc = 0 if crc else None  # CRC32 of the SQL, for backup-db's gzip trailer check
        self.head = b""
        self.tail = b""

    def __call__(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        if self.crc is not None:
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
        """At a line start in SQL: find the next COPY line, or a TABLE DATA entry header that names its rows."""
        for prefix in SQL_LINES:
            if buf.startswith(prefix, pos):
                newline = buf.find(b"\n", pos)
                if newline < 0:
                    if len(buf) - pos <= LINE_LIMIT:
                        self.partial = buf[pos:]
                    elif prefix == b"COPY ":
                        raise VerificationError(
                            f"a line beginning with COPY is longer than {LINE_LIMIT} bytes: not pg_dump's output"
                        )
                    else:
                        self.mid_line = True  # not a statement that names roles: a function's text, say
                    return len(buf)
                line = buf[pos:newline]
                if prefix == DATA_HEADER:
                    self.data_header = line
                elif prefix in ROLE_LINES:
                    self.roles |= roles_named(line)
                elif (table := parallel_load.data_table(line, self.data_header)) is not None:
                    self.copying, self.rows, self.data_header = table, 0, None
                return newline + 1
        found = SQL_LINE_RE.search(buf, pos)
        if found:
            return found.start() + 1
        last_newline = buf.rfind(b"\n", pos)
        start = last_newline + 1 if last_newline >= 0 else pos
        rest = buf[start:]
        if rest and any(rest.startswith(p) or p.startswith(rest) for p in SQL_LINES):
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
    # Optional in a manifest read (manifest_problem allows them absent): a dataclass default, not a TypeError.
    database: str | None = None
    server_version: str | None = None
    pg_dump_version: str | None = None
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
        return replace(
            self,
            file=self.encryption["plain_file"],
            bytes=self.encryption["plain_bytes"],
            sha256=self.encryption["plain_sha256"],
            encryption=None,
        )

    @classmethod
    def from_json(cls, data: bytes, source: str = "manifest") -> Manifest:
        """A manifest from its bytes; VerificationError (exit 3) for anything but a valid one."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise VerificationError(f"{source} is not a valid manifest (larger than {MAX_MANIFEST_BYTES} bytes)")
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise VerificationError(f"{source} is not a valid manifest (not JSON: {exc})") from exc
        problem = manifest_problem(raw)
        if problem:
            raise VerificationError(f"{source} is not a valid manifest ({problem})")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def write_beside(self, directory: Path) -> Path:
        return files.write_atomic(directory, self.file + names.MANIFEST_SUFFIX, self.to_json())


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _sha256(value) -> bool:
    return isinstance(value, str) and SHA256_RE.fullmatch(value) is not None


def manifest_problem(raw) -> str | None:
    """What keeps parsed JSON from being a manifest (every field of its natural type), or None."""
    if not isinstance(raw, dict):
        return "not a JSON object"
    if not isinstance(raw.get("file"), str):
        return "file is not a string"
    if not _count(raw.get("bytes")):
        return "bytes is not a non-negative integer"
    if not _sha256(raw.get("sha256")):
        return "sha256 is not 64 hex digits"
    if not isinstance(raw.get("created_at"), str):
        return "created_at is not a string"
    try:
        datetime.fromisoformat(raw["created_at"].replace("Z", "+00:00"))
    except ValueError:
        return "created_at is not an ISO 8601 time"
    for key in ("database", "server_version", "pg_dump_version", "tool_version"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            return f"{key} is not a string"
    tables = raw.get("tables")
    if not isinstance(tables, dict) or not all(isinstance(k, str) and _count(v) for k, v in tables.items()):
        return "tables is not an object of table names to non-negative row counts"
    encryption = raw.get("encryption")
    if encryption is not None:
        if (
            not isinstance(encryption, dict)
            or not isinstance(encryption.get("plain_file"), str)
            or not _count(encryption.get("plain_bytes"))
            or not _sha256(encryption.get("plain_sha256"))
            or not isinstance(encryption.get("recipients", []), list)
        ):
            return "encryption lacks plain_file, plain_bytes or plain_sha256"
    return None


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_manifest(dump_path: Path) -> Manifest | None:
    """The manifest beside a dump, None when there is none; VerificationError when it is not valid."""
    path = Path(str(dump_path) + names.MANIFEST_SUFFIX)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)  # never more, whatever its size
    except FileNotFoundError:
        return None
    return Manifest.from_json(data, str(path))


def decompressor() -> list[str]:
    """The fastest gzip decompressor installed: igzip (ISA-L, about twice pigz's speed), pigz, else gzip.

    All three check the stream and its CRC32 and exit non-zero on damage or truncation.
    """
    for tool in ("igzip", "pigz"):
        if shutil.which(tool):
            return [tool, "-dc"]
    return ["gzip", "-dc"]


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
    roles: frozenset[str] = frozenset()  # named by the SQL, when it was read whole

    @property
    def status(self) -> str:
        return "verified" if self.manifest else "unverified"


def verify_file(
    path: Path,
    manifest: Manifest | None = None,
    *,
    use_manifest: bool = True,
    whole: bool = True,
    reader: FileChunks | None = None,
    name: str | None = None,
    decrypt: Cmd | None = None,
) -> Verified:
    """The one check of a dump: VerificationError (exit 3) says what is wrong with it.

    Whole (the default): the gzip stream, pg_dump's completion line and every table's row count,
    plus size and sha256, all against the manifest (the one beside `path` unless given or
    `use_manifest` is False). `whole=False` with a manifest checks size and sha256 only. `reader`
    may follow a file still being received; `name` is the dump's final name when `path` is a
    temporary one. With `decrypt` (age -d for an encrypted copy) the content is checked inside,
    against the plain dump's part of the manifest; its StageFailed is raised as it is.
    """
    path = Path(path)
    if reader is None and not path.is_file():
        raise Failed(f"{path}: no such dump", "check the name with list-backups")
    if manifest is None and use_manifest:
        manifest = read_manifest(path)
    reader = reader or FileChunks(path)
    name = name or path.name
    shown = str(path) if name == path.name else name
    if not whole and manifest is not None:
        for _ in reader:
            pass
        check_against_manifest(shown, manifest, reader.size, reader.sha256.hexdigest(), None)
        return Verified(path, reader.size, reader.sha256.hexdigest(), manifest, manifest.tables)
    plain = _Measure() if decrypt else None
    scanner = DumpScanner()
    steps = [decrypt, plain] if decrypt else []
    if names.plain_name(name).endswith(".gz"):
        steps.append(Cmd(decompressor(), name="gzip stream check"))
    try:
        pipeline([*steps, scanner], stdin=reader)
    except StageFailed as exc:
        if exc.stage == reader.name or isinstance(exc.__cause__, OSError):
            raise Failed(f"{shown}: cannot read: {exc.detail}") from exc
        if decrypt is not None and exc.stage == decrypt.name:
            raise
        if isinstance(exc.__cause__, VerificationError):
            raise VerificationError(f"{shown}: {exc.__cause__.message}", "use another copy (list-backups)") from exc
        raise VerificationError(
            f"{shown}: corrupt gzip stream ({exc.tail or exc.detail})", "use another copy (list-backups)"
        ) from exc
    problem = scanner.problem()
    if problem:
        raise VerificationError(f"{shown}: incomplete dump: {problem}", "use another copy (list-backups)")
    digest = reader.sha256.hexdigest()
    if manifest is not None:
        if plain is not None:
            check_against_manifest(shown, manifest, reader.size, digest, None)
            inner = manifest.plain()
            check_against_manifest(inner.file, inner, plain.size, plain.sha256.hexdigest(), scanner.tables)
        else:
            check_against_manifest(shown, manifest, reader.size, digest, scanner.tables)
    return Verified(path, reader.size, digest, manifest, scanner.tables, frozenset(scanner.roles))


class _Measure(Tap):
    """sha256 and size of a decrypted stream on its way to the decompressor."""

    name = "plain sha256"

    def __init__(self):
        self.sha256 = hashlib.sha256()
        self.size = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.sha256.update(chunk)
        self.size += len(chunk)
        return chunk


def check_against_manifest(path, manifest: Manifest, size: int, sha256: str, tables: dict[str, int] | None) -> None:
    """The file is exactly what its manifest describes; `tables` (when the content was scanned) too."""
    if manifest.file != Path(path).name:
        raise VerificationError(f"{path}: its manifest describes {manifest.file}")
    if manifest.bytes != size:
        raise VerificationError(
            f"{path}: size {size} differs from the manifest's {manifest.bytes}",
            "the copy is damaged or incomplete: use another copy",
        )
    if manifest.sha256 != sha256:
        raise VerificationError(f"{path}: sha256 differs from the manifest's", "the copy is damaged: use another copy")
    if tables is not None and manifest.tables != tables:
        differ = sorted(k for k in set(manifest.tables) | set(tables) if manifest.tables.get(k) != tables.get(k))
        shown = ", ".join(
            f"{k} ({tables.get(k, 'absent')} rows, manifest {manifest.tables.get(k, 'absent')})" for k in differ[:5]
        )
        raise VerificationError(
            f"{path}: row counts differ from the manifest's: {shown}",
            "the dump is not what backup-db wrote: use another copy",
        )


OWNER_RE = re.compile(rb"^ALTER [A-Z ]+ .* OWNER TO (\"(?:[^\"]|\"\")+\"|[^\s;]+);$", re.M)
EXTENSION_RE = re.compile(rb"^CREATE EXTENSION IF NOT EXISTS (\"(?:[^\"]|\"\")+\"|[^\s;]+)", re.M)


class _Enough(Exception):
    """Raised by HeadReader once it has read what it needs."""


class HeadReader(Tap):
    """Keeps the SQL before the first COPY: the schema, with owners and extensions."""

    name = "head"

    def __init__(self, limit: int = 32 * 1024 * 1024):  # a schema this large is rare; memory stays bounded
        self.limit = limit
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        start = max(0, len(self.data) - 8)
        self.data += chunk
        found = self.data.find(b"\nCOPY ", start)
        if found >= 0 or len(self.data) > self.limit:
            del self.data[found if found >= 0 else self.limit :]
            raise _Enough()


def requirements(path: Path) -> dict:
    """Roles, extensions and pg_dump version a dump needs, from its schema part (before any data)."""
    head = HeadReader()
    steps = (
        [Cmd([*decompressor(), "--", str(path)], name="gzip stream check"), head]
        if str(path).endswith(".gz")
        else [Cmd(["cat", "--", str(path)], name="read"), head]
    )
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
    return {
        "roles": sorted(roles),
        "extensions": sorted(extensions),
        "pg_dump_version": version.group(1).decode() if version else None,
    }


COPY_TAG_RE = re.compile(rb"COPY (\d+)")


def copy_counts(psql_echo: bytes) -> dict[str, int]:
    """Rows each COPY loaded, from psql -e output: the echoed COPY statement, then its `COPY n` tag."""
    counts: dict[str, int] = {}
    table = None
    for line in psql_echo.splitlines():
        if (target := parallel_load.copy_target(line)) is not None:
            table = target
        elif table and (m := COPY_TAG_RE.fullmatch(line)):
            counts[table] = counts.get(table, 0) + int(m[1])
            table = None
    return counts
