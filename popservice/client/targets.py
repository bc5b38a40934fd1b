"""
The delivery targets: where fetched messages go, each with its part of the
crash-safe protocol (see L{popservice.client.delivery}).  L{MaildirTarget}
writes tmp/ files and renames them into new/ after the journal names them;
L{MboxTarget} appends mboxrd-quoted messages and truncates an uncommitted
batch away; L{MDATarget} pipes each message to a command.  L{make_target}
turns a C{maildir:PATH}, C{mbox:PATH} or C{mda:COMMAND} spec into one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import socket
import time
from collections.abc import Callable

from popservice.client.durability import CLOEXEC, fsync_dir, start_writeback, syncfs, write_all
from popservice.client.journal import Journal

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from typing import Any, BinaryIO

__all__ = [
    "DeliveryError", "MaildirTarget", "MboxTarget", "MDATarget", "MessageRefused", "Target", "make_target",
]


class DeliveryError(Exception):
    """
    A message could not be delivered (nothing was deleted); the run stops.
    C{temporary}: worth trying again later (the receiving server was
    unreachable, or said 421), else it needs someone's attention.
    """

    temporary = False


class MessageRefused(Exception):
    """
    A receiving server (L{popservice.client.forward}) refused one message:
    that message is not recorded (unless the options say to drop a permanent
    refusal) and stays on the POP3 server, and the run goes on with the next.
    C{temporary}: some recipient got a 4xx answer (the next run tries again).
    """

    def __init__(self, text: str, temporary: bool) -> None:
        super().__init__(text)
        self.temporary = temporary


class Target:
    """Where messages go.  Subclasses implement the crash-safe protocol."""

    #: store CRLF line ends (False: LF, the Unix convention)
    crlf = False
    #: may L{prepare} run in a thread while the next messages are written?
    threadable = False
    #: each message is handed on by L{deliver} as soon as it is complete, and
    #: committed on its own (a batch of one): an MDA or a forwarding target,
    #: which cannot take a message back once it has it
    immediate = False
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

    def deliver(self, uid: str, writer: Any) -> None:
        """
        (L{immediate} targets) Hand a finished message on; raises
        L{MessageRefused} when the receiver refused this message, or
        L{DeliveryError} when delivery cannot go on (the run stops).  Blocking.
        """
        raise NotImplementedError

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
        write_all(self.fd, chunk)
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
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | CLOEXEC, 0o600)
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
                write_all(writer.fd, b"".join(chunks)[written:])
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

    def __init__(self, out: Callable[[bytes], None], start: int = 0) -> None:
        self.out = out
        self._partial = b""
        self.last = b"\n"
        #: the mbox's size before this message's envelope line
        self.start = start

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
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | CLOEXEC, 0o600)
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
        start = os.fstat(self.fd).st_size
        if not self._batch_started:
            # the rollback point must be durable before the first byte is appended
            self._journal.append([f"B {start}"])
            self._batch_started = True
        envelope = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
        write_all(self.fd, f"From MAILER-DAEMON {envelope}\n".encode("ascii"))
        return _MboxQuoter(lambda b: write_all(self.fd, b), start)

    def finished(self, writer: Any) -> int:
        """This message's bytes in the mbox (envelope, quoting and separator included)."""
        writer.close()
        write_all(self.fd, b"\n")
        return int(os.fstat(self.fd).st_size) - int(writer.start)

    def abort(self, writer: Any) -> None:
        raise DeliveryError("mbox: download failed in the middle of a batch")

    def prepare(self, writers: list[Any]) -> None:
        os.fsync(self.fd)

    def commit(self, journal: Journal, uids: list[str], writers: list[Any]) -> None:
        journal.append([f"D {u}" for u in uids] + ["C"])
        journal.delivered.update(uids)
        self._batch_started = False

    def close(self) -> None:
        fd, self.fd = self.fd, -1  # never closed twice: the number may belong to another file by then
        if fd >= 0:
            os.close(fd)


class MDATarget(Target):
    """
    Pipe each message to a command (C{%u}: the POP3 user name, C{%%}: %).
    An MDA cannot be rolled back: a crash while it runs means it runs again
    for that message (at-least-once, with a warning), never that mail is lost.
    """

    immediate = True

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
