"""
Memory a client that does not read can cost (popservice.server.pacing and the
body transfer): over real loopback sockets, a client with a 4 KiB receive
buffer pipelines RETRs of a large Maildir message and never reads; once the
server is stalled on it, the bytes it holds for the connection stay under a
small chunk, the kernel's unsent queue under its cap; when the client reads
again, every body arrives intact (CRLF and dot-stuffing across the changing
chunk sizes).  And the pacer's decisions against a real kernel socket: a
small first chunk, large ones while the peer takes everything, small ones
again once it falls behind.  The same through the wrappers a connection may
sit under (STLS, implicit TLS, the PROXY protocol): the write buffer that
pauses the server is the TCP transport's, whatever wraps it.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import threading
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, endpoints, reactor, task, threads
from twisted.trial import unittest

from popservice import wire
from popservice.server.pacing import (
    GROW_AFTER,
    LAG_LIMIT,
    LARGE_CHUNK,
    SMALL_CHUNK,
    UNSENT_LIMIT,
    BodyPacer,
    unsent_octets,
)
from popservice.server.policy import parse_networks
from popservice.server.proxy import proxy_endpoint
from popservice.server.transport import write_buffer_owner
from popservice.stores.maildir import MaildirStore
from popservice.tap import load_tls_options
from popservice.tlsutil import make_self_signed
from tests.support import ServerMixin, make_factory, memory_checker, recv_line, shutdown

LINUX = sys.platform.startswith("linux")


def awkward_message(size: int) -> bytes:
    """
    About C{size} octets of mail whose awkward spots sit on every 16 KiB
    boundary: a CR that ends one chunk before the LF that starts the next, and
    a line starting with a dot right after it; bare LFs elsewhere.
    """
    out = bytearray(b"Subject: awkward\n\n")
    n = 0
    while len(out) < size:
        n += 1
        room = SMALL_CHUNK - len(out) % SMALL_CHUNK
        if room <= 80:
            out += b"x" * (room - 1) + b"\r\n.dot line %d\n" % n
        else:
            out += b"%06d the quick brown fox jumps over the lazy dog\n" % n
    return bytes(out)


def deliver(root: str, user: str, message: bytes) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(root, user, sub), exist_ok=True)
    with open(os.path.join(root, user, "cur", "1700000001.M1P1.test:2,S"), "wb") as f:
        f.write(message)


def tcp_transport(server: Any) -> Any:
    """The server connection's TCP transport, under any TLS or PROXY wrapper."""
    transport = write_buffer_owner(server.transport)
    assert transport is not None
    return transport


def held(server: Any) -> int:
    """Octets of body the server's TCP transport holds for the connection (whole buffer objects)."""
    transport = tcp_transport(server)
    return int(len(transport.dataBuffer) + transport._tempDataLen)


class RawPeer:
    """
    A client socket with a 4 KiB receive buffer, read only when the test says
    so; C{preface} is sent first (a PROXY header).
    """

    def __init__(self, port: int, preface: bytes = b"") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        # Loopback: the kernel completes the handshake before the server accepts.
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(preface)
        self.sock.setblocking(False)
        self.received = bytearray()

    def drain(self) -> int:
        got = 0
        while True:
            try:
                data = self.sock.recv(262144)
            except BlockingIOError:
                return got
            if not data:
                return got
            self.received += data
            got += len(data)

    @defer.inlineCallbacks
    def until(self, marker: bytes, count: int = 1, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while self.received.count(marker) < count:
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %r x%d" % (marker, count))
            self.drain()
            yield task.deferLater(reactor, 0.002, lambda: None)

    def close(self) -> None:
        self.sock.close()


class NonReadingClient(ServerMixin, unittest.TestCase):
    def mailbox(self) -> str:
        """alice's Maildir under a new mail root (returned) with one awkward 1 MiB message."""
        if not LINUX:
            raise unittest.SkipTest("the kernel's unsent queue is read on Linux only")
        root = os.path.abspath(self.mktemp())
        self.message = awkward_message(1 << 20)
        deliver(root, "alice", self.message)
        return root

    def setUp(self) -> None:
        root = self.mailbox()
        self.port = self.listen(make_factory(MaildirStore(os.path.join(root, "%u")),
                                             [memory_checker(alice="secret")]))

    @defer.inlineCallbacks
    def stalled(self, server: Any, timeout: float = 20.0) -> Any:
        """Wait until the server sends nothing more (its buffer and the kernel's queue are full)."""
        deadline = time.monotonic() + timeout
        last, still = -1, 0
        while still < 5:
            if time.monotonic() > deadline:
                raise AssertionError("the server never stalled")
            yield task.deferLater(reactor, 0.02, lambda: None)
            now = server.bytes_out
            still = still + 1 if now == last and held(server) else 0
            last = now

    #: what the client sends before POP3 (a PROXY header)
    preface = b""

    @defer.inlineCallbacks
    def test_stalled_connection_holds_one_small_chunk(self) -> Any:
        peer = RawPeer(self.port, self.preface)
        self.addCleanup(peer.close)
        yield peer.until(b"\r\n")
        peer.sock.send(b"USER alice\r\nPASS secret\r\n")
        yield peer.until(b"+OK", 3)
        (server,) = list(self.factory.connections)
        rounds = 4
        peer.sock.send(b"RETR 1\r\n" * rounds)
        yield self.stalled(server)
        self.assertLessEqual(held(server), SMALL_CHUNK + SMALL_CHUNK // 2)
        unsent = unsent_octets(server.transport.getHandle())
        assert unsent is not None
        self.assertLessEqual(unsent, UNSENT_LIMIT + LARGE_CHUNK)
        # Reading again, the client gets every body whole and correctly encoded.
        body = wire.BodyEncoder().encode(self.message) + wire.BodyEncoder().finish()
        expected = (b"+OK %d octets\r\n" % (wire.transmitted_size([self.message]),) + body) * rounds
        yield peer.until(wire.TERMINATOR, rounds)
        answers = bytes(peer.received).split(b"+OK Logged in", 1)[1].split(b"\r\n", 1)[1]
        self.assertEqual(len(answers), len(expected))
        self.assertEqual(answers, expected)
        self.assertEqual(tcp_transport(server).bufferSize, self.factory.config.write_buffer)


class NonReadingProxiedClient(NonReadingClient):
    """
    The same through the PROXY protocol (a C{ProtocolWrapper} between TCP and
    the server, as TLS is on an C{ssl:} listener).
    """

    #: a client on loopback, as the proxy saw it (plaintext USER/PASS allowed, as without PROXY)
    preface = b"PROXY TCP4 127.0.0.7 127.0.0.1 40000 110\r\n"

    def listen(self, factory: Any) -> int:
        self.factory = factory
        endpoint = proxy_endpoint("tcp:0:interface=127.0.0.1", parse_networks("127.0.0.0/8"), 5.0)
        port: Any = self.successResultOf(endpoint.listen(factory))
        self.addCleanup(shutdown, port, factory)
        return int(port.getHost().port)


class NonReadingTLSClient(NonReadingClient):
    """The same over STLS and implicit TLS: the ciphertext of one small chunk is what waits."""

    def setUp(self) -> None:
        root = self.mailbox()
        self.cert, key = make_self_signed(os.path.join(root, "tls"))
        self.factory = make_factory(MaildirStore(os.path.join(root, "%u")), [memory_checker(alice="secret")],
                                    tls_context=load_tls_options(self.cert, key))

    def client(self, port: int, implicit: bool, rounds: int, go: threading.Event) -> bytes:
        """In a thread: log in over TLS, pipeline the RETRs, read nothing until C{go}, then all."""
        context = ssl.create_default_context(cafile=self.cert)
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(30)
        raw.connect(("127.0.0.1", port))
        if not implicit:
            recv_line(raw)
            raw.sendall(b"STLS\r\n")
            recv_line(raw)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            if implicit:
                recv_line(tls)
            tls.sendall(b"USER alice\r\nPASS secret\r\n")
            recv_line(tls)
            recv_line(tls)
            tls.sendall(b"RETR 1\r\n" * rounds)
            go.wait(30)
            received = bytearray()
            while received.count(wire.TERMINATOR) < rounds:
                data = tls.recv(262144)
                if not data:
                    break
                received += data
            return bytes(received)

    @defer.inlineCallbacks
    def stalled_over_tls(self, implicit: bool) -> Any:
        if implicit:
            endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, self.factory.config.tls_context,
                                                    interface="127.0.0.1")
            listening = yield endpoint.listen(self.factory)
            self.addCleanup(shutdown, listening, self.factory)
            port = listening.getHost().port
        else:
            port = self.listen(self.factory)
        rounds = 3
        go = threading.Event()
        self.addCleanup(go.set)
        done = threads.deferToThread(self.client, port, implicit, rounds, go)
        deadline = time.monotonic() + 20
        while not self.factory.connections or not any(c.session for c in self.factory.connections):
            self.assertLess(time.monotonic(), deadline, "no login")
            yield task.deferLater(reactor, 0.01, lambda: None)
        (server,) = list(self.factory.connections)
        yield self.stalled(server)
        self.assertLessEqual(held(server), SMALL_CHUNK + SMALL_CHUNK // 2)
        go.set()
        received = yield done
        body = wire.BodyEncoder().encode(self.message) + wire.BodyEncoder().finish()
        expected = (b"+OK %d octets\r\n" % (wire.transmitted_size([self.message]),) + body) * rounds
        self.assertEqual(received, expected)
        self.assertEqual(tcp_transport(server).bufferSize, self.factory.config.write_buffer)

    def test_stalled_connection_holds_one_small_chunk(self) -> Any:
        return self.stalled_over_tls(implicit=False)

    def test_implicit_tls(self) -> Any:
        # TLS is a ProtocolWrapper over TCP here: the write buffer set on it
        # would never pause the server (four records, 67,000 octets, would wait).
        return self.stalled_over_tls(implicit=True)


class Encoding(unittest.TestCase):
    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n", b".\r\n", b"\n.", b".."]),
                    min_size=1, max_size=40),
           st.lists(st.sampled_from([SMALL_CHUNK, LARGE_CHUNK]), min_size=1, max_size=12))
    def test_any_sequence_of_chunk_sizes(self, tokens: list[bytes], sizes: list[int]) -> None:
        # A body read in the pacer's chunk sizes, small and large in any order,
        # encodes as it would in one piece.
        unit = b"".join(tokens)
        message = unit * (3 * LARGE_CHUNK // len(unit) + 1)
        encoder = wire.BodyEncoder()
        out, pos, i = [], 0, 0
        while pos < len(message):
            size = sizes[i % len(sizes)]
            out.append(encoder.encode(message[pos:pos + size]))
            pos += size
            i += 1
        out.append(encoder.finish())
        whole = wire.BodyEncoder()
        self.assertEqual(b"".join(out), whole.encode(message) + whole.finish())


class Pacer(unittest.TestCase):
    """BodyPacer against a real loopback TCP socket (the kernel's queue is the signal)."""

    def setUp(self) -> None:
        if not LINUX:
            raise unittest.SkipTest("the kernel's unsent queue is read on Linux only")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.client = socket.socket()
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.client.connect(listener.getsockname())
        self.server, _ = listener.accept()
        listener.close()
        self.server.setblocking(False)
        self.client.setblocking(False)
        self.addCleanup(self.client.close)
        self.addCleanup(self.server.close)

    def test_small_first_large_while_read_small_when_behind(self) -> None:
        connection = _Connection(self.server)
        pacer = BodyPacer(connection, write_buffer=32768)
        # Nothing is known of the peer: a small chunk, and a write buffer below it.
        self.assertEqual(pacer.chunk_size(), SMALL_CHUNK)
        self.assertLess(connection.bufferSize, SMALL_CHUNK)
        # The kernel sent all of it (here: nothing was written), time after time: large chunks.
        for _ in range(GROW_AFTER - 1):
            self.assertEqual(pacer.chunk_size(), SMALL_CHUNK)
        self.assertEqual(pacer.chunk_size(), LARGE_CHUNK)
        self.assertEqual(connection.bufferSize, 32768)
        # The peer stops reading: the kernel takes up to its cap, then the pacer goes small.
        sent = 0
        while True:
            try:
                sent += self.server.send(b"x" * 65536)
            except BlockingIOError:
                break
        self.assertLess(sent, UNSENT_LIMIT + 2 * LARGE_CHUNK)  # TCP_NOTSENT_LOWAT caps the queue
        self.assertEqual(pacer.chunk_size(), SMALL_CHUNK)
        self.assertLess(connection.bufferSize, SMALL_CHUNK)
        self.assertEqual(pacer.chunk_size(), SMALL_CHUNK)  # still behind
        # It reads everything: large chunks again.
        deadline = time.monotonic() + 10
        received = 0
        while received < sent and time.monotonic() < deadline:
            try:
                received += len(self.client.recv(65536))
            except BlockingIOError:
                time.sleep(0.001)
        self.assertEqual(received, sent)
        while unsent_octets(self.server) and time.monotonic() < deadline:
            time.sleep(0.001)
        for _ in range(GROW_AFTER - 1):
            self.assertEqual(pacer.chunk_size(), SMALL_CHUNK)
        self.assertEqual(pacer.chunk_size(), LARGE_CHUNK)
        self.assertEqual(connection.bufferSize, 32768)
        pacer.reset()
        self.assertEqual(connection.bufferSize, 32768)


class ScriptedPacer(BodyPacer):
    """A BodyPacer told how much the kernel holds unsent, one figure per chunk."""

    def __init__(self, unsent: list[int]) -> None:
        super().__init__(_Connection(socket.socket()), write_buffer=32768)
        self.transport.sock.close()
        self.script = unsent

    def _unsent(self) -> int | None:
        return self.script.pop(0)


class LagLimit(unittest.TestCase):
    """Lag is more than LAG_LIMIT octets unsent, whatever the size of a large chunk."""

    def test_unsent_up_to_the_lag_limit_keeps_large_chunks(self) -> None:
        # A fast reader on loopback leaves tens of KiB unsent for a moment: large chunks go on
        # (half a large chunk was the limit once, and 64 KiB chunks went small several times
        # per message).
        self.assertLess(LAG_LIMIT, LARGE_CHUNK // 2)
        self.assertLess(LAG_LIMIT, UNSENT_LIMIT)
        pacer = ScriptedPacer([0] * (GROW_AFTER + 1) + [LAG_LIMIT, LAG_LIMIT // 2, LAG_LIMIT + 1, 0])
        sizes = [pacer.chunk_size() for _ in range(GROW_AFTER + 5)]
        self.assertEqual(sizes, [SMALL_CHUNK] * GROW_AFTER + [LARGE_CHUNK] * 3 + [SMALL_CHUNK] * 2)


class _Connection:
    """What the pacer reaches of a Twisted TCP transport: its socket and its write buffer size."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.bufferSize = 65536
        self.dataBuffer = b""

    def getHandle(self) -> socket.socket:
        return self.sock
