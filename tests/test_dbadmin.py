"""
C{popservice db upgrade|status} and C{popservice migrate-store} as an operator
runs them (subprocesses) against a real PostgreSQL (tests/pg.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
from twisted.internet import defer, threads
from twisted.trial import unittest

from popservice.stores.maildir import MaildirStore
from popservice.stores.postgres import PostgresStore
from popservice.stores.postgres.store import normalise
from tests import pg

SHAPES = [
    b"Subject: lf\n\nbody\n",
    b"Subject: crlf\r\n\r\n.leading dot\r\n..two dots\r\n",
    b"Subject: no newline at the end\n\nlast",
    b"Subject: empty body\n\n",
    b"Subject: 8bit\n\n\xc3\xa4\xff\x00 bytes\n",
]


def popservice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "popservice.cli", *args], capture_output=True, text=True,
                          timeout=120)


class DbCommand(unittest.TestCase):
    skip = pg.SKIP

    def test_status_and_upgrade(self) -> None:
        url = pg.fresh_database(upgrade=False)
        status = popservice("db", "status", url)
        self.assertEqual(status.returncode, 75, status.stderr)
        self.assertIn("schema at version 0", status.stdout)
        upgrade = popservice("db", "upgrade", url)
        self.assertEqual(upgrade.returncode, 0, upgrade.stderr)
        self.assertIn("applied 1", upgrade.stdout)
        self.assertEqual(popservice("db", "upgrade", url).returncode, 0)
        self.assertEqual(popservice("db", "status", url).returncode, 0)

    def test_unreachable_database(self) -> None:
        result = popservice("db", "status", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
        self.assertEqual(result.returncode, 75)
        self.assertIn("popservice db:", result.stderr)


class MigrateStore(unittest.TestCase):
    skip = pg.SKIP

    def setUp(self) -> None:
        self.url = pg.fresh_database()
        self.root = os.path.abspath(self.mktemp())
        for user, count in (("alice", len(SHAPES)), ("bob", 2)):
            box = os.path.join(self.root, user)
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(box, sub))
            for i, message in enumerate(SHAPES[:count]):
                with open(os.path.join(box, "new", "%d.M%d.test" % (1700000000 + i, i)), "wb") as f:
                    f.write(message)
        self.template = "maildir:%s/%%u" % (self.root,)

    @defer.inlineCallbacks
    def uidls(self, store: Any, user: str) -> Any:
        mailbox = yield store.open_mailbox(user, None)
        listing = yield mailbox.listing()
        yield mailbox.close()
        return [m.uid for m in listing], [m.size for m in listing]

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            cur = conn.execute(query, args)
            rows = cur.fetchall() if cur.description else []
            conn.commit()
        return rows

    @defer.inlineCallbacks
    def test_moves_mail_keeping_uidls_and_is_resumable(self) -> Any:
        maildir = MaildirStore(os.path.join(self.root, "%u"))
        before = yield self.uidls(maildir, "alice")
        # As if a first run had been interrupted after alice's first message.
        target = PostgresStore.from_description(self.url)
        self.addCleanup(target.db.close)
        yield target.deliver("alice", None, SHAPES[0], None, uidl=before[0][0])
        result = yield threads.deferToThread(popservice, "migrate-store", self.template, self.url,
                                             "alice", "bob")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("alice: 5 messages, 4 copied now, 5 checked byte for byte", result.stdout)
        self.assertIn("bob: 2 messages, 2 copied now, 2 checked byte for byte", result.stdout)
        after = yield self.uidls(target, "alice")
        self.assertEqual(after, before)
        for message in SHAPES:
            chunks, _ = normalise(message)
            stored = self.sql("SELECT count(*) FROM message_chunks WHERE data = %s", b"".join(chunks))
            self.assertEqual(stored, [(1 if message not in SHAPES[:2] else 2,)])
        # Run again: nothing copied, everything checked.
        again = yield threads.deferToThread(popservice, "migrate-store", self.template, self.url, "alice")
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("alice: 5 messages, 0 copied now, 5 checked byte for byte", again.stdout)

    @defer.inlineCallbacks
    def test_a_message_that_differs_is_reported(self) -> Any:
        result = yield threads.deferToThread(popservice, "migrate-store", self.template, self.url, "bob")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.sql("UPDATE message_chunks SET data = 'tampered' "
                 "WHERE message_id = (SELECT min(id) FROM messages)")
        again = yield threads.deferToThread(popservice, "migrate-store", self.template, self.url, "bob")
        self.assertEqual(again.returncode, 70, again.stdout + again.stderr)
        self.assertIn("differs in the database", again.stderr)
