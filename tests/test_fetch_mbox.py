"""
An mbox that already holds mail: each message counts its own bytes (not the
mbox file's size), so the summary's byte count and rate are right and the
16 MiB durability batches stay batches, in both engines, against
popservice's own server.
"""

from __future__ import annotations

import mailbox
import os
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from popservice.client import blocking
from popservice.client.common import Credentials
from popservice.client.connect import connect
from popservice.client.delivery import DeliverySession, FetchOptions, Journal, MboxTarget, make_target
from popservice.client.fetch import fetch
from popservice.client.url import parse_url
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker

MESSAGES = [b"Subject: m%d\n\n" % i + b"line of mail\n" * (200 + i) for i in range(5)]
#: what is in the mbox before the fetch: more than a batch's worth of bytes
EXISTING = b"From old@example.org Thu Jan  1 00:00:00 2026\nSubject: old\n\n" + b"x" * 2_000_000 + b"\n\n"


def batches(state_dir: str) -> int:
    """How many durability batches the journal records (one C{B <offset>} line each)."""
    with open(os.path.join(state_dir, "journal"), "rb") as f:
        return sum(1 for line in f if line.startswith(b"B "))


class MboxTargetTests(unittest.TestCase):
    def test_finished_counts_the_message(self) -> None:
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        mbox = os.path.join(tmp, "mbox")
        with open(mbox, "wb") as f:
            f.write(EXISTING)
        target = MboxTarget(mbox)
        journal = Journal(os.path.join(tmp, "state"))
        self.addCleanup(journal.close)
        session = DeliverySession(target, journal, FetchOptions(batch_bytes=1024 * 1024))
        target.recover(journal)
        sizes = []
        for i, msg in enumerate(MESSAGES[:2]):
            before = os.path.getsize(mbox)
            writer = target.open(f"u{i}", len(msg))
            writer.write(msg)
            full = session.finished(f"u{i}", writer)
            sizes.append(os.path.getsize(mbox) - before)
            self.assertFalse(full)  # a few kB: the batch is far from 1 MiB
        self.assertEqual(session.batch_bytes, sum(sizes))
        self.assertLess(session.batch_bytes, 10_000)
        target.close()


class MboxFetchTests(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.listen(make_factory(MemoryStore({"alice": list(MESSAGES)}), [memory_checker(alice="pw")]))
        self.url = f"pop3://alice@127.0.0.1:{self.server_port.getHost().port}"
        self.creds = Credentials("alice", "pw", allow_plaintext=True)

    @defer.inlineCallbacks
    def run_engine(self, engine: str) -> Any:
        mbox = os.path.join(self.tmp, f"mbox-{engine}")
        state = os.path.join(self.tmp, f"state-{engine}")
        with open(mbox, "wb") as f:
            f.write(EXISTING)
        target = make_target(f"mbox:{mbox}", username="alice", state_dir=state)
        options = FetchOptions(keep=True, batch_bytes=1024 * 1024)
        if engine == "twisted":
            client = yield connect(reactor, self.url, self.creds, starttls="none", timeout=10)
            result = yield fetch(client, target, state, options)
        else:
            result = yield threads.deferToThread(
                blocking.run_fetch, parse_url(self.url), self.creds, target, state, options,
                starttls="none", timeout=10)
        grown = os.path.getsize(mbox) - len(EXISTING)
        self.assertEqual(result.fetched, len(MESSAGES), engine)
        self.assertEqual(result.bytes, grown, engine)
        self.assertIn(f"({grown} bytes, ", result.summary(), engine)
        self.assertEqual(batches(state), 1, engine)  # not one batch (and sync) per message
        # the messages, whole and in order after the old mail
        box = mailbox.mbox(mbox, create=False)
        got = [(m["Subject"], m.get_payload(decode=True)) for m in box][1:]
        box.close()
        self.assertEqual(got, [(f"m{i}", m.split(b"\n\n", 1)[1]) for i, m in enumerate(MESSAGES)], engine)

    def test_twisted_engine(self) -> Any:
        return self.run_engine("twisted")

    def test_blocking_engine(self) -> Any:
        return self.run_engine("blocking")
