#!/usr/bin/env python3
"""Load a plain pg_dump dump into an empty database over several psql sessions, as pg_restore -j does.

Standard library only, no import from kwbackup: restore.py sends this file to prod's own python3
over ssh (`python3 - ARGS`, the code on stdin), and runs it here for kamal and for the drill.

    parallel_load.py --session JSON [--jobs N|auto] [--dump PATH] [--queue-bytes N]
                                                    (without --dump: SQL on stdin)

--session is the argument list of one psql session on the new database (JSON), with
ON_ERROR_STOP=1, -A -t and without -q, so that its `COPY n` tags reach us. The dump is read once
(through igzip, pigz or gzip -dc for a .gz): the preamble (SET lines, \\restrict) goes to every
session; the pre-data (types, tables, functions) runs in session 0; each table's COPY block goes
to a free session as the stream reaches it; when that session lags (--queue-bytes queued for it,
16 MiB) and another idles, the block is cut after a row and goes on there as another COPY of the
table. The data's other entries (INSERTs, SEQUENCE SET, large objects, statistics) follow in order.
Then the post-data: indexes and primary key, unique and exclusion constraints in parallel (never
two units on one table unless both are plain CREATE INDEX), each as soon as its table's data is
in, then INDEX ATTACH in order, then FOREIGN KEYs in parallel (never two on one partition tree)
and CHECK constraints, then everything else in its original order. Every entry type pg_dump 15 to
18 writes has its place (see placement()); SQL it does not write runs in one session in the
dump's order, saying why on stderr.

stdout: for each COPY, its statement and then its tag (`COPY n`), as `psql -e` prints them.
stderr: lines starting with `kw-parallel-load: `. Exit 0 loaded; 97 the dump is damaged or
truncated; 98 this Python is too old; else a session failed (its error and the entry are named).
"""

import collections
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time

PREFIX = "kw-parallel-load: "
DAMAGED = 97
TOO_OLD = 98
CHUNK = 1 << 20
QUEUE_BYTES = 16 << 20  # queued in memory for one session; past this the stream waits, or cuts its COPY
HEADER_RE = re.compile(rb"^-- (?:Data for )?Name: (.*); Type: (.*?); Schema: (.*?); Owner: (.*?)(?:; Tablespace: .*)?$")
# pg_dump writes `COPY <qualified name> <column list> FROM stdin;`, the list empty for a table without
# columns (two spaces): the name is read by copy_target, by pg_dump's quoting rules.
COPY_RE = re.compile(rb"^COPY (.+?) (?:\(.*\) | )?FROM stdin;$")
DATA_HEADER_RE = re.compile(rb"^-- Data for Name: (.*); Type: TABLE DATA; Schema: (.*?); Owner: ")
NAME_PART_RE = re.compile(rb'"(?:[^"]|"")*"|[^."\s(]+')
TAG_RE = re.compile(rb"^COPY (\d+)$")
STATE_RE = re.compile(
    rb"^(?:SET (default_tablespace|default_table_access_method|default_with_oids|search_path) = "
    rb"|(SET SESSION AUTHORIZATION|RESET SESSION AUTHORIZATION))"
)
RESTRICT_RE = re.compile(rb"^\\(?:un)?restrict ")
PREAMBLE_RE = re.compile(rb"^(?:SET \w+ = .*;|SELECT pg_catalog\.set_config\(.*\);|\\restrict \S+)$")
IDENT = rb'(?:"(?:[^"]|"")*"|[^."\s(]+)'
QUALIFIED = rb"(" + IDENT + rb"(?:\." + IDENT + rb")?)"
INDEX_ON_RE = re.compile(rb"^CREATE (?:UNIQUE )?INDEX " + IDENT + rb" ON (ONLY )?" + QUALIFIED + rb" USING ", re.M)
# The one statement of a CONSTRAINT, CHECK CONSTRAINT or FK CONSTRAINT entry; its last group is set when it builds
# an index of the table's own (a primary key, unique or exclusion constraint, not one USING an existing index).
ADD_CONSTRAINT_RE = re.compile(
    rb"^ALTER (TABLE|FOREIGN TABLE|DOMAIN) (ONLY )?"
    + QUALIFIED
    + rb"\n    ADD CONSTRAINT "
    + IDENT
    + rb" ((?:PRIMARY KEY|UNIQUE|EXCLUDE)\b(?! USING INDEX))?",
    re.M,
)
REFERENCES_RE = re.compile(rb" REFERENCES " + QUALIFIED + rb"\(")
ATTACH_RE = re.compile(rb"^ALTER TABLE ONLY " + QUALIFIED + rb" ATTACH PARTITION " + QUALIFIED + rb" ", re.M)

PRE_DATA, DATA, POST_DATA = "pre-data", "data", "post-data"
# The sections of the entry types pg_dump writes (15 to 18: pg_dump.c's ArchiveEntry calls), which a plain dump
# holds in that order; every other type (SCHEMA, TABLE, FUNCTION, BLOB before pg_dump 17, ...) is pre-data.
# ACLs and DEFAULT ACLs (no section) come after the post-data's other entries, in a pass of their own.
DATA_TYPES = {b"TABLE DATA", b"SEQUENCE SET", b"BLOBS", b"BLOB METADATA"}
POST_TYPES = {
    b"INDEX",
    b"CONSTRAINT",
    b"CHECK CONSTRAINT",
    b"FK CONSTRAINT",
    b"INDEX ATTACH",
    b"TRIGGER",
    b"RULE",
    b"POLICY",
    b"ROW SECURITY",
    b"EVENT TRIGGER",
    b"MATERIALIZED VIEW DATA",
    b"STATISTICS",
    b"PUBLICATION",
    b"PUBLICATION TABLE",
    b"PUBLICATION TABLES IN SCHEMA",
    b"SUBSCRIPTION",
    b"SUBSCRIPTION TABLE",
    b"ACL",
    b"DEFAULT ACL",
}
# In the section of the entry before them: a COMMENT or SECURITY LABEL follows its object (a large object's is
# data from pg_dump 17 on), STATISTICS DATA (pg_dump 18) is a table's in the data, an index's in the post-data.
FOLLOWING_TYPES = {b"COMMENT", b"SECURITY LABEL", b"STATISTICS DATA"}
CONSTRAINT_TYPES = {b"CONSTRAINT", b"CHECK CONSTRAINT", b"FK CONSTRAINT"}
# Post-data that runs after the indexes and constraints, in the dump's order.
LATER_TYPES = (POST_TYPES | FOLLOWING_TYPES) - CONSTRAINT_TYPES - {b"INDEX", b"INDEX ATTACH"}


def program():
    """This file's text: what restore.py sends to prod's python3."""
    with open(__file__, "rb") as f:
        return f.read()


def note(text):
    sys.stderr.write(PREFIX + text + "\n")
    sys.stderr.flush()


class LoadFailed(Exception):
    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# --- the stream ---------------------------------------------------------------------------------


def chunks_of(fd):
    """The stream in pieces of at least a quarter MiB (a pipe gives what is there, often 64 KiB:
    each piece costs the sessions' queues a lock and a wake-up). os.read, not a buffered reader:
    half the CPU."""
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return
        if len(chunk) < CHUNK // 4:
            parts, size = [chunk], len(chunk)
            while size < CHUNK // 4:
                more = os.read(fd, CHUNK - size)
                if not more:
                    break
                parts.append(more)
                size += len(more)
            chunk = b"".join(parts)
        yield chunk


def find_terminator(buf, pos):
    """Where the next `\\n\\.\\n` (the end of COPY data) starts at or after `pos`, or -1. Backslashes
    are rare in most data, and memchr finds them ten times faster than a search for the four bytes;
    where they are common (many NULLs, \\N), after a few the four-byte search takes over."""
    i = buf.find(b"\\", pos + 1)
    for _ in range(16):
        if i < 0:
            return -1
        if buf[i - 1] == 10 and buf[i + 1 : i + 3] == b".\n":
            return i - 1
        i = buf.find(b"\\", i + 1)
    return -1 if i < 0 else buf.find(b"\n\\.\n", i - 1)


def events(chunks):
    """("line", bytes) for each line outside COPY data (with its newline), ("copy", header line),
    ("data", memoryview) for the COPY data in the stream's own pieces (never copied), its `\\.` line
    last, then ("end", None); at the end ("eof", None), or ("eof", header) when the stream stops
    inside a COPY."""
    buf = b""
    copying = None
    last = b""  # the COPY data's latest bytes already passed on: a terminator may begin there
    for chunk in chunks:
        buf = buf + chunk if buf else chunk
        view = memoryview(buf)
        pos = 0
        size = len(buf)
        while pos < size:
            if copying is not None:
                probe = last + buf[pos : pos + 3]
                i = probe.find(b"\n\\.\n")
                if 0 <= i < len(last) < i + 4:  # begun in what was passed on
                    found_end = pos + i + 4 - len(last)
                else:
                    found = find_terminator(buf, pos)
                    found_end = found + 4 if found >= 0 else -1
                if found_end >= 0:
                    yield "data", view[pos:found_end]
                    yield "end", None
                    pos = found_end
                    copying = None
                    continue
                yield "data", view[pos:]
                last = (last + buf[max(pos, size - 3) :])[-3:]
                pos = size
                break
            newline = buf.find(b"\n", pos)
            if newline < 0:
                break
            line = buf[pos : newline + 1]
            pos = newline + 1
            if line.startswith(b"COPY ") and copy_target(line) is not None:
                copying = line
                last = b"\n"
                yield "copy", line
            else:
                yield "line", line
        buf = buf[pos:] if pos < size else b""
    if copying is not None:
        yield "eof", copying
        return
    if buf:
        yield "line", buf
    yield "eof", None


class Entry:
    """One TOC entry of the dump: its header's name and type, its text (or streamed COPY data)."""

    def __init__(self, name=b"", type_=b"", schema=b""):
        self.name, self.type, self.schema = name, type_, schema
        self.lines = []
        self.state = {}  # the session state (default_tablespace, ...) in force where it starts

    def text(self):
        return b"".join(self.lines)

    def label(self):
        what = self.type.decode(errors="replace") or "SQL"
        name = self.name.decode(errors="replace")
        schema = self.schema.decode(errors="replace")
        return f"{what} {schema + '.' if schema not in ('', '-') else ''}{name}".strip()


def _name_parts(text, pos=0):
    """The parts of a (schema-)qualified name at `pos`, as the catalog has them, and where it ends: a
    quoted part keeps its case, spaces and dots (`""` is a quote); an unquoted one is folded to
    lower case, as the server folds it."""
    parts = []
    while True:
        m = NAME_PART_RE.match(text, pos)
        if not m:
            return None, pos
        part = m.group(0)
        parts.append(part[1:-1].replace(b'""', b'"') if part.startswith(b'"') else part.lower())
        pos = m.end()
        if text[pos : pos + 1] != b"." or len(parts) == 2:
            return parts, pos
        pos += 1


def key_of(qualified):
    """`schema.table` as the catalog has it, for a qualified name as pg_dump writes one."""
    parts, _ = _name_parts(qualified)
    return b".".join(parts or [qualified]).decode(errors="replace")


def _copy_parts(line):
    line = line.rstrip(b"\n")
    if not line.startswith(b"COPY "):
        return None
    parts, end = _name_parts(line, 5)
    rest = line[end:]
    if parts is None or not (
        rest in (b"  FROM stdin;", b" FROM stdin;") or (rest.startswith(b" (") and rest.endswith(b") FROM stdin;"))
    ):
        return None
    return parts


def copy_target(line):
    """`schema.table` that a COPY line loads, or None when it is not `COPY name [(columns)] FROM stdin;`."""
    parts = _copy_parts(line)
    return None if parts is None else b".".join(parts).decode(errors="replace")


def data_table(copy_line, data_header=None):
    """The one reading of a dump's table names (the manifest, verify-backup, the pull, the restores,
    the drill): `schema.table` as the catalog has it, for the rows of a COPY line (None when it is
    not one) under the TABLE DATA entry header before it, if any. pg_dump --load-via-partition-root
    COPYs a partition's rows into its root: then the header names the partition, whose rows they are
    (its names as pg_dump prints them in comments: a line break in a name becomes a space)."""
    parts = _copy_parts(copy_line)
    if parts is None:
        return None
    if data_header is not None and len(parts) == 2:
        schema, table = (_comment_text(p) for p in parts)
        own = b"-- Data for Name: " + table + b"; Type: TABLE DATA; Schema: " + schema + b"; Owner: "
        m = None if data_header.startswith(own) else DATA_HEADER_RE.match(data_header)
        if m:
            parts = [m.group(2), m.group(1)]
    return b".".join(parts).decode(errors="replace")


def _comment_text(name):
    return name.replace(b"\n", b" ").replace(b"\r", b" ")


# --- sessions -----------------------------------------------------------------------------------


class Unit:
    """What one session runs between two markers."""

    def __init__(self, uid, label, kind, table=None, exclusive=False, shared=False, deps=(), cost=0, entry=None):
        self.id, self.label, self.kind = uid, label, kind
        self.table, self.exclusive, self.shared = table, exclusive, shared
        self.deps, self.cost, self.entry = set(deps), cost, entry
        self.copies = collections.deque()  # the COPY statements sent in it, in order, for their tags
        self.done = False
        self.started = False


class Loader:
    def __init__(self, argv, jobs, queue_bytes=QUEUE_BYTES):
        self.argv, self.jobs, self.queue_bytes = argv, jobs, queue_bytes
        self.token = secrets.token_hex(6)
        self.cond = threading.Condition()
        self.failure = None
        self.out_lock = threading.Lock()
        self.sessions = []
        self.next_id = 0

    # sessions
    def start(self):
        for index in range(self.jobs):
            self.sessions.append(Session(self, index))

    def unit(self, label, kind, **kw):
        self.next_id += 1
        return Unit(self.next_id, label, kind, **kw)

    def check(self):
        if self.failure is not None:
            raise LoadFailed(self.failure)

    def fail(self, message):
        with self.cond:
            if self.failure is None:
                self.failure = message
            self.cond.notify_all()

    def free_session(self, exclude=None):
        for session in self.sessions:
            if session is not exclude and not session.pending:
                return session
        return None

    def wait_free(self):
        with self.cond:
            while True:
                self.check()
                session = self.free_session()
                if session is not None:
                    return session
                self.cond.wait(1)

    def wait_all(self, units=None):
        with self.cond:
            while True:
                self.check()
                if units is None and all(not s.pending for s in self.sessions):
                    return
                if units is not None and all(u.done for u in units):
                    return
                self.cond.wait(1)

    def begin(self, session, unit, prefix=b""):
        with self.cond:
            self.check()
            unit.started = True
            session.pending.append(unit)
        if prefix:
            session.put(prefix)

    def finish(self, session, unit):
        session.put(f"SELECT 'kw-done-{self.token}-{unit.id}';\n".encode())

    def copy_done(self, header, rows):
        try:
            with self.out_lock:
                sys.stdout.buffer.write(header + b"COPY %d\n" % rows)
                sys.stdout.buffer.flush()
        except OSError:  # the caller is gone (killed, its link dropped): stop, and stop the sessions
            self.fail("the counts' reader is gone (the restore was killed or its connection dropped)")

    def close(self):
        for session in self.sessions:
            session.close()

    def kill(self):
        for session in self.sessions:
            session.kill()


class Session:
    def __init__(self, loader, index):
        self.loader, self.index = loader, index
        self.pending = collections.deque()
        self.queue = collections.deque()
        self.queued = 0
        self.closing = False
        self.errors = collections.deque(maxlen=20)
        try:
            self.proc = subprocess.Popen(
                loader.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
            )
        except OSError as exc:
            raise LoadFailed(f"cannot start {loader.argv[0]}: {exc.strerror}") from exc
        for pipe in (self.proc.stdin, self.proc.stdout):
            _large_pipe(pipe.fileno())
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self.write, self.read, self.read_errors)]
        for thread in self.threads:
            thread.start()

    def put(self, data, unless_one_idles=False, wait=True):
        """Queue bytes for this session, waiting while it holds its share already (unless `wait` is
        False: a COPY's last bytes before its cut). With `unless_one_idles`, returns False instead of
        waiting when another session has nothing to do: the caller cuts the COPY there."""
        loader = self.loader
        with loader.cond:
            while wait and self.queued > loader.queue_bytes:
                loader.check()
                if unless_one_idles and loader.free_session(exclude=self) is not None:
                    return False
                loader.cond.wait(1)
            loader.check()
            self.queue.append(data)
            self.queued += len(data)
            loader.cond.notify_all()
        return True

    def write(self):
        cond = self.loader.cond
        fd = self.proc.stdin.fileno()
        try:
            while True:
                with cond:
                    while not self.queue and not self.closing:
                        cond.wait()
                    if not self.queue:
                        break
                    item = self.queue.popleft()
                _write_all(fd, item)
                with cond:
                    self.queued -= len(item)
                    cond.notify_all()
        except OSError:
            pass  # psql went away: read() reports its exit
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def read(self):
        loader = self.loader
        marker = f"kw-done-{loader.token}-".encode()
        for line in self.proc.stdout:
            line = line.rstrip(b"\n")
            if line.startswith(marker):
                with loader.cond:
                    unit = self.pending.popleft() if self.pending else None
                    if unit is None or str(unit.id).encode() != line[len(marker) :]:
                        loader.failure = loader.failure or f"session {self.index}: out of step at {line!r}"
                    else:
                        unit.done = True
                    loader.cond.notify_all()
                continue
            m = TAG_RE.match(line)
            if m:
                with loader.cond:
                    unit = self.pending[0] if self.pending else None
                    header = unit.copies.popleft() if unit is not None and unit.copies else None
                if header is not None:
                    loader.copy_done(header, int(m.group(1)))
        code = self.proc.wait()
        for thread in self.threads[2:]:
            thread.join(5)
        with loader.cond:
            if code != 0 or self.pending:
                unit = self.pending[0] if self.pending else None
                where = f" loading {unit.label}" if unit is not None else ""
                said = " | ".join(e for e in list(self.errors)[-3:]) or "no message"
                reason = f"exit {code}" if code >= 0 else f"killed by signal {-code}"
                if loader.failure is None:
                    loader.failure = f"psql session {self.index} failed ({reason}){where}: {said}"
            loader.cond.notify_all()

    def read_errors(self):
        for line in self.proc.stderr:
            text = line.decode(errors="replace").strip()
            if text:
                self.errors.append(text)

    def close(self):
        with self.loader.cond:
            self.closing = True
            self.loader.cond.notify_all()

    def kill(self):
        try:
            self.proc.kill()
        except OSError:
            pass


def _large_pipe(fd):
    try:
        import fcntl

        fcntl.fcntl(fd, 1031, CHUNK)  # F_SETPIPE_SZ (Linux): 1 MiB pipes, a quarter of the reads and writes
    except (OSError, ImportError):
        pass


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- the plan -----------------------------------------------------------------------------------


def section_of(type_, section):
    """The section an entry of `type_` is in, coming after one in `section`. Unknown types stay where they are
    (a new pre-data kind runs in order with the rest), but after the data they are post-data, which the
    post-data's plan then declines."""
    if type_ in FOLLOWING_TYPES:
        return section
    if type_ in POST_TYPES or section == DATA and type_ not in DATA_TYPES:
        return POST_DATA
    return DATA if type_ in DATA_TYPES and section == PRE_DATA else section


def placement(type_, text):
    """How a post-data entry loads, from its type and its SQL as pg_dump writes it:
    ("index", table)       a CREATE INDEX, beside the others on its table (they share their lock);
    ("constraint", table)  ALTER TABLE ONLY ... ADD a primary key, unique or exclusion constraint: it builds an
                           index on that one table, and runs alone on it;
    ("attach", None)       INDEX ATTACH, after those, in order;
    ("late", tables)       the rest of the constraints (FOREIGN KEY, CHECK on a table or a domain, a NOT NULL ...
                           NOT VALID) after those and all the data: they check rows beyond one table (the other
                           side of a key, inheritance children, every column of a domain); never beside another
                           on one of `tables`, and when those are not known (None) alone;
    ("later", None)        everything else pg_dump writes there, after all of those, in order;
    (None, why)            SQL pg_dump does not write there."""
    if re.search(rb"^\\", text, re.M):
        return None, "a psql meta-command"
    if type_ == b"INDEX":
        found = INDEX_ON_RE.findall(text)
        return ("index", key_of(found[0][1])) if len(found) == 1 else (None, "an index statement it cannot read")
    if type_ in CONSTRAINT_TYPES:
        found = ADD_CONSTRAINT_RE.findall(text)
        if len(found) != 1:
            return None, "a constraint it cannot read"
        what, only, table, builds_index = found[0]
        if type_ == b"CONSTRAINT" and what == b"TABLE" and only and builds_index:
            return "constraint", key_of(table)
        ref = REFERENCES_RE.search(text)
        if type_ == b"FK CONSTRAINT" and what == b"TABLE" and only and ref:
            return "late", (key_of(table), key_of(ref.group(1)))
        return "late", None  # recursing into partitions or children, or a domain's: alone
    if type_ == b"INDEX ATTACH":
        return "attach", None
    if type_ in LATER_TYPES:
        return "later", None
    return None, "an entry of type " + type_.decode(errors="replace")


class Plan:
    """Reads the stream, feeds the sessions, and schedules what comes after the data."""

    def __init__(self, loader, at_eof=None):
        self.loader = loader
        self.at_eof = at_eof or (lambda: None)
        self.section = "preamble"
        self.preamble = []
        self.state = {}
        self.entry = None  # the entry being read
        self.serial = None  # why everything from here on runs in session 0, in order
        self.main = None
        self.open_unit = None  # session 0's unit whose marker is not sent yet (the pre-data, or the serial rest)
        self.data_units = []  # COPY units: (unit, root of its table)
        self.rows_units = []  # the data's other entries, run after the stream in order (INSERTs, SEQUENCE SET, ...)
        self.post = []
        self.parents = {}  # partition -> its parent (TABLE ATTACH entries)
        self.copy_unit = None
        self.copy_session = None
        self.copy_header = None
        self.copy_table = None
        self.copy_state = b""  # the session state lines its COPY runs under, for each part it is cut into
        self.copy_label = ""
        self.copy_parts = 0
        self.sizes = collections.Counter()  # COPY bytes per table
        self.copies = 0
        self.parts = 0  # COPY statements sent: more than copies when blocks were cut
        self.data_transactions = False

    def run(self, stream):
        for kind, value in stream:
            if kind == "line":
                self.line(value)
            elif kind == "copy":
                self.copy_start(value)
            elif kind == "data":
                self.copy_data(value)
            elif kind == "end":
                self.copy_end()
            else:
                self.at_eof()
                if value is not None:
                    raise LoadFailed(
                        "the dump ends inside the data of table " + copy_target(value),
                        DAMAGED,
                    )
        if self.section == "preamble":
            self.go_serial("no pg_dump entry headers")
        if self.serial:
            self.close_open_unit()
            self.loader.wait_all()
            return
        self.flush_entry()
        self.close_open_unit()
        self.commit_data_transactions()
        self.schedule_rest()

    # the stream's lines
    def line(self, line):
        if self.serial:
            self.main.put(line)
            return
        stripped = line.rstrip(b"\n")
        m = HEADER_RE.match(stripped) if stripped.startswith(b"-- ") else None
        if m and self._prev_is_dashes():
            self.new_entry(m)
            return
        if self.section == "preamble":
            self.preamble.append(line)
            if not (_is_noise(line) or PREAMBLE_RE.match(line)):
                self.go_serial(f"no pg_dump entry header before {stripped[:40].decode(errors='replace')!r}")
            return
        if line.startswith(b"\\"):
            if RESTRICT_RE.match(line):
                return  # the preamble's \restrict guards every session; the closing \unrestrict is not needed
            self.go_serial(f"a psql meta-command in the dump ({stripped[:40].decode(errors='replace')})")
            self.main.put(line)
            return
        if self.entry is None:
            self.entry = Entry()
            self.entry.state = dict(self.state)
        self.entry.lines.append(line)

    def _prev_is_dashes(self):
        lines = self.preamble if self.section == "preamble" else (self.entry.lines if self.entry else [])
        return bool(lines) and lines[-1] == b"--\n"

    def new_entry(self, m):
        carried = []
        if self.section == "preamble":
            self.preamble.pop()  # the header's first "--" line
            self.section = PRE_DATA
            self.send_preamble()
        else:
            lines = self.entry.lines
            lines.pop()
            while lines and (lines[-1] == b"\n" or STATE_RE.match(lines[-1])):
                carried.insert(0, lines.pop())
            self.flush_entry()
            if self.serial:  # flushing found something it could not place
                self.main.put(b"".join(carried) + b"--\n" + m.group(0) + b"\n")
                return
        for line in carried:
            s = STATE_RE.match(line)
            if s:
                self.state[s.group(1) or s.group(2)] = line
        name, type_, schema = m.group(1), m.group(2), m.group(3)
        self.entry = Entry(name, type_, schema)
        self.entry.state = dict(self.state)
        self.entry.lines = carried + [b"--\n", m.group(0) + b"\n"]
        section = section_of(type_, self.section)
        if section != self.section and self.section == PRE_DATA:
            self.close_open_unit()
            self.loader.wait_all()
            if section == DATA:
                self.begin_data_transactions()
        self.section = section

    def send_preamble(self, everywhere=True):
        loader = self.loader
        loader.start()
        self.main = loader.sessions[0]
        preamble = b"".join(self.preamble)
        for session in loader.sessions if everywhere else [self.main]:
            session.put(preamble)
        for line in self.preamble:
            s = STATE_RE.match(line)
            if s:
                self.state[s.group(1) or s.group(2)] = line
        self.open_unit = loader.unit("the pre-data (types, tables, functions)", PRE_DATA)
        loader.begin(self.main, self.open_unit)

    def flush_entry(self):
        """The entry read so far is complete: run it now (pre-data) or keep it for later."""
        entry, self.entry = self.entry, None
        if entry is None:
            return
        if self.section == PRE_DATA:
            for m in ATTACH_RE.finditer(entry.text()):
                self.parents[key_of(m.group(2))] = key_of(m.group(1))
            self.main.put(entry.text())
        elif not entry.type:  # lines between entries
            if not all(_is_noise(line) for line in entry.lines):
                self.go_serial("SQL outside any entry")
                self.main.put(entry.text())
        elif self.section == DATA:
            self.rows_units.append(entry)
        else:
            self.post.append(entry)

    def begin_data_transactions(self):
        """Each session loads its COPY blocks in one transaction, committed when the stream ends: rows
        count for autovacuum only once committed, so it does not scan and analyze the tables while
        they are being loaded (as it would after each COPY), taking the cores from the load."""
        for session in self.loader.sessions:
            session.put(b"BEGIN;\n")
        self.data_transactions = True

    def commit_data_transactions(self):
        """The COPY blocks' transactions committed (the post-data, in other sessions, must see the rows)."""
        if not self.data_transactions:
            return
        self.data_transactions = False
        for session in self.loader.sessions:
            unit = self.loader.unit("COMMIT of the data", "commit")
            self.loader.begin(session, unit, b"COMMIT;\n")
            self.loader.finish(session, unit)
        self.loader.wait_all()

    def close_open_unit(self):
        if self.open_unit is not None:
            self.loader.finish(self.main, self.open_unit)
            self.open_unit = None

    def go_serial(self, why):
        """From here on, everything in session 0, in the dump's order."""
        if self.serial:
            return
        self.serial = why
        note(f"loading the rest in one session, in the dump's order: {why}")
        if self.main is None:
            self.send_preamble(everywhere=False)
        elif self.open_unit is None:
            self.commit_data_transactions()
            self.loader.wait_all()
            self.open_unit = self.loader.unit("the rest of the dump, in order", "serial")
            self.loader.begin(self.main, self.open_unit)
        pending = self.rows_units + self.post + ([self.entry] if self.entry is not None else [])
        self.rows_units, self.post, self.entry = [], [], None
        for entry in pending:
            self.main.put(entry.text())

    # COPY blocks
    def copy_start(self, header):
        if not self.serial:
            entry = self.entry
            if (
                self.section != DATA
                or entry is None
                or entry.type != b"TABLE DATA"
                or not all(_is_noise(line) for line in entry.lines)
            ):
                self.go_serial(f"a COPY outside a TABLE DATA entry ({header.decode(errors='replace').strip()[:60]})")
        if self.serial:
            self.open_unit.copies.append(header)
            self.main.put(header)
            return
        self.entry = None
        self.copies += 1
        self.copy_header, self.copy_state = header, _state_lines(entry.state)
        self.copy_table = copy_target(header)
        self.copy_label, self.copy_parts = entry.label(), 1
        self.copy_part(self.loader.wait_free(), self.copy_label, self.copy_state + entry.text() + header)

    def copy_part(self, session, label, prefix):
        """A COPY statement of the current block in `session`: the block's start, or a part after a cut."""
        table = self.copy_table
        unit = self.loader.unit(label, DATA, table=table)
        unit.copies.append(self.copy_header)
        self.loader.begin(session, unit, prefix)
        self.copy_unit, self.copy_session = unit, session
        self.data_units.append((unit, self.root(table)))
        self.parts += 1

    def copy_data(self, data):
        if self.serial:
            self.main.put(data)
            return
        self.sizes[self.copy_unit.table] += len(data)
        session = self.copy_session
        ends = len(data) <= 3 or data[-4:] == b"\n\\.\n"  # may end the block (`\.`, whole or begun before): never cut
        if ends:
            session.put(data)
            return
        if session.put(data, unless_one_idles=True):
            return
        # Its session lags and another idles: in text format (pg_dump's) every newline ends a row, so
        # the block is cut after the piece's last one and the rest goes on as another COPY there.
        piece = bytes(data)
        cut = piece.rfind(b"\n") + 1
        if cut == 0:  # inside a row longer than the piece: no cut here
            session.put(data)
            return
        session.put(piece[:cut] + b"\\.\n", wait=False)
        self.loader.finish(session, self.copy_unit)
        self.copy_parts += 1
        label = f"{self.copy_label} (part {self.copy_parts})"
        self.copy_part(self.loader.wait_free(), label, self.copy_state + self.copy_header)
        if cut < len(piece):
            self.copy_session.put(piece[cut:])

    def copy_end(self):
        if not self.serial:
            self.loader.finish(self.copy_session, self.copy_unit)
            self.copy_unit = self.copy_session = None

    def root(self, table):
        seen = set()
        while table in self.parents and table not in seen:
            seen.add(table)
            table = self.parents[table]
        return table

    # after the stream
    def schedule_rest(self):
        loader = self.loader
        units = []
        chain = set()
        before_indexes = set()  # rows loaded by INSERTs, and restored statistics that an index build rewrites
        for entry in self.rows_units:
            unit = loader.unit(entry.label(), "later-data", entry=entry, deps=chain)
            chain = {unit.id}
            units.append(unit)
            if entry.type in (b"TABLE DATA", b"STATISTICS DATA"):
                before_indexes.add(unit.id)
        data_ids = {u.id for u, _ in self.data_units} | {u.id for u in units}
        post, why = self.plan_post(data_ids, before_indexes)
        if why:
            note(f"the post-data runs in one session, in the dump's order: {why}")
        self.execute(units + post)

    def plan_post(self, data_ids, before_indexes):
        loader = self.loader
        first, attach, late, later = [], [], [], []
        why = None
        for entry in self.post:
            kind, detail = placement(entry.type, entry.text())
            if kind is None:
                why = why or f"{detail} ({entry.label()})"
            elif kind in ("index", "constraint"):
                first.append((entry, detail, kind == "index"))
            elif kind == "attach":
                attach.append(entry)
            elif kind == "late":
                late.append((entry, None if detail is None else {self.root(table) for table in detail}))
            else:
                later.append(entry)
        if why:
            units, chain = [], set()
            for entry in self.post:
                unit = loader.unit(entry.label(), "post-serial", entry=entry, deps=data_ids | chain)
                chain = {unit.id}
                units.append(unit)
            return units, why
        by_root = collections.defaultdict(set)
        for unit, root in self.data_units:
            by_root[root].add(unit.id)
        firsts = []
        for entry, table, is_index in first:
            firsts.append(
                loader.unit(
                    entry.label(),
                    "index" if is_index else "constraint",
                    entry=entry,
                    table=table,
                    shared=is_index,
                    deps=by_root.get(self.root(table), set()) | before_indexes,
                    cost=self.sizes[table],
                )
            )
        firsts.sort(key=lambda u: -u.cost)  # the longest first
        barrier = {u.id for u in firsts}
        attaches, chain = [], set()
        for entry in attach:
            unit = loader.unit(entry.label(), "attach", entry=entry, deps=barrier | chain)
            chain = {unit.id}
            attaches.append(unit)
        barrier |= {u.id for u in attaches} | data_ids
        late_units = []
        for entry, roots in late:
            unit = loader.unit(entry.label(), "late", entry=entry, deps=barrier)
            unit.locks = roots
            late_units.append(unit)
        barrier |= {u.id for u in late_units}
        laters, chain = [], set()
        for entry in later:
            unit = loader.unit(entry.label(), "later", entry=entry, deps=barrier | chain)
            chain = {unit.id}
            laters.append(unit)
        return firsts + attaches + late_units + laters, None

    def execute(self, units):
        """Run units as their dependencies are done, on free sessions, never two that lock alike at once."""
        loader = self.loader
        waiting = list(units)
        running = []
        done = set()
        with loader.cond:
            while waiting:
                loader.check()
                done |= {u.id for u, _ in self.data_units if u.done} | {u.id for u in running if u.done}
                running = [u for u in running if not u.done]
                ready = None
                for unit in waiting:
                    if unit.deps <= done and not self._conflicts(unit, running):
                        ready = unit
                        break
                session = loader.free_session() if ready is not None else None
                if session is None:
                    if not running and not any(s.pending for s in loader.sessions):
                        raise LoadFailed("internal error: the remaining entries wait for each other")
                    loader.cond.wait(1)
                    continue
                waiting.remove(ready)
                running.append(ready)
                loader.begin(session, ready, _state_lines(ready.entry.state) + ready.entry.text())
                loader.finish(session, ready)
        loader.wait_all()

    @staticmethod
    def _conflicts(unit, running):
        if unit.kind == "late":
            return any(
                other.kind == "late" and (unit.locks is None or other.locks is None or unit.locks & other.locks)
                for other in running
            )
        if unit.kind in ("index", "constraint"):
            return any(
                other.kind in ("index", "constraint")
                and other.table == unit.table
                and not (unit.shared and other.shared)
                for other in running
            )
        return False


def _is_noise(line):
    return not line.strip() or line.startswith(b"--") or bool(STATE_RE.match(line))


def _state_lines(state):
    return b"".join(state[k] for k in sorted(state))


# --- the program --------------------------------------------------------------------------------


def decompressor(path):
    if not path.endswith(".gz"):
        return ["cat", "--", path]
    for tool in ("igzip", "pigz", "gzip"):
        if shutil.which(tool):
            return [tool, "-dc", "--", path]
    raise LoadFailed("no gzip decompressor (igzip, pigz or gzip) on PATH")


def default_jobs():
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def load(argv, jobs, dump=None, stdin_fd=0, queue_bytes=QUEUE_BYTES):
    """Load; returns the exit status."""
    started = time.monotonic()
    loader = Loader(argv, jobs, queue_bytes)
    source = None
    err = tempfile.TemporaryFile()

    def decompressed():
        """At the end of the stream: a failed decompression is a damaged dump, whatever was read."""
        if source is not None and source.wait() != 0:
            err.seek(0)
            said = " ".join(err.read().decode(errors="replace").split())[-300:]
            raise LoadFailed(f"decompressing failed: exit {source.returncode}: {said}", DAMAGED)

    plan = Plan(loader, decompressed)
    try:
        if dump is not None:
            source = subprocess.Popen(decompressor(dump), stdout=subprocess.PIPE, stderr=err, bufsize=0)
            fd = source.stdout.fileno()
        else:
            fd = stdin_fd
        _large_pipe(fd)
        plan.run(events(chunks_of(fd)))
        loader.close()
        for session in loader.sessions:
            session.threads[1].join()
        loader.check()
    except LoadFailed as exc:
        loader.kill()
        if source is not None and source.poll() is None:
            source.kill()
        note(str(exc))
        return exc.code
    except BaseException:
        loader.kill()
        if source is not None:
            source.kill()
        raise
    note(
        f"loaded with {jobs} sessions in {time.monotonic() - started:.1f}s: {plan.copies} tables' data"
        + (f" in {plan.parts} COPY statements (blocks cut where a session lagged)" if plan.parts > plan.copies else "")
        + (f" (in one session: {plan.serial})" if plan.serial else "")
    )
    return 0


def main(args=None):
    args = list(sys.argv[1:] if args is None else args)
    options = {"--jobs": "auto", "--session": None, "--dump": None, "--queue-bytes": str(QUEUE_BYTES)}
    while args:
        flag = args.pop(0)
        if flag not in options or not args:
            sys.stderr.write(__doc__)
            return 2
        options[flag] = args.pop(0)
    if options["--session"] is None:
        sys.stderr.write(__doc__)
        return 2
    argv = json.loads(options["--session"])
    jobs = default_jobs() if options["--jobs"] == "auto" else max(1, int(options["--jobs"]))
    return load(argv, jobs, options["--dump"], queue_bytes=max(1, int(options["--queue-bytes"])))


if __name__ == "__main__":
    sys.exit(main())
