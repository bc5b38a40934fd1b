"""
One contract, every store: the same tests run against the Maildir store and
the PostgreSQL store (a real server started by the suite, see tests/pg.py).
Mail goes in through L{IMailDelivery} and comes out through L{IMailStore} /
L{IMailbox}, as LMTP and a POP3 session use them.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from popservice import wire
from popservice.interfaces import IMailDelivery, MailboxInUse, MessageInfo
from tests import pg

MESSAGES = [
    b"Subject: one\n\nfirst body\n",
    b"Subject: two\r\n\r\n.dot line\r\nlast line without newline",
    b"Subject: empty\n\n",
]


async def read_all(mailbox: Any, index: int) -> bytes:
    stream = await defer.maybeDeferred(mailbox.open, index)
    out = []
    try:
        while True:
            chunk = await defer.maybeDeferred(stream.read)
            if not chunk:
                break
            out.append(chunk)
    finally:
        stream.close()
    return b"".join(out)


def crlf(data: bytes) -> bytes:
    norm = wire.LineEndNormaliser()
    return norm.feed(data) + norm.finish()


class StoreContract:
    """Mixed into a TestCase that defines C{make_store(**kw)}."""

    def make_store(self, **kw: Any) -> Any:
        raise NotImplementedError

    async def deliver(self, store: Any, user: str, message: bytes, key: str | None = None) -> bool:
        stored: bool = await store.deliver(user, None, message, key)
        return stored

    async def open(self, store: Any, user: str = "alice") -> Any:
        return await store.open_mailbox(user, None)

    @defer.inlineCallbacks
    def test_delivered_mail_is_listed_and_read_back(self) -> Any:
        store = self.make_store()
        self.assertTrue(IMailDelivery.providedBy(store))
        for message in MESSAGES:
            self.assertTrue((yield defer.Deferred.fromCoroutine(self.deliver(store, "alice", message))))
        mailbox = yield defer.Deferred.fromCoroutine(self.open(store))
        listing = yield mailbox.listing()
        self.assertEqual([m.size for m in listing], [wire.transmitted_size([m]) for m in MESSAGES])
        self.assertEqual(len({m.uid for m in listing}), 3)
        for i, message in enumerate(MESSAGES):
            body = yield defer.Deferred.fromCoroutine(read_all(mailbox, i))
            self.assertEqual(crlf(body), crlf(message))
        yield mailbox.close()

    @defer.inlineCallbacks
    def test_uidls_stable_and_deletion_in_update(self) -> Any:
        store = self.make_store()
        for message in MESSAGES:
            yield defer.Deferred.fromCoroutine(self.deliver(store, "alice", message))
        first = yield defer.Deferred.fromCoroutine(self.open(store))
        listing: list[MessageInfo] = yield first.listing()
        failed = yield first.delete([1])
        self.assertEqual(failed, [])
        yield first.close()
        second = yield defer.Deferred.fromCoroutine(self.open(store))
        after: list[MessageInfo] = yield second.listing()
        self.assertEqual([m.uid for m in after], [listing[0].uid, listing[2].uid])
        yield second.close()

    @defer.inlineCallbacks
    def test_second_session_is_in_use_until_the_first_closes(self) -> Any:
        store = self.make_store()
        first = yield defer.Deferred.fromCoroutine(self.open(store))
        yield self.assertFailure(defer.Deferred.fromCoroutine(self.open(store)), MailboxInUse)
        yield first.close()
        second = yield defer.Deferred.fromCoroutine(self.open(store))
        yield second.close()

    @defer.inlineCallbacks
    def test_delivery_during_a_session_shows_at_the_next_login(self) -> Any:
        store = self.make_store()
        yield defer.Deferred.fromCoroutine(self.deliver(store, "alice", MESSAGES[0]))
        session = yield defer.Deferred.fromCoroutine(self.open(store))
        # Delivery never takes the session lock.
        self.assertTrue((yield defer.Deferred.fromCoroutine(self.deliver(store, "alice", MESSAGES[1]))))
        self.assertEqual(len((yield session.listing())), 1)
        yield session.close()
        session = yield defer.Deferred.fromCoroutine(self.open(store))
        self.assertEqual(len((yield session.listing())), 2)
        yield session.close()

    @defer.inlineCallbacks
    def test_a_retried_delivery_is_stored_once(self) -> Any:
        store = self.make_store()
        key = "<retry@example.org>:digest"
        self.assertTrue((yield defer.Deferred.fromCoroutine(self.deliver(store, "alice", MESSAGES[0], key))))
        self.assertFalse((yield defer.Deferred.fromCoroutine(self.deliver(store, "alice", MESSAGES[0], key))))
        # The same key for another user is another message.
        self.assertTrue((yield defer.Deferred.fromCoroutine(self.deliver(store, "bob", MESSAGES[0], key))))
        session = yield defer.Deferred.fromCoroutine(self.open(store))
        self.assertEqual(len((yield session.listing())), 1)
        yield session.close()

    @defer.inlineCallbacks
    def test_users_apart(self) -> Any:
        store = self.make_store()
        yield defer.Deferred.fromCoroutine(self.deliver(store, "alice", MESSAGES[0]))
        bob = yield defer.Deferred.fromCoroutine(self.open(store, "bob"))
        self.assertEqual((yield bob.listing()), [])
        alice = yield defer.Deferred.fromCoroutine(self.open(store, "alice"))  # bob's lock is not alice's
        yield bob.close()
        yield alice.close()


class MaildirContract(StoreContract, unittest.TestCase):
    def make_store(self, **kw: Any) -> Any:
        from popservice.stores.maildir import MaildirStore

        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        store = MaildirStore(os.path.join(root, "%u"), **kw)
        if not IMailDelivery.providedBy(store):
            raise unittest.SkipTest("the Maildir store does not deliver yet")
        return store


class PostgresContract(StoreContract, unittest.TestCase):
    skip = pg.SKIP

    def make_store(self, **kw: Any) -> Any:
        from popservice.stores.postgres import PostgresStore

        store = PostgresStore.from_description(pg.fresh_database(), **kw)
        self.addCleanup(store.db.close)
        return store
