"""
Warm logins of the Maildir store: a Maildir unchanged since its last
listing is opened on the reactor thread, from the store's cache; any change
by another process (a delivery, a removal, a flag changed by another
client, a symbolic link put in place of cur/) between two logins is seen by
the next one.  Real files, real processes, a real server on a loopback
socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from popservice.interfaces import MailboxForbidden, MailboxUnavailable, MessageGone, MessageInfo
from popservice.stores.maildir import MaildirMailbox, MaildirStore
from popservice.stores.maildir import freshness as maildir_freshness
from popservice.stores.maildir.cache import WarmListings
from popservice.stores.maildir.delivery import deliver_into
from popservice.stores.maildir.listing import Listing
from popservice.stores.maildir.work import maildir_pool
from tests.support import ServerMixin, make_factory, memory_checker

HOUR_NS = 3600 * 10**9


def async_test(f: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(self: Any) -> Any:
        return defer.Deferred.fromCoroutine(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


def settle(box: str) -> None:
    """cur/ and new/ as if last modified an hour ago (beyond freshness.SETTLE)."""
    old = time.time_ns() - HOUR_NS
    for sub in ("cur", "new"):
        os.utime(os.path.join(box, sub), ns=(old, old))


def in_another_process(code: str, *args: str) -> None:
    subprocess.run([sys.executable, "-c", code, *args], check=True, timeout=60)


class Recorder:
    """Calls to the store's thread pool, passed on to the real one."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.run = maildir_pool.run

    def __call__(self, f: Callable[..., Any], *args: Any) -> Any:
        self.calls.append(getattr(f, "__name__", repr(f)))
        return self.run(f, *args)


class WarmMaildirTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.box = os.path.join(self.root, "alice")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.box, sub))
        for i in range(3):
            self.put("cur", f"170000000{i}.m{i}.host:2,", b"message %d\n" % i)
        self.store = MaildirStore(os.path.join(self.root, "%u"))
        self.threads = Recorder()
        self.patch(maildir_pool, "run", self.threads)

    def put(self, sub: str, name: str, content: bytes) -> None:
        with open(os.path.join(self.box, sub, name), "wb") as f:
            f.write(content)

    async def open(self) -> MaildirMailbox:
        mailbox = await self.store.open_mailbox("alice", None)
        assert isinstance(mailbox, MaildirMailbox)
        self.addCleanup(mailbox.close)
        return mailbox

    async def listing(self) -> list[MessageInfo]:
        mailbox = await self.open()
        try:
            return list(await mailbox.listing())
        finally:
            await mailbox.close()

    async def content(self, mailbox: MaildirMailbox, index: int) -> bytes:
        stream = await mailbox.open(index)
        chunks = []
        while chunk := await stream.read():
            chunks.append(chunk)
        return b"".join(chunks)


class WarmLoginTests(WarmMaildirTestCase):
    @async_test
    async def test_warm_login_stays_on_the_reactor_thread(self) -> None:
        settle(self.box)
        first = await self.listing()
        self.assertIn("scan_maildir", self.threads.calls)
        del self.threads.calls[:]
        d = self.store.open_mailbox("alice", None)
        mailbox = self.successResultOf(d)  # fired at once: no thread hop
        self.addCleanup(mailbox.close)
        self.assertEqual(self.threads.calls, [])
        listing = await mailbox.listing()
        self.assertEqual(list(listing), first)
        # the session shares the store's listing: no copy per session
        known = self.store.listings.get(os.path.join(self.root, "alice"))
        assert known is not None
        self.assertIs(listing, known[1])
        assert isinstance(mailbox, MaildirMailbox)
        self.assertEqual(await self.content(mailbox, 1), b"message 1\n")

    @async_test
    async def test_warm_login_is_locked_like_a_cold_one(self) -> None:
        settle(self.box)
        await self.listing()
        holder = await self.open()
        with self.assertRaises(Exception) as caught:
            await self.store.open_mailbox("alice", None)
        self.assertEqual(type(caught.exception).__name__, "MailboxInUse")
        await holder.close()
        await self.listing()

    @async_test
    async def test_change_in_the_same_tick_is_not_trusted(self) -> None:
        # cur/ modified just now: a change in the same clock tick could leave its mtime as it is
        first = await self.listing()
        cur = os.path.join(self.box, "cur")
        before = os.stat(cur)
        self.put("cur", "1700000009.m9.host:2,", b"late\n")
        os.utime(cur, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick, as far as stat can tell
        listing = await self.listing()
        self.assertEqual(len(listing), 4)
        self.assertEqual(listing[:3], first)

    @async_test
    async def test_delivery_between_logins(self) -> None:
        settle(self.box)
        first = await self.listing()
        await self.listing()
        del self.threads.calls[:]
        self.assertTrue(deliver_into(self.box, b"Subject: new\n\nnew\n", None))
        listing = await self.listing()
        self.assertEqual(len(listing), 4)
        self.assertEqual(listing[:3], first)
        self.assertIn("scan_maildir", self.threads.calls)

    @async_test
    async def test_removal_by_another_process(self) -> None:
        settle(self.box)
        first = await self.listing()
        await self.listing()
        in_another_process("import os, sys; os.unlink(sys.argv[1])",
                           os.path.join(self.box, "cur", "1700000001.m1.host:2,"))
        self.assertEqual(await self.listing(), [first[0], first[2]])

    @async_test
    async def test_flag_change_by_another_client(self) -> None:
        settle(self.box)
        first = await self.listing()
        await self.listing()
        cur = os.path.join(self.box, "cur")
        in_another_process("import os, sys; os.rename(sys.argv[1], sys.argv[2])",
                           os.path.join(cur, "1700000002.m2.host:2,"),
                           os.path.join(cur, "1700000002.m2.host:2,S"))
        mailbox = await self.open()
        self.assertEqual(list(await mailbox.listing()), first)
        self.assertEqual(await self.content(mailbox, 2), b"message 2\n")

    @async_test
    async def test_index_replaced_by_another_process(self) -> None:
        settle(self.box)
        first = await self.listing()
        index = os.path.join(self.box, "popservice-uidlist")
        with open(index, encoding="utf-8") as f:
            text = f.read()
        in_another_process(
            "import os, sys; open(sys.argv[1] + '.new', 'w').write(sys.argv[2]); "
            "os.rename(sys.argv[1] + '.new', sys.argv[1])",
            index, text.replace(first[0].uid, "Z" * len(first[0].uid)))
        listing = await self.listing()
        self.assertEqual(listing[0].uid, "Z" * len(first[0].uid))

    @async_test
    async def test_symbolic_link_in_place_of_cur(self) -> None:
        settle(self.box)
        await self.listing()
        outside = os.path.abspath(self.mktemp())
        cur = os.path.join(self.box, "cur")
        shutil.move(cur, outside)
        os.symlink(outside, cur)
        with self.assertRaises(MailboxForbidden):
            await self.store.open_mailbox("alice", None)

    @async_test
    async def test_cur_swapped_for_a_link_during_a_session_is_not_followed(self) -> None:
        mailbox = await self.open()
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        with open(os.path.join(outside, "1700000000.m0.host:2,"), "wb") as f:
            f.write(b"not yours\n")
        cur = os.path.join(self.box, "cur")
        os.rename(cur, cur + ".old")
        os.symlink(outside, cur)
        with self.assertRaises((MailboxUnavailable, MessageGone)):
            await self.content(mailbox, 0)
        self.flushLoggedErrors()

    @async_test
    async def test_descriptors_are_not_kept(self) -> None:
        mailbox = await self.open()
        stream = await mailbox.open(0)
        fd = stream._fd  # type: ignore[attr-defined]
        del stream  # dropped unread, never closed
        self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(await self.content(mailbox, 0), b"message 0\n")
        cur = mailbox._cur
        assert cur is not None
        await mailbox.close()
        self.assertRaises(OSError, os.fstat, cur)

    @async_test
    async def test_settled_state_is_recorded(self) -> None:
        settle(self.box)
        mailbox = await self.open()
        listing = await mailbox.listing()
        assert isinstance(listing, Listing)
        self.assertIsNotNone(listing.state)
        known = maildir_freshness.identity(self.box)
        assert known is not None
        self.assertEqual(listing.state, maildir_freshness.warm_state(self.box, known[0]))
        await mailbox.close()
        # unsettled: no state, the next login scans
        os.utime(os.path.join(self.box, "new"))
        listing = await (await self.open()).listing()
        assert isinstance(listing, Listing)
        self.assertIsNone(listing.state)


class WarmListingsBounds(unittest.TestCase):
    def test_bounds(self) -> None:
        listings = WarmListings(budget=30, entries=2)
        one = Listing(["a"] * 3, [1] * 3, ["u"] * 3)
        listings.put("/m/a", one)
        listings.put("/m/b", Listing(["b"], [1], ["v"]))
        known = listings.get("/m/a")  # now the most recent: b goes first
        assert known is not None
        self.assertIs(known[1], one)
        self.assertEqual(known[0], "/m/a")
        listings.put("/m/c", Listing(["c"], [1], ["w"]))
        self.assertIsNone(listings.get("/m/b"))
        self.assertEqual(len(listings), 2)
        listings.put("/m/big", Listing(["d"] * 4, [1] * 4, ["x"] * 4))  # over a tenth of the budget
        self.assertIsNone(listings.get("/m/big"))
        listings.put("/m/a", Listing(["e"] * 3, [1] * 3, ["y"] * 3))
        listings.put("/m/d", Listing(["f"] * 3, [1] * 3, ["z"] * 3))
        self.assertIsNone(listings.get("/m/c"))
        listings.forget("/m/a")
        self.assertIsNone(listings.get("/m/a"))
        self.assertEqual(len(listings), 1)


class WarmLoginOverSockets(ServerMixin, WarmMaildirTestCase):
    """Through a real server on a loopback socket: a delivery between two logins is listed."""

    def setUp(self) -> None:
        super().setUp()
        self.listen(make_factory(self.store, [memory_checker(alice="secret")]))

    @defer.inlineCallbacks
    def session(self) -> Any:
        client = yield self.login()
        stat = yield client.command(b"STAT")
        _, uidls = yield client.command_multi(b"UIDL")
        first, body = yield client.command_multi(b"RETR 1")
        self.assertTrue(first.startswith(b"+OK"))
        yield client.command(b"QUIT")
        yield client.lost
        return stat, uidls, body

    @defer.inlineCallbacks
    def test_delivery_seen_by_next_login(self) -> Any:
        settle(self.box)
        stat, uidls, body = yield self.session()
        self.assertEqual(stat, b"+OK 3 33")
        self.assertEqual(body, b"message 0\r\n")
        del self.threads.calls[:]
        again = yield self.session()
        self.assertEqual(again, (stat, uidls, body))
        self.assertEqual(self.threads.calls, [])  # warm: no thread hop
        self.assertTrue(deliver_into(self.box, b"Subject: x\n\nfour\n", None))
        stat, later, _ = yield self.session()
        self.assertTrue(stat.startswith(b"+OK 4 "), stat)
        self.assertTrue(later.startswith(uidls))
        self.assertIn("scan_maildir", self.threads.calls)
