"""
The fetch journal: the per-account record of delivered UIDLs, with the lock
that keeps two fetches of one account apart.  L{Journal} reads the records
back at start-up (a torn last line is cut off), appends and fsyncs new ones,
and compacts them atomically.  The record format and the recovery rules are
in L{popservice.client.delivery}'s docstring; the targets
(L{popservice.client.targets}) write the records.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Sequence

from popservice.client.durability import CLOEXEC, fsync_dir, write_all

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from popservice.client.url import POP3URL

__all__ = ["Journal", "StateLocked", "default_state_dir"]


def default_state_dir(url: POP3URL, username: str) -> str:
    """
    An account's journal directory when none is given:
    C{$XDG_STATE_HOME/popservice/fetch/USER@HOST:PORT} (the journal belongs
    to the mailbox, whichever command or config file fetches from it).
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    name = re.sub(r"[^A-Za-z0-9@._:+-]", "_", f"{username}@{url.host}:{url.port}")
    return os.path.join(base, "popservice", "fetch", name)


class StateLocked(Exception):
    """Another fetch for the same account is running."""


class Journal:
    """The per-account record of delivered UIDLs (its records: L{popservice.client.delivery})."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "journal")
        self._lock_fd = os.open(os.path.join(state_dir, "lock"),
                                os.O_RDWR | os.O_CREAT | CLOEXEC, 0o600)
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
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | CLOEXEC, 0o600)

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
            elif op == "X" and len(parts) == 2:
                self.mda_unknown.discard(parts[1])

    @property
    def needs_compaction(self) -> bool:
        return bool(self.maildir or self.mda_unknown or self.open_mbox_batch is not None
                    or self._records > len(self.delivered))

    def append(self, records: Sequence[str], sync: bool = True) -> None:
        """Append whole records (one write) and fsync."""
        if not records:
            return
        write_all(self._fd, "".join(r + "\n" for r in records).encode("ascii"))
        self._records += len(records)
        if sync:
            os.fsync(self._fd)

    def sync(self) -> None:
        os.fsync(self._fd)

    def compact(self, keep: set[str] | None = None) -> None:
        """Rewrite as D lines (only those in C{keep} when given), atomically."""
        uids = self.delivered if keep is None else self.delivered & keep
        tmp = self.path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | CLOEXEC, 0o600)
        try:
            write_all(fd, "".join(f"D {u}\n" for u in sorted(uids)).encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        fsync_dir(self.dir)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | CLOEXEC, 0o600)
        self.delivered = set(uids)
        self.maildir.clear()
        self.mda_unknown.clear()
        self.open_mbox_batch = None
        self._records = len(uids)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._lock_fd)
