"""
The log of C{twistd pop3 --workers N}: where a worker's events go, and how.

The parent (L{popservice.server.workers}) chooses a L{route} from twistd's
own options and tells each worker, in C{$POPSERVICE_WORKER_LOG}
(L{worker_setting}), the route, the descriptor to write on and its index:

  - C{text} or C{json} (the parent logs to a stream: stdout with C{-n}, or
    C{--logfile -}): the worker gets the parent's log descriptor and writes
    its lines there itself, formatted as the parent would (twistd's text,
    or L{popservice.server.logformat.event_as_json}), with C{worker=N} in
    front of the system (text) or a C{worker} field (JSON).  The lines of a
    turn of the reactor go out in as few C{write}s as possible, each at
    most C{PIPE_BUF} bytes and ending at a line's end, so lines of several
    processes never interleave (a pipe writes that much at once; a file's
    writes through one shared open file are serialized by the kernel);
  - C{text-pass} or C{json-pass} (C{--logfile PATH}, a file twistd rotates
    by size and on SIGUSR1): the same lines, on a pipe to the parent, which
    writes them unparsed to its log file, so the file's rotation sees every
    byte;
  - C{records} (anything else: C{--syslog}, a C{--logger}): each event a
    record (L{event_record}) on a pipe to the parent, which publishes it
    again (L{record_event}) to its observers.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogEvent,
    LogLevel,
    formatEvent,
    textFileLogObserver,
)
from twisted.python import threadable
from zope.interface import implementer

from popservice.server.logformat import event_as_json

__all__ = ["ENVIRONMENT", "RECORD_SEPARATOR", "ROUTES", "LineWriter", "event_record", "pass_through",
           "record_event", "route", "worker_log_observer", "worker_setting", "worker_system"]

#: the variable naming a worker's log route, descriptor and index (L{worker_setting})
ENVIRONMENT = "POPSERVICE_WORKER_LOG"

#: starts each log record a worker writes (the C{records} route)
RECORD_SEPARATOR = "\x1e"

#: what L{route} may answer
ROUTES = frozenset({"text", "json", "text-pass", "json-pass", "records"})

#: the most bytes one C{write} of a worker carries: a pipe takes that much at once
PIPE_BUF = select.PIPE_BUF

#: field values a record carries (others are in its text only)
_PLAIN = (str, int, float, bool, type(None))


def route(twistd_options: Mapping[str, Any], log_format: str) -> str:
    """
    Where the workers' lines go, from twistd's options (the C{pop3} options'
    C{parent}) and C{--log-format}: the parent's stream itself (C{text},
    C{json}), through the parent to its rotating C{--logfile} (C{text-pass},
    C{json-pass}), or as events to the parent's observers (C{records}).
    """
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return "records"
    logfile = twistd_options.get("logfile")
    if logfile == "-" or (twistd_options.get("nodaemon") and not logfile):
        return log_format
    return log_format + "-pass"


def worker_setting(chosen: str, fd: int, index: int) -> str:
    """The value of L{ENVIRONMENT} for worker C{index} writing on C{fd}."""
    return "%s:%d:%d" % (chosen, fd, index)


def worker_system(index: int, event: LogEvent) -> str:
    """The system of a worker's event in the parent's log: C{worker=N} and its own."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = "%s#%s" % (event.get("log_namespace", "-"), getattr(level, "name", "-"))
    return "worker=%d %s" % (index, system)


def event_record(event: LogEvent) -> str:
    """
    A log event as one line for the parent (L{record_event} reads it): its
    time, level, namespace and system, its text formatted here (a traceback
    after it), and its plain fields; C{RECORD_SEPARATOR} first.
    """
    level = event.get("log_level")
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = "%s\n%s" % (text, failure.getTraceback())
    fields = {k: v for k, v in event.items() if not k.startswith("log_") and isinstance(v, _PLAIN)}
    record: dict[str, object] = {"t": event.get("log_time"), "l": getattr(level, "name", "info"),
                                 "n": event.get("log_namespace"), "x": text, "f": fields}
    system = event.get("log_system")
    if system is not None:
        record["s"] = str(system)
    return RECORD_SEPARATOR + json.dumps(record, separators=(",", ":"), default=str) + "\n"


def record_event(record: str) -> dict[str, Any]:
    """The event of a line L{event_record} made (its text as C{log_text}); C{ValueError} if it is none."""
    fields = json.loads(record[1:] if record.startswith(RECORD_SEPARATOR) else record)
    if not isinstance(fields, dict) or not isinstance(fields.get("f"), dict):
        raise ValueError("not a log record")
    event: dict[str, Any] = dict(fields["f"])
    try:
        level = LogLevel.levelWithName(str(fields.get("l")))
    except InvalidLogLevelError:
        level = LogLevel.info
    event.update(log_time=fields.get("t"), log_level=level, log_namespace=fields.get("n") or "-",
                 log_format="{log_text}", log_text=str(fields.get("x", "")))
    if "s" in fields:
        event["log_system"] = fields["s"]
    return event


def _write_all(fd: int, data: bytes, write: Callable[[int, bytes], int]) -> None:
    view = memoryview(data)
    while view:
        try:
            written = write(fd, view)  # type: ignore[arg-type]
        except BlockingIOError:  # a descriptor shared with a process that made it non-blocking
            select.select([], [fd], [])
            continue
        view = view[written:]


class LineWriter:
    """
    A file for twisted.logger's file observers, writing whole lines on a
    descriptor: what is written during a turn of the reactor goes out at its
    end (L{flush} only schedules that), in writes of at most L{PIPE_BUF}
    bytes that end at a line's end (a longer line alone); at once outside
    the reactor's thread or while it does not run (startup, shutdown), and
    at exit.
    """

    def __init__(self, fd: int, reactor: Any = None, write: Callable[[int, bytes], int] = os.write) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.fd = fd
        self._write = write
        self.reactor: Any = reactor
        #: lines not written yet (a deque: appending and taking need no lock, so a signal
        #: handler that logs while this thread is writing never waits for itself)
        self._lines: deque[bytes] = deque()
        self._pending = False
        self._lock = threading.Lock()
        #: the thread writing now (a drain it starts again, from a signal handler, returns)
        self._writer: int | None = None
        atexit.register(self.drain)

    def write(self, text: str) -> None:
        self._lines.append(text.encode("utf-8", "replace"))

    def flush(self) -> None:
        if self.reactor.running and threadable.isInIOThread():
            if not self._pending:
                self._pending = True
                self.reactor.callLater(0, self.drain)
        else:
            self.drain()

    def drain(self) -> None:
        """
        Write what was written so far.  A drain started again by this thread while it
        writes (a signal handler logging, twistd's "Received SIGTERM") returns at once:
        its lines are taken by the drain under way, at a line's end.
        """
        me = threading.get_ident()
        if self._writer == me:
            return
        with self._lock:
            self._writer = me
            self._pending = False
            lines = self._lines
            try:
                while lines:  # (again: lines a signal handler added during the last write)
                    chunk = b""
                    while lines:
                        line = lines.popleft()
                        if chunk and len(chunk) + len(line) > PIPE_BUF:
                            _write_all(self.fd, chunk, self._write)
                            chunk = b""
                        chunk += line
                    if chunk:
                        _write_all(self.fd, chunk, self._write)
            except OSError:  # the destination is gone (the parent, a closed pipe): nothing to tell
                lines.clear()
            finally:
                self._writer = None


@implementer(ILogObserver)
class _WorkerLines:
    """Passes each event to C{observer} with its worker: a C{worker} field, C{worker=N} before its system."""

    def __init__(self, index: int, observer: ILogObserver) -> None:
        self.index = index
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        self.observer(dict(event, worker=self.index, log_system=worker_system(self.index, event)))


@implementer(ILogObserver)
class _RecordObserver:
    """Writes every event as L{event_record} (the C{records} route)."""

    def __init__(self, out: IO[str] | LineWriter) -> None:
        self.out = out

    def __call__(self, event: LogEvent) -> None:
        self.out.write(event_record(event))
        self.out.flush()


def worker_log_observer(environ: Mapping[str, str] = os.environ) -> ILogObserver:
    """
    twistd's C{--logger} in a worker: the observer L{ENVIRONMENT} asks for
    (lines on a descriptor, or records); without it, records on stdout (the
    descriptor twistd found, before it sends stdout to the log).
    """
    chosen, fd, index = "records", 1, 0
    setting = environ.get(ENVIRONMENT)
    if setting:
        name, fd_text, index_text = setting.split(":")
        chosen, fd, index = name, int(fd_text), int(index_text)
    writer = LineWriter(fd)
    if chosen.startswith("json"):
        return _WorkerLines(index, FileLogObserver(writer, event_as_json))  # type: ignore[arg-type]
    if chosen.startswith("text"):
        return _WorkerLines(index, textFileLogObserver(writer))  # type: ignore[arg-type]
    return _RecordObserver(writer)


def pass_through(buffered: bytes, data: bytes, out: Any) -> bytes:
    """
    The parent's side of the C{-pass} routes: the whole lines of
    C{buffered + data} written to C{out} (twistd's log file) as they are;
    what follows the last line's end is returned, to come before the next
    data.
    """
    data = buffered + data
    end = data.rfind(b"\n") + 1
    if end:
        out.write(data[:end].decode("utf-8", "replace"))
        out.flush()
    return data[end:]
