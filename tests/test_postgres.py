"""
The PostgreSQL store against a real PostgreSQL (tests/pg.py): the lease as a
cluster-wide session lock (expiry on the database clock, idle take-over across
front ends, a stalled holder's UPDATE refused, a lost lease ending the
session), the schema check, and real POP3 sessions over a socket (poplib).
"""

from __future__ import annotations

import poplib
from typing import Any

import psycopg
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from popservice import wire
from popservice.database import schema
from popservice.interfaces import MailboxInUse
from popservice.stores.postgres import PostgresStore
from tests import pg
from tests.support import ServerMixin, make_factory, memory_checker, record_events
from tests.test_store_contract import MESSAGES, crlf


def sleep(seconds: float) -> "defer.Deferred[None]":
    return task.deferLater(reactor, seconds, lambda: None)


class PostgresTestCase(unittest.TestCase):
    skip = pg.SKIP

    def setUp(self) -> None:
        self.url = pg.fresh_database()

    def store(self, **kw: Any) -> PostgresStore:
        store = PostgresStore.from_description(self.url, **kw)
        self.addCleanup(store.db.close)
        return store

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            cur = conn.execute(query, args)
            rows = cur.fetchall() if cur.description else []
            conn.commit()
        return rows

    @defer.inlineCallbacks
    def fill(self, store: PostgresStore, user: str = "alice") -> Any:
        for message in MESSAGES:
            yield store.deliver(user, None, message, None)


class Lease(PostgresTestCase):
    @defer.inlineCallbacks
    def test_in_use_on_another_front_end_then_free_after_expiry(self) -> Any:
        # Front end A never renews (its clock never moves): as if it had been SIGKILLed.
        a = self.store(lease_ttl=1.0, clock=task.Clock())
        b = self.store(lease_ttl=1.0)
        yield self.fill(a)
        held = yield a.open_mailbox("alice", None)
        yield self.assertFailure(b.open_mailbox("alice", None), MailboxInUse)
        yield sleep(1.2)
        taken = yield b.open_mailbox("alice", None)
        self.assertEqual(len((yield taken.listing())), 3)
        self.assertEqual(self.sql("SELECT generation FROM leases"), [(2,)])
        # A stalled past its lease: its UPDATE deletes nothing.
        failed = yield held.delete([0, 1])
        self.assertEqual(failed, [0, 1])
        self.assertEqual(self.sql("SELECT count(*) FROM messages"), [(3,)])
        yield held.close()  # releasing a lease it no longer holds leaves the new holder alone
        yield self.assertFailure(a.open_mailbox("alice", None), MailboxInUse)
        self.assertEqual(len((yield taken.delete([2]))), 0)
        yield taken.close()
        self.assertEqual(self.sql("SELECT count(*) FROM messages"), [(2,)])

    @defer.inlineCallbacks
    def test_idle_holder_taken_over_across_front_ends(self) -> Any:
        clock = task.Clock()
        a = self.store(lease_ttl=30.0, clock=clock)
        b = self.store(lease_ttl=30.0, lock_grace=5.0)
        held = yield a.open_mailbox("alice", None)
        lost: list[str] = []
        held.watch(lambda: 2.0, lost.append)
        clock.advance(10.0)  # a renewal: idle 2 s
        yield sleep(0.2)
        yield self.assertFailure(b.open_mailbox("alice", None), MailboxInUse)
        held.watch(lambda: 60.0, lost.append)
        clock.advance(10.0)  # a renewal: idle 60 s, past B's grace
        yield sleep(0.2)
        taken = yield b.open_mailbox("alice", None)
        self.assertEqual(lost, [])
        clock.advance(10.0)  # A's next renewal finds the generation changed
        for _ in range(50):
            if lost:
                break
            yield sleep(0.02)
        self.assertEqual(lost, ["mailbox taken over by another session"])
        yield taken.close()
        yield held.close()

    @defer.inlineCallbacks
    def test_release_frees_at_once(self) -> Any:
        a, b = self.store(), self.store()
        held = yield a.open_mailbox("alice", None)
        yield held.close()
        again = yield b.open_mailbox("alice", None)
        yield again.close()
        self.assertEqual(self.sql("SELECT generation FROM leases"), [(2,)])


class Schema(PostgresTestCase):
    def setUp(self) -> None:
        self.url = pg.fresh_database(upgrade=False)

    @defer.inlineCallbacks
    def test_store_refuses_an_old_schema_until_upgraded(self) -> Any:
        store = self.store()
        d = store.open_mailbox("alice", None)
        from popservice.interfaces import MailboxUnavailable

        failure = yield self.assertFailure(d, MailboxUnavailable)
        self.assertIn("popservice db upgrade", str(failure))
        with psycopg.connect(self.url) as conn:
            self.assertEqual(schema.upgrade(conn), [schema.SCHEMA_VERSION])
            self.assertEqual(schema.upgrade(conn), [])  # idempotent
        mailbox = yield store.open_mailbox("alice", None)
        yield mailbox.close()


class PostgresServer(ServerMixin, PostgresTestCase):
    """Real POP3 sessions (poplib, raw sockets) against a PostgreSQL-backed server."""

    @defer.inlineCallbacks
    def test_poplib_session(self) -> Any:
        store = self.store()
        yield self.fill(store)
        port = self.listen(make_factory(store, [memory_checker(alice="secret")]))

        def session() -> tuple[Any, ...]:
            client = poplib.POP3("127.0.0.1", port, timeout=10)
            client.user("alice")
            client.pass_("secret")
            stat = client.stat()
            sizes = [int(line.split()[1]) for line in client.list()[1]]
            uidls = client.uidl()[1]
            client.sock.sendall(b"RETR 2\r\n")
            raw = b""
            while not raw.endswith(b"\r\n.\r\n"):
                raw += client.sock.recv(65536)
            client.dele(1)
            quit_answer = client.quit()
            return stat, sizes, uidls, raw, quit_answer

        stat, sizes, uidls, raw, quit_answer = yield threads.deferToThread(session)
        self.assertEqual(stat, (3, sum(wire.transmitted_size([m]) for m in MESSAGES)))
        self.assertEqual(sizes, [wire.transmitted_size([m]) for m in MESSAGES])
        self.assertEqual(len(uidls), 3)
        encoder = wire.BodyEncoder()
        expected = encoder.encode(MESSAGES[1]) + encoder.finish()
        self.assertEqual(raw, b"+OK %d octets\r\n" % (sizes[1],) + expected)
        self.assertEqual(crlf(MESSAGES[1]) + b"\r\n", expected.replace(b"\r\n..", b"\r\n.")[:-3])
        self.assertTrue(quit_answer.startswith(b"+OK"))
        self.assertEqual(self.sql("SELECT count(*) FROM messages"), [(2,)])

    @defer.inlineCallbacks
    def test_in_use_and_lost_lease_end_the_session(self) -> Any:
        clock = task.Clock()
        store = self.store(lease_ttl=30.0, clock=clock)
        yield self.fill(store)
        factory = make_factory(store, [memory_checker(alice="secret")])
        events = record_events(factory)
        self.listen(factory)
        client = yield self.login()
        other = yield self.connect()
        yield other.command(b"USER alice")
        self.assertTrue((yield other.command(b"PASS secret")).startswith(b"-ERR [IN-USE]"))
        # Another front end takes the mailbox over (as after an idle grace): our
        # next renewal finds out and the session ends without UPDATE.
        yield client.command(b"DELE 1")
        self.sql("UPDATE leases SET generation = generation + 1, holder = 'elsewhere'")
        clock.advance(10.0)
        yield client.lost
        logout = [f for name, f in events if name == "logout"][-1]
        self.assertEqual(logout["reason"], "mailbox taken over by another session")
        self.assertEqual(self.sql("SELECT count(*) FROM messages"), [(3,)])


class Retries(PostgresTestCase):
    """SQLSTATE 40001 (what CockroachDB and YugabyteDB raise under contention) is retried."""

    @defer.inlineCallbacks
    def test_serialization_failure_retried(self) -> Any:
        from popservice.database import Database

        db = Database(self.url)
        self.addCleanup(db.close)
        attempts: list[int] = []

        def work(cursor: Any) -> str:
            attempts.append(1)
            cursor.execute("INSERT INTO mailboxes (name) VALUES (%s)", ("try%d" % len(attempts),))
            if len(attempts) < 3:
                # a real serialization failure from the server, after a write that must roll back
                cursor.execute("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            return "done"

        self.assertEqual((yield db.run(work)), "done")
        self.assertEqual(len(attempts), 3)
        self.assertEqual(self.sql("SELECT name FROM mailboxes"), [("try3",)])

    @defer.inlineCallbacks
    def test_other_errors_are_not_retried(self) -> Any:
        from popservice.database import Database

        db = Database(self.url)
        self.addCleanup(db.close)
        attempts: list[int] = []

        def work(cursor: Any) -> None:
            attempts.append(1)
            cursor.execute("SELECT no_such_column FROM mailboxes")

        yield self.assertFailure(db.run(work), psycopg.errors.UndefinedColumn)
        self.assertEqual(len(attempts), 1)
