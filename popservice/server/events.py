"""
The one place every session event passes.  The default observer writes
structured C{twisted.logger} events; metrics exporters add observers beside it.

Every event of a connection carries, besides its own fields, C{user},
C{peer} and C{session_id} (L{new_session_id}, made at connect), so the lines
of one session can be found together in the logs.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from popservice.interfaces import ISessionObserver

#: events worth a log line; per-command events go to metrics observers only
_INFO = frozenset({"connect", "refused", "login", "login_failed", "login_delay", "logout", "takeover",
                   "expired", "update_failed", "error"})

#: the namespace of session log events (L{LogObserver}); JSON logs tell them apart by it
SESSION_NAMESPACE = "popservice.session"

_prefix = secrets.token_hex(3)
_counter = itertools.count(1)


def _new_process() -> None:
    """A forked worker starts its own series of session ids."""
    global _prefix, _counter
    _prefix = secrets.token_hex(3)
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_new_process)


def new_session_id() -> str:
    """
    A short id for one session, unique in this process and very likely across
    processes: 6 random hex digits chosen per process, then a hex counter
    (12 characters for the first 16.7 million sessions).
    """
    return "%s%06x" % (_prefix, next(_counter))


@implementer(ISessionObserver)
class LogObserver:
    """
    Log each session event with its fields (user, peer, counts...).  The
    session id is logged as C{session}.  Only the events in L{_INFO} are
    logged; formatting happens later, in twisted.logger's observers.
    """

    #: the events wanted (L{Observers} sends only these)
    events = _INFO

    def __init__(self) -> None:
        # Not a class attribute: as a descriptor, a Logger takes the class's name as its namespace.
        self.log = Logger(namespace=SESSION_NAMESPACE, source=self)

    def event(self, name: str, session: object, **fields: object) -> None:
        if name not in _INFO:
            return
        if "session_id" in fields:
            fields["session"] = fields.pop("session_id")
        fmt = "pop3 {event}: " + " ".join("%s={%s}" % (k, k) for k in sorted(fields))
        self.log.info(fmt, event=name, **fields)


@implementer(ISessionObserver)
class Observers:
    """
    Fan an event out to several observers; one failing never stops the others.

    An observer may say which events it wants with an C{events} attribute (a
    set of names; without one it gets every event): then it is not called for
    the others.  Every call with C{**fields} copies the fields, so skipping the
    log observer for the per-command events keeps them as cheap with a
    metrics observer beside the log as they were with the log alone.
    """

    log = Logger()

    def __init__(self, observers: Iterable[ISessionObserver]) -> None:
        self.observers = list(observers)
        #: event name -> the observers that want it (filled as names come)
        self._routes: dict[str, tuple[ISessionObserver, ...]] = {}

    def _route(self, name: str) -> tuple[ISessionObserver, ...]:
        route = tuple(o for o in self.observers if name in getattr(o, "events", (name,)))
        if len(self._routes) < 256:  # names come from the code; bounded all the same
            self._routes[name] = route
        return route

    def event(self, name: str, session: object, **fields: object) -> None:
        route = self._routes.get(name)
        if route is None:
            route = self._route(name)
        for observer in route:
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
