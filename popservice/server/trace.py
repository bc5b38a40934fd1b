"""
Per-user session traces: C{--trace-user NAME --trace-dir DIR}.

Every session of that user is written, both directions, to a file of its own
in DIR (mode 0600): one line per record, the time (UTC), then C{C:} for what
the client sent, C{S:} for what the server answered, C{--} for a session
event (connect, login, logout...).

Secrets are never written: the PASS argument, the APOP digest, the initial
response of AUTH, every line of an AUTH exchange in both directions (SASL
payloads: passwords, SCRAM proofs, OAuth bearer tokens) become
C{[redacted]}; a client line that is no POP3 command (a SASL response sent
out of turn, say) is written only as its length.  RETR and TOP bodies are
written as C{[RETR body: N octets]}, their content only with
C{--trace-bodies}.

Whose session it is is known only at USER or APOP, or at login (AUTH): until
then the records are kept in memory, at most L{PRELOGIN_LIMIT} octets of
them, and written once the session turns out to be the traced user's (a USER
or APOP name, a failed or a successful login with that name), or dropped when
it logs in as somebody else or ends first.  The shell holds a
L{SessionTrace} only while it may still be written, so the sessions of other
users cost one attribute check per line, and none at all without
C{--trace-user}.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import time
from typing import Protocol, Union

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from popservice import wire
from popservice.states import COMMANDS

__all__ = ["PRELOGIN_LIMIT", "SessionTrace", "Tracer", "redact"]

#: octets of records kept in memory until the session's user is known
PRELOGIN_LIMIT = 64 * 1024

_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class _Body(Protocol):
    """What the trace reads of a L{popservice.server.transfer.MessageTransfer}."""

    finished: bool

    @property
    def top(self) -> object: ...


def redact(line: bytes) -> tuple[bytes, str | None]:
    """
    A client command line as it may be written, and the user name it gives
    (USER, APOP) or None.  Secrets become C{[redacted]}; a line that is no
    POP3 command is written only as its length.
    """
    words = line.split(None, 1)
    if not words:
        return line, None
    keyword = words[0].upper()
    if keyword.decode("latin-1") not in COMMANDS:
        return b"[%d octets, not a command: not written]" % (len(line),), None
    rest = words[1] if len(words) > 1 else b""
    if keyword == b"USER":
        return line, rest.strip().decode("utf-8", "replace")
    if keyword == b"PASS":
        return (words[0] + b" [redacted]" if rest else line), None
    if keyword in (b"APOP", b"AUTH"):
        # APOP name digest / AUTH mechanism initial-response: the second word is the secret
        parts = rest.split(None, 1)
        text = words[0] + b" " + parts[0] + b" [redacted]" if len(parts) > 1 else line
        name = parts[0].decode("utf-8", "replace") if keyword == b"APOP" and parts else None
        return text, name
    return line, None


class Tracer:
    """Whose sessions are traced, where, and whether bodies are written: one per server."""

    def __init__(self, user: str, directory: str, *, bodies: bool = False,
                 limit: int = PRELOGIN_LIMIT) -> None:
        self.user = user
        self.directory = directory
        self.bodies = bodies
        self.limit = limit
        self._key = user.casefold()
        self._serial = itertools.count(1)

    def matches(self, name: object) -> bool:
        """Is C{name} the traced user (compared without case)?"""
        return isinstance(name, str) and name.casefold() == self._key

    def begin(self, clock: IReactorTime, peer: str | None) -> "SessionTrace":
        """The trace of a new connection, kept in memory until its user is known."""
        return SessionTrace(self, clock, peer)

    def open_file(self, now: float) -> io.BufferedWriter:
        """A new trace file, mode 0600, never through a symbolic link and never an existing file."""
        name = "%s-%s-%d-%d.trace" % (_UNSAFE.sub("_", self.user)[:64] or "user",
                                      time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)), os.getpid(),
                                      next(self._serial))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
        fd = os.open(os.path.join(self.directory, name), flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            return os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise


class SessionTrace:
    """The trace of one connection (see the module docstring)."""

    log = Logger()

    def __init__(self, tracer: Tracer, clock: IReactorTime, peer: str | None) -> None:
        self._tracer = tracer
        self._clock = clock
        self._peer = peer
        self._file: io.BufferedWriter | None = None
        self._disabled = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._dropped = 0
        #: the transfer whose body is being sent, its kind and octets so far
        self._body: _Body | None = None
        self._body_kind = b""
        self._body_octets = 0
        #: with --trace-bodies: the unfinished last line of a body chunk
        self._partial = b""

    # -- what the shell calls

    def client(self, line: Union[bytes, wire.LineTooLong], in_sasl: bool) -> None:
        """A line from the client, about to be handled (C{in_sasl}: a response inside AUTH)."""
        self._end_body()
        name = None
        if isinstance(line, wire.LineTooLong):
            text = b"[line too long: not written]"
        elif in_sasl:
            text = b"[SASL response, %d octets: redacted]" % (len(line),)
        else:
            text, name = redact(line)
        self._record(b"C:", text)
        if self._file is None and self._tracer.matches(name):
            self._start()

    def server(self, data: bytes, transfer: _Body | None) -> None:
        """Bytes to the client; those of a RETR/TOP body while C{transfer} is sending it."""
        if transfer is not None and not transfer.finished:
            if transfer is not self._body:
                self._end_body()
                self._body = transfer
                self._body_kind = b"RETR" if transfer.top is None else b"TOP"
            self._body_octets += len(data)
            if self._tracer.bodies:
                lines = (self._partial + data).split(b"\r\n")
                self._partial = lines.pop()
                for line in lines:
                    self._record(b"S:", line)
            return
        self._end_body()
        if data[:2] == b"+ ":
            # Only a SASL challenge starts so (+OK, -ERR otherwise).
            self._record(b"S:", b"+ [SASL challenge, %d octets: redacted]" % (len(data.rstrip(b"\r\n")) - 2,))
            return
        lines = data.split(b"\r\n")
        if lines[-1] == b"":
            lines.pop()
        for line in lines:
            self._record(b"S:", line)

    def event(self, name: str, user: str | None, fields: dict[str, object]) -> "SessionTrace | None":
        """A session event; the trace the shell keeps from now on (None: this one has ended)."""
        if name == "command":
            return self
        self._end_body()
        self._record(b"--", " ".join([name] + ["%s=%s" % item for item in sorted(fields.items())])
                     .encode("utf-8", "replace"))
        if name == "logout":
            self._close()
            return None
        if name == "login":
            if self._tracer.matches(user):
                if self._file is None:
                    self._start()
            elif self._file is None:
                self._drop()
                return None
            else:
                self._record(b"--", b"logged in as another user: the trace ends")
                self._close()
                return None
        elif name == "login_failed" and self._file is None and self._tracer.matches(fields.get("attempted")):
            self._start()
        return None if self._disabled else self

    # -- records

    def _record(self, tag: bytes, text: bytes) -> None:
        if self._disabled:
            return
        now = self._clock.seconds()
        stamp = time.strftime("%H:%M:%S", time.gmtime(now)) + ".%03d" % (int(now * 1000) % 1000,)
        if b"\n" in text or b"\r" in text:
            text = text.replace(b"\r", b"\\r").replace(b"\n", b"\\n")
        record = b"%s %s %s\n" % (stamp.encode("ascii"), tag, text)
        if self._file is not None:
            try:
                self._file.write(record)
                self._file.flush()
            except OSError as e:
                self.log.warn("session trace stopped, cannot write: {error}", error=e)
                self._close()
            return
        if self._pending_size + len(record) > self._tracer.limit:
            self._dropped += len(record)
            return
        self._pending.append(record)
        self._pending_size += len(record)

    def _end_body(self) -> None:
        if self._body is None:
            return
        if self._partial:
            self._record(b"S:", self._partial)
            self._partial = b""
        self._record(b"S:", b"[%s body: %d octets]" % (self._body_kind, self._body_octets))
        self._body = None
        self._body_octets = 0

    def _start(self) -> None:
        """The session is the traced user's: write what was kept, and everything from now on."""
        now = self._clock.seconds()
        try:
            out = self._tracer.open_file(now)
        except OSError as e:
            self.log.warn("cannot write a session trace of {user} in {directory}: {error}",
                          user=self._tracer.user, directory=self._tracer.directory, error=e)
            self._drop()
            return
        head = b"# popservice session trace of %s, peer %s, %s\n" % (
            self._tracer.user.encode("utf-8", "replace"), (self._peer or "-").encode("ascii", "replace"),
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)).encode("ascii"))
        kept = b"".join(self._pending)
        if self._dropped:
            kept += b"# %d octets of records before login not kept (limit %d)\n" % (
                self._dropped, self._tracer.limit)
        self._pending, self._pending_size, self._dropped = [], 0, 0
        self._file = out
        try:
            out.write(head + kept)
            out.flush()
        except OSError as e:
            self.log.warn("session trace stopped, cannot write: {error}", error=e)
            self._close()

    def _drop(self) -> None:
        self._disabled = True
        self._pending, self._pending_size = [], 0

    def _close(self) -> None:
        self._disabled = True
        self._pending, self._pending_size = [], 0
        out, self._file = self._file, None
        if out is not None:
            try:
                out.close()
            except OSError as e:
                self.log.warn("closing a session trace: {error}", error=e)
