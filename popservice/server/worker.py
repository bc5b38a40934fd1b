"""
One worker of C{twistd pop3 --workers N} (L{popservice.server.workers} is
its parent): what makes a C{twistd pop3} process a worker.

  - L{AdoptingReactor}: each listener adopts the listening socket its parent
    passed (C{--worker-fds}) under the same layers one process builds (the
    PROXY header reader, C{ssl:} and C{--listen-tls} TLS reloaded on SIGHUP);
  - L{connection_share}: its part of C{--max-connections} and
    C{--max-connections-per-ip};
  - L{worker_log_observer}: its log, a JSON record per event on stdout,
    which the parent publishes (L{event_record}, L{record_event});
  - L{ParentWatch}: it stops gracefully when its parent is gone.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import socket
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.application import service
from twisted.internet import abstract, main
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import ILogObserver, InvalidLogLevelError, LogEvent, Logger, LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["RECORD_SEPARATOR", "AdoptingReactor", "ParentWatch", "adopted_description", "connection_share",
           "event_record", "record_event", "worker_fds", "worker_log_observer"]

log = Logger(namespace="popservice.workers")

#: starts each log record a worker writes on its stdout
RECORD_SEPARATOR = "\x1e"

#: field values a record carries (others are in its text only)
_PLAIN = (str, int, float, bool, type(None))


def connection_share(cap: int, workers: int) -> int:
    """A worker's part of a connection cap shared by C{workers} processes (rounded up)."""
    return max(1, math.ceil(cap / max(1, workers)))


def worker_fds(text: str | None) -> list[int] | None:
    """C{--worker-fds 3,4,5}: the listening sockets a worker got, in the order of its listeners."""
    if text is None:
        return None
    return [int(part) for part in text.split(",") if part.strip()]


def _kind(description: str) -> str:
    return description.split(":", 1)[0].strip().lower()


def adopted_description(description: str) -> str:
    """
    What a worker parses C{description} as, before its L{AdoptingReactor}
    turns the listening into an adoption: itself, except C{systemd:} (whose
    sockets the worker does not get from systemd but from its parent), parsed
    as a plain TCP endpoint.  C{ssl:} keeps its files: TLS is the worker's.
    """
    return "tcp:0" if _kind(description) == "systemd" else description


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


@implementer(ILogObserver)
class _RecordObserver:
    """
    Writes every event as L{event_record} to a file, flushed once per turn of
    the reactor (one write, and one wake-up of the parent, for all the
    events of a turn), and at exit.
    """

    def __init__(self, out: IO[str], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.out = out
        self.reactor: Any = reactor
        self._pending = False
        atexit.register(self.flush)

    def __call__(self, event: LogEvent) -> None:
        self.out.write(event_record(event))
        if not self._pending:
            self._pending = True
            self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._pending = False
        try:
            self.out.flush()
        except (OSError, ValueError):  # the parent is gone, or the stream closed at exit
            pass


def worker_log_observer() -> ILogObserver:
    """
    twistd's C{--logger} in a worker: each event a record on stdout (the
    stream twistd found, before it sends stdout to the log), which the
    parent publishes again (L{popservice.server.workers.relay_line}).
    """
    return _RecordObserver(sys.stdout)


class AdoptingReactor:
    """
    The reactor as one listener of a worker sees it: whatever its endpoint
    listens with (C{listenTCP}, C{listenSSL}, C{listenUNIX}, or
    C{adoptStreamPort}), it adopts the socket C{fd} from the parent instead,
    with the same factory (C{listenSSL}: Twisted's TLS wrapped around it, as
    the reactor does).  Everything else is C{reactor}'s.
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def _adopt(self, factory: IProtocolFactory) -> IListeningPort:
        probe = socket.socket(fileno=os.dup(self._fd))  # learns the family; closes only its copy
        try:
            family = probe.family
        finally:
            probe.close()
        port: IListeningPort = self._reactor.adoptStreamPort(self._fd, family, factory)
        if family == socket.AF_UNIX and isinstance(getattr(port, "_bindPath", None), (bytes, str)):
            # Twisted's unix port, adopted or not (unlike its TCP port), shuts the socket down and removes
            # its path when it stops listening: this one is the parent's, where the other workers go on
            # accepting, so neither (its path marked as no file of ours).
            port._bindPath = b"\0"  # type: ignore[attr-defined]
            port._shouldShutdown = False  # type: ignore[attr-defined]
        return port

    def listenTCP(self, port: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        return self._adopt(factory)

    def listenSSL(self, port: int, factory: IProtocolFactory, contextFactory: Any, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def listenUNIX(self, address: str, factory: IProtocolFactory, backlog: int = 50, mode: int = 0o666,
                   wantPID: int = 0) -> IListeningPort:
        return self._adopt(factory)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: Any,
                        factory: IProtocolFactory) -> IListeningPort:
        return self._adopt(factory)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class _PipeEnd(abstract.FileDescriptor):
    """The read end of a pipe, calling C{on_end} once the other end is closed."""

    def __init__(self, fd: int, on_end: Callable[[], object], reactor: Any) -> None:
        abstract.FileDescriptor.__init__(self, reactor)
        self._fd = fd
        self._on_end = on_end

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> object:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        return main.CONNECTION_DONE if not data else None

    def connectionLost(self, reason: Failure) -> None:
        abstract.FileDescriptor.connectionLost(self, reason)
        self._on_end()


class ParentWatch(service.Service):
    """
    A worker's tie to its parent, the last service of its application: says
    once the worker accepts (the reactor runs, its listeners were adopted
    before), and reads the pipe the parent keeps open to the worker's stdin:
    at its end (the parent is gone, even killed) the worker stops gracefully
    (C{on_lost}, by default the reactor's stop: the application stops as on
    SIGTERM).
    """

    def __init__(self, index: int, fd: int = 0, on_lost: Callable[[], object] | None = None,
                 reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.index = index
        self.fd = fd
        self.reactor: Any = reactor
        self._on_lost = on_lost if on_lost is not None else reactor.stop
        self._pipe: _PipeEnd | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        os.set_blocking(self.fd, False)
        self._pipe = _PipeEnd(self.fd, self._ended, self.reactor)
        self._pipe.startReading()  # type: ignore[no-untyped-call]
        self.reactor.callWhenRunning(self._accepting)

    def _accepting(self) -> None:
        if self.running:
            log.info("worker {worker} accepting: pid {pid}", worker=self.index, pid=os.getpid())

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        pipe, self._pipe = self._pipe, None
        if pipe is not None and not pipe.disconnected:
            pipe.stopReading()  # type: ignore[no-untyped-call]

    def _ended(self) -> None:
        if self.running:
            log.warn("the parent process is gone: stopping")
            self._on_lost()
