"""
Idle take-over across processes (popservice.server.handoff): the lock file's
holder record, the control socket, and two real C{twistd pop3} processes
sharing one Maildir root and one runtime directory.
"""

from __future__ import annotations

import fcntl
import os
import poplib
import shutil
import socket
import stat
import tempfile
import time
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from popservice.interfaces import LockHolder, MailboxInUse
from popservice.server.config import ServerConfig
from popservice.server.factory import POP3ServerFactory, makeServer
from popservice.server.handoff import ControlListener, HandoffClient, control_path
from popservice.server.policy import Policy
from popservice.server.realm import SessionRegistry
from popservice.stores.lock import (
    LOCK_FILE_NAME,
    FcntlMailboxLock,
    ProcessIdentity,
    decode_record,
    encode_record,
    read_holder,
    this_process,
)
from popservice.stores.maildir import MaildirStore
from tests.interop.world import World, simple_messages
from tests.support import ServerMixin, memory_checker, record_events

M1 = b"Subject: one\n\nfirst\n"
M2 = b"Subject: two\n\nsecond\n"


def short_tempdir(case: unittest.TestCase) -> str:
    """A private directory with a short path (unix socket paths are limited to ~107 bytes)."""
    path = tempfile.mkdtemp(prefix="pop-rt-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


# -- the holder record ----------------------------------------------------------------------------


class HolderRecord(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = short_tempdir(self)
        self.path = os.path.join(self.dir, LOCK_FILE_NAME)

    def lock(self, user: str | None = "alice", identity: ProcessIdentity | None = None) -> FcntlMailboxLock:
        lock = FcntlMailboxLock(self.path, user=user, identity=identity)
        self.addCleanup(lock.release_now)
        return lock

    def test_lock_names_its_holder_until_released(self) -> None:
        identity = ProcessIdentity()
        identity.control = "/run/popservice/session-1.sock"
        lock = self.lock(identity=identity)
        self.successResultOf(lock.acquire())
        self.assertEqual(read_holder(self.path),
                         LockHolder(pid=os.getpid(), token=identity.token, control=identity.control,
                                    user="alice"))
        self.successResultOf(lock.release())
        self.assertIsNone(read_holder(self.path))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(1), b"\n")

    def test_loser_learns_the_holder(self) -> None:
        self.successResultOf(self.lock().acquire())
        failure = self.failureResultOf(self.lock(user="bob").acquire(), MailboxInUse)
        self.assertEqual(failure.value.holder, this_process.holder("alice"))
        # the loser did not touch the record
        self.assertEqual(read_holder(self.path), this_process.holder("alice"))

    def test_garbled_record_is_harmless(self) -> None:
        """A record left by a crash or an old server: the lock works, the loser learns no holder."""
        with open(self.path, "wb") as f:
            f.write(b'{"v":1,"pid":"x"' + b"\xff" * 10000)
        # held by someone who never wrote a record (an old popservice, or a crash before the write)
        fd = os.open(self.path, os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        failure = self.failureResultOf(self.lock().acquire(), MailboxInUse)
        self.assertIsNone(failure.value.holder)
        fcntl.flock(fd, fcntl.LOCK_UN)
        lock = self.lock()
        self.successResultOf(lock.acquire())
        self.assertEqual(read_holder(self.path), this_process.holder("alice"))

    def test_decode_refuses_garbage(self) -> None:
        good = LockHolder(pid=42, token="ab12", control="/run/x/session-42.sock", user="alice")
        self.assertEqual(decode_record(encode_record(good, 1.0)), good)
        self.assertEqual(decode_record(encode_record(LockHolder(42, "t", None, None), 1.0)),
                         LockHolder(42, "t", None, None))
        for garbage in [b"", b"\n", b"null", b"[]", b"{}", b"42", b"\xff\xfe", b'{"v":2,"pid":1,"token":"t"}',
                        b'{"v":1,"pid":0,"token":"t"}', b'{"v":1,"pid":true,"token":"t"}',
                        b'{"v":1,"pid":"1","token":"t"}', b'{"v":1,"pid":1,"token":""}',
                        b'{"v":1,"pid":1,"token":"t","control":"relative.sock"}',
                        b'{"v":1,"pid":1,"token":"t","control":"/a\\u0000b"}',
                        b'{"v":1,"pid":1,"token":"t","user":7}', b"[" * 4000,
                        b'{"v":1,"pid":1,"token":"t","control":null,"user":null}' + b" " * 5000]:
            self.assertIsNone(decode_record(garbage), garbage[:60])

    def test_forked_child_is_another_holder(self) -> None:
        """After fork the child draws a new token and has no control socket until it listens."""
        saved = this_process.control
        this_process.control = "/run/x/session-1.sock"
        self.addCleanup(setattr, this_process, "control", saved)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.write(write, ("%s %s" % (this_process.token, this_process.control)).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as f:
            token, control = f.read().decode().split()
        self.assertNotEqual(token, this_process.token)
        self.assertEqual(control, "None")


# -- in one process: two servers, as if two processes ---------------------------------------------


def maildir_server(root: str, *, lock_grace: float, runtime_dir: str | None = None,
                   clock: Any = None) -> POP3ServerFactory:
    store = MaildirStore(os.path.join(root, "%u"))
    return makeServer(store, [memory_checker(alice="secret")],
                      ServerConfig(hostname="test.example", policy=Policy(failure_delay=0)),
                      lock_grace=lock_grace, clock=clock, runtime_dir=runtime_dir)


class RacingClient:
    """The real client; the moment the holder has let go, a third locker takes the mailbox."""

    def __init__(self, inner: HandoffClient, lock: FcntlMailboxLock) -> None:
        self.inner = inner
        self.lock = lock

    def ask(self, holder: LockHolder, user: str) -> Any:
        def released(answer: bool) -> bool:
            if answer:
                self.lock.try_acquire()
            return answer

        return self.inner.ask(holder, user).addCallback(released)


class SilentServer(protocol.Protocol):
    """A unix socket peer that accepts and never answers."""


class ControlSocket(ServerMixin, unittest.TestCase):
    """
    Server A holds the mailbox and listens on the control socket; server B
    (another registry, and a client with an identity of its own) logs in.
    flock locks conflict between open files of one process as between
    processes, so the whole exchange runs here over real sockets.
    """

    timeout = 20

    def setUp(self) -> None:
        self.root = short_tempdir(self)
        self.runtime = short_tempdir(self)
        os.chmod(self.runtime, 0o700)
        self.box = os.path.join(self.root, "alice")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.box, sub))
        for i, content in enumerate((M1, M2), start=1):
            with open(os.path.join(self.box, "new", "17000000%02d.M1P1.test" % i), "wb") as f:
                f.write(content)
        self.clock = task.Clock()
        self.a = maildir_server(self.root, lock_grace=30, runtime_dir=self.runtime, clock=self.clock)
        self.events = record_events(self.a)
        assert self.a.control is not None
        self.addCleanup(self.a.control.stop)
        self.port_a = self.listen(self.a)
        self.b = maildir_server(self.root, lock_grace=30)
        self.b_identity = ProcessIdentity()
        self.b.portal.realm.holders = HandoffClient(identity=self.b_identity, timeout=0.5)  # type: ignore
        self.port_b = self.listen(self.b)

    def files(self) -> list[str]:
        return sorted(name.split(":")[0] for sub in ("new", "cur")
                      for name in os.listdir(os.path.join(self.box, sub)))

    @defer.inlineCallbacks
    def login_b(self) -> Any:
        client = yield self.connect(self.port_b)
        yield client.command(b"USER alice")
        answer = yield client.command(b"PASS secret")
        return client, answer

    def test_control_socket_private_and_named_in_locks(self) -> None:
        path = control_path(self.runtime, os.getpid())
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))
        self.assertEqual(stat.S_IMODE(os.lstat(path).st_mode), 0o600)
        self.assertEqual(this_process.control, path)

    @defer.inlineCallbacks
    def test_idle_session_in_other_process_taken_over(self) -> Any:
        first = yield self.login(port=self.port_a)
        self.assertTrue((yield first.command(b"DELE 1")).startswith(b"+OK"))
        self.assertEqual(read_holder(os.path.join(self.box, LOCK_FILE_NAME)),
                         LockHolder(os.getpid(), this_process.token, control_path(self.runtime, os.getpid()),
                                    "alice"))
        # active (idle less than A's grace): B is told [IN-USE], A's session goes on
        second, answer = yield self.login_b()
        self.assertTrue(answer.startswith(b"-ERR [IN-USE]"), answer)
        self.assertTrue((yield first.command(b"NOOP")).startswith(b"+OK"))
        self.clock.advance(31)
        yield second.command(b"USER alice")
        answer = yield second.command(b"PASS secret")
        self.assertTrue(answer.startswith(b"+OK"), answer)
        yield first.lost
        # A's session ended without UPDATE: its DELE was not applied
        self.assertEqual(len(self.files()), 2)
        self.assertTrue((yield second.command(b"STAT")).startswith(b"+OK 2 "))
        takeovers = [fields for name, fields in self.events if name == "takeover"]
        self.assertEqual(len(takeovers), 1)
        self.assertEqual((takeovers[0]["cross_process"], takeovers[0]["by_pid"], takeovers[0]["user"]),
                         (True, os.getpid(), "alice"))
        logout = [fields for name, fields in self.events if name == "logout"]
        self.assertIn("taken over by a login in process", logout[0]["reason"])

    @defer.inlineCallbacks
    def test_released_but_taken_by_a_third_login(self) -> Any:
        """The holder lets go but another locker wins the race: [IN-USE] after a few tries."""
        yield self.login(port=self.port_a)
        self.clock.advance(31)
        third = FcntlMailboxLock(os.path.join(self.box, LOCK_FILE_NAME), identity=ProcessIdentity())
        self.addCleanup(third.release_now)
        self.b.portal.realm.holders = RacingClient(self.b.portal.realm.holders, third)  # type: ignore
        _, answer = yield self.login_b()
        self.assertTrue(answer.startswith(b"-ERR [IN-USE]"), answer)
        self.assertTrue(third.held)
        self.assertEqual([name for name, _ in self.events if name == "takeover"], ["takeover"])

    @defer.inlineCallbacks
    def test_holder_checks_the_token(self) -> Any:
        """A record naming a previous process with the same pid (another token) is answered 'unknown'."""
        yield self.login(port=self.port_a)
        self.clock.advance(31)
        holder = LockHolder(os.getpid(), "0123456789abcdef", control_path(self.runtime, os.getpid()), "alice")
        released = yield self.b.portal.realm.holders.ask(holder, "alice")  # type: ignore
        self.assertFalse(released)
        self.assertEqual([name for name, _ in self.events if name == "takeover"], [])

    @defer.inlineCallbacks
    def test_holder_without_control_socket(self) -> Any:
        """A holder that takes no requests (no --runtime-dir, an older server): [IN-USE] as before."""
        yield self.a.control.stop()  # type: ignore[union-attr]
        self.assertIsNone(this_process.control)
        first = yield self.login(port=self.port_a)
        self.clock.advance(31)
        _, answer = yield self.login_b()
        self.assertTrue(answer.startswith(b"-ERR [IN-USE]"), answer)
        self.assertTrue((yield first.command(b"NOOP")).startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_holder_gone(self) -> Any:
        """The control socket is gone (the process died; its flock died with it): the login proceeds."""
        yield self.login(port=self.port_a)
        lock_file = os.path.join(self.box, LOCK_FILE_NAME)
        record = open(lock_file, "rb").read()
        yield self.a.control.stop()  # type: ignore[union-attr]
        for connection in list(self.a.connections):
            connection.transport.abortConnection()
        yield task.deferLater(reactor, 0.05, lambda: None)
        # a dead holder's record, left behind
        with open(lock_file, "wb") as f:
            f.write(record)
        _, answer = yield self.login_b()
        self.assertTrue(answer.startswith(b"+OK"), answer)

    @defer.inlineCallbacks
    def test_dead_control_socket_while_locked(self) -> Any:
        """The record names a socket nobody listens on: [IN-USE], at once."""
        lock_file = os.path.join(self.box, LOCK_FILE_NAME)
        dead = os.path.join(self.runtime, "session-999999.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(dead)
        s.close()
        other = ProcessIdentity()
        other.control = dead
        holder = FcntlMailboxLock(lock_file, user="alice", identity=other)
        holder.try_acquire()
        self.addCleanup(holder.release_now)
        _, answer = yield self.login_b()
        self.assertTrue(answer.startswith(b"-ERR [IN-USE]"), answer)

    @defer.inlineCallbacks
    def test_holder_that_never_answers(self) -> Any:
        """A control socket that accepts and stays silent: the request times out, [IN-USE]."""
        silent_path = os.path.join(self.runtime, "silent.sock")
        factory = protocol.Factory.forProtocol(SilentServer)
        silent = reactor.listenUNIX(silent_path, factory)  # type: ignore[attr-defined]
        self.addCleanup(silent.stopListening)
        other = ProcessIdentity()
        other.control = silent_path
        holder = FcntlMailboxLock(os.path.join(self.box, LOCK_FILE_NAME), user="alice", identity=other)
        holder.try_acquire()
        self.addCleanup(holder.release_now)
        # bounded by the client's timeout (0.5 s here), or the login would hang past the test's timeout
        _, answer = yield self.login_b()
        self.assertTrue(answer.startswith(b"-ERR [IN-USE]"), answer)


class Listener(unittest.TestCase):
    @defer.inlineCallbacks
    def test_socket_removed_at_stop(self) -> Any:
        runtime = short_tempdir(self)
        identity = ProcessIdentity()
        listener = ControlListener(runtime, SessionRegistry(), identity=identity)
        self.successResultOf(listener.start())
        path = control_path(runtime, os.getpid())
        self.assertEqual(identity.control, path)
        self.assertTrue(os.path.exists(path))
        yield listener.stop()
        self.assertFalse(os.path.exists(path))
        self.assertIsNone(identity.control)

    @defer.inlineCallbacks
    def test_started_again_while_closing(self) -> Any:
        """The old port removes its socket file once closed: the new one listens after that."""
        runtime = short_tempdir(self)
        identity = ProcessIdentity()
        listener = ControlListener(runtime, SessionRegistry(), identity=identity)
        self.addCleanup(listener.stop)
        yield listener.start()
        listener.stop()
        yield listener.start()
        path = control_path(runtime, os.getpid())
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))
        self.assertEqual(identity.control, path)

    def test_stale_socket_of_our_pid_replaced(self) -> Any:
        runtime = short_tempdir(self)
        path = control_path(runtime, os.getpid())
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
        identity = ProcessIdentity()
        listener = ControlListener(runtime, SessionRegistry(), identity=identity)
        self.addCleanup(listener.stop)
        d = listener.start()
        self.successResultOf(d)
        self.assertEqual(identity.control, path)

    def test_not_a_socket_is_left_alone(self) -> None:
        runtime = short_tempdir(self)
        path = control_path(runtime, os.getpid())
        with open(path, "w") as f:
            f.write("precious")
        identity = ProcessIdentity()
        listener = ControlListener(runtime, SessionRegistry(), identity=identity)
        self.successResultOf(listener.start())
        self.assertIsNone(identity.control)
        self.assertEqual(open(path).read(), "precious")
        self.flushLoggedErrors()


# -- two real twistd pop3 processes ---------------------------------------------------------------


class TwoProcesses(unittest.TestCase):
    """
    Two C{twistd pop3} processes on one Maildir root: a login on B takes
    over A's session once it has sat idle past --lock-grace.
    """

    timeout = 90

    def worlds(self, a_args: list[str], b_args: list[str], b_env: dict[str, str] | None = None
               ) -> tuple[World, World]:
        a = World("handoff-a", a_args)
        a.add_user("carol", "carolpw", simple_messages("carol", 3))
        self.addCleanup(a.stop)
        a.start()
        b = World("handoff-b", b_args)
        self.addCleanup(b.stop)
        # B serves A's Maildirs and users
        b.mail, b.passwd, b.users = a.mail, a.passwd, a.users
        saved = dict(os.environ)
        os.environ.update(b_env or {})
        try:
            b.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return a, b

    def test_idle_session_taken_over_by_the_other_process(self) -> None:
        runtime = short_tempdir(self)
        os.chmod(runtime, 0o700)
        # A is given the directory as an option, B through the environment
        a, b = self.worlds(["--lock-grace", "1", "--runtime-dir", runtime], ["--lock-grace", "1"],
                           {"POPSERVICE_RUNTIME_DIR": runtime})
        self.assertTrue(os.path.exists(control_path(runtime, a.pid)))
        self.assertTrue(os.path.exists(control_path(runtime, b.pid)))
        idle = a.session("carol")
        self.assertTrue(idle.command(b"DELE 1").startswith(b"+OK"))
        # before the grace: [IN-USE]
        early = b.connect()
        self.assertTrue(early.login("carol", "carolpw").startswith(b"-ERR [IN-USE]"))
        early.close()
        time.sleep(1.3)  # A's session now idle past its grace
        client = poplib.POP3("127.0.0.1", b.port, timeout=30)
        client.user("carol")
        self.assertTrue(client.pass_("carolpw").startswith(b"+OK"))
        # A's client sees its connection closed
        idle.sock.settimeout(10)
        try:
            self.assertEqual(idle.sock.recv(100), b"")
        except ConnectionResetError:
            pass
        # ... and nothing of its DELE was applied (no UPDATE)
        self.assertEqual(a.present("carol"), [1, 2, 3])
        count, _size = client.stat()
        self.assertEqual(count, 3)
        self.assertEqual(b"\r\n".join(client.retr(2)[1]) + b"\r\n",
                         a.users["carol"].messages[1].retr)
        client.dele(3)
        client.quit()
        self.assertEqual(a.present("carol"), [1, 2])
        log = a.log_text()
        self.assertIn("pop3 takeover:", log)
        self.assertIn("by_pid=%d cross_process=True" % b.pid, log)

    def test_holder_without_runtime_dir_keeps_the_mailbox(self) -> None:
        runtime = short_tempdir(self)
        a, b = self.worlds(["--lock-grace", "1"], ["--lock-grace", "1", "--runtime-dir", runtime])
        idle = a.session("carol")
        time.sleep(1.3)
        late = b.connect()
        self.assertTrue(late.login("carol", "carolpw").startswith(b"-ERR [IN-USE]"))
        late.close()
        self.assertTrue(idle.command(b"NOOP").startswith(b"+OK"))
        idle.quit()
        # and once it has gone, the other process logs in as usual
        self.assertTrue(b.session("carol").command(b"STAT").startswith(b"+OK 3 "))
