"""
Graceful stop and SIGHUP reload (popservice.server.lifecycle), over real
sockets: in this process with stores whose UPDATE and message reads the test
holds and releases (deterministic), and end to end against a real
C{twistd -n pop3} subprocess receiving SIGTERM and SIGHUP.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from popservice.auth.passwdfile import PasswdFileChecker
from popservice.interfaces import IMailbox, IMessageStream
from popservice.server.lifecycle import ServerLifecycle
from popservice.stores.memory import MemoryMailbox, MemoryStore
from popservice.tap import load_tls_options
from popservice.tlsutil import ReloadableServerTLS, make_self_signed
from tests.interop.world import RawPOP, World, client_context, free_port, simple_messages
from tests.support import ServerMixin, make_factory, memory_checker, recv_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHUTTING_DOWN = b"-ERR [SYS/TEMP] server shutting down"

M1 = b"Subject: one\r\n\r\nfirst\r\n"
M2 = b"Subject: two\r\n\r\nsecond\r\n"
M3 = b"Subject: three\r\n\r\nthird\r\n"


# -- stores whose UPDATE and reads the test controls ----------------------------------------------


class Gate:
    """Holds whoever waits on it until L{open}; L{reached} fires at the first wait."""

    def __init__(self) -> None:
        self.reached: defer.Deferred[None] = defer.Deferred()
        self.opened = False
        self._waiting: list[defer.Deferred[None]] = []

    def wait(self) -> "defer.Deferred[None]":
        if not self.reached.called:
            self.reached.callback(None)
        if self.opened:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def open(self) -> None:
        self.opened = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


@implementer(IMessageStream)
class GatedStream:
    """The first chunk at once, the rest once the store's read gate opens."""

    def __init__(self, inner: Any, gate: Gate) -> None:
        self.inner = inner
        self.gate = gate
        self.reads = 0

    def read(self) -> "defer.Deferred[bytes]":
        self.reads += 1
        if self.reads == 1:
            d: defer.Deferred[bytes] = self.inner.read()
            return d
        return self.gate.wait().addCallback(lambda _: self.inner.read())

    def close(self) -> None:
        self.inner.close()


@implementer(IMailbox)
class GatedMailbox(MemoryMailbox):
    store: GatedStore

    def open(self, index: int) -> Any:
        return super().open(index).addCallback(GatedStream, self.store.read_gate)

    def delete(self, indices: list[int]) -> Any:
        # UPDATE is under way from here until the test opens the gate.
        return self.store.delete_gate.wait().addCallback(lambda _: MemoryMailbox.delete(self, indices))


class GatedStore(MemoryStore):
    def __init__(self, messages: dict[str, list[bytes]], chunk: int = 65536) -> None:
        super().__init__(messages, chunk)
        self.delete_gate = Gate()
        self.read_gate = Gate()

    def open_mailbox(self, user: str, home: str | None) -> Any:
        def gated(_: object) -> GatedMailbox:
            mailbox = GatedMailbox(self, user)
            mailbox.store = self
            return mailbox

        return super().open_mailbox(user, home).addCallback(gated)


@implementer(IMailbox)
class HeldUpdateMailbox:
    """
    For a twistd subprocess (L{held_update_application}): a mailbox whose
    UPDATE, once begun, writes C{update-started} into C{directory} and waits
    for a C{release} file there before deleting.
    """

    def __init__(self, inner: Any, directory: str) -> None:
        self.inner = inner
        self.directory = directory

    def listing(self) -> Any:
        return self.inner.listing()

    def open(self, index: int) -> Any:
        return self.inner.open(index)

    def close(self) -> Any:
        return self.inner.close()

    def delete(self, indices: list[int]) -> Any:
        with open(os.path.join(self.directory, "update-started"), "w"):
            pass
        released: defer.Deferred[None] = defer.Deferred()

        def poll() -> None:
            if os.path.exists(os.path.join(self.directory, "release")):
                loop.stop()
                released.callback(None)

        loop = task.LoopingCall(poll)
        loop.start(0.02)
        return released.addCallback(lambda _: self.inner.delete(indices))


class HeldUpdateStore:
    def __init__(self, inner: Any, directory: str) -> None:
        self.inner = inner
        self.directory = directory

    def open_mailbox(self, user: str, home: str | None) -> Any:
        return self.inner.open_mailbox(user, home).addCallback(HeldUpdateMailbox, self.directory)


def held_update_application(argv: list[str], directory: str) -> service.Application:
    """The application of C{twistd pop3 ARGV}, its store's UPDATE held as L{HeldUpdateMailbox} says."""
    from popservice import tap

    options = tap.Options()
    options.parseOptions(argv)
    top = tap.makeService(options)
    lifecycle = next(s for s in top if isinstance(s, ServerLifecycle))
    realm: Any = lifecycle.factory.portal.realm
    realm.store = HeldUpdateStore(realm.store, directory)
    application = service.Application("pop3")
    top.setServiceParent(application)
    return application


def sleep(seconds: float) -> "defer.Deferred[None]":
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %s s" % (timeout,))
        yield sleep(0.02)


# -- in this process: the stop, step by step ------------------------------------------------------


class GracefulStop(ServerMixin, unittest.TestCase):
    timeout = 30

    def start(self, store: MemoryStore, grace: float = 5.0) -> tuple[service.MultiService, int]:
        self.pop3 = make_factory(store, [memory_checker(alice="secret", bob="secret")])
        self.notes: list[str] = []
        self.lifecycle = ServerLifecycle(self.pop3, grace=grace, notify=self.notes.append,
                                         handle_signals=False)
        top = service.MultiService()
        port = free_port()
        self.lifecycle.listener("tcp:%d:interface=127.0.0.1" % (port,)).setServiceParent(top)
        top.addService(self.lifecycle)
        top.startService()
        self.addCleanup(lambda: top.stopService() if top.running else None)
        return top, port

    @defer.inlineCallbacks
    def test_update_under_way_completes_others_end_without_deleting(self) -> Any:
        store = GatedStore({"alice": [M1, M2], "bob": [M3]})
        top, port = self.start(store)
        alice = yield self.login("alice", port=port)
        bob = yield self.login("bob", port=port)
        self.assertEqual((yield bob.command(b"DELE 1")), b"+OK Message 1 deleted")
        self.assertEqual((yield alice.command(b"DELE 1")), b"+OK Message 1 deleted")
        alice.send(b"QUIT\r\n")
        yield store.delete_gate.reached  # alice is in UPDATE, her deletion not yet done
        stopped = top.stopService()
        self.assertIn("STOPPING=1", self.notes[-1])
        # bob's next command is refused and his session ends; his mark is forgotten
        self.assertEqual((yield bob.command(b"NOOP")), SHUTTING_DOWN)
        yield bob.lost
        # new connections are not accepted any more
        with self.assertRaises(ConnectionError):
            yield threads.deferToThread(socket.create_connection, ("127.0.0.1", port), 5)
        yield sleep(0.2)
        self.assertFalse(stopped.called, "the stop must wait for alice's UPDATE")
        store.delete_gate.open()
        self.assertEqual((yield alice.line()), b"+OK Bye, 1 messages deleted")
        yield alice.lost
        yield stopped
        self.assertEqual(store.messages, {"alice": [M2], "bob": [M3]})
        self.assertEqual(self.pop3.connections, set())

    @defer.inlineCallbacks
    def test_retr_under_way_finishes_then_next_command_refused(self) -> Any:
        body = b"Subject: long\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(200))
        store = GatedStore({"alice": [body]}, chunk=512)
        top, port = self.start(store)
        alice = yield self.login("alice", port=port)
        # RETR, and a command pipelined behind it
        alice.send(b"RETR 1\r\nNOOP\r\n")
        yield store.read_gate.reached  # the first chunk is out, the rest held
        stopped = top.stopService()
        yield sleep(0.1)
        store.read_gate.open()
        status, received = yield alice.multi()
        self.assertTrue(status.startswith(b"+OK"), status)
        self.assertEqual(received, body)
        self.assertEqual((yield alice.line()), SHUTTING_DOWN)
        yield alice.lost
        yield stopped
        self.assertEqual(store.messages["alice"], [body])

    @defer.inlineCallbacks
    def test_idle_session_closed_when_grace_ends_nothing_deleted(self) -> Any:
        store = MemoryStore({"alice": [M1, M2]})
        top, port = self.start(store, grace=0.5)
        alice = yield self.login("alice", port=port)
        self.assertEqual((yield alice.command(b"DELE 1")), b"+OK Message 1 deleted")
        self.assertEqual((yield alice.command(b"DELE 2")), b"+OK Message 2 deleted")
        started = time.monotonic()
        yield top.stopService()
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 2.5)
        yield alice.lost
        self.assertEqual(store.messages["alice"], [M1, M2])
        self.assertEqual(store.locked, set())

    @defer.inlineCallbacks
    def test_without_connections_the_stop_is_immediate(self) -> Any:
        top, port = self.start(MemoryStore({"alice": [M1]}), grace=10)
        yield eventually(lambda: bool(self.notes))
        self.assertEqual(self.notes[0].splitlines()[0], "READY=1")
        started = time.monotonic()
        yield top.stopService()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(self.notes[-1].splitlines()[0], "STOPPING=1")

    @defer.inlineCallbacks
    def test_connection_accepted_while_stopping_is_refused(self) -> Any:
        store = MemoryStore({"alice": [M1], "bob": []})
        top, port = self.start(store)
        bob = yield self.login("bob", port=port)  # keeps the stop under way
        # another listener of the same server, not (yet) stopped
        extra = reactor.listenTCP(0, self.pop3, interface="127.0.0.1")
        self.addCleanup(extra.stopListening)
        stopped = top.stopService()
        late = yield self.connect(extra.getHost().port, greet=False)
        self.assertEqual((yield late.line()), SHUTTING_DOWN)
        yield late.lost
        bob.transport.loseConnection()
        yield stopped


class TapOptions(unittest.TestCase):
    def parse(self, *argv: str) -> Any:
        from popservice import tap

        options = tap.Options()
        options.parseOptions(["--auth", "memory:a:b", *argv])
        return options

    def test_shutdown_grace(self) -> None:
        from twisted.python import usage

        self.assertEqual(self.parse()["shutdown-grace"], 10)
        self.assertEqual(self.parse("--shutdown-grace", "2.5")["shutdown-grace"], 2.5)
        for bad in ("-1", "nan", "inf"):
            self.assertRaises(usage.UsageError, self.parse, "--shutdown-grace", bad)

    def test_listen_tls_needs_a_certificate(self) -> None:
        from twisted.python import usage

        self.assertRaises(usage.UsageError, self.parse, "--listen-tls", "tcp:995")

    def test_service_ends_with_the_lifecycle(self) -> None:
        from popservice import tap

        root = os.path.abspath(self.mktemp())
        cert, key = make_self_signed(os.path.join(root, "tls"))
        options = self.parse("--mail", "maildir:%s/%%u" % (root,), "--listen-tls",
                             "tcp:0:interface=127.0.0.1", "--tls-certificate", cert, "--tls-key", key,
                             "--shutdown-grace", "3")
        self.assertEqual(options["listen"], [])  # --listen-tls alone: no default tcp:110
        children = list(tap.makeService(options))
        lifecycle = children[-1]
        self.assertIsInstance(lifecycle, ServerLifecycle)
        self.assertEqual(lifecycle.grace, 3)
        self.assertIs(lifecycle.tls[0], lifecycle.factory.config.tls_context)


# -- in this process: the reload ------------------------------------------------------------------


def der_fingerprint(cert_path: str) -> str:
    with open(cert_path) as f:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()


def implicit_tls_fingerprint(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context(None).wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return hashlib.sha256(der).hexdigest()


def stls_fingerprint(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        greeting = recv_line(raw)
        assert greeting.startswith(b"+OK"), greeting
        raw.sendall(b"STLS\r\n")
        answer = recv_line(raw)
        assert answer.startswith(b"+OK"), answer
        with client_context(None).wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return hashlib.sha256(der).hexdigest()


def replace_file(path: str, data: bytes) -> None:
    """Write a file the way certificate renewals do: a new file renamed over the old."""
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class LogCapture:
    def __init__(self, case: unittest.TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self, namespace: str) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_namespace") == namespace]


class Reload(ServerMixin, unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.cert, self.key = make_self_signed(os.path.join(self.root, "tls"))
        self.passwd = os.path.join(self.root, "passwd")
        replace_file(self.passwd, b"alice:{PLAIN}alicepw:::::\n")
        self.store = MemoryStore({"alice": [M1, M2], "dave": [M3]})

    def start(self) -> None:
        cert, key = self.cert, self.key
        tls = ReloadableServerTLS(lambda: load_tls_options(cert, key), "STLS")
        self.pop3 = make_factory(self.store, [PasswdFileChecker(self.passwd)], tls_context=tls)
        self.notes: list[str] = []
        self.lifecycle = ServerLifecycle(self.pop3, grace=1, notify=self.notes.append)
        top = service.MultiService()
        self.port, self.ssl_port, self.tls_port = free_port(), free_port(), free_port()
        self.lifecycle.listener("tcp:%d:interface=127.0.0.1" % (self.port,)).setServiceParent(top)
        self.lifecycle.listener("ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1"
                                % (self.ssl_port, key, cert)).setServiceParent(top)
        self.lifecycle.listener("tcp:%d:interface=127.0.0.1" % (self.tls_port,),
                                implicit_tls=True).setServiceParent(top)
        top.addService(self.lifecycle)
        self.previous_handler = signal.getsignal(signal.SIGHUP)
        top.startService()
        self.top = top
        self.addCleanup(lambda: top.stopService() if top.running else None)

    def fingerprints(self) -> "defer.Deferred[tuple[str, str, str]]":
        def all_three() -> tuple[str, str, str]:
            return (implicit_tls_fingerprint(self.ssl_port), implicit_tls_fingerprint(self.tls_port),
                    stls_fingerprint(self.port))

        return threads.deferToThread(all_three)

    def new_certificate(self, name: str) -> tuple[str, str]:
        return make_self_signed(os.path.join(self.root, name))

    @defer.inlineCallbacks
    def test_sighup_reloads_users_and_certificates(self) -> Any:
        self.start()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.lifecycle._sighup)
        old = der_fingerprint(self.cert)
        self.assertEqual((yield self.fingerprints()), (old, old, old))
        # a session over implicit TLS, opened before the reload
        before = yield threads.deferToThread(RawPOP, self.tls_port, implicit_tls=True)
        self.addCleanup(before.close)
        self.assertTrue((yield threads.deferToThread(before.login, "alice", "alicepw")).startswith(b"+OK"))
        # renewed certificate and key; a new user
        cert, key = self.new_certificate("renewed")
        replace_file(self.key, read(key))
        replace_file(self.cert, read(cert))
        replace_file(self.passwd, b"alice:{PLAIN}alicepw:::::\ndave:{PLAIN}davepw:::::\n")
        new = der_fingerprint(self.cert)
        os.kill(os.getpid(), signal.SIGHUP)
        yield eventually(lambda: any("reloaded" in n for n in self.notes))
        self.assertIn("RELOADING=1", "\n".join(self.notes))
        self.assertEqual((yield self.fingerprints()), (new, new, new))
        dave = yield self.login("dave", "davepw", port=self.port)
        self.assertTrue((yield dave.command(b"STAT")).startswith(b"+OK 1 "))
        # the session from before is still up and works
        self.assertTrue((yield threads.deferToThread(before.command, b"STAT")).startswith(b"+OK 2 "))
        status, body = yield threads.deferToThread(before.multi, b"RETR 2")
        self.assertEqual(body, M2)
        self.assertEqual(hashlib.sha256(before.sock.getpeercert(binary_form=True)).hexdigest(), old)
        self.assertTrue((yield threads.deferToThread(before.quit)).startswith(b"+OK"))
        yield self.top.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.previous_handler)

    @defer.inlineCallbacks
    def test_broken_new_certificate_keeps_the_old_one(self) -> Any:
        self.start()
        log = LogCapture(self)
        old = der_fingerprint(self.cert)
        other_cert, other_key = self.new_certificate("other")
        good_cert, good_key = read(self.cert), read(self.key)
        broken: list[tuple[str, dict[str, bytes]]] = [
            ("not PEM", {self.cert: b"not a certificate\n"}),
            ("key not matching", {self.cert: read(other_cert)}),
            ("key not PEM", {self.key: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}),
        ]
        for why, files in broken:
            for path, data in files.items():
                replace_file(path, data)
            before = len(log.texts("popservice.tls"))
            yield self.lifecycle.reload()
            lines = log.texts("popservice.tls")[before:]
            # one line per context: STLS (which --listen-tls shares) and the ssl: listener
            self.assertEqual(len(lines), 2, (why, lines))
            for line in lines:
                self.assertIn("new certificate/key refused", line)
                self.assertIn("still using", line)
            self.assertEqual((yield self.fingerprints()), (old, old, old), why)
            replace_file(self.cert, good_cert)
            replace_file(self.key, good_key)
        # unreadable: gone
        os.unlink(self.key)
        yield self.lifecycle.reload()
        self.assertEqual((yield self.fingerprints()), (old, old, old))
        # and a good pair is taken again
        replace_file(self.key, read(other_key))
        replace_file(self.cert, read(other_cert))
        yield self.lifecycle.reload()
        new = der_fingerprint(other_cert)
        self.assertEqual((yield self.fingerprints()), (new, new, new))


# -- end to end: a twistd subprocess --------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("%s not met within %s s" % (what, timeout))
        time.sleep(0.02)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def exit_time(world: World, timeout: float = 20.0) -> float:
    """Seconds until the server process exits."""
    assert world.process is not None
    started = time.monotonic()
    world.process.wait(timeout)
    return time.monotonic() - started


class TwistdSigterm(unittest.TestCase):
    timeout = 60

    def world(self, *args: str) -> World:
        world = World("lifecycle", args)
        world.add_user("carol", "carolpw", simple_messages("carol", 3))
        world.add_user("dave", "davepw", simple_messages("dave", 2))
        world.start()
        self.addCleanup(world.stop)
        return world

    def test_sessions_end_without_deleting_within_the_grace(self) -> None:
        world = self.world("--shutdown-grace", "2")
        idle = world.session("carol")
        self.assertTrue(idle.command(b"DELE 1").startswith(b"+OK"))
        self.assertTrue(idle.command(b"DELE 2").startswith(b"+OK"))
        active = world.session("dave")
        self.assertTrue(active.command(b"DELE 1").startswith(b"+OK"))
        signalled = time.monotonic()
        os.kill(world.pid, signal.SIGTERM)
        wait_for(lambda: "stopping: 2 connections" in world.log_text(), what="the stop")
        # a session that speaks gets the answer and is closed
        self.assertEqual(active.command(b"NOOP"), SHUTTING_DOWN)
        self.assertEqual(active.sock.recv(100), b"")
        # the idle one holds the stop until the grace is over, then it is closed
        exited = exit_time(world)
        total = time.monotonic() - signalled
        self.assertGreaterEqual(total, 1.8)
        self.assertLess(total, 2 + 3)
        try:
            self.assertEqual(idle.sock.recv(100), b"")
        except ConnectionResetError:
            pass
        self.assertEqual(world.present("carol"), [1, 2, 3])
        self.assertEqual(world.present("dave"), [1, 2])
        log = world.log_text()
        self.assertIn("grace period over, 1 connections aborted", log)
        self.assertIn("pop3 logout:", log)
        self.assertGreater(exited, 0)

    def test_update_under_way_at_sigterm_completes(self) -> None:
        """
        twistd -y with the same service, its UPDATE held until the test lets
        it go: SIGTERM arrives in UPDATE, the deletion commits, +OK is sent.
        """
        world = World("update")
        world.add_user("carol", "carolpw", simple_messages("carol", 3))
        world.add_user("dave", "davepw", simple_messages("dave", 1))
        self.addCleanup(world.stop)
        world.port, world.tls_port = free_port(), free_port()
        argv = world.command_line()
        tac = os.path.join(world.root, "pop3.tac")
        with open(tac, "w") as f:
            f.write("from tests.test_lifecycle import held_update_application\n"
                    "application = held_update_application(%r, %r)\n"
                    % (argv[argv.index("pop3") + 1:], world.root))
        command = [argv[0], "-n", "--no_save", "--pidfile=", "-l", world.log, "-y", tac]
        world.process = subprocess.Popen(command, cwd=world.root, stdin=subprocess.DEVNULL,
                                         env=dict(os.environ, PYTHONPATH=ROOT),
                                         stdout=open(os.path.join(world.root, "twistd.out"), "wb"),
                                         stderr=subprocess.STDOUT)
        wait_for(lambda: _accepts(world.port) or not world.alive(), what="the server")
        self.assertTrue(world.alive(), world.log_tail())
        session = world.session("carol")
        self.assertTrue(session.command(b"DELE 2").startswith(b"+OK"))
        idle = world.session("dave")
        session.send(b"QUIT\r\n")
        wait_for(lambda: os.path.exists(os.path.join(world.root, "update-started")), what="UPDATE")
        os.kill(world.pid, signal.SIGTERM)
        wait_for(lambda: "stopping: 2 connections" in world.log_text(), what="the stop")
        self.assertEqual(idle.command(b"NOOP"), SHUTTING_DOWN)
        with open(os.path.join(world.root, "release"), "w"):
            pass
        self.assertEqual(session.line(), b"+OK Bye, 1 messages deleted")
        self.assertLess(exit_time(world), 5)
        self.assertEqual(world.present("carol"), [1, 3])
        self.assertEqual(world.present("dave"), [1])
        self.assertIn("stopped: all connections closed", world.log_text())

    def test_quit_racing_sigterm_deletes_all_or_nothing(self) -> None:
        """DELE + QUIT, SIGTERM right behind: either UPDATE ran (+OK, deleted) or nothing was deleted."""
        world = self.world()  # default grace: 10 s
        session = world.session("carol")
        self.assertTrue(session.command(b"DELE 1").startswith(b"+OK"))
        session.send(b"QUIT\r\n")
        os.kill(world.pid, signal.SIGTERM)
        answer = session.line()
        # no session left: the process does not wait for the grace
        self.assertLess(exit_time(world), 5)
        if answer.startswith(b"+OK"):
            self.assertEqual(answer, b"+OK Bye, 1 messages deleted")
            self.assertEqual(world.present("carol"), [2, 3])
        else:
            self.assertEqual(answer, SHUTTING_DOWN)
            self.assertEqual(world.present("carol"), [1, 2, 3])


class TwistdSighup(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.world = World("reload")
        self.world.add_user("carol", "carolpw", simple_messages("carol", 2))
        self.world.add_user("bob", "bobpw", [])
        self.world.start()
        self.addCleanup(self.world.stop)
        self.spare = os.path.abspath(self.mktemp())

    def hup(self) -> None:
        done = self.world.log_text().count("reload done")
        os.kill(self.world.pid, signal.SIGHUP)
        wait_for(lambda: self.world.log_text().count("reload done") > done, what="the reload")

    def fingerprints(self) -> tuple[str, str]:
        return implicit_tls_fingerprint(self.world.tls_port), stls_fingerprint(self.world.port)

    def test_sighup_reloads_users_and_certificate(self) -> None:
        world = self.world
        old = der_fingerprint(world.cert)
        self.assertEqual(self.fingerprints(), (old, old))
        before = world.session("carol", tls=True)
        self.assertTrue(before.command(b"STAT").startswith(b"+OK 2 "))
        # renewed certificate and key, renamed into place
        cert, key = make_self_signed(self.spare)
        os.replace(key, world.key)
        os.replace(cert, world.cert)
        new = der_fingerprint(world.cert)
        # a new user and a changed password
        world.add_user("dave", "davepw", simple_messages("dave", 1))
        world.users["bob"].password = "bobpw2"
        world.add_passwd_line("# bob's password changed")  # (rewrites the file)
        self.hup()
        log = world.log_text()
        self.assertIn("SIGHUP: reloading", log)
        self.assertIn("reload: passwd-file %r re-read, 3 users" % (world.passwd,), log)
        self.assertEqual(self.fingerprints(), (new, new))
        dave = world.session("dave")
        self.assertTrue(dave.command(b"STAT").startswith(b"+OK 1 "))
        self.assertTrue(dave.quit().startswith(b"+OK"))
        bob = world.connect()
        self.assertTrue(bob.login("bob", "bobpw").startswith(b"-ERR"))
        bob.close()
        bob = world.session("bob")
        bob.quit()
        # the session from before the reload is still up, on the old certificate
        self.assertTrue(before.command(b"STAT").startswith(b"+OK 2 "))
        status, body = before.multi(b"RETR 1")
        self.assertEqual(body, world.users["carol"].messages[0].retr)
        self.assertEqual(hashlib.sha256(before.sock.getpeercert(binary_form=True)).hexdigest(), old)
        self.assertTrue(before.quit().startswith(b"+OK"))

    def test_broken_certificate_keeps_the_old_one(self) -> None:
        world = self.world
        old = der_fingerprint(world.cert)
        key_pem = read(world.key)
        other_cert, other_key = make_self_signed(self.spare)
        for why, data in (("not PEM", b"garbage\n"), ("key not matching", read(other_cert))):
            refused = world.log_text().count("new certificate/key refused")
            replace_file(world.cert, data)
            self.hup()
            # one line for the STLS context, one for the ssl: listener
            self.assertEqual(world.log_text().count("new certificate/key refused"), refused + 2, why)
            self.assertEqual(self.fingerprints(), (old, old), why)
        # fixed: taken at the next SIGHUP
        replace_file(world.key, read(other_key))
        replace_file(world.cert, read(other_cert))
        self.hup()
        new = der_fingerprint(other_cert)
        self.assertEqual(self.fingerprints(), (new, new))
        self.assertNotEqual(key_pem, read(world.key))
