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
    logged; formatting happens later, in twisted.logger's observers, and
    only there (L{SessionText}).
    """

    #: the events wanted (L{Observers} sends only these)
    events = _INFO

    def __init__(self) -> None:
        # Not a class attribute: as a descriptor, a Logger takes the class's name as its namespace.
        self.log = Logger(namespace=SESSION_NAMESPACE, source=self)

    def event(self, name: str, session: object, **fields: object) -> None:
        self.event_fields(name, session, fields)

    def event_fields(self, name: str, session: object, fields: dict[str, object]) -> None:
        """L{event} without copying the fields (L{Observers} calls this)."""
        if name not in _INFO:
            return
        self.log.info("{log_text}", log_text=SessionText(name, fields), event=name, **fields)


class SessionText:
    """
    The text of a session log line, C{pop3 NAME: key=value ...} (keys sorted;
    the session id says C{session=}, the log event keeps the field's name, JSON
    logs rename it too).  Made only when an observer formats the event
    (twistd's text log); one C{str} join, not a field-by-field format string.
    """

    __slots__ = ("name", "fields")

    def __init__(self, name: str, fields: dict[str, object]) -> None:
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        fields = self.fields
        return "pop3 %s: %s" % (self.name, " ".join(
            "%s=%s" % ("session" if k == "session_id" else k, fields[k]) for k in sorted(fields)))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


@implementer(ISessionObserver)
class Observers:
    """
    Fan an event out to several observers; one failing never stops the others.

    Two ways to keep this cheap on the per-command path:

      - an observer may say which events it wants with an C{events} attribute
        (a set of names; without one it gets every event): it is not called
        for the others (the log observer wants no C{command} events);
      - an observer may have C{event_fields(name, session, fields)}, called
        instead of C{event} with the fields as one dict, shared by every such
        observer, which must not change it: a call with C{**fields} copies
        them, per observer and event.
    """

    log = Logger()

    def __init__(self, observers: Iterable[ISessionObserver]) -> None:
        self.observers = list(observers)
        #: event name -> (observer, its method, whether that takes the dict) for the observers wanting it
        self._routes: dict[str, tuple[tuple[object, Any, bool], ...]] = {}

    @property
    def events(self) -> frozenset[str] | None:
        """
        The events any of the observers wants (None: every event), so a
        connection need not send the others (nor compute their fields).
        """
        wanted: set[str] = set()
        for observer in self.observers:
            names = getattr(observer, "events", None)
            if names is None:
                return None
            wanted.update(names)
        return frozenset(wanted)

    def _route(self, name: str) -> tuple[tuple[object, Any, bool], ...]:
        route = []
        for observer in self.observers:
            if name in getattr(observer, "events", (name,)):
                direct = getattr(observer, "event_fields", None)
                route.append((observer, direct or observer.event, direct is not None))
        if len(self._routes) < 256:  # names come from the code; bounded all the same
            self._routes[name] = tuple(route)
        return tuple(route)

    def event(self, name: str, session: object, **fields: object) -> None:
        route = self._routes.get(name)
        if route is None:
            route = self._route(name)
        for observer, method, direct in route:
            try:
                if direct:
                    method(name, session, fields)
                else:
                    method(name, session, **fields)
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
    listing = session.listing
    # a Maildir listing sums its sizes without making a MessageInfo per message
    sizes = getattr(listing, "sizes", None)
    size = sum(sizes()) if callable(sizes) else sum(m.size for m in listing)
    return {"messages": len(listing), "size": size,
            "retr": stats.retr, "retr_bytes": stats.retr_bytes,
            "top": stats.top, "top_bytes": stats.top_bytes,
            "deleted": stats.deleted, "deleted_bytes": stats.deleted_bytes}
