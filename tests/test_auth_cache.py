"""
The authentication cache (L{popservice.auth.cache}, C{--auth-cache-ttl}):
over real loopback sessions against a real passwd-file checker whose hash
verifications are counted.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer, reactor, task
from twisted.python import usage
from twisted.trial import unittest

from popservice import tap
from popservice.auth import crypt_schemes, hashing
from popservice.auth.cache import AuthCache, CachingChecker, install_auth_cache
from popservice.auth.passwdfile import PasswdFileChecker
from popservice.auth.schemes import hash_password
from popservice.sasl.server import mechanisms_from_option
from popservice.server.policy import Policy
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, record_events

MSG = b"Subject: hi\r\n\r\nhello\r\n"


class CacheTestCase(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.patch(crypt_schemes, "SHA_CRYPT_ROUNDS", 1000)
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.path = self.mktemp()
        self.write({"alice": b"secret", "bob": b"hunter2", "carol": b"carol-pw"})
        self.verified: list[int] = []

    def write(self, users: dict[str, bytes]) -> None:
        with open(self.path, "w") as f:
            for user, password in users.items():
                f.write("%s:%s:::::\n" % (user, hash_password(password, "SHA512-CRYPT")))
        # a new inode too, as an atomic rename gives: the change is seen even within the same second
        os.rename(self.path, self.path + ".tmp")
        os.rename(self.path + ".tmp", self.path)

    def counting(self, work: Callable[[], bool]) -> "defer.Deferred[bool]":
        self.verified.append(1)
        return hashing.run_hashing(work)

    def start(self, ttl: float = 3600, negative_ttl: float = 0, size: int = 100,
              failure_delay: float = 0) -> None:
        self.checker = PasswdFileChecker(self.path, self.clock.seconds, run_in_thread=self.counting)
        store = MemoryStore({u: [MSG] for u in ("alice", "bob", "carol")})
        self.factory = make_factory(store, [self.checker],
                                    clock=self.clock, policy=Policy(failure_delay=failure_delay),
                                    sasl=mechanisms_from_option("PLAIN"))
        self.events = record_events(self.factory)
        self.cache = AuthCache(ttl, negative_ttl, size, clock=self.clock)
        self.caching = install_auth_cache(self.factory.portal, self.cache)
        self.listen(self.factory)

    @defer.inlineCallbacks
    def attempt(self, user: str, password: str) -> Any:
        client = yield self.connect()
        yield client.command(b"USER " + user.encode())
        answer = yield client.command(b"PASS " + password.encode())
        yield client.command(b"QUIT")
        return answer

    @defer.inlineCallbacks
    def plain(self, user: str, password: str) -> Any:
        """SASL PLAIN (RFC 4616) with the initial response."""
        client = yield self.connect()
        message = base64.b64encode(b"\x00" + user.encode() + b"\x00" + password.encode())
        answer = yield client.command(b"AUTH PLAIN " + message)
        yield client.command(b"QUIT")
        return answer


class Hits(CacheTestCase):
    @defer.inlineCallbacks
    def test_hit(self) -> Any:
        self.start()
        self.assertTrue((yield self.attempt("alice", "secret")).startswith(b"+OK"))
        self.assertEqual(len(self.verified), 1)
        self.assertTrue((yield self.attempt("alice", "secret")).startswith(b"+OK"))
        self.assertEqual(len(self.verified), 1)

    @defer.inlineCallbacks
    def test_sasl_plain_shares_the_cache(self) -> Any:
        self.start()
        self.assertTrue((yield self.attempt("alice", "secret")).startswith(b"+OK"))
        self.assertTrue((yield self.plain("alice", "secret")).startswith(b"+OK"))
        self.assertEqual(len(self.verified), 1)
        self.assertTrue((yield self.plain("alice", "wrong")).startswith(b"-ERR"))
        self.assertEqual(len(self.verified), 2)

    @defer.inlineCallbacks
    def test_miss_after_ttl(self) -> Any:
        self.start(ttl=60)
        yield self.attempt("alice", "secret")
        self.clock.advance(59)
        yield self.attempt("alice", "secret")
        self.assertEqual(len(self.verified), 1)
        self.clock.advance(1)
        self.assertTrue((yield self.attempt("alice", "secret")).startswith(b"+OK"))
        self.assertEqual(len(self.verified), 2)

    @defer.inlineCallbacks
    def test_wrong_password_after_right_one(self) -> Any:
        self.start(negative_ttl=3600)
        self.assertTrue((yield self.attempt("alice", "secret")).startswith(b"+OK"))
        self.assertTrue((yield self.attempt("alice", "secret2")).startswith(b"-ERR"))
        self.assertTrue((yield self.attempt("alice", "secre")).startswith(b"-ERR"))
        # each different password was verified, not taken from the cache
        self.assertEqual(len(self.verified), 3)
        # and the right one still is
        self.assertTrue((yield self.attempt("alice", "secret")).startswith(b"+OK"))
        self.assertEqual(len(self.verified), 3)

    @defer.inlineCallbacks
    def test_other_user_same_password(self) -> Any:
        self.write({"alice": b"same", "bob": b"same", "carol": b"carol-pw"})
        self.start()
        yield self.attempt("alice", "same")
        self.assertTrue((yield self.attempt("bob", "same")).startswith(b"+OK"))
        self.assertTrue((yield self.attempt("carol", "same")).startswith(b"-ERR"))
        self.assertEqual(len(self.verified), 3)

    @defer.inlineCallbacks
    def test_size_bound(self) -> Any:
        self.start(size=2)
        for user, password in (("alice", "secret"), ("bob", "hunter2"), ("carol", "carol-pw")):
            yield self.attempt(user, password)
        self.assertEqual(len(self.cache), 2)
        self.assertEqual(len(self.verified), 3)
        yield self.attempt("carol", "carol-pw")
        self.assertEqual(len(self.verified), 3)
        yield self.attempt("alice", "secret")  # the least recently used, gone
        self.assertEqual(len(self.verified), 4)

    @defer.inlineCallbacks
    def test_no_plaintext_kept(self) -> Any:
        self.start(negative_ttl=60)
        yield self.attempt("alice", "secret")
        yield self.attempt("alice", "a-wrong-one")
        kept = repr([vars(self.cache), vars(self.cache._positive), vars(self.cache._negative)])
        self.assertNotIn("secret", kept)
        self.assertNotIn("a-wrong-one", kept)


class Invalidation(CacheTestCase):
    @defer.inlineCallbacks
    def test_changed_passwd_file(self) -> Any:
        self.start()
        self.assertTrue((yield self.attempt("alice", "secret")).startswith(b"+OK"))
        self.write({"alice": b"new-secret", "bob": b"hunter2", "carol": b"carol-pw"})
        self.clock.advance(2)  # the checker looks at the file at most once a second
        self.assertTrue((yield self.attempt("alice", "secret")).startswith(b"-ERR"))
        self.assertTrue((yield self.attempt("alice", "new-secret")).startswith(b"+OK"))
        self.assertEqual(len(self.verified), 3)
        self.assertTrue((yield self.attempt("alice", "new-secret")).startswith(b"+OK"))
        self.assertEqual(len(self.verified), 3)

    @defer.inlineCallbacks
    def test_user_removed(self) -> Any:
        self.start()
        yield self.attempt("bob", "hunter2")
        self.write({"alice": b"secret"})
        self.clock.advance(2)
        self.assertTrue((yield self.attempt("bob", "hunter2")).startswith(b"-ERR"))


class Negative(CacheTestCase):
    @defer.inlineCallbacks
    def test_negative_ttl(self) -> Any:
        self.start(negative_ttl=30)
        for _ in range(3):
            self.assertTrue((yield self.attempt("alice", "wrong")).startswith(b"-ERR"))
        self.assertEqual(len(self.verified), 1)
        self.clock.advance(30)
        self.assertTrue((yield self.attempt("alice", "wrong")).startswith(b"-ERR"))
        self.assertEqual(len(self.verified), 2)

    @defer.inlineCallbacks
    def test_no_negative_ttl_no_negative_entries(self) -> Any:
        self.start(negative_ttl=0)
        yield self.attempt("alice", "wrong")
        yield self.attempt("alice", "wrong")
        self.assertEqual(len(self.verified), 2)
        self.assertEqual(len(self.cache), 0)

    @defer.inlineCallbacks
    def test_failure_delay_kept_for_cached_failures(self) -> Any:
        self.start(negative_ttl=3600, failure_delay=5.0)
        answers = []
        for _ in range(2):
            client = yield self.connect()
            yield client.command(b"USER alice")
            client.send(b"PASS wrong\r\n")
            answer = client.line()
            for _ in range(500):
                if len([e for e in self.events if e[0] == "login_failed"]) > len(answers):
                    break
                yield task.deferLater(reactor, 0.01, lambda: None)
            self.assertFalse(answer.called)  # held by the failure delay, cached or not
            self.clock.advance(60)
            answers.append((yield answer))
        self.assertTrue(all(a.startswith(b"-ERR") for a in answers), answers)
        self.assertEqual(len(self.verified), 1)

    @defer.inlineCallbacks
    def test_right_password_after_cached_failure(self) -> Any:
        self.start(negative_ttl=3600)
        yield self.attempt("alice", "wrong")
        self.assertTrue((yield self.attempt("alice", "secret")).startswith(b"+OK"))


class Options(unittest.TestCase):
    def options(self, *extra: str) -> tap.Options:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice:{PLAIN}secret:::::\n")
        options = tap.Options()
        options.parseOptions(["--auth", "passwd-file:" + path, "--mail", "maildir:/nonexistent/%u",
                              "--listen", "tcp:0:interface=127.0.0.1", *extra])
        return options

    def test_off_by_default(self) -> None:
        factory = tap.make_factory(self.options())
        self.assertNotIsInstance(factory.portal.checkers[IUsernamePassword], CachingChecker)

    def test_on(self) -> None:
        factory = tap.make_factory(self.options("--auth-cache-ttl", "300", "--auth-cache-negative-ttl", "60",
                                                "--auth-cache-size", "5"))
        caching = factory.portal.checkers[IUsernamePassword]
        self.assertIsInstance(caching, CachingChecker)
        self.assertEqual((caching.cache.ttl, caching.cache.negative_ttl, caching.cache._positive.size),
                         (300, 60, 5))
        # the checkers behind it are still found (SASL secrets, reloads)
        self.assertIn(type(caching.checkers[0]).__name__, {"PasswdFileChecker"})
        self.assertIn(caching.checkers[0], factory.all_checkers())

    def test_bad_values(self) -> None:
        for extra in (("--auth-cache-ttl", "-1"), ("--auth-cache-negative-ttl", "-5"),
                      ("--auth-cache-size", "0"), ("--auth-cache-ttl", "inf")):
            self.assertRaises(usage.UsageError, self.options, *extra)
