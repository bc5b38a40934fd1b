"""
The one place every session event passes.  The default observer writes
structured C{twisted.logger} events; metrics exporters add observers beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from popservice.interfaces import ISessionObserver

#: events worth a log line; per-command events go to metrics observers only
_INFO = {"login", "login_failed", "logout", "takeover", "update_failed", "error"}


@implementer(ISessionObserver)
class LogObserver:
    """Log each session event with its fields (user, peer, counts...)."""

    log = Logger(namespace="popservice.session")

    def event(self, name: str, session: object, **fields: object) -> None:
        if name not in _INFO:
            return
        fmt = "pop3 {event}: " + " ".join("%s={%s}" % (k, k) for k in sorted(fields))
        self.log.info(fmt, event=name, **fields)


@implementer(ISessionObserver)
class Observers:
    """Fan an event out to several observers; one failing never stops the others."""

    log = Logger()

    def __init__(self, observers: Iterable[ISessionObserver]) -> None:
        self.observers = list(observers)

    def event(self, name: str, session: object, **fields: object) -> None:
        for observer in self.observers:
            try:
                observer.event(name, session, **fields)
            except Exception:
                self.log.failure("session observer {observer!r} failed", observer=observer)


def session_summary(session: Any) -> dict[str, int]:
    """
    The counts of the logout event (messages, size, RETR/TOP counts and bytes,
    deletions) of a L{popservice.server.session.MailboxSession}, or zeros
    before login.
    """
    if session is None:
        return dict.fromkeys(("messages", "size", "retr", "retr_bytes", "top", "top_bytes", "deleted",
                              "deleted_bytes"), 0)
    stats = session.stats
    return {"messages": len(session.listing), "size": sum(m.size for m in session.listing),
            "retr": stats.retr, "retr_bytes": stats.retr_bytes,
            "top": stats.top, "top_bytes": stats.top_bytes,
            "deleted": stats.deleted, "deleted_bytes": stats.deleted_bytes}
