"""
Delivery into a Maildir (L{IMailDelivery} of L{MaildirStore}): the qmail
rules, without the session lock, plus an idempotency record.

A message is written to C{tmp/} under a unique name, fsync'ed, then linked
into C{new/} (a rename where hard links are not supported) and C{new/}
fsync'ed; only then is the delivery reported.  A POP3 session that holds the
mailbox has its listing frozen already: the message shows at the next login
(L{popservice.stores.maildir.scan} picks up whatever is in C{new/} then).

File names are C{SECONDS.MMICROSECONDSPpidQcounterRrandom.host,S=n,W=n}: the
time stamp first (L{popservice.stores.maildir.order} numbers messages by it),
C{,S=} the size on disk and C{,W=} the size as transmitted with CRLF line ends,
so no login has to read the file to learn its size.  Line ends are stored as
LF (the Maildir convention) whenever that is exactly reversible (no CR before
a CRLF), otherwise the message is stored as received.

Idempotency (L{DeliveredKeys}): the caller's key is hashed (SHA-256) and
recorded in C{popservice-delivered}, one fixed-width line
C{TIMESTAMP HEX\\n} per delivery, appended under an exclusive C{flock} on
C{popservice-delivered.lock} (never the session lock).  A delivery whose key
is recorded stores nothing and reports C{False}.

Bounds: a key is kept for L{KEEP_DAYS} (7) days, longer than an MTA retries a
message (Postfix's C{maximal_queue_lifetime} and sendmail's queue timeout
default to 5 days), but only the newest L{KEEP_KEYS} (10,000) keys are kept,
so the file never exceeds about 1 MiB (76 bytes a line) and one substring
search answers a lookup.  The file is rewritten atomically when it holds a
quarter more lines than that or its first line is a day past the age bound.
A mailbox receiving more than 10,000 messages within an MTA's retry time
loses the duplicate protection for its oldest keys: a retry of one of those
would be stored twice, nothing is ever lost.

Crash windows, in order:

 - before the link into C{new/}: a file in C{tmp/} is left (the MTA got no
   success and retries; such leftovers are removed after 36 hours, the
   Maildir rule, by the next delivery that looks);
 - between the link and the key record: the message is stored but its key
   is not; the MTA got no success and retries: the message is stored twice
   (a duplicate at worst, never a loss: the key is written only after the
   message is durable);
 - after the key record: a retry finds the key and stores nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import secrets
import socket
import time
from collections.abc import Iterator

from twisted.logger import Logger

from popservice.fsutil import fsync_dir
from popservice.interfaces import MailboxUnavailable
from popservice.stores.maildir.layout import ensure_maildir
from popservice.wire import transmitted_size

__all__ = [
    "DELIVERED_FILE_NAME",
    "DELIVERED_LOCK_NAME",
    "KEEP_DAYS",
    "KEEP_KEYS",
    "DeliveredKeys",
    "deliver_into",
    "maildir_exists",
    "unique_name",
]

log = Logger(namespace="popservice.stores.maildir")

#: The idempotency record of a Maildir, and the lock serialising its updates.
DELIVERED_FILE_NAME = "popservice-delivered"
DELIVERED_LOCK_NAME = "popservice-delivered.lock"

#: Keys younger than this many days are kept ...
KEEP_DAYS = 7
#: ... but never more than this many (the newest).
KEEP_KEYS = 10_000

#: C{tmp/} files older than this are leftovers of a crashed delivery (the Maildir rule).
TMP_MAX_AGE = 36 * 3600

_LINE_LENGTH = 76  # b"%010d %64s\n"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: errnos of a filesystem without hard links: fall back to rename(2)
_NO_LINK = {errno.EPERM, errno.EXDEV, errno.EMLINK, getattr(errno, "ENOTSUP", -1),
            getattr(errno, "EOPNOTSUPP", -1), getattr(errno, "ENOSYS", -1)}

_counter = itertools.count(1)


def _host() -> str:
    # the Maildir spec: "/" and ":" encoded as octal escapes; "," too (it starts ,S= and ,W=)
    name = socket.gethostname() or "localhost"
    return name.replace("\\", "\\134").replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


_HOST = _host()


def unique_name(size: int, wire_size: int, now: float | None = None) -> str:
    """
    A Maildir file name no other delivery uses: time, microseconds, process,
    a per-process counter and 32 random bits, the host, C{,S=} and C{,W=}.
    """
    if now is None:
        now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return "%d.M%06dP%dQ%dR%s.%s,S=%d,W=%d" % (seconds, micros, os.getpid(), next(_counter),
                                               secrets.token_hex(4), _HOST, size, wire_size)


def stored_form(message: bytes) -> bytes:
    """
    The bytes written to the file: LF line ends, unless a CR stands before a
    CRLF (then converting would not be reversible and the message is kept as
    it is).  Either way the message reads back identically with CRLF line ends.
    """
    if b"\r\r\n" in message:
        return message
    return message.replace(b"\r\n", b"\n")


def maildir_exists(path: str, home: str | None) -> bool:
    """
    Does this Maildir exist, or may it be made at delivery?  It may when
    C{home} is given (a C{~} template) and that home directory exists, as
    Postfix's C{home_mailbox} and Dovecot's LDA do.  A directory that cannot
    be looked at is a temporary failure, not an unknown user.
    """
    for candidate in (path, home):
        if candidate is None:
            continue
        try:
            os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            log.warn("cannot look at {path}: {error}", path=candidate, error=e)
            raise MailboxUnavailable("mailbox temporarily unavailable") from e
        return True
    return False


class DeliveredKeys:
    """The idempotency record of one Maildir (see the module docstring)."""

    def __init__(self, maildir: str, keep_days: float = KEEP_DAYS, keep_keys: int = KEEP_KEYS) -> None:
        self.path = os.path.join(maildir, DELIVERED_FILE_NAME)
        self.lock_path = os.path.join(maildir, DELIVERED_LOCK_NAME)
        self.maildir = maildir
        self.keep_days = keep_days
        self.keep_keys = keep_keys

    @staticmethod
    def digest(key: str) -> bytes:
        """The recorded form of a key: its SHA-256, in hex."""
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest().encode("ascii")

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb", opener=lambda p, f: os.open(p, f | _NOFOLLOW | _CLOEXEC)) as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def contains(self, digest: bytes) -> bool:
        """Is this digest recorded?  (No lock needed: lines are appended whole.)"""
        return b" " + digest + b"\n" in self._read()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the record's lock (a blocking C{flock}, held for a rename and an append)."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def record(self, digest: bytes, now: float) -> None:
        """Append C{digest} (durably); compact the file when it is due.  Hold L{locked}."""
        data = self._read()
        line = b"%010d %s\n" % (int(now), digest)
        if data and not data.endswith(b"\n"):
            line = b"\n" + line  # after a torn append: keep lines whole
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._compaction_due(data + line, now):
            self.compact(now)

    def _compaction_due(self, data: bytes, now: float) -> bool:
        if len(data) > self.keep_keys * _LINE_LENGTH * 5 // 4:
            return True
        head = data[:10]
        return head.isdigit() and int(head) < now - (self.keep_days + 1) * 86400

    def compact(self, now: float) -> None:
        """Keep the newest L{KEEP_KEYS} keys younger than L{KEEP_DAYS}: atomic rewrite.  Hold L{locked}."""
        limit = now - self.keep_days * 86400
        kept = []
        for raw in self._read().split(b"\n"):
            stamp, _, digest = raw.partition(b" ")
            if len(raw) == _LINE_LENGTH - 1 and stamp.isdigit() and int(stamp) >= limit:
                kept.append(raw + b"\n")
        kept = kept[-self.keep_keys:]
        tmp = "%s.tmp.%d.%d" % (self.path, os.getpid(), next(_counter))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(kept))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.maildir)


def _write_file(path: str, data: bytes) -> None:
    """Write and fsync a new file; a failure (ENOSPC, EFBIG, EIO) leaves nothing behind."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)


def _move_into_new(tmp: str, new: str) -> None:
    """tmp/ -> new/ without ever replacing a file (link + unlink; rename where links fail)."""
    try:
        os.link(tmp, new)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
        if os.path.lexists(new):
            raise FileExistsError(errno.EEXIST, "exists", new) from e
        os.rename(tmp, new)
        return
    os.unlink(tmp)


def _remove_stale_tmp(maildir: str, now: float) -> None:
    """Remove C{tmp/} files older than 36 hours (leftovers of crashed deliveries)."""
    tmp = os.path.join(maildir, "tmp")
    try:
        with os.scandir(tmp) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False) and \
                            entry.stat(follow_symlinks=False).st_mtime < now - TMP_MAX_AGE:
                        os.unlink(entry.path)
                except OSError:
                    continue
    except OSError:
        return


def deliver_into(path: str, message: bytes, key: str | None, now: float | None = None) -> bool:
    """
    Store C{message} in the Maildir at C{path} (created when missing), unless
    C{key} is recorded there already (then C{False}).  Runs in a thread.
    Raises L{MailboxUnavailable} (temporary; the C{OSError} as its cause).
    """
    try:
        return _deliver(path, message, key, time.time() if now is None else now)
    except MailboxUnavailable:
        raise
    except OSError as e:
        log.warn("delivery into {path} failed: {error}", path=path, error=e)
        raise MailboxUnavailable("cannot write to the mailbox now") from e


def _deliver(path: str, message: bytes, key: str | None, now: float) -> bool:
    if not all(os.path.isdir(os.path.join(path, sub)) for sub in ("cur", "new", "tmp")):
        ensure_maildir(path)
    keys = DeliveredKeys(path)
    digest = DeliveredKeys.digest(key) if key is not None else None
    if digest is not None and keys.contains(digest):
        return False  # the common retry: nothing written at all
    data = stored_form(message)
    wire_size = transmitted_size([data])
    for _attempt in range(3):
        name = unique_name(len(data), wire_size, now)
        tmp = os.path.join(path, "tmp", name)
        try:
            _write_file(tmp, data)
        except FileExistsError:
            continue
        try:
            with keys.locked():
                if digest is not None and keys.contains(digest):
                    os.unlink(tmp)  # a concurrent delivery of the same message won
                    return False
                try:
                    _move_into_new(tmp, os.path.join(path, "new", name))
                except FileExistsError:
                    os.unlink(tmp)
                    continue
                fsync_dir(os.path.join(path, "new"))
                # The message is durable: only now may its key say so.
                if digest is not None:
                    try:
                        keys.record(digest, now)
                    except OSError as e:
                        log.warn("message stored in {path}, but its idempotency key could not be "
                                 "recorded ({error}): a retry would store it again", path=path, error=e)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if secrets.randbelow(64) == 0:  # now and then, whichever process delivers
            _remove_stale_tmp(path, now)
        return True
    raise MailboxUnavailable("no unique file name in tmp/")
