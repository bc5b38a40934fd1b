"""
Our UIDL/size index, C{popservice-uidlist} (RFC 1939 section 7, UIDL: a
unique-id is assigned once and never changes or comes back).

Index file format (UTF-8; file names as on disk, undecodable bytes kept)::

    popservice-uidlist 1 V<uidvalidity> N<next uid>
    <uidl> <size> <base name>
    ...

C{<uidl>} is 1-70 characters in 0x21-0x7E (no space), C{<size>} the
transmitted size in decimal (C{-} for a taken-over UIDL whose file could not
be read yet: kept, not listed, retried at the next login), and C{<base name>} the rest of the line (it may
contain spaces).  Newly assigned UIDLs are C{"%08x%08x" % (uid, uidvalidity)},
which is exactly what Dovecot's default C{pop3_uidl_format = %08Xu%08Xv}
produces (Dovecot's C{X} modifier prints lower-case hex), so after a takeover
from Dovecot, new messages get the ids Dovecot itself would have given.

The file is replaced atomically (write a temporary file, fsync, rename, fsync
the directory), and every read-modify-write holds C{popservice-uidlist.lock}
(a blocking C{flock}, held briefly).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence

from twisted.logger import Logger

from popservice.stores.maildir.layout import _CLOEXEC, _NOFOLLOW, _nofollow_opener
from popservice.stores.maildir.order import _DIGITS_RE, _sorted_bases

__all__ = ["INDEX_FILE_NAME", "INDEX_LOCK_NAME", "parse_index"]

log = Logger(namespace="popservice.stores.maildir")

#: The popservice UIDL/size index inside each Maildir.
INDEX_FILE_NAME = "popservice-uidlist"
#: Short-lived lock serialising read-modify-write of the index.
INDEX_LOCK_NAME = "popservice-uidlist.lock"
_INDEX_HEADER = "popservice-uidlist 1"

_UIDL_RE = re.compile(r"[\x21-\x7e]{1,70}\Z")
_INDEX_HEADER_RE = re.compile(r"popservice-uidlist 1 V([0-9]{1,10}) N([0-9]{1,12})\Z")


#: An index entry: (UIDL, transmitted size); size -1 for a taken-over UIDL
#: whose file could not be read yet.
_Entry = tuple[str, int]


class _Index:
    """The UIDL/size index of one Maildir, in memory."""

    __slots__ = ("uidvalidity", "next_uid", "entries", "_used")

    def __init__(self, uidvalidity: int, next_uid: int, entries: dict[str, _Entry] | None = None) -> None:
        self.uidvalidity = uidvalidity
        self.next_uid = max(1, next_uid)
        #: base name -> entry; in file order when parsed
        self.entries: dict[str, _Entry] = {} if entries is None else entries
        self._used: set[str] | None = None

    def new_uidl(self) -> str:
        """The next UIDL: C{%08x%08x} of (counter, uidvalidity); never one in use."""
        if self._used is None:
            self._used = {e[0] for e in self.entries.values()}
        while True:
            n = self.next_uid
            self.next_uid += 1
            uidl = f"{n:08x}{self.uidvalidity:08x}"
            if uidl not in self._used:  # only possible next to foreign (taken-over) UIDLs
                self._used.add(uidl)
                return uidl

    def serialise(self) -> bytes:
        entries = self.entries
        lines = [f"{_INDEX_HEADER} V{self.uidvalidity} N{self.next_uid}\n"]
        for base in _sorted_bases(list(entries)):
            uidl, size = entries[base]
            # "-": a taken-over UIDL whose file could not be read yet; kept, not listed
            lines.append(f"{uidl} {size if size >= 0 else '-'} {base}\n")
        return "".join(lines).encode("utf-8", "surrogateescape")


def _fresh_uidvalidity(previous: int | None = None) -> int:
    v = int(time.time()) & 0xFFFFFFFF
    if previous is not None and v <= previous:
        v = (previous + 1) & 0xFFFFFFFF
    return max(v, 1)


def _read_bytes(path: str) -> bytes | None:
    """The file's content, or C{None} when it does not exist."""
    try:
        with open(path, "rb", opener=_nofollow_opener) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _read_text(path: str) -> str | None:
    """The file's text, or C{None} when it does not exist."""
    data = _read_bytes(path)
    return None if data is None else data.decode("utf-8", "surrogateescape")


def _parse_index_lines_fast(body: str) -> dict[str, _Entry] | None:
    """
    The entries of a well-formed index body (every line C{<uidl> <size> <base>}
    with a space-free base name, sizes all known, no blank line), split with a
    few whole-text operations; C{None} when the body is not of that simple kind.
    """
    if not body:
        return {}
    n = body.count("\n")
    if body[-1] != "\n" or body.count(" ") != 2 * n or "\n\n" in body or body[0] == "\n":
        return None
    # "u s b\n" -> "u s b \n " -> [u, s, b, "\n", ...]: a line end in every fourth
    # field, and only there, proves that each line has exactly three fields
    fields = body.replace("\n", " \n ").split(" ")
    fields.pop()  # the "" after the last line end
    if len(fields) != 4 * n or fields[3::4].count("\n") != n:
        return None
    uidls, sizes, bases = fields[0::4], fields[1::4], fields[2::4]
    if "" in uidls or "" in sizes or "" in bases or max(map(len, uidls)) > 70:
        return None
    joined = "".join(uidls)
    # (no space can be left in a field: isprintable() then means 0x21-0x7E)
    if not (joined.isascii() and joined.isprintable()):
        return None
    joined = "".join(sizes)
    if not (joined.isascii() and joined.isdigit()):
        return None
    return dict(zip(bases, zip(uidls, map(int, sizes), strict=True), strict=True))


def parse_index(text: str, where: str = INDEX_FILE_NAME) -> _Index | None:
    """Parse a popservice index; C{None} when its header is unreadable."""
    head, _, body = text.partition("\n")
    m = _INDEX_HEADER_RE.match(head)
    if not m:
        return None
    index = _Index(int(m.group(1)), int(m.group(2)))
    entries = _parse_index_lines_fast(body)
    if entries is not None:
        index.entries = entries
        return index
    entries = index.entries
    for lineno, line in enumerate(body.split("\n"), start=2):
        if not line:
            continue
        parts = line.split(" ", 2)
        if (len(parts) != 3 or not _UIDL_RE.match(parts[0])
                or not (_DIGITS_RE.match(parts[1]) or parts[1] == "-") or not parts[2]):
            log.warn("{where}: skipping malformed line {lineno} (its message gets a new UIDL)",
                     where=where, lineno=lineno)
            continue
        entries[parts[2]] = (parts[0], int(parts[1]) if parts[1] != "-" else -1)
    return index


@contextlib.contextmanager
def _index_lock(path: str) -> Iterator[None]:
    """Serialise read-modify-write of the index (a blocking flock; held briefly)."""
    fd = os.open(os.path.join(path, INDEX_LOCK_NAME), os.O_RDWR | os.O_CREAT | _CLOEXEC | _NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_tmp_counter = 0
_tmp_lock = threading.Lock()


#: a temporary index file older than this is a crash's leftover (a write takes milliseconds)
STALE_TEMPORARY = 3600.0


def _remove_stale_temporaries(path: str, prefix: str) -> None:
    """Remove C{prefix}* files in C{path} older than L{STALE_TEMPORARY}: left by a killed server."""
    now = time.time()
    try:
        names = [n for n in os.listdir(path) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        full = os.path.join(path, name)
        with contextlib.suppress(OSError):
            if now - os.lstat(full).st_mtime > STALE_TEMPORARY:
                os.unlink(full)


def _write_index(path: str, index: _Index) -> bytes:
    """
    Replace the index atomically: temporary file, fsync, rename, fsync the
    directory.  Returns the content written.
    """
    global _tmp_counter
    with _tmp_lock:
        _tmp_counter += 1
        n = _tmp_counter
    target = os.path.join(path, INDEX_FILE_NAME)
    tmp = f"{target}.tmp.{os.getpid()}.{n}"
    data = index.serialise()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC | _NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _remove_stale_temporaries(path, INDEX_FILE_NAME + ".tmp.")
    try:
        dfd = os.open(path, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return data
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return data


def _remove_from_index(path: str, bases: Sequence[str]) -> None:
    with _index_lock(path):
        text = _read_text(os.path.join(path, INDEX_FILE_NAME))
        index = parse_index(text) if text is not None else None
        if index is None:
            return
        changed = False
        for b in bases:
            if index.entries.pop(b, None) is not None:
                changed = True
        if changed:
            _write_index(path, index)
