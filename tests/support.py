"""Test support: a raw loopback POP3 client and server fixtures (no mocks of the wire)."""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.address import IPv4Address

from popservice.server.factory import POP3ServerFactory, ServerConfig, makeServer
from popservice.server.policy import Policy


class RawClient(protocol.Protocol):
    """Reads raw bytes; hands out status lines and multi-line bodies as they arrive."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiters: list[tuple[Any, defer.Deferred[Any]]] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._check()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.lost.callback(None)
        for _, d in self.waiters:
            d.errback(ConnectionError("closed; buffer=%r" % (self.buffer[:200],)))
        self.waiters = []

    def _check(self) -> None:
        while self.waiters:
            parse, d = self.waiters[0]
            result = parse()
            if result is None:
                return
            self.waiters.pop(0)
            d.callback(result)

    def _line(self) -> bytes | None:
        i = self.buffer.find(b"\r\n")
        if i < 0:
            return None
        line, self.buffer = self.buffer[:i], self.buffer[i + 2:]
        return line

    def _multi(self) -> tuple[bytes, bytes] | None:
        i = self.buffer.find(b"\r\n")
        if i < 0:
            return None
        if not self.buffer.startswith(b"+OK"):
            return self._line(), b""  # type: ignore[return-value]
        if self.buffer.startswith(b"\r\n.\r\n", i) or self.buffer[i + 2:i + 5] == b".\r\n":
            end = i + 2
            first = self.buffer[:i]
            self.buffer = self.buffer[end + 3:]
            return first, b""
        j = self.buffer.find(b"\r\n.\r\n", i)
        if j < 0:
            return None
        first, body = self.buffer[:i], self.buffer[i + 2:j + 2]
        self.buffer = self.buffer[j + 5:]
        return first, body

    def line(self) -> "defer.Deferred[bytes]":
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiters.append((self._line, d))
        self._check()
        return d

    def multi(self) -> "defer.Deferred[tuple[bytes, bytes]]":
        d: defer.Deferred[tuple[bytes, bytes]] = defer.Deferred()
        self.waiters.append((self._multi, d))
        self._check()
        return d

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    @defer.inlineCallbacks
    def command(self, line: bytes) -> Any:
        self.send(line + b"\r\n")
        return (yield self.line())

    @defer.inlineCallbacks
    def command_multi(self, line: bytes) -> Any:
        self.send(line + b"\r\n")
        return (yield self.multi())


def recv_line(sock: Any) -> bytes:
    """One line, CRLF included, from a blocking socket (byte by byte: nothing read past it)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed after %r" % (data,))
        data += chunk
    return data


def memory_checker(**users: str) -> InMemoryUsernamePasswordDatabaseDontUse:
    return InMemoryUsernamePasswordDatabaseDontUse(**{k: v.encode() for k, v in users.items()})


def make_factory(store: Any, checkers: Any, **config: Any) -> POP3ServerFactory:
    policy = config.pop("policy", Policy(failure_delay=0))
    clock = config.pop("clock", None)
    lock_grace = config.pop("lock_grace", 60.0)
    exclusive = config.pop("exclusive", True)
    max_sessions = config.pop("max_sessions", 10)
    return makeServer(store, checkers, ServerConfig(hostname="test.example", policy=policy, **config),
                      clock=clock, lock_grace=lock_grace, exclusive=exclusive, max_sessions=max_sessions)


class ServerMixin:
    """Listen on 127.0.0.1:0 and connect raw clients to it; cleans up."""

    def listen(self, factory: POP3ServerFactory) -> int:
        self.server_port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(shutdown, self.server_port, factory)  # type: ignore[attr-defined]
        self.factory = factory
        return int(self.server_port.getHost().port)

    @defer.inlineCallbacks
    def connect(self, port: int | None = None, greet: bool = True) -> Any:
        port = port if port is not None else self.server_port.getHost().port
        client = yield protocol.ClientCreator(reactor, RawClient).connectTCP("127.0.0.1", port)
        self.addCleanup(self._drop, client)  # type: ignore[attr-defined]
        if greet:
            client.greeting = yield client.line()
        return client

    @defer.inlineCallbacks
    def login(self, user: str = "alice", password: str = "secret", port: int | None = None) -> Any:
        client = yield self.connect(port)
        r = yield client.command(b"USER " + user.encode())
        assert r.startswith(b"+OK"), r
        r = yield client.command(b"PASS " + password.encode())
        assert r.startswith(b"+OK"), r
        return client

    def _drop(self, client: RawClient) -> Any:
        if client.closed:
            return None
        client.transport.abortConnection()  # type: ignore[union-attr]
        return client.lost


@defer.inlineCallbacks
def shutdown(port: Any, factory: POP3ServerFactory) -> Any:
    """Stop listening, abort what is still connected, wait until it is gone."""
    yield port.stopListening()
    for connection in list(factory.connections):
        connection.transport.abortConnection()
    for _ in range(200):
        if not factory.connections:
            return
        yield task.deferLater(reactor, 0.01, lambda: None)


def peer(host: str = "192.0.2.1") -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


def record_events(factory: POP3ServerFactory) -> list[tuple[str, dict[str, Any]]]:
    """Replace C{factory}'s session observer by one that records (name, fields) of every event."""
    events: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def event(self, name: str, session: object, **fields: Any) -> None:
            events.append((name, fields))

    factory.observer = Recorder()
    return events
