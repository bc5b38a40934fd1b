"""
When each message was first retrieved, for RFC 2449 EXPIRE: a message may be
removed a set number of days after its first retrieval.

A small text file beside the mailbox's other state, one C{UIDL TIMESTAMP}
line per message; appended with one write per session and rewritten
atomically when expired messages are forgotten.  Losing a line (a crash
between RETR and the append) only keeps that message longer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

FILE_NAME = "popservice-retrieved"
_LINE = re.compile(r"([\x21-\x7e]{1,70}) ([0-9]+(?:\.[0-9]*)?)\Z")


class RetrievalLog:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, FILE_NAME)

    def load(self) -> dict[str, float]:
        """UIDL -> time of first retrieval; malformed lines are skipped."""
        try:
            with open(self.path, encoding="ascii", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        seen: dict[str, float] = {}
        for line in text.splitlines():
            m = _LINE.match(line)
            if m is not None:
                seen.setdefault(m.group(1), float(m.group(2)))
        return seen

    def record(self, uids: Iterable[str], when: float) -> None:
        """Note C{uids} as retrieved at C{when}, unless they were retrieved before."""
        known = self.load()
        new = [u for u in dict.fromkeys(uids) if u not in known and _LINE.match("%s 0" % (u,))]
        if not new:
            return
        data = "".join("%s %d\n" % (u, int(when)) for u in new).encode("ascii")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def expired(self, days: int, now: float) -> set[str]:
        """The UIDLs first retrieved at least C{days} days before C{now}."""
        limit = now - days * 86400
        return {uid for uid, when in self.load().items() if when <= limit}

    def forget(self, uids: Iterable[str]) -> None:
        """Drop C{uids} (their messages are gone); atomic rewrite."""
        gone = set(uids)
        seen = self.load()
        if not gone & seen.keys():
            return
        keep = "".join("%s %d\n" % (u, int(t)) for u, t in seen.items() if u not in gone)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, keep.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
