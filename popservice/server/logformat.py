"""
C{twistd pop3 --log-format json}: one JSON object per line on twistd's log
output (the C{--logfile}, or stdout with C{-n}), instead of twistd's text.
With the default C{--log-format text}, twistd's text lines, the same
characters made with less work (L{ClassicText}).

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
    formatEventAsClassicLogText,
    formatTime,
    globalLogBeginner,
    timeFormatRFC3339,
)

from popservice.server.events import SESSION_NAMESPACE, SessionText

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


#: keys that make an event's text line other than time, namespace#level and text
_SPECIAL = frozenset({"log_failure", "log_system", "log_flattened"})

#: the formatter Twisted's C{textFileLogObserver} gives a file observer
_TWISTED_TEXT = "textFileLogObserver.<locals>.formatEvent"


class ClassicText:
    """
    twistd's text log line for an event: what Twisted's C{textFileLogObserver}
    writes (C{formatEventAsClassicLogText}, RFC 3339 times), character for
    character, for about half the work, as three lines are written per
    session.  The time's text is kept for the second it names (Twisted works
    out the time zone and calls C{strftime} per line); a session event's line
    (L{SessionText}, no failure, no system of its own) is put together
    directly; any other event goes through Twisted's formatter.
    """

    def __init__(self, time_format: str | None = timeFormatRFC3339) -> None:
        self.time_format = time_format
        #: a format that shows less than seconds can be kept per second
        self._keep = time_format is not None and "%f" not in time_format
        self._second: int | None = None
        self._stamp = "-"

    def time(self, when: float | None) -> str:
        """Twisted's C{formatTime(when, time_format)}."""
        if not self._keep or when is None:
            return formatTime(when, self.time_format)
        second = int(when)
        if second != self._second:
            if not 0 <= when - second < 0.9999995:  # (may round up to the next second: not kept)
                return formatTime(when, self.time_format)
            self._stamp = formatTime(when, self.time_format)
            self._second = second
        return self._stamp

    def __call__(self, event: LogEvent) -> str | None:
        text = event.get("log_text")
        if (type(text) is SessionText and event.get("log_format") == "{log_text}"
                and not _SPECIAL.intersection(event)):
            level = event.get("log_level")
            try:
                line = "%s [%s#%s] %s" % (self.time(event.get("log_time")), event.get("log_namespace", "-"),
                                          "-" if level is None else level.name, text)
            except Exception:  # (a field that cannot be shown: Twisted says so in the line)
                return formatEventAsClassicLogText(event, formatTime=self.time)
            return line.replace("\n", "\n\t") + "\n"
        return formatEventAsClassicLogText(event, formatTime=self.time)


def _twisted_text_format(observer: FileLogObserver) -> tuple[bool, str | None]:
    """Whether C{observer} formats with Twisted's C{textFileLogObserver}, and its time format."""
    format_event = getattr(observer, "formatEvent", None)
    code = getattr(format_event, "__code__", None)
    if (code is None or getattr(format_event, "__qualname__", "") != _TWISTED_TEXT
            or code.co_freevars != ("timeFormat",)):
        return False, None
    cells: tuple[Any, ...] = getattr(format_event, "__closure__", None) or ()
    if len(cells) != 1 or not isinstance(cells[0].cell_contents, (str, type(None))):
        return False, None
    return True, cells[0].cell_contents


def as_classic_text(observer: ILogObserver) -> ILogObserver:
    """A file observer of twistd's that writes Twisted's text now writes it through L{ClassicText}."""
    if isinstance(observer, FileLogObserver):
        twisted_text, time_format = _twisted_text_format(observer)
        if twisted_text:
            observer.formatEvent = ClassicText(time_format)
    return observer


def _wrap_begin_logging(beginner: LogBeginner, change: Any) -> None:
    original = beginner.beginLoggingTo

    def begin_logging_to(observers: Any, discardBuffer: bool = False,
                         redirectStandardIO: bool = True) -> None:
        # Once: the instance attribute goes, the class's method is back.
        delattr(beginner, "beginLoggingTo")
        original([change(o) for o in observers], discardBuffer, redirectStandardIO)

    setattr(beginner, "beginLoggingTo", begin_logging_to)  # noqa: B010 (mypy: no assigning to a method)


def use_classic_text_logs(beginner: LogBeginner = globalLogBeginner) -> None:
    """twistd's text log observer (if Twisted's) formats through L{ClassicText}; see L{use_json_logs}."""
    _wrap_begin_logging(beginner, as_classic_text)


def use_json_logs(beginner: LogBeginner = globalLogBeginner) -> None:
    """
    Make twistd's log output JSON lines.

    twistd makes its log observer (the C{--logfile}, or stdout with C{-n})
    after the plugin's C{makeService} ran, and hands it to
    C{beginner.beginLoggingTo}: call this from C{makeService}.  That call is
    wrapped, once: the file observers it is given format events with
    L{event_as_json}.  Events logged before (buffered) come out as JSON too.
    """
    _wrap_begin_logging(beginner, as_json)
