"""
Crash-safe delivery shared by both fetch engines (Twisted:
L{popservice.client.fetch}; blocking: L{popservice.client.blocking}).  The
engines only talk to the server; everything that touches local state is
here, and nothing here imports Twisted.

The fetcher: download new mail from a POP3 server into a Maildir, an mbox or
an MDA, exactly once, whatever moment the process is killed at.

Crash safety rests on one rule: a message is marked for deletion (DELE) only
after its local copy is durable (fsynced) I{and} its UIDL is recorded in the
journal (fsynced append); and a message whose UIDL is in the journal is never
delivered again.  The journal is per account (a directory with C{journal} and
C{lock}); records are lines:

    D <uidl>                     delivered
    M <uidl> <tmp> <final>       delivered into a Maildir: tmp/<tmp> is durable
                                 and is renamed to new/<final> (redone at start-up
                                 when a crash came between the two)
    B <offset>                   an mbox batch starts at <offset> (fsynced first)
    C                            the D lines since the last B are committed
    I <uidl>                     an MDA is about to run for <uidl>

A torn last line (no LF) is ignored and cut off.  Recovery at start-up: Maildir
renames are completed and our orphaned tmp/ files removed; an mbox batch
without C{C} is truncated away (its D lines do not count); an MDA run without
its D may or may not have delivered (an MDA cannot be rolled back): it is run
again (at-least-once) and a warning says so.  Compaction rewrites the journal
as D lines for the UIDLs still on the server, atomically (temporary file,
fsync, rename, fsync directory).

Speed: RETRs are pipelined (a window of outstanding commands) and driven by
plain callbacks; into a Maildir each complete message is written with one
writev to a fresh tmp/ file, and durability is batched: per batch one
syncfs(2) (Linux; elsewhere, or with C{--sync file}, an fdatasync of each
file and one fsync of tmp/), one journal append+fsync, the renames, then the
DELEs.  On the machine that measured it, 1,000 fdatasyncs cost ~0.1 s that
one syncfs does not.  A server without UIDL is refused (exactly-once is
impossible without it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from typing import Any, BinaryIO

__all__ = [
    "DeliveryError", "DeliverySession", "FetchOptions", "FetchResult", "Journal",
    "MaildirTarget", "MboxTarget", "MDATarget", "Progress", "StateLocked", "Target",
    "fsync_dir", "make_target",
]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # the process image: libc is in it
        fn: Callable[[int], int] = libc.syncfs
        return fn
    except (OSError, AttributeError):
        return None


_syncfs: Callable[[int], int] | None | bool = False
_sync_file_range: Callable[[int, int, int, int], int] | None | bool = False
#: sync_file_range(2) flag: start writeback of dirty pages, do not wait
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """
    Start writing C{fd}'s dirty pages to disk without waiting (Linux
    sync_file_range(2)); a later fdatasync then has (almost) nothing left to
    do, and the block allocations of a whole batch of files land in one
    filesystem journal commit instead of one each.  A no-op elsewhere.
    """
    global _sync_file_range
    if _sync_file_range is False:
        _sync_file_range = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)  # the process image: libc is in it
                fn = libc.sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):
                pass
    if _sync_file_range is not None and _sync_file_range is not True:
        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # advisory: errors show up at fdatasync


def syncfs(fd: int) -> bool:
    """
    Linux syncfs(2): write back and commit everything dirty on C{fd}'s
    filesystem, waiting for it (errors reported since Linux 5.8).  One call
    makes a whole batch of files and directory entries durable.  Returns
    False when unavailable (the caller then fsyncs file by file).
    """
    global _syncfs
    if _syncfs is False:
        _syncfs = _load_syncfs()
    if _syncfs is None or _syncfs is True:
        return False
    if _syncfs(fd) != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return True


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]



class StateLocked(Exception):
    """Another fetch for the same account is running."""


class DeliveryError(Exception):
    """A message could not be delivered locally (nothing was deleted)."""


# --------------------------------------------------------------------------
# The journal

class Journal:
    """The per-account record of delivered UIDLs (see the module docstring)."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "journal")
        self._lock_fd = os.open(os.path.join(state_dir, "lock"),
                                os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StateLocked(f"another fetch holds {state_dir}/lock")
            raise
        self.delivered: set[str] = set()
        #: maildir records: uidl -> (tmp name, final name)
        self.maildir: dict[str, tuple[str, str]] = {}
        #: offset of an mbox batch that never committed
        self.open_mbox_batch: int | None = None
        #: MDA runs that never recorded their outcome
        self.mda_unknown: set[str] = set()
        self._records = 0
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _CLOEXEC, 0o600)

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # a torn record from a crash: cut it off so appends start on a fresh line
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        batch: list[str] | None = None
        for raw in data[:end].split(b"\n"):
            parts = raw.decode("ascii", "replace").split(" ")
            op = parts[0]
            if not op:
                continue
            self._records += 1
            if op == "D" and len(parts) == 2:
                if batch is not None:
                    batch.append(parts[1])
                else:
                    self.delivered.add(parts[1])
                    self.mda_unknown.discard(parts[1])
            elif op == "M" and len(parts) == 4:
                self.delivered.add(parts[1])
                self.maildir[parts[1]] = (parts[2], parts[3])
            elif op == "B" and len(parts) == 2:
                batch = []
                self.open_mbox_batch = int(parts[1])
            elif op == "C":
                if batch is not None:
                    self.delivered.update(batch)
                batch = None
                self.open_mbox_batch = None
            elif op == "I" and len(parts) == 2:
                self.mda_unknown.add(parts[1])

    @property
    def needs_compaction(self) -> bool:
        return bool(self.maildir or self.mda_unknown or self.open_mbox_batch is not None
                    or self._records > len(self.delivered))

    def append(self, records: Sequence[str], sync: bool = True) -> None:
        """Append whole records (one write) and fsync."""
        if not records:
            return
        _write_all(self._fd, "".join(r + "\n" for r in records).encode("ascii"))
        self._records += len(records)
        if sync:
            os.fsync(self._fd)

    def sync(self) -> None:
        os.fsync(self._fd)

    def compact(self, keep: set[str] | None = None) -> None:
        """Rewrite as D lines (only those in C{keep} when given), atomically."""
        uids = self.delivered if keep is None else self.delivered & keep
        tmp = self.path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _CLOEXEC, 0o600)
        try:
            _write_all(fd, "".join(f"D {u}\n" for u in sorted(uids)).encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        fsync_dir(self.dir)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _CLOEXEC, 0o600)
        self.delivered = set(uids)
        self.maildir.clear()
        self.mda_unknown.clear()
        self.open_mbox_batch = None
        self._records = len(uids)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._lock_fd)


# --------------------------------------------------------------------------
# Delivery targets

class Target:
    """Where messages go.  Subclasses implement the crash-safe protocol."""

    #: store CRLF line ends (False: LF, the Unix convention)
    crlf = False
    #: may L{prepare} run in a thread while the next messages are written?
    threadable = False
    description = ""

    def recover(self, journal: Journal) -> None:
        """Finish or roll back what a crash interrupted (before compaction)."""

    def open(self, uid: str, size: int) -> Any:
        """Start a message; returns a writer with C{write(chunk)}."""
        raise NotImplementedError

    def finished(self, writer: Any) -> int:
        """The message is complete (not yet durable); returns its stored size."""
        raise NotImplementedError

    def abort(self, writer: Any) -> None:
        """The download failed: forget this message."""

    def prepare(self, writers: list[Any]) -> None:
        """Make a batch durable (may run in a thread: no journal, no reactor)."""

    def commit(self, journal: Journal, uids: list[str], writers: list[Any]) -> None:
        """Record a prepared batch in the journal (fsynced) and publish it."""
        raise NotImplementedError

    def close(self) -> None:
        pass


_counter = 0
#: the host and process parts of our Maildir names, looked up once (two
#: system calls a message otherwise); a forked child looks its pid up again
_host = ""
_pid = 0


def _refresh_ids() -> None:
    global _host, _pid
    _host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_ids)


def _unique(prefix: str) -> str:
    global _counter
    if not _pid:
        _refresh_ids()
    _counter += 1
    now = time.time()
    return f"{int(now)}.M{int(now * 1e6) % 1000000}P{_pid}Q{_counter}{prefix}.{_host}"


class _FileWriter:
    __slots__ = ("uid", "name", "fd", "size", "final")

    def __init__(self, uid: str, name: str, fd: int) -> None:
        self.uid = uid
        self.name = name
        self.fd = fd
        self.size = 0
        self.final = name

    def write(self, chunk: bytes) -> None:
        _write_all(self.fd, chunk)
        self.size += len(chunk)


class MaildirTarget(Target):
    """
    Deliver into a Maildir: tmp/ (durable), journal, then rename into new/.

    Two ways in: L{open}/L{finished} stream a message into its tmp/ file as
    it arrives; L{store} writes a whole message (its chunks) with one
    C{writev} and may start its writeback at once.  L{prepare} then makes a
    batch durable: by default (C{use_syncfs}) with one syncfs(2), which
    writes back the batch's files and tmp/ entries together (it also waits
    for other programs' dirty data on that filesystem); where syncfs is
    missing, or with C{use_syncfs=False}, with an fdatasync of each file and
    one fsync of tmp/ for the names.
    """

    threadable = True

    def __init__(self, path: str, crlf: bool = False, tag: str = "", use_syncfs: bool = True) -> None:
        self.use_syncfs = use_syncfs
        self.path = os.path.abspath(os.path.expanduser(path))
        self.crlf = crlf
        self.description = f"maildir:{self.path}"
        #: our tmp/ names carry this so recovery removes only our orphans
        self.tag = "R" + (re.sub(r"[^A-Za-z0-9]", "", tag)[:16] or "popfetch")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)
        self.tmp = os.path.join(self.path, "tmp")
        self.new = os.path.join(self.path, "new")

    def recover(self, journal: Journal) -> None:
        referenced = set()
        for tmp_name, final in journal.maildir.values():
            referenced.add(tmp_name)
            src = os.path.join(self.tmp, tmp_name)
            if os.path.exists(src):
                os.rename(src, os.path.join(self.new, final))
        if journal.maildir:
            fsync_dir(self.new)
        marker = self.tag + "."
        removed = False
        for name in os.listdir(self.tmp):
            if marker in name and name not in referenced:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.tmp, name))
                    removed = True
        if removed or journal.maildir:
            fsync_dir(self.tmp)

    def open(self, uid: str, size: int) -> _FileWriter:
        name = _unique(self.tag)
        fd = os.open(os.path.join(self.tmp, name),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o600)
        return _FileWriter(uid, name, fd)

    def finished(self, writer: _FileWriter) -> int:
        writer.final = f"{writer.name},S={writer.size}"
        return writer.size

    def store(self, uid: str, chunks: list[bytes], writeback: bool = True) -> _FileWriter:
        """
        Write a complete message into a new tmp/ file (not yet durable);
        C{writeback}: start writing it to disk at once (L{start_writeback}).
        """
        writer = self.open(uid, 0)
        try:
            size = sum(map(len, chunks))
            written = os.writev(writer.fd, chunks) if chunks else 0
            if written < size:  # a short write: finish the rest by hand
                _write_all(writer.fd, b"".join(chunks)[written:])
            writer.size = size
            if writeback:
                start_writeback(writer.fd)
        except BaseException:
            self.abort(writer)
            raise
        self.finished(writer)
        return writer

    def abort(self, writer: _FileWriter) -> None:
        if writer.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(writer.fd)
            writer.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.tmp, writer.name))

    def prepare(self, writers: list[_FileWriter]) -> None:
        if self.use_syncfs and len(writers) > 2 and writers[0].fd >= 0 and syncfs(writers[0].fd):
            # one syncfs covers the data of every file and the tmp/ entries
            for w in writers:
                os.close(w.fd)
                w.fd = -1
            return
        for w in writers:
            os.fdatasync(w.fd)
            os.close(w.fd)
            w.fd = -1
        fsync_dir(self.tmp)

    def commit(self, journal: Journal, uids: list[str], writers: list[_FileWriter]) -> None:
        journal.append([f"M {w.uid} {w.name} {w.final}" for w in writers])
        journal.delivered.update(uids)
        tmp, new = self.tmp + "/", self.new + "/"
        for w in writers:
            os.rename(tmp + w.name, new + w.final)

    def close(self) -> None:
        fsync_dir(self.new)
        fsync_dir(self.tmp)


class _MboxQuoter:
    """mboxrd: every line matching C{^>*From } gets one more C{>}, across chunks."""

    _FROM = re.compile(rb"^(>*From )", re.MULTILINE)

    def __init__(self, out: Callable[[bytes], None]) -> None:
        self.out = out
        self._partial = b""
        self.last = b"\n"

    def write(self, chunk: bytes) -> None:
        data = self._partial + chunk
        nl = data.rfind(b"\n")
        if nl < 0:
            self._partial = data
            return
        self._partial = data[nl + 1:]
        self._emit(data[:nl + 1])

    def _emit(self, data: bytes) -> None:
        if data:
            self.out(self._FROM.sub(rb">\1", data))
            self.last = data[-1:]

    def close(self) -> None:
        self._emit(self._partial)
        self._partial = b""
        if self.last != b"\n":
            self.out(b"\n")


class MboxTarget(Target):
    """Append to an mbox (mboxrd quoting); a batch is truncated away unless committed."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self.description = f"mbox:{self.path}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | _CLOEXEC, 0o600)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise DeliveryError(f"{self.path} is locked by another program")
        self._batch_started = False
        self._journal: Journal | None = None

    def recover(self, journal: Journal) -> None:
        self._journal = journal
        if journal.open_mbox_batch is not None:
            size = os.fstat(self.fd).st_size
            if size > journal.open_mbox_batch:
                os.ftruncate(self.fd, journal.open_mbox_batch)
                os.fsync(self.fd)

    def open(self, uid: str, size: int) -> Any:
        assert self._journal is not None
        if not self._batch_started:
            # the rollback point must be durable before the first byte is appended
            self._journal.append([f"B {os.fstat(self.fd).st_size}"])
            self._batch_started = True
        envelope = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
        _write_all(self.fd, f"From MAILER-DAEMON {envelope}\n".encode("ascii"))
        return _MboxQuoter(lambda b: _write_all(self.fd, b))

    def finished(self, writer: Any) -> int:
        writer.close()
        _write_all(self.fd, b"\n")
        return int(os.fstat(self.fd).st_size)

    def abort(self, writer: Any) -> None:
        raise DeliveryError("mbox: download failed in the middle of a batch")

    def prepare(self, writers: list[Any]) -> None:
        os.fsync(self.fd)

    def commit(self, journal: Journal, uids: list[str], writers: list[Any]) -> None:
        journal.append([f"D {u}" for u in uids] + ["C"])
        journal.delivered.update(uids)
        self._batch_started = False

    def close(self) -> None:
        os.close(self.fd)


class MDATarget(Target):
    """
    Pipe each message to a command (C{%u}: the POP3 user name, C{%%}: %).
    An MDA cannot be rolled back: a crash while it runs means it runs again
    for that message (at-least-once, with a warning), never that mail is lost.
    """

    def __init__(self, command: str, username: str, state_dir: str,
                 warn: Callable[[str], None]) -> None:
        self.command = re.sub(r"%([u%])", lambda m: shlex.quote(username) if m.group(1) == "u" else "%",
                              command)
        self.description = f"mda:{command}"
        self.spool = state_dir
        self.warn = warn
        self._journal: Journal | None = None

    def recover(self, journal: Journal) -> None:
        self._journal = journal
        for uid in sorted(journal.mda_unknown):
            self.warn(f"MDA run for {uid} was interrupted; it will run again (possible duplicate)")

    def open(self, uid: str, size: int) -> Any:
        import tempfile  # only the MDA target spools (and tempfile costs start-up time)

        f = tempfile.TemporaryFile(dir=self.spool)
        return f

    def finished(self, writer: BinaryIO) -> int:
        assert self._journal is not None
        size = writer.tell()
        writer.seek(0)
        return size

    def abort(self, writer: BinaryIO) -> None:
        writer.close()

    def deliver(self, uid: str, writer: BinaryIO) -> None:
        assert self._journal is not None
        self._journal.append([f"I {uid}"])
        import subprocess  # only an MDA delivery needs it

        try:
            rc = subprocess.call(self.command, shell=True, stdin=writer)  # noqa: S602
        finally:
            writer.close()
        if rc != 0:
            raise DeliveryError(f"MDA {self.command!r} exited with status {rc}")

    def prepare(self, writers: list[Any]) -> None:
        pass

    def commit(self, journal: Journal, uids: list[str], writers: list[Any]) -> None:
        journal.append([f"D {u}" for u in uids])
        journal.delivered.update(uids)


def make_target(spec: str, *, username: str, state_dir: str, crlf: bool = False,
                warn: Callable[[str], None] = print, tag: str = "", sync: str = "batch") -> Target:
    """
    C{maildir:PATH}, C{mbox:PATH} or C{mda:COMMAND} -> a L{Target}.  C{sync}
    (Maildir): C{"batch"} makes a batch durable with one syncfs(2) where
    Linux has it, C{"file"} with an fdatasync of each file.
    """
    if sync not in ("batch", "file"):
        raise ValueError(f"sync must be batch or file, not {sync!r}")
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ValueError(f"delivery target must be maildir:PATH, mbox:PATH or mda:COMMAND, not {spec!r}")
    if kind == "maildir":
        return MaildirTarget(arg, crlf=crlf, tag=tag, use_syncfs=sync == "batch")
    if kind == "mbox":
        return MboxTarget(arg)
    if kind == "mda":
        return MDATarget(arg, username, state_dir, warn)
    raise ValueError(f"unknown delivery target kind {kind!r}")


# --------------------------------------------------------------------------
# The fetch loop

class FetchOptions:
    """How a fetch runs (keyword arguments; every one has a default)."""

    __slots__ = ("batch_bytes", "batch_messages", "early_writeback", "keep", "limit", "max_size",
                 "threaded_sync", "window")

    def __init__(self, *, keep: bool = False, limit: int | None = None, max_size: int | None = None,
                 window: int = 32, batch_messages: int = 256, batch_bytes: int = 16 * 1024 * 1024,
                 threaded_sync: bool = False, early_writeback: bool = True) -> None:
        self.keep = keep
        self.limit = limit
        self.max_size = max_size
        #: outstanding RETRs when the server pipelines
        self.window = window
        #: messages / bytes per durability batch
        self.batch_messages = batch_messages
        self.batch_bytes = batch_bytes
        #: make a batch durable in a thread while the next one downloads (the
        #: commit still waits for it); the CLI turns it on for the blocking
        #: engine, where one syncfs per batch overlaps the download (~5% faster
        #: here); with an fdatasync per file it measured slower on ext4 (file
        #: creation then waits on the journal commit)
        self.threaded_sync = threaded_sync
        #: Maildir: start each file's writeback as soon as it is written (measured
        #: faster for the Twisted engine; slower for the blocking one on ext4, where
        #: creating the next file then waits behind that writeback)
        self.early_writeback = early_writeback


class FetchResult:
    """What a fetch did; L{summary} is the line the CLI prints."""

    def __init__(self) -> None:
        self.total_on_server = 0
        self.fetched = 0
        self.bytes = 0
        self.deleted = 0
        self.skipped_size = 0
        self.already = 0
        self.seconds = 0.0
        self.warnings: list[str] = []

    def summary(self) -> str:
        rate = self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        parts = [f"{self.fetched} message{'s' if self.fetched != 1 else ''} fetched "
                 f"({self.bytes} bytes, {self.seconds:.2f} s, {rate:.1f} MB/s)"]
        parts.append(f"{self.deleted} deleted on server")
        if self.already:
            parts.append(f"{self.already} already fetched")
        if self.skipped_size:
            parts.append(f"{self.skipped_size} skipped (too large)")
        parts.append(f"{self.total_on_server} on server")
        return ", ".join(parts)


class Progress:
    """Messages and bytes with ETA on a terminal; nothing otherwise."""

    def __init__(self, stream: Any = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total_msgs = 0
        self.total_bytes = 0
        self.msgs = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._last = 0.0

    def begin(self, msgs: int, nbytes: int) -> None:
        self.total_msgs, self.total_bytes = msgs, nbytes
        self.start = time.monotonic()

    def advance(self, nbytes: int, force: bool = False) -> None:
        self.msgs += 1
        self.bytes += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1 and self.msgs < self.total_msgs:
            return
        self._last = now
        elapsed = now - self.start
        frac = self.bytes / self.total_bytes if self.total_bytes else 1.0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        width = 30
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        self.stream.write(f"\r[{bar}] {self.msgs}/{self.total_msgs} msgs "
                          f"{self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB ETA {eta:4.0f}s ")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.total_msgs:
            self.stream.write("\n")
            self.stream.flush()




# --------------------------------------------------------------------------
# The engine-independent part of a fetch

class DeliverySession:
    """
    What both engines share: which messages to fetch and delete (L{plan}),
    and the batches: messages are L{store}d or L{finished} (not yet durable),
    then L{flush} makes the batch durable, records it in the journal and
    publishes it, and only then returns the message numbers an engine may
    send DELE for.  An engine does the network I/O and calls these in order.
    """

    def __init__(self, target: Target, journal: Journal, options: FetchOptions | None = None,
                 progress: Progress | None = None) -> None:
        self.target = target
        self.journal = journal
        self.options = options or FetchOptions()
        self.progress = progress or Progress(enabled=False)
        self.result = FetchResult()
        self.number: dict[str, int] = {}
        self.batch_uids: list[str] = []
        self.batch_writers: list[Any] = []
        self.batch_bytes = 0
        self._mda = isinstance(target, MDATarget)

    def plan(self, uidls: Sequence[tuple[int, str]],
             sizes: Mapping[int, int]) -> tuple[list[tuple[int, str, int]], list[int]]:
        """
        Recover from a crash, compact the journal, and decide: returns the
        C{(number, uidl, size)} to download and the numbers of messages
        already delivered that may be deleted now (empty with C{keep}).
        """
        journal, opts, result = self.journal, self.options, self.result
        self.target.recover(journal)
        result.total_on_server = len(uidls)
        on_server = {uid for _, uid in uidls}
        if journal.needs_compaction or journal.delivered - on_server:
            journal.compact(keep=on_server)
        todo: list[tuple[int, str, int]] = []
        delete: list[int] = []
        seen: set[str] = set()
        delivered = journal.delivered
        for number, uid in uidls:
            self.number[uid] = number
            if uid in delivered:
                result.already += 1
                if not opts.keep:
                    delete.append(number)
                continue
            if uid in seen:
                result.warnings.append(
                    f"duplicate UIDL {uid} on the server: message {number} skipped")
                continue
            seen.add(uid)
            size = sizes.get(number, 0)
            if opts.max_size is not None and size > opts.max_size:
                result.skipped_size += 1
                continue
            todo.append((number, uid, size))
        if opts.limit is not None:
            todo = todo[:opts.limit]
        self.progress.begin(len(todo), sum(s for _, _, s in todo))
        return todo, delete

    def _add(self, uid: str, writer: Any, stored: int) -> bool:
        self.batch_uids.append(uid)
        self.batch_writers.append(writer)
        self.batch_bytes += stored
        self.progress.advance(stored)
        opts = self.options
        return (self._mda or len(self.batch_uids) >= opts.batch_messages
                or self.batch_bytes >= opts.batch_bytes)

    def store(self, uid: str, chunks: list[bytes]) -> bool:
        """A complete message for a L{MaildirTarget}; True when the batch is full."""
        target = self.target
        assert isinstance(target, MaildirTarget)
        writer = target.store(uid, chunks, self.options.early_writeback)
        return self._add(uid, writer, writer.size)

    def finished(self, uid: str, writer: Any) -> bool:
        """A message written through C{target.open(...).write}; True when the batch is full."""
        target = self.target
        try:
            stored = target.finished(writer)
            if isinstance(target, MDATarget):
                target.deliver(uid, writer)
        except BaseException:
            with contextlib.suppress(Exception):
                target.abort(writer)
            raise
        return self._add(uid, writer, stored)

    def take_batch(self) -> tuple[list[str], list[Any], int]:
        batch = self.batch_uids, self.batch_writers, self.batch_bytes
        self.batch_uids, self.batch_writers, self.batch_bytes = [], [], 0
        return batch

    def commit(self, uids: list[str], writers: list[Any], nbytes: int) -> list[int]:
        """
        Record a prepared (durable) batch in the journal and publish it;
        returns the numbers to DELE.  When this fails the files are left
        alone: the journal may already name them, and recovery sorts it out.
        """
        self.target.commit(self.journal, uids, writers)
        result = self.result
        result.fetched += len(uids)
        result.bytes += nbytes
        if self.options.keep:
            return []
        number = self.number
        return [number[uid] for uid in uids]

    def flush(self) -> list[int]:
        """Make the current batch durable and commit it; returns the numbers to DELE."""
        uids, writers, nbytes = self.take_batch()
        if not uids:
            return []
        try:
            self.target.prepare(writers)
        except BaseException:
            self.batch_uids, self.batch_writers, self.batch_bytes = uids, writers, nbytes
            raise
        return self.commit(uids, writers, nbytes)

    def abort(self, writers: Sequence[Any] = ()) -> None:
        """Forget the uncommitted batch (and C{writers} in progress): nothing of it counts."""
        for w in list(writers) + self.batch_writers:
            with contextlib.suppress(Exception):
                self.target.abort(w)
        self.batch_uids, self.batch_writers, self.batch_bytes = [], [], 0
