"""
One worker of C{twistd pop3 --workers N} (L{popservice.server.workers} is
its parent): what makes a C{twistd pop3} process a worker.

  - L{AdoptingReactor}: each listener adopts the listening socket its parent
    passed (C{--worker-fds}) under the same layers one process builds (the
    PROXY header reader, C{ssl:} and C{--listen-tls} TLS reloaded on SIGHUP);
  - L{connection_share}: its part of C{--max-connections} and
    C{--max-connections-per-ip};
  - its log is L{popservice.server.workerlog}'s (its lines written where
    the parent's go, or records the parent publishes);
  - L{ParentWatch}: it stops gracefully when its parent is gone.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import abstract, main
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

__all__ = ["AdoptingReactor", "ParentWatch", "adopted_description", "connection_share", "worker_fds"]

log = Logger(namespace="popservice.workers")


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
