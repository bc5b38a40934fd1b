"""
Idle take-over across processes: the control socket of a server process and
the request a new login sends to it.

A Maildir session lock (L{popservice.stores.lock}) records its holder: pid, a
random per-process token, the path of the holder's control socket and the
user.  A login that finds the mailbox locked by another popservice process on
this host asks that process, over its control socket, to end the session if
it has sat idle past the holder's C{--lock-grace}
(L{popservice.server.realm.SessionRegistry.release_idle}): the holder ends it
without UPDATE (the same path as an in-process take-over), releases the lock,
then answers.  Nothing is written per command: the holder knows its sessions'
idleness.

Each process with a runtime directory (C{--runtime-dir}, shared by the
workers of C{--workers}) listens on C{DIR/session-<pid>.sock} (mode 0600) with
L{ControlListener}.  Both ends check with C{SO_PEERCRED} that the peer runs
as our uid (and the requester that the holder is the pid the lock names).
The protocol is one JSON line each way::

    -> {"takeover": "alice", "token": "<holder token>", "pid": 4242}
    <- {"result": "released"}       (or "busy", "unknown")

A request is bounded (L{REQUEST_TIMEOUT}) and never blocks the reactor; a
holder that cannot be reached, does not answer or says no leaves the login
with C{[IN-USE]}, as before.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime, ITransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from popservice.interfaces import LockHolder
from popservice.server.realm import IHolderRequests, SessionRegistry
from popservice.stores.lock import ProcessIdentity, this_process

__all__ = ["ControlListener", "HandoffClient", "control_path", "peer_credentials"]

log = Logger(namespace="popservice.server.handoff")

#: Seconds a take-over request may take, connection included.
REQUEST_TIMEOUT = 2.0

#: The longest line either side sends.
MAX_LINE = 4096

#: What a holder may answer.
RELEASED, BUSY, UNKNOWN = "released", "busy", "unknown"


def control_path(directory: str, pid: int) -> str:
    """The control socket of process C{pid} in the runtime directory C{directory}."""
    return os.path.join(directory, "session-%d.sock" % (pid,))


def peer_credentials(transport: ITransport | None) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end of a unix socket; C{None} where the OS cannot tell."""
    option = getattr(socket, "SO_PEERCRED", None)
    handle: Any = getattr(transport, "getHandle", lambda: None)()
    if option is None or handle is None:
        return None
    try:
        raw = handle.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
    except OSError:
        return None
    return pid, uid


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# -- the holder's side ----------------------------------------------------------------------------


class _LineExchange(LineOnlyReceiver):
    """One JSON line each way over a unix socket."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    #: the exchange is over (answered or refused)
    finished = False
    #: the connection is gone
    lost = False

    def send(self, message: dict[str, Any]) -> None:
        transport: Any = self.transport
        transport.write(_encode(message) + self.delimiter)

    def close(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.finished = True
        self.abort()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


class ControlProtocol(_LineExchange):
    """One take-over request from a process running as our uid, answered once."""

    factory: ControlFactory
    _deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        credentials = peer_credentials(self.transport)
        if credentials is not None and credentials[1] != os.geteuid():
            log.warn("take-over request from uid {uid} (pid {pid}) refused", uid=credentials[1],
                     pid=credentials[0])
            self.finished = True
            self.abort()
            return
        # A peer that connects and says nothing is dropped.
        self._deadline = self.factory.clock.callLater(REQUEST_TIMEOUT, self.abort)

    def lineReceived(self, line: bytes) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_deadline()
        request = _decode(line) or {}
        user, token, pid = request.get("takeover"), request.get("token"), request.get("pid")
        if not isinstance(user, str) or not isinstance(token, str) or not isinstance(pid, int):
            log.warn("malformed take-over request {line!r}", line=line[:200])
            self.abort()
            return
        if token != self.factory.identity.token:
            # A lock record of a previous process with our pid, or of another one entirely.
            self._answer(UNKNOWN)
            return
        self.factory.registry.release_idle(user, pid).addCallbacks(self._released, self._failed,
                                                                   errbackArgs=(user,))

    def _released(self, released: bool) -> None:
        self._answer(RELEASED if released else BUSY)

    def _failed(self, failure: Failure, user: str) -> None:
        log.failure("ending the idle session of {user} for a take-over", failure, user=user)
        self._answer(BUSY)

    def _answer(self, result: str) -> None:
        if self.lost:
            return
        self.send({"result": result})
        self.close()

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_deadline()
        _LineExchange.connectionLost(self, reason)


class ControlFactory(Factory):
    protocol = ControlProtocol  # type: ignore[assignment]
    noisy = False  # the listener logs its own line

    def __init__(self, registry: SessionRegistry, identity: ProcessIdentity, clock: IReactorTime) -> None:
        self.registry = registry
        self.identity = identity
        self.clock = clock


class ControlListener:
    """
    This process's control socket in C{directory}: listening while the POP3
    factory runs (L{start} and L{stop} from its C{startFactory} and
    C{stopFactory}), so every process serving the listeners, workers
    included, takes requests for its own sessions.  While it listens, the
    locks this process takes name it (L{ProcessIdentity.control}).
    """

    def __init__(self, directory: str, registry: SessionRegistry, identity: ProcessIdentity = this_process,
                 reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self.directory = directory
        self.registry = registry
        self.identity = identity
        self.reactor: Any = reactor  # IReactorUNIX and IReactorTime
        self.path: str | None = None
        self._port: IListeningPort | None = None
        self._starting: defer.Deferred[None] | None = None
        self._stopping: defer.Deferred[None] | None = None
        #: counts the stops: a listen that completes after a stop closes again
        self._stops = 0

    def start(self) -> "defer.Deferred[None]":
        """Listen on C{session-<pid>.sock}; a failure is logged (take-over requests then go unanswered)."""
        if self._starting is not None:
            return self._starting
        stopping, self._stopping = self._stopping, None
        if stopping is None or stopping.called:
            self._starting = self._listen()
            return self._starting
        # Started again while the last port is still closing (it removes the socket file when it
        # has closed): listen once it has.
        started: defer.Deferred[None] = defer.Deferred()

        def closed(result: object) -> object:
            self._listen().chainDeferred(started)
            return result

        stopping.addBoth(closed)
        self._starting = started
        return started

    def _listen(self) -> "defer.Deferred[None]":
        path = control_path(self.directory, self.identity.pid)
        try:
            self._remove_stale(path)
        except OSError as e:
            log.error("cannot use {path} for take-over requests: {error}", path=path, error=e)
            return defer.succeed(None)
        endpoint = UNIXServerEndpoint(self.reactor, path, mode=0o600)
        d = endpoint.listen(ControlFactory(self.registry, self.identity, self.reactor))
        stops = self._stops

        def listening(port: IListeningPort) -> None:
            if stops != self._stops:  # stopped meanwhile
                port.stopListening()
                return
            self._port = port
            self.path = path
            self.identity.control = path
            log.info("take-over requests on {path}", path=path)

        def failed(failure: Failure) -> None:
            log.error("cannot listen on {path} for take-over requests: {error}", path=path,
                      error=failure.getErrorMessage())

        done: defer.Deferred[None] = d.addCallbacks(listening, failed)
        return done

    @staticmethod
    def _remove_stale(path: str) -> None:
        """A socket left at our own pid's path by a process that died (our pid is ours alone)."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError("%s exists and is not a socket" % (path,))
        os.unlink(path)

    def stop(self) -> "defer.Deferred[None]":
        """Stop listening (the socket file is removed); idempotent."""
        if self._stopping is not None:
            return self._stopping
        self._stops += 1
        self._starting = None
        port, self._port = self._port, None
        if self.path is not None and self.identity.control == self.path:
            self.identity.control = None
        self.path = None
        stopped: Any = port.stopListening() if port is not None else None
        self._stopping = stopped if isinstance(stopped, defer.Deferred) else defer.succeed(None)
        return self._stopping


# -- the requester's side -------------------------------------------------------------------------


class RequestProtocol(_LineExchange):
    """Sends one take-over request, to the process the lock names only, and reads its answer."""

    def __init__(self, request: dict[str, Any], holder_pid: int) -> None:
        self.request = request
        self.holder_pid = holder_pid
        self.answer: defer.Deferred[str] = defer.Deferred(lambda _: self.abort())

    def connectionMade(self) -> None:
        credentials = peer_credentials(self.transport)
        if credentials is not None and credentials != (self.holder_pid, os.geteuid()):
            self._done(ConnectionError("the control socket is served by pid %d uid %d, not the lock's holder"
                                       % credentials))
            self.abort()
            return
        self.send(self.request)

    def lineReceived(self, line: bytes) -> None:
        result = (_decode(line) or {}).get("result")
        self._done(result if isinstance(result, str) else ConnectionError("malformed answer %r" % line[:200]))
        self.close()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._done(ConnectionError("over-long answer"))
        _LineExchange.lineLengthExceeded(self, line)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._done(ConnectionError("the holder closed without answering"))
        _LineExchange.connectionLost(self, reason)

    def _done(self, result: str | Exception) -> None:
        if self.answer.called:
            return
        if isinstance(result, Exception):
            self.answer.errback(result)
        else:
            self.answer.callback(result)


class _OneRequest(Factory):
    """Connects one L{RequestProtocol} (as C{connectProtocol} does, without a log line per request)."""

    noisy = False

    def __init__(self, protocol: RequestProtocol) -> None:
        self.request = protocol

    def buildProtocol(self, addr: Any) -> RequestProtocol:
        self.request.factory = self
        return self.request


@implementer(IHolderRequests)
class HandoffClient:
    """Asks the process a lock record names, over its control socket, to let an idle session go."""

    def __init__(self, identity: ProcessIdentity = this_process, reactor: Any = None,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self.identity = identity
        self.reactor: Any = reactor  # IReactorUNIX and IReactorTime
        self.timeout = timeout

    def ask(self, holder: LockHolder, user: str) -> "defer.Deferred[bool]":
        """See L{IHolderRequests.ask}."""
        if holder.control is None or holder.token == self.identity.token:
            # Nobody to ask; or this process (its session registry has decided already).
            return defer.succeed(False)
        request = {"takeover": user, "token": holder.token, "pid": self.identity.pid}
        protocol = RequestProtocol(request, holder.pid)
        endpoint = UNIXClientEndpoint(self.reactor, holder.control, timeout=max(1, int(self.timeout + 0.5)))
        connected = endpoint.connect(_OneRequest(protocol))
        d: defer.Deferred[str] = connected.addCallback(lambda _: protocol.answer)
        clock: IReactorTime = self.reactor
        d.addTimeout(self.timeout, clock)

        def answered(result: str) -> bool:
            log.info("asked process {pid} to end the idle session of {user}: {result}", pid=holder.pid,
                     user=user, result=result)
            return result == RELEASED

        def failed(failure: Failure) -> bool:
            log.info("asked process {pid} to end the idle session of {user}: no answer ({why})",
                     pid=holder.pid, user=user, why=failure.getErrorMessage() or repr(failure.value))
            return False

        return d.addCallbacks(answered, failed)
