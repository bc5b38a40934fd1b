"""
C{twistd pop3 --log-format json}: one JSON object per line on twistd's log
output (the C{--logfile}, or stdout with C{-n}), instead of twistd's text.

Session events (L{popservice.server.events.LogObserver}) become flat objects
with stable names: C{time} (RFC 3339, UTC), C{level}, C{event} (C{connect},
C{login}, C{logout}...), C{session}, C{user}, C{peer}, C{tls}, C{method} and
every other field of the event.  Other log events keep C{time} and C{level},
with C{event} their namespace, C{message} their formatted text, C{failure}
a traceback where there is one, and their plain (str, number, bool) fields.

Nothing is formatted for events that are not logged: the session observer
logs only some events (never C{command}), and this formatter runs in the
file observer, once per line written.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogBeginner,
    LogEvent,
    formatEvent,
    globalLogBeginner,
)

from popservice.server.events import SESSION_NAMESPACE

#: the leading fields of a session event, in this order (when present)
SESSION_FIELDS = ("session", "user", "peer", "tls", "method")

#: keys of legacy (twisted.python.log.msg) events that are not fields
_LEGACY = frozenset({"format", "message", "time", "isError", "printed", "system", "why", "failure"})

_PLAIN = (str, int, float, bool, type(None))


def _time(event: LogEvent) -> str | None:
    when = event.get("log_time")
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _level(event: LogEvent) -> str:
    level = event.get("log_level")
    return str(getattr(level, "name", "info"))


def event_as_json(event: LogEvent) -> str:
    """One log event as one line of JSON (ASCII: any other character is escaped), newline included."""
    out: dict[str, Any] = {"time": _time(event), "level": _level(event)}
    if event.get("log_namespace") == SESSION_NAMESPACE and "event" in event:
        out["event"] = event["event"]
        if "session_id" in event:  # the session events' field, named session here
            out["session"] = event["session_id"]
        for key in SESSION_FIELDS:
            if key in event:
                out[key] = event[key]
        for key, value in event.items():
            if key not in out and key != "session_id" and not key.startswith("log_"):
                out[key] = value
    else:
        out["event"] = event.get("log_namespace") or "log"
        out["message"] = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            out["failure"] = failure.getTraceback()
        legacy = "isError" in event  # log.msg always sets it
        for key, value in event.items():
            if (key not in out and not key.startswith("log_") and isinstance(value, _PLAIN)
                    and not (legacy and key in _LEGACY)):
                out[key] = value
    return json.dumps(out, default=str, separators=(",", ":")) + "\n"


def as_json(observer: ILogObserver) -> ILogObserver:
    """A file observer of twistd (text) now writes JSON lines; other observers (syslog) stay as they are."""
    if isinstance(observer, FileLogObserver):
        observer.formatEvent = event_as_json
    return observer


def use_json_logs(beginner: LogBeginner = globalLogBeginner) -> None:
    """
    Make twistd's log output JSON lines.

    twistd makes its log observer (the C{--logfile}, or stdout with C{-n})
    after the plugin's C{makeService} ran, and hands it to
    C{beginner.beginLoggingTo}: call this from C{makeService}.  That call is
    wrapped, once: the file observers it is given format events with
    L{event_as_json}.  Events logged before (buffered) come out as JSON too.
    """
    original = beginner.beginLoggingTo

    def begin_logging_to(observers: Any, discardBuffer: bool = False,
                         redirectStandardIO: bool = True) -> None:
        # Once: the instance attribute goes, the class's method is back.
        delattr(beginner, "beginLoggingTo")
        original([as_json(o) for o in observers], discardBuffer, redirectStandardIO)

    setattr(beginner, "beginLoggingTo", begin_logging_to)  # noqa: B010 (mypy: no assigning to a method)
