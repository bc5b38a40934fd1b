"""
No reactor stalls: the slow work of a login (the first scan and sizing of a
big Maildir, password hashes) runs off the reactor thread, and password
hashing has a thread pool of its own, so neither starves the other nor the
other sessions.  Asserted by structure (which thread, what is answered while
the slow part is held), never by time; C{bench/stalls.py} measures.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from popservice.auth import crypt_schemes, hashing, passwdfile
from popservice.auth.passwdfile import PasswdFileChecker
from popservice.auth.schemes import hash_password
from popservice.server.policy import Policy
from popservice.stores.maildir import store as maildir_store
from popservice.stores.maildir.store import MaildirStore
from popservice.stores.maildir.work import MAILDIR_THREADS, maildir_pool
from tests.support import ServerMixin, make_factory
from tests.test_passwdfile import VECTORS

BODY = b"Subject: m\n\n" + b"a line of a message body\n" * 20


def make_maildir(path: str, count: int) -> None:
    """C{count} messages in cur/, named as deliveries name them, without C{,W=}: each is read for its size."""
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub))
    cur = os.path.join(path, "cur")
    for i in range(count):
        with open(os.path.join(cur, "%d.M%dP1.test,S=%d:2," % (1700000000 + i, i, len(BODY))), "wb") as f:
            f.write(BODY)


def cheap_costs(case: unittest.TestCase) -> None:
    case.patch(crypt_schemes, "SHA_CRYPT_ROUNDS", 1000)
    case.patch(crypt_schemes, "ARGON2_TIME_COST", 1)
    case.patch(crypt_schemes, "ARGON2_MEMORY_COST", 64)


def pause(seconds: float = 0.01) -> "defer.Deferred[None]":
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def until(condition: Callable[[], bool], turns: int = 2000) -> Any:
    """Let the reactor run until C{condition()} holds (a bounded number of turns)."""
    for _ in range(turns):
        if condition():
            return
        yield pause()
    raise AssertionError("condition never held")


class Gate:
    """Holds a function run in a thread until opened; records the thread it ran in."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.started = threading.Event()
        self.open = threading.Event()
        self.threads: list[int] = []
        self.names: list[str] = []

    def __call__(self, *args: Any) -> Any:
        self.threads.append(threading.get_ident())
        self.names.append(threading.current_thread().name)
        self.started.set()
        # bounded: a scan wrongly run on the reactor thread would hold it this long, then the test fails
        self.open.wait(5)
        return self.function(*args)


class MaildirWorld(ServerMixin):
    def world(self, **users: int) -> str:
        root = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(root)
        passwd = os.path.join(root, "passwd")
        with open(passwd, "w") as f:
            for user, count in users.items():
                f.write("%s:{PLAIN}pw-%s:::::\n" % (user, user))
                make_maildir(os.path.join(root, "mail", user), count)
        checker = PasswdFileChecker(passwd)
        store = MaildirStore(os.path.join(root, "mail", "%u"))
        self.listen(make_factory(store, [checker], policy=Policy(failure_delay=0)))
        return root


class ColdScanOffReactor(MaildirWorld, unittest.TestCase):
    """The first login of a 10,000-message Maildir (no index): other sessions are served meanwhile."""

    @defer.inlineCallbacks
    def test_other_session_answered_during_cold_scan(self) -> Any:
        self.world(bigbox=10_000, probe=2)
        gate = Gate(maildir_store.scan_maildir)
        self.patch(maildir_store, "scan_maildir", gate)
        gate.open.set()  # the probe's own (small) scan passes
        probe = yield self.login("probe", "pw-probe")
        # the big login's scan is held in its thread
        gate.open.clear()
        gate.started.clear()
        big = yield self.connect()
        yield big.command(b"USER bigbox")
        big.send(b"PASS pw-bigbox\r\n")
        answer = big.line()
        yield until(gate.started.is_set)
        for _ in range(3):
            self.assertEqual((yield probe.command(b"NOOP")), b"+OK")
            self.assertTrue((yield probe.command(b"STAT")).startswith(b"+OK 2 "))
        self.assertFalse(answer.called)
        self.assertFalse(gate.open.is_set())
        gate.open.set()
        self.assertTrue((yield answer).startswith(b"+OK"))
        self.assertTrue((yield big.command(b"STAT")).startswith(b"+OK 10000 "))
        self.assertNotIn(threading.get_ident(), gate.threads)


class HashingPoolApart(MaildirWorld, unittest.TestCase):
    """Password hashes are verified in a pool of their own: neither pool waits for the other."""

    def saturate(self, run: Callable[[Callable[[], Any]], Any], size: int) -> threading.Event:
        gate = threading.Event()
        self.addCleanup(gate.set)
        for _ in range(size):
            run(lambda: gate.wait(20))
        return gate

    @defer.inlineCallbacks
    def test_store_scans_not_behind_hashes(self) -> Any:
        self.world(alice=300)
        gate = self.saturate(hashing.run_hashing, hashing.hashing_pool.size)
        yield until(lambda: hashing.hashing_pool.busy() == hashing.hashing_pool.size)
        client = yield self.login("alice", "pw-alice")
        self.assertTrue((yield client.command(b"STAT")).startswith(b"+OK 300 "))
        self.assertFalse(gate.is_set())

    @defer.inlineCallbacks
    def test_hashes_not_behind_store_work(self) -> Any:
        cheap_costs(self)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("carol:%s\nbob:%s\n" % (hash_password(b"secret", "ARGON2ID"),
                                            hash_password(b"secret", "SHA512-CRYPT")))
        checker = PasswdFileChecker(path)
        pool = reactor.getThreadPool()  # type: ignore[attr-defined]
        gate = self.saturate(lambda f: reactor.callInThread(f), pool.max)  # type: ignore[attr-defined]
        yield until(lambda: len(pool.working) == pool.max)
        self.assertEqual((yield checker.requestAvatarId(UsernamePassword(b"carol", b"secret"))), "carol")
        self.assertEqual((yield checker.requestAvatarId(UsernamePassword(b"bob", b"secret"))), "bob")
        self.assertFalse(gate.is_set())
    test_hashes_not_behind_store_work.timeout = 15  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_every_slow_scheme_and_unknown_users_in_the_pool(self) -> Any:
        cheap_costs(self)
        made = ["ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "SCRAM-SHA-256",
                "SCRAM-SHA-1"]
        # schemes hash_password does not make: Dovecot's vectors (password "secret")
        vectors = {name: VECTORS[name] for name in ("MD5-CRYPT", "DES-CRYPT", "CRYPT", "PBKDF2")}
        slow = made + list(vectors)
        self.patch(crypt_schemes, "BCRYPT_ROUNDS", 4)
        path = self.mktemp()
        with open(path, "w") as f:
            for scheme in made:
                f.write("u-%s:%s\n" % (scheme.lower(), hash_password(b"secret", scheme)))
            for scheme, hashed in vectors.items():
                f.write("u-%s:%s\n" % (scheme.lower(), hashed))
            f.write("plain:{PLAIN}secret\n")
        ran: list[int] = []

        def recording(work: Callable[[], bool]) -> "defer.Deferred[bool]":
            def counted() -> bool:
                ran.append(threading.get_ident())
                return work()

            return hashing.run_hashing(counted)

        checker = PasswdFileChecker(path, run_in_thread=recording)
        for scheme in slow:
            user = "u-" + scheme.lower()
            answer = yield checker.requestAvatarId(UsernamePassword(user.encode(), b"secret"))
            self.assertEqual(answer, user)
        self.assertEqual(len(ran), len(slow))
        # unknown users cost a real-looking hash, in the pool too
        yield self.assertFailure(checker.requestAvatarId(UsernamePassword(b"nobody", b"x")), Exception)
        self.assertEqual(len(ran), len(slow) + 1)
        # microseconds of work stay on the reactor
        self.assertEqual((yield checker.requestAvatarId(UsernamePassword(b"plain", b"secret"))), "plain")
        self.assertEqual(len(ran), len(slow) + 1)
        self.assertNotIn(threading.get_ident(), ran)


class MaildirPoolApart(MaildirWorld, unittest.TestCase):
    """Maildir file system work runs in a bounded pool of its own, not in the reactor's."""

    @defer.inlineCallbacks
    def test_cold_login_while_reactor_pool_is_full(self) -> Any:
        self.world(alice=30)
        pool = reactor.getThreadPool()  # type: ignore[attr-defined]
        gate = threading.Event()
        self.addCleanup(gate.set)
        for _ in range(pool.max):
            reactor.callInThread(gate.wait, 20)  # type: ignore[attr-defined]
        yield until(lambda: len(pool.working) == pool.max)
        scan = Gate(maildir_store.scan_maildir)
        scan.open.set()
        self.patch(maildir_store, "scan_maildir", scan)
        client = yield self.login("alice", "pw-alice")
        self.assertTrue((yield client.command(b"STAT")).startswith(b"+OK 30 "))
        self.assertFalse(gate.is_set())
        self.assertEqual(len(scan.names), 1)
        self.assertIn("popservice-maildir", scan.names[0])

    @defer.inlineCallbacks
    def test_burst_of_first_logins_holds_at_most_the_pool_size(self) -> Any:
        users = {"u%d" % i: 3 for i in range(MAILDIR_THREADS * 3)}
        self.world(**users)
        scan = Gate(maildir_store.scan_maildir)
        self.patch(maildir_store, "scan_maildir", scan)
        clients = []
        answers = []
        for user in users:
            client = yield self.connect()
            yield client.command(b"USER " + user.encode())
            client.send(b"PASS pw-%s\r\n" % user.encode())
            clients.append(client)
            answers.append(client.line())
        yield until(lambda: maildir_pool.busy() == MAILDIR_THREADS)
        yield pause(0.05)
        # the rest wait in the pool's queue: no further thread was started for them
        self.assertEqual(maildir_pool.threads(), MAILDIR_THREADS)
        self.assertEqual(len(scan.threads), MAILDIR_THREADS)
        self.assertFalse(any(answer.called for answer in answers))
        scan.open.set()
        for answer in answers:
            self.assertTrue((yield answer).startswith(b"+OK"))
        self.assertEqual(len(scan.threads), len(users))
        self.assertLessEqual(len(set(scan.threads)), MAILDIR_THREADS)
        self.assertNotIn(threading.get_ident(), scan.threads)


class PasswdFileParsedOffReactor(unittest.TestCase):
    """A big changed passwd-file is parsed in a thread; logins wait for the new copy."""

    def write(self, path: str, alice: str, users: int) -> None:
        with open(path + ".new", "w") as f:
            f.write("alice:{PLAIN}%s:::::\n" % (alice,))
            for i in range(users):
                f.write("user%d:{PLAIN}pw%d::::/home/user%d::\n" % (i, i, i))
        os.rename(path + ".new", path)

    @defer.inlineCallbacks
    def test_big_file_parsed_in_thread(self) -> Any:
        clock = task.Clock()
        path = self.mktemp()
        self.write(path, "old", 2000)
        self.assertGreater(os.path.getsize(path), passwdfile.INLINE_PARSE_BYTES)
        checker = PasswdFileChecker(path, clock.seconds)
        self.assertIsNotNone(checker.record("user1999"))  # at start-up: read at once, whatever the size
        version = checker.records_version()
        gate = Gate(passwdfile.parse_passwd_file)
        self.patch(passwdfile, "parse_passwd_file", gate)
        self.write(path, "new", 2000)
        clock.advance(2)
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"new"))
        yield until(gate.started.is_set)
        self.assertFalse(d.called)
        self.assertNotIn(checker.records_version(), (version, version + 1))  # nothing cached meanwhile
        gate.open.set()
        self.assertEqual((yield d), "alice")
        self.assertEqual(checker.records_version(), version + 1)
        self.assertNotIn(threading.get_ident(), gate.threads)
        old = checker.requestAvatarId(UsernamePassword(b"alice", b"old"))
        yield self.assertFailure(old, UnauthorizedLogin)

    def test_small_file_parsed_at_once(self) -> None:
        clock = task.Clock()
        path = self.mktemp()
        self.write(path, "old", 10)
        checker = PasswdFileChecker(path, clock.seconds)
        self.write(path, "new", 11)
        clock.advance(2)
        self.assertEqual(checker.record("user10").home, "/home/user10")  # type: ignore[union-attr]
