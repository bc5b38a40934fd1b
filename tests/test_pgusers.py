"""
C{--auth postgresql://...}: users from the C{users} table of a real
PostgreSQL (tests/pg.py) with the passwd-file's schemes and extra fields, so
USER/PASS, APOP, SCRAM, nologin and LOGIN-DELAY work as with a passwd-file;
through real POP3 sessions over a socket, and through C{twistd pop3}'s options.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import psycopg
from twisted.cred.strcred import InvalidAuthArgumentString
from twisted.internet import defer
from twisted.trial import unittest

from popservice.auth import crypt_schemes
from popservice.auth.passwdfile import hash_password, scram_extra_fields
from popservice.auth.pgusers import PostgresUserChecker, PostgresUserCheckerFactory
from popservice.sasl.server import mechanisms_from_option
from popservice.stores.memory import MemoryStore
from tests import pg
from tests.support import ServerMixin, make_factory
from tests.test_sasl_mechanisms import GS2Client
from tests.test_sasl_server import b64, unb64

MESSAGE = b"Subject: pg\n\nbody\n"


def sync_thread(f: Any) -> "defer.Deferred[Any]":
    return defer.succeed(f())


class PostgresUsers(ServerMixin, unittest.TestCase):
    skip = pg.SKIP

    def setUp(self) -> None:
        self.patch(crypt_schemes, "ARGON2_TIME_COST", 1)
        self.patch(crypt_schemes, "ARGON2_MEMORY_COST", 64)
        self.url = pg.fresh_database()
        scram = dict(kv.split("=", 1) for kv in scram_extra_fields("bobpw").split())
        self.insert("alice", "{PLAIN}secret", "/home/alice", {})
        self.insert("bob", hash_password("bobpw", "ARGON2ID"), None, scram)
        self.insert("carol", hash_password("carolpw", "SCRAM-SHA-256"), None, {"login_delay": 3600})
        self.insert("eve", "{PLAIN}evepw", None, {"nologin": True})
        self.store = MemoryStore({u: [MESSAGE] for u in ("alice", "bob", "carol", "eve", "dave")})
        self.checker = PostgresUserChecker(self.url, run_in_thread=sync_thread)
        self.addCleanup(self.checker.db.close)
        self.checker.load_now()

    def insert(self, name: str, password: str, home: str | None, extra: dict[str, Any]) -> None:
        with psycopg.connect(self.url) as conn:
            conn.execute("INSERT INTO users (name, password, home, extra) VALUES (%s, %s, %s, %s)",
                         (name, password, home, json.dumps(extra)))

    def start(self) -> int:
        return self.listen(make_factory(self.store, [self.checker],
                                        sasl=mechanisms_from_option("SCRAM-SHA-256,PLAIN")))

    @defer.inlineCallbacks
    def test_user_pass_every_scheme(self) -> Any:
        self.start()
        for user, password in (("alice", "secret"), ("bob", "bobpw"), ("carol", "carolpw")):
            client = yield self.connect()
            yield client.command(b"USER " + user.encode())
            r = yield client.command(b"PASS " + password.encode())
            self.assertEqual(r, b"+OK Logged in, 1 messages", user)
        client = yield self.connect()
        yield client.command(b"USER bob")
        self.assertTrue((yield client.command(b"PASS wrong")).startswith(b"-ERR [AUTH]"))

    @defer.inlineCallbacks
    def test_nologin_and_unknown_refused(self) -> Any:
        self.start()
        for user, password in (("eve", "evepw"), ("dave", "x")):
            client = yield self.connect()
            yield client.command(b"USER " + user.encode())
            self.assertTrue((yield client.command(b"PASS " + password.encode())).startswith(b"-ERR [AUTH]"))

    @defer.inlineCallbacks
    def test_apop_for_a_recoverable_password(self) -> Any:
        self.start()
        client = yield self.connect()
        stamp = re.search(rb"<[^>]+>", client.greeting).group(0)  # type: ignore[union-attr]
        digest = hashlib.md5(stamp + b"secret").hexdigest().encode()
        self.assertTrue((yield client.command(b"APOP alice " + digest)).startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_scram_from_stored_keys_and_the_extra_field(self) -> Any:
        self.start()
        for user, password in (("carol", "carolpw"), ("bob", "bobpw"), ("alice", "secret")):
            client = yield self.connect()
            c = GS2Client("SCRAM-SHA-256", user, password)
            first = yield client.command(b"AUTH SCRAM-SHA-256 " + b64(c.first()))
            final = yield client.command(b64(c.final(unb64(first))))
            c.check(unb64(final))
            self.assertEqual((yield client.command(b"")), b"+OK Logged in, 1 messages", user)

    @defer.inlineCallbacks
    def test_login_delay_from_the_extra_field(self) -> Any:
        self.start()
        client = yield self.connect()
        _, capa = yield client.command_multi(b"CAPA")
        yield client.command(b"USER carol")
        self.assertTrue((yield client.command(b"PASS carolpw")).startswith(b"+OK"))
        _, capa = yield client.command_multi(b"CAPA")
        self.assertIn(b"LOGIN-DELAY 3600", capa)
        yield client.command(b"QUIT")
        yield client.lost
        again = yield self.connect()
        yield again.command(b"USER carol")
        self.assertTrue((yield again.command(b"PASS carolpw")).startswith(b"-ERR [LOGIN-DELAY]"))

    @defer.inlineCallbacks
    def test_refresh_sees_new_and_changed_users(self) -> Any:
        self.insert("dave", "{PLAIN}davepw", None, {})
        self.assertIsNone(self.checker.record("dave"))
        yield self.checker.refresh()
        self.assertIsNotNone(self.checker.record("dave"))
        self.start()
        client = yield self.connect()
        yield client.command(b"USER dave")
        self.assertTrue((yield client.command(b"PASS davepw")).startswith(b"+OK"))

    def test_home_directory(self) -> None:
        self.assertEqual(self.checker.home("alice"), "/home/alice")
        self.assertIsNone(self.checker.home("bob"))


class StrcredFactory(unittest.TestCase):
    skip = pg.SKIP

    def test_generates_a_loaded_checker(self) -> None:
        url = pg.fresh_database()
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO users (name, password) VALUES ('zed', '{PLAIN}z')")
        checker = PostgresUserCheckerFactory().generateChecker(url[len("postgresql:"):])
        self.addCleanup(checker.db.close)
        self.assertIsNotNone(checker.record("zed"))

    def test_twistd_options(self) -> None:
        from popservice.tap import Options

        url = pg.fresh_database()
        options = Options()
        options.parseOptions(["--auth", url, "--mail", url, "--listen", "tcp:0"])
        (checker,) = [c for c in options["credCheckers"] if isinstance(c, PostgresUserChecker)]
        self.addCleanup(checker.db.close)

    def test_unreachable_database_is_one_clear_error(self) -> None:
        factory = PostgresUserCheckerFactory()
        with self.assertRaises(InvalidAuthArgumentString) as caught:
            factory.generateChecker("//nobody@127.0.0.1:1/none?connect_timeout=2")
        self.assertIn("cannot read the users table", str(caught.exception))
