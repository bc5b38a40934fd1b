"""
The per-session fast paths (issue 10), each against what it replaces:

  - answers written through to the kernel (popservice.server.transport's
    WriteThroughServer): a short answer is in the peer's socket as soon as
    C{write} returns, with no writer registered with the reactor; a write
    the kernel takes only in part, and every write while something waits,
    keep Twisted's order; the listening port makes its next connections
    write-through from the start;
  - parsed command lines shared between equal lines of numbers only (never a
    line with a password or a user name in it), the cache bounded;
  - Maildir message streams read without a Deferred per chunk, and a short
    read of a regular file taken for its end (no read that returns nothing);
    a pipe read in short pieces is still read to its end;
  - the lock file's holder record built from a per-process head: the same
    bytes as JSON, and a new token or control socket seen at once;
  - what an idle logged-in connection holds: none of the objects it does
    not need.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.task import deferLater
from twisted.trial import unittest

from popservice import wire
from popservice.interfaces import IImmediateMailbox, IImmediateMessageStream, LockHolder, MailboxUnavailable
from popservice.server import transport as transport_module
from popservice.server.login import LoggedIn, after_login
from popservice.server.transport import WRITE_THROUGH_LIMIT, WriteThroughServer, write_through
from popservice.stores.lock import decode_record, encode_record
from popservice.stores.maildir import MaildirStore
from popservice.stores.maildir.mailbox import MaildirMailbox, MaildirMessageStream
from tests.support import ServerMixin, make_factory, memory_checker, record_events


def alice_maildir(case: unittest.TestCase, *bodies: bytes) -> MaildirStore:
    """A Maildir store whose user alice has C{bodies} in new/ (one file each, in order)."""
    root = os.path.abspath(case.mktemp())
    os.makedirs(os.path.join(root, "alice", "new"))
    for i, body in enumerate(bodies):
        with open(os.path.join(root, "alice", "new", "%d.m.host" % i), "wb") as f:
            f.write(body)
    return MaildirStore(os.path.join(root, "%u"))


class _Keep(protocol.Protocol):
    """Server side of a test connection: keeps its transport for the test."""

    def connectionMade(self) -> None:
        self.factory.made.callback(self)  # type: ignore[attr-defined]


class WriteThroughTests(unittest.TestCase):
    @defer.inlineCallbacks
    def pair(self) -> Any:
        """A Twisted TCP server connection (made write-through) and a blocking client socket."""
        factory = protocol.ServerFactory()
        factory.protocol = _Keep
        factory.made = defer.Deferred()  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        server = yield factory.made
        self.addCleanup(server.transport.abortConnection)
        self.assertIs(type(server.transport), tcp.Server)
        self.assertTrue(write_through(server.transport))
        return port, server.transport, client

    @defer.inlineCallbacks
    def test_short_write_is_in_the_peer_socket_when_write_returns(self) -> Any:
        port, transport, client = yield self.pair()
        self.assertIsInstance(transport, WriteThroughServer)
        transport.write(b"+OK hello\r\n")
        # No reactor turn in between: the bytes left in write() itself, and nothing waits for
        # the socket to become writable.
        client.setblocking(False)
        self.assertEqual(client.recv(100), b"+OK hello\r\n")
        self.assertNotIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
        self.assertEqual(transport._tempDataLen, 0)
        # The port's next connections are born write-through.
        self.assertIs(port.transport, WriteThroughServer)

    @defer.inlineCallbacks
    def another(self, port: Any) -> Any:
        """The server transport of one more connection to C{port} (after L{pair})."""
        made: defer.Deferred[Any] = defer.Deferred()
        port.factory.made = made
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        server = yield made
        self.addCleanup(server.transport.abortConnection)
        return server.transport

    @defer.inlineCallbacks
    def test_later_connections_of_the_port_are_write_through_from_the_start(self) -> Any:
        port, _, _ = yield self.pair()
        transport = yield self.another(port)
        self.assertIs(type(transport), WriteThroughServer)

    @defer.inlineCallbacks
    def test_writes_keep_their_order_when_the_kernel_takes_part(self) -> Any:
        _, transport, client = yield self.pair()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # (not below the loopback MSS: a tiny window is reopened by the sender's slow persist timer)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 131072)
        pieces = [bytes([65 + i % 26]) * (WRITE_THROUGH_LIMIT - 1 - i) for i in range(48)]
        pieces += [b"x" * (WRITE_THROUGH_LIMIT * 2), b"tail\r\n"]  # one long write (Twisted's path)
        for piece in pieces:
            transport.write(piece)
        # The kernel's buffers are full long before the end: the rest waits in Twisted's buffer.
        self.assertGreater(transport._tempDataLen + len(transport.dataBuffer), 0)
        self.assertIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
        # The kernel has room again (the peer read some) but the reactor has not written the
        # buffer yet: a short write now must wait behind what is buffered, not jump ahead of it.
        received = bytearray()
        client.setblocking(False)
        idle = 0
        while idle < 3:  # what the kernel holds for the peer, until it has nothing more to give
            try:
                received += client.recv(65536)
                idle = 0
            except BlockingIOError:
                idle += 1
                time.sleep(0.01)
        self.assertTrue(received)
        transport.write(b"late\r\n")
        expected = b"".join(pieces) + b"late\r\n"
        client.setblocking(False)
        while len(received) < len(expected):
            try:
                chunk = client.recv(65536)
            except BlockingIOError:
                yield deferLater(reactor, 0, lambda: None)
                continue
            self.assertTrue(chunk)
            received += chunk
        self.assertEqual(bytes(received), expected)

    @defer.inlineCallbacks
    def test_a_closing_connection_takes_twisteds_path(self) -> Any:
        _, transport, client = yield self.pair()
        transport.loseConnection()
        transport.write(b"+OK bye\r\n")  # after loseConnection: buffered, sent before the close
        self.assertEqual(transport._tempDataLen, len(b"+OK bye\r\n"))
        client.settimeout(5)
        data = b""
        while True:
            yield deferLater(reactor, 0.001, lambda: None)
            try:
                chunk = client.recv(100, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if not chunk:
                break
            data += chunk
        self.assertEqual(data, b"+OK bye\r\n")

    @defer.inlineCallbacks
    def test_fileno_and_repr_without_per_connection_copies(self) -> Any:
        port, _, _ = yield self.pair()
        transport = yield self.another(port)
        self.assertIs(type(transport), WriteThroughServer)
        # Twisted's per-connection bound method and repr string are not kept, yet answer the same
        self.assertNotIn("fileno", vars(transport))
        self.assertNotIn("repstr", vars(transport))
        self.assertEqual(transport.fileno(), transport.socket.fileno())
        self.assertEqual(repr(transport), "<_Keep #%d on %d>" % (transport.sessionno, port.getHost().port))
        # nor its log prefix string, nor an empty list of pending writes
        self.assertNotIn("logstr", vars(transport))
        self.assertEqual(transport.logPrefix(), "_Keep,%d,127.0.0.1" % (transport.sessionno,))
        self.assertIsNone(vars(transport).get("_pending"))
        lost: defer.Deferred[Any] = defer.Deferred()
        transport.protocol.connectionLost = lambda reason: lost.callback(None)
        transport.loseConnection()
        yield lost
        self.assertEqual(transport.fileno(), -1)  # closed: as Twisted's FileDescriptor says
        self.assertIn("#%d" % transport.sessionno, repr(transport))

    @defer.inlineCallbacks
    def test_pending_writes_list_made_when_needed_and_let_go(self) -> Any:
        _, transport, client = yield self.pair()
        self.assertIsNone(vars(transport).get("_pending"))
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = []
        for i in range(64):  # until the kernel takes no more: the rest waits in Twisted's list
            sent.append(bytes([65 + i % 26]) * 4000)
            transport.write(sent[-1])
        self.assertTrue(vars(transport)["_pending"])
        self.assertEqual(transport._tempDataLen, sum(map(len, vars(transport)["_pending"])))
        received = bytearray()
        client.setblocking(False)
        while len(received) < 64 * 4000:
            try:
                received += client.recv(65536)
            except BlockingIOError:
                yield deferLater(reactor, 0.001, lambda: None)
        self.assertEqual(bytes(received), b"".join(sent))
        self.assertIsNone(vars(transport).get("_pending"))  # emptied by Twisted: let go

    def test_nothing_but_twisteds_tcp_server_is_changed(self) -> None:
        class Other:
            transport = None

        self.assertFalse(write_through(Other()))
        self.assertFalse(write_through(None))

    def test_limit_is_below_a_body_chunk(self) -> None:
        # Body chunks (16 KiB and more) take the buffered path: one per reactor turn, so a fast
        # reader's big message cannot hold the reactor for its whole length.
        from popservice.server.pacing import SMALL_CHUNK
        self.assertLessEqual(transport_module.WRITE_THROUGH_LIMIT, SMALL_CHUNK)


class WriteThroughSessionTests(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_server_connections_write_through(self) -> Any:
        self.listen(make_factory(alice_maildir(self, b"Subject: x\n\n.dot\nbody\n"),
                                 [memory_checker(alice="secret")]))
        client = yield self.login()
        [connection] = list(self.factory.connections)
        self.assertIsInstance(connection.transport, WriteThroughServer)
        first, body = yield client.command_multi(b"RETR 1")
        self.assertEqual(first, b"+OK 26 octets")
        self.assertEqual(body, b"Subject: x\r\n\r\n..dot\r\nbody\r\n")


class ParseCacheTests(unittest.TestCase):
    def setUp(self) -> None:
        wire._parsed.clear()
        self.addCleanup(wire._parsed.clear)

    def test_lines_of_numbers_are_shared(self) -> None:
        for line in (b"STAT", b"RETR 7", b"TOP 1 10", b"list"):
            first = wire.parse_command(line)
            self.assertIs(wire.parse_command(line), first)
            self.assertIn(line, wire._parsed)

    def test_lines_with_words_are_never_kept(self) -> None:
        for line in (b"USER alice", b"PASS s3cret", b"APOP alice 0123456789abcdef0123456789abcdef",
                     b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"LANG en"):
            command = wire.parse_command(line)
            self.assertIsInstance(command, wire.Command)
            self.assertNotIn(line, wire._parsed)
        self.assertEqual(wire._parsed, {})

    def test_errors_are_never_kept(self) -> None:
        for line in (b"RETR 0", b"RETR x", b"XYZZY", b"RETR 1 2"):
            self.assertIsInstance(wire.parse_command(line), wire.CommandError)
        self.assertEqual(wire._parsed, {})

    def test_bounded(self) -> None:
        for n in range(1, wire.PARSED_CACHE_SIZE * 3):
            self.assertEqual(wire.parse_command(b"DELE %d" % n), wire.Command("DELE", (n,)))
            self.assertLessEqual(len(wire._parsed), wire.PARSED_CACHE_SIZE)


class ImmediateStreamTests(unittest.TestCase):
    def file(self, content: bytes) -> int:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return os.open(path, os.O_RDONLY)

    def test_short_read_of_a_regular_file_is_its_end(self) -> None:
        fd = self.file(b"x" * 100)
        stream = MaildirMessageStream(fd, chunk_size=64, regular=True)
        self.assertTrue(IImmediateMessageStream.providedBy(stream))
        self.assertEqual(stream.read_now(), b"x" * 64)
        os.fstat(fd)  # still open
        self.assertEqual(stream.read_now(), b"x" * 36)
        self.assertRaises(OSError, os.fstat, fd)  # closed with the short read: no empty read needed
        self.assertEqual(stream.read_now(), b"")

    def test_a_file_of_exactly_one_chunk(self) -> None:
        stream = MaildirMessageStream(self.file(b"y" * 64), chunk_size=64, regular=True)
        self.assertEqual(stream.read_now(), b"y" * 64)
        self.assertEqual(stream.read_now(), b"")
        self.assertEqual(stream.read_now(), b"")

    def test_a_pipe_is_read_to_its_end_through_short_reads(self) -> None:
        r, w = os.pipe()
        stream = MaildirMessageStream(r, chunk_size=64)
        os.write(w, b"a" * 10)
        self.assertEqual(stream.read_now(), b"a" * 10)  # short, but not the end
        os.write(w, b"b" * 5)
        os.close(w)
        self.assertEqual(stream.read_now(), b"b" * 5)
        self.assertEqual(stream.read_now(), b"")

    def test_read_gives_the_same_through_a_deferred(self) -> None:
        stream = MaildirMessageStream(self.file(b"z" * 70), chunk_size=64, regular=True)
        got: list[bytes] = []
        for _ in range(3):
            stream.read().addCallback(got.append)
        self.assertEqual(got, [b"z" * 64, b"z" * 6, b""])

    def test_errors(self) -> None:
        stream = MaildirMessageStream(os.open(os.path.dirname(os.path.abspath(self.mktemp())) or ".",
                                              os.O_RDONLY), regular=True)
        self.assertRaises(MailboxUnavailable, stream.read_now)
        self.assertEqual(stream.read_now(), b"")  # closed after the error
        failing = MaildirMessageStream(os.open(os.path.abspath("."), os.O_RDONLY))
        self.failureResultOf(failing.read(), MailboxUnavailable)


class LockRecordTests(unittest.TestCase):
    def test_same_as_json(self) -> None:
        for holder in (LockHolder(pid=12, token="ab12", control=None, user=None),
                       LockHolder(pid=12, token="ab12", control="/run/c.sock", user="al\u00efce\"x"),
                       LockHolder(pid=13, token="cd34", control=None, user="bob")):
            record = encode_record(holder, 1764590000.12345)
            self.assertTrue(record.endswith(b"}\n"))
            self.assertEqual(json.loads(record), {"v": 1, "pid": holder.pid, "token": holder.token,
                                                  "control": holder.control, "user": holder.user,
                                                  "since": 1764590000.123})
            self.assertEqual(decode_record(record), holder)

    def test_a_new_token_is_seen_at_once(self) -> None:
        one = encode_record(LockHolder(pid=12, token="aa", control=None, user="u"), 1.0)
        two = encode_record(LockHolder(pid=12, token="bb", control="/c", user="u"), 1.0)
        self.assertEqual(decode_record(one), LockHolder(pid=12, token="aa", control=None, user="u"))
        self.assertEqual(decode_record(two), LockHolder(pid=12, token="bb", control="/c", user="u"))


class LockPathTests(unittest.TestCase):
    def test_a_lock_named_in_its_directory(self) -> None:
        from popservice.stores.lock import LOCK_FILE_NAME, FcntlMailboxLock, read_holder
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        lock = FcntlMailboxLock(directory, user="alice", name=LOCK_FILE_NAME)
        self.assertEqual(lock.path, os.path.join(directory, LOCK_FILE_NAME))
        lock.try_acquire()
        self.addCleanup(lock.release_now)
        holder = read_holder(os.path.join(directory, LOCK_FILE_NAME))
        assert holder is not None
        self.assertEqual(holder.user, "alice")


class SummaryTests(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_logout_sums_sizes_without_a_messageinfo_per_message(self) -> Any:
        store = alice_maildir(self, b"a\n", b"bb\n", b"ccc\n")
        self.listen(make_factory(store, [memory_checker(alice="secret")]))
        events = record_events(self.factory)
        client = yield self.login()
        self.assertEqual((yield client.command(b"QUIT")), b"+OK Bye")
        yield client.lost
        [logout] = [f for name, f in events if name == "logout"]
        self.assertEqual((logout["messages"], logout["size"]), (3, 3 + 4 + 5))
        [listing] = store.listings._listings.values()
        self.assertIsNone(listing._infos)  # the cached listing stays compact


class ImmediateOpenTests(ServerMixin, unittest.TestCase):
    """RETR and TOP open a Maildir message at once (IImmediateMailbox), with the same answers."""

    def message_file(self, store: MaildirStore, base: str) -> str:
        root = os.path.dirname(store.template.replace("%u", "alice/x"))
        for sub in ("cur", "new"):
            for name in os.listdir(os.path.join(root, sub)):
                if name.startswith(base):
                    return os.path.join(root, sub, name)
        raise AssertionError("no file %s" % (base,))

    @defer.inlineCallbacks
    def test_open_now_answers(self) -> Any:
        store = alice_maildir(self, b"Subject: a\n\none\n", b"bb\n", b"ccc\n")
        self.listen(make_factory(store, [memory_checker(alice="secret")]))
        client = yield self.login()

        def no_deferred_open(*args: object) -> None:
            raise AssertionError("open() called: a Deferred per message")

        self.patch(MaildirMailbox, "open", no_deferred_open)
        first, body = yield client.command_multi(b"RETR 1")
        self.assertEqual((first, body), (b"+OK 19 octets", b"Subject: a\r\n\r\none\r\n"))
        first, body = yield client.command_multi(b"TOP 1 0")
        self.assertEqual(body, b"Subject: a\r\n\r\n")
        # gone underneath (another client's UPDATE): a temporary error, the session goes on
        os.unlink(self.message_file(store, "1.m.host"))
        self.assertEqual((yield client.command(b"RETR 2")), b"-ERR [SYS/TEMP] Message is no longer available")
        # not a regular file any more: cannot be read, logged
        path = self.message_file(store, "2.m.host")
        os.unlink(path)
        os.mkdir(path)
        self.assertEqual((yield client.command(b"RETR 3")), b"-ERR [SYS/TEMP] Cannot read message")
        self.assertEqual(len(self.flushLoggedErrors(MailboxUnavailable)), 1)
        self.assertEqual((yield client.command(b"NOOP")), b"+OK")
        self.assertTrue(IImmediateMailbox.providedBy(self.factory.connections.copy().pop().session.mailbox))


class IdleConnectionTests(ServerMixin, unittest.TestCase):
    """
    What an idle logged-in connection holds (issue 10, item 4): none of the
    per-connection objects an idle session does not need, each of which was
    there before (the login state, a line buffer, Twisted's pending-writes
    list and log prefix, a command rate object, a float for the last command).
    """

    @defer.inlineCallbacks
    def test_idle_session_holds_only_what_it_needs(self) -> Any:
        self.listen(make_factory(alice_maildir(self, b"Subject: x\n\nbody\n"),
                                 [memory_checker(alice="secret")]))
        first = yield self.login()
        self.assertTrue((yield first.command(b"STAT")).startswith(b"+OK 1 "))
        [connection] = list(self.factory.connections)
        # the login state: one shared object per login method, holding the method only
        self.assertIs(type(connection.login), LoggedIn)
        self.assertIs(connection.login, after_login("USER"))
        self.assertEqual(connection.login.method, "USER")
        # no line buffer object, no float for the answered command
        self.assertIs(connection.reader._buffer, b"")
        self.assertEqual(connection._command_at, 0.0)
        # the command rate is the server's object; the connection keeps one number
        self.assertIs(connection._rate, self.factory.command_rate())
        self.assertIsInstance(connection._rate_full, float)
        # Twisted's per-connection list, log prefix, bound fileno and repr are not kept
        transport = connection.transport
        for name in ("_pending", "logstr", "fileno", "repstr", "_tempDataBuffer"):
            self.assertIsNone(vars(transport).get(name), name)
        # one string for the user name, shared by the shell and the mailbox lock
        mailbox = connection.session.mailbox
        self.assertIs(connection.user, mailbox._lock.user)
        self.assertIs(mailbox.path, mailbox._listing.path)
