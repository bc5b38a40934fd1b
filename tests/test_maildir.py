"""Tests for popservice.stores.maildir (trial; the thread pool runs for real)."""

from __future__ import annotations

import builtins
import functools
import os
import random
import re
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popservice.interfaces import (
    IMailbox,
    IMailStore,
    IMessageStream,
    MailboxInUse,
    MailboxUnavailable,
    MessageGone,
    MessageInfo,
)
from popservice.stores import maildir
from popservice.stores.maildir import (
    CHUNK_SIZE,
    INDEX_FILE_NAME,
    DovecotUIDLFormat,
    MaildirMailbox,
    MaildirStore,
    message_sort_key,
    valid_user_name,
)
from popservice.stores.maildir import cache as maildir_cache
from popservice.stores.maildir import scan as maildir_scan
from popservice.stores.maildir import store as maildir_store
from popservice.stores.maildir.listing import Listing
from popservice.wire import transmitted_size

UIDL_RE = re.compile(r"[\x21-\x7e]{1,70}\Z")


def async_test(f: Callable[[Any], Awaitable[None]]) -> Callable[[Any], defer.Deferred[None]]:
    @functools.wraps(f)
    def wrapper(self: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(f(self))  # type: ignore[arg-type]

    return wrapper


def deliver(box: str, base: str, content: bytes, sub: str = "new", info: str | None = None) -> str:
    name = base if info is None else base + ":" + info
    path = os.path.join(box, sub, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def find(box: str, base: str) -> str:
    for sub in ("cur", "new"):
        for name in os.listdir(os.path.join(box, sub)):
            if name.split(":", 1)[0] == base:
                return os.path.join(box, sub, name)
    raise AssertionError(f"{base} not found")


class LogCapture:
    def __init__(self, test: unittest.TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]


class MaildirTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.store = MaildirStore(os.path.join(os.path.abspath(self.root), "%u"))
        self.box = os.path.join(os.path.abspath(self.root), "alice")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.box, sub))
        # a cache of this test's own that keeps even the smallest Maildir, so
        # that every test also runs the warm path through it
        self.patch(maildir_cache, "_listing_cache", maildir._ListingCache(maildir.LISTING_CACHE_MESSAGES, 1))

    async def open(self, store: MaildirStore | None = None, user: str = "alice",
                   home: str | None = None) -> MaildirMailbox:
        mbox = await (store or self.store).open_mailbox(user, home)
        self.addCleanup(mbox.close)
        return mbox

    async def listing(self, mbox: MaildirMailbox) -> list[MessageInfo]:
        return list(await mbox.listing())

    async def session_listing(self) -> list[MessageInfo]:
        mbox = await self.open()
        try:
            return await self.listing(mbox)
        finally:
            await mbox.close()

    async def content(self, mbox: MaildirMailbox, index: int) -> bytes:
        stream = await mbox.open(index)
        chunks = []
        while True:
            chunk = await stream.read()
            if not chunk:
                break
            chunks.append(chunk)
        stream.close()
        return b"".join(chunks)


class NumberingTests(MaildirTestCase):
    @async_test
    async def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IMailStore, self.store))
        deliver(self.box, "1700000000.a.host", b"x\n")
        mbox = await self.open()
        self.assertTrue(verifyObject(IMailbox, mbox))
        stream = await mbox.open(0)
        self.assertTrue(verifyObject(IMessageStream, stream))
        stream.close()

    @async_test
    async def test_order_across_new_and_cur(self) -> None:
        deliver(self.box, "1700000300.M3.host", b"third\n", "new")
        deliver(self.box, "1700000100.M1.host", b"first\n", "cur", "2,S")
        deliver(self.box, "zzz-no-timestamp", b"last\n", "new")
        deliver(self.box, "abc-no-timestamp", b"second-to-last\n", "cur", "2,")
        deliver(self.box, "1700000200.M2b.host", b"second-b\n", "new")
        deliver(self.box, "1700000200.M2a.host", b"second-a\n", "cur", "2,RS")
        # 999 sorts before 1700000000 numerically, after it as a string
        deliver(self.box, "999.M0.host", b"zeroth\n", "new")
        mbox = await self.open()
        got = [await self.content(mbox, i) for i in range(7)]
        # the stream gives the stored bytes; line ends are the protocol's business
        self.assertEqual(got, [b"zeroth\n", b"first\n", b"second-a\n", b"second-b\n",
                               b"third\n", b"second-to-last\n", b"last\n"])

    def test_sort_key(self) -> None:
        names = ["b", "10.x", "9.y", "a", "10.a", "1x.z"]
        self.assertEqual(sorted(names, key=message_sort_key), ["9.y", "10.a", "10.x", "1x.z", "a", "b"])

    @async_test
    async def test_new_moved_to_cur(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n", "new")
        deliver(self.box, "1700000001.b.host", b"two\n", "cur", "2,S")
        mbox = await self.open()
        self.assertEqual(os.listdir(os.path.join(self.box, "new")), [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.box, "cur"))),
                         ["1700000000.a.host:2,", "1700000001.b.host:2,S"])
        self.assertEqual(await self.content(mbox, 0), b"one\n")

    @async_test
    async def test_dotfiles_tmp_and_directories_ignored(self) -> None:
        deliver(self.box, "1700000000.a.host", b"real\n", "cur", "2,")
        deliver(self.box, ".hidden", b"no\n", "cur")
        deliver(self.box, ".also-hidden", b"no\n", "new")
        deliver(self.box, "1700000001.t.host", b"in tmp\n", "tmp")
        os.mkdir(os.path.join(self.box, "cur", "1700000002.dir"))
        listing = await self.session_listing()
        self.assertEqual(len(listing), 1)
        self.assertEqual(listing[0].size, 6)
        self.assertTrue(os.path.exists(os.path.join(self.box, "tmp", "1700000001.t.host")))

    @async_test
    async def test_listing_frozen_at_open(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        mbox = await self.open()
        deliver(self.box, "1700000001.b.host", b"two\n")
        self.assertEqual(len(await self.listing(mbox)), 1)
        await mbox.close()
        self.assertEqual(len(await self.session_listing()), 2)


class UIDLTests(MaildirTestCase):
    @async_test
    async def test_uidls_valid_and_distinct(self) -> None:
        for i in range(20):
            deliver(self.box, f"17000000{i:02d}.m{i}.host", b"m\n")
        listing = await self.session_listing()
        uids = [m.uid for m in listing]
        self.assertEqual(len(set(uids)), 20)
        for u in uids:
            self.assertRegex(u, UIDL_RE)

    @async_test
    async def test_stable_across_reopen_and_flag_rename(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        deliver(self.box, "1700000001.b.host", b"two\n", "cur", "2,")
        first = await self.session_listing()
        # another program flags and renames the files
        os.rename(find(self.box, "1700000000.a.host"),
                  os.path.join(self.box, "cur", "1700000000.a.host:2,RS"))
        os.rename(find(self.box, "1700000001.b.host"), os.path.join(self.box, "new", "1700000001.b.host"))
        second = await self.session_listing()
        self.assertEqual([m.uid for m in first], [m.uid for m in second])
        third = await self.session_listing()
        self.assertEqual([m.uid for m in first], [m.uid for m in third])

    @async_test
    async def test_no_reuse_after_delete(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        deliver(self.box, "1700000001.b.host", b"two\n")
        mbox = await self.open()
        seen = {m.uid for m in await self.listing(mbox)}
        self.assertEqual(await mbox.delete([0, 1]), [])
        await mbox.close()
        # a new delivery, even one reusing a deleted file's name, gets a new UIDL
        deliver(self.box, "1700000000.a.host", b"one again\n")
        deliver(self.box, "1700000002.c.host", b"three\n")
        listing = await self.session_listing()
        self.assertEqual(len(listing), 2)
        for m in listing:
            self.assertNotIn(m.uid, seen)

    @async_test
    async def test_index_file_format(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        deliver(self.box, "1700000001.b b.host", b"two\r\n")  # a space in the name
        listing = await self.session_listing()
        with open(os.path.join(self.box, INDEX_FILE_NAME), encoding="utf-8") as f:
            lines = f.read().splitlines()
        m = re.match(r"popservice-uidlist 1 V([0-9]+) N3\Z", lines[0])
        assert m is not None, lines[0]
        v = int(m.group(1))
        self.assertEqual(lines[1:], [f"{1:08x}{v:08x} 5 1700000000.a.host",
                                     f"{2:08x}{v:08x} 5 1700000001.b b.host"])
        self.assertEqual([m.uid for m in listing], [f"{1:08x}{v:08x}", f"{2:08x}{v:08x}"])
        # no temporary files left behind
        self.assertEqual(sorted(n for n in os.listdir(self.box) if n.startswith(INDEX_FILE_NAME)),
                         [INDEX_FILE_NAME, INDEX_FILE_NAME + ".lock"])

    @async_test
    async def test_corrupt_index_rebuilt_with_new_uidvalidity(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        first = await self.session_listing()
        path = os.path.join(self.box, INDEX_FILE_NAME)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace(" N2", " Nbroken"))
        logs = LogCapture(self)
        second = await self.session_listing()
        self.assertEqual(len(second), 1)
        self.assertNotEqual(first[0].uid, second[0].uid)
        self.assertTrue(any("UIDLs of every message" in t for t in logs.texts()), logs.texts())

    @async_test
    async def test_index_not_writable_hides_new_messages(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        first = await self.session_listing()
        deliver(self.box, "1700000001.b.host", b"two\n")

        def fail(path: str, index: object) -> None:
            raise OSError(28, "No space left on device")

        self.patch(maildir_scan, "_write_index", fail)
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing], [first[0].uid])


class TakeoverTests(MaildirTestCase):
    # Recorded from Dovecot 2.3.19.1 (pop3_uidl_format = %08Xu%08Xv) over the
    # yardstick fixture: it answered UIDL with 000000016b081451 ... 000000036b081451.
    DOVECOT = (
        "3 V1795691601 N4 G5cef25255114086b6d1a000083ecc375\n"
        "1 W326 :1700000060.M000001P4242Q1.popfixture\n"
        "2 W356 :1700000120.M000002P4242Q2.popfixture\n"
        "3 W386 :1700000180.M000003P4242Q3.popfixture\n"
    )

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.box, name), "w") as f:
            f.write(text)

    @async_test
    async def test_dovecot_uidlist(self) -> None:
        self.write("dovecot-uidlist", self.DOVECOT)
        deliver(self.box, "1700000060.M000001P4242Q1.popfixture", b"a\n")
        deliver(self.box, "1700000120.M000002P4242Q2.popfixture", b"b\n", "cur", "2,S")
        deliver(self.box, "1700000180.M000003P4242Q3.popfixture", b"c\n")
        deliver(self.box, "1700000240.M000004P4242Q4.popfixture", b"new since\n")
        logs = LogCapture(self)
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing],
                         ["000000016b081451", "000000026b081451", "000000036b081451",
                          "000000046b081451"])
        # Dovecot's W (its LIST size) is taken over; the new one is computed
        self.assertEqual([m.size for m in listing], [326, 356, 386, 11])
        self.assertTrue(any("took over 3 UIDLs from dovecot-uidlist" in t for t in logs.texts()))
        # persisted in our own index: Dovecot's file is no longer needed
        os.unlink(os.path.join(self.box, "dovecot-uidlist"))
        again = await self.session_listing()
        self.assertEqual(listing, again)
        deliver(self.box, "1700000300.M000005P4242Q5.popfixture", b"later\n")
        later = await self.session_listing()
        self.assertEqual(later[-1].uid, "000000056b081451")

    @async_test
    async def test_dovecot_counter_never_collides(self) -> None:
        # next uid N5 although only uid 1 is listed: uids 2-4 were used and deleted
        self.write("dovecot-uidlist", "3 V1000 N5\n1 :1700000000.a.host\n")
        deliver(self.box, "1700000000.a.host", b"a\n")
        deliver(self.box, "1700000001.b.host", b"b\n")
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing], [f"{1:08x}{1000:08x}", f"{5:08x}{1000:08x}"])

    @async_test
    async def test_dovecot_stale_next_uid(self) -> None:
        # a header whose N is behind the listed uids must not make us reuse them
        self.write("dovecot-uidlist", "3 V1000 N1\n3 :1700000000.a.host\n")
        deliver(self.box, "1700000000.a.host", b"a\n")
        deliver(self.box, "1700000001.b.host", b"b\n")
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing], [f"{3:08x}{1000:08x}", f"{4:08x}{1000:08x}"])

    @async_test
    async def test_new_uidl_skips_taken_over_one(self) -> None:
        # Dovecot's P (a UIDL it took over itself) equals what our counter gives next
        self.write("dovecot-uidlist", "3 V16 N2\n1 P0000000200000010 :1700000000.a.host\n")
        deliver(self.box, "1700000000.a.host", b"a\n")
        deliver(self.box, "1700000001.b.host", b"b\n")
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing], ["0000000200000010", "0000000300000010"])

    @async_test
    async def test_dovecot_custom_format_and_pop3_uidl_extension(self) -> None:
        self.write("dovecot-uidlist",
                   "3 V1234 N9\n7 :1700000000.a.host\n8 P+migrated-uidl S2 :1700000001.b.host:2,S\n")
        deliver(self.box, "1700000000.a.host", b"a\n")
        deliver(self.box, "1700000001.b.host", b"b\n")
        store = MaildirStore(os.path.join(os.path.abspath(self.root), "%u"),
                             dovecot_uidl_format="%v.%u-%f")
        mbox = await self.open(store)
        listing = await self.listing(mbox)
        self.assertEqual([m.uid for m in listing], ["1234.7-1700000000.a.host", "+migrated-uidl"])

    @async_test
    async def test_dovecot_version_1(self) -> None:
        self.write("dovecot-uidlist", "1 4096 3\n2 1700000000.a.host:2,S\n")
        deliver(self.box, "1700000000.a.host", b"a\n", "cur", "2,S")
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing], [f"{2:08x}{4096:08x}"])

    @async_test
    async def test_courier_sizelist(self) -> None:
        # Courier's sizes (999, 998) are deliberately wrong: they are not used
        self.write("courierpop3dsizelist",
                   "/3 4 1600000000\n"
                   "1700000000.a.host:2,S 999 1:1600000000:0\n"
                   "1700000001.b.host 998 2:0:0\n")
        deliver(self.box, "1700000000.a.host", b"a\n", "cur", "2,S")
        deliver(self.box, "1700000001.b.host", b"bb\n")
        deliver(self.box, "1700000002.c.host", b"ccc\n")
        logs = LogCapture(self)
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing][:2], ["UID1-1600000000", "UID2"])
        self.assertRegex(listing[2].uid, r"\A[0-9a-f]{16}\Z")
        self.assertEqual([m.size for m in listing], [3, 4, 5])
        self.assertTrue(any("courierpop3dsizelist" in t and "took over 2" in t for t in logs.texts()))

    @async_test
    async def test_taken_over_uidl_kept_while_file_unreadable(self) -> None:
        self.write("dovecot-uidlist", "3 V1000 N3\n1 :1700000000.a.host\n2 :1700000001.b.host\n")
        deliver(self.box, "1700000000.a.host", b"a\n")
        deliver(self.box, "1700000001.b.host", b"b\n")
        real = maildir.compute_size

        def unreadable(path: str) -> int:
            if "a.host" in path:
                raise PermissionError(13, "Permission denied", path)
            return real(path)

        self.patch(maildir_scan, "compute_size", unreadable)
        self.assertEqual([m.uid for m in await self.session_listing()], [f"{2:08x}{1000:08x}"])
        os.unlink(os.path.join(self.box, "dovecot-uidlist"))
        self.patch(maildir_scan, "compute_size", real)
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing], [f"{1:08x}{1000:08x}", f"{2:08x}{1000:08x}"])
        self.assertEqual([m.size for m in listing], [3, 3])

    @async_test
    async def test_own_index_wins_over_foreign_files(self) -> None:
        deliver(self.box, "1700000000.a.host", b"a\n")
        first = await self.session_listing()
        self.write("dovecot-uidlist", "3 V77 N2\n1 :1700000000.a.host\n")
        self.assertEqual(await self.session_listing(), first)

    @async_test
    async def test_unknown_foreign_format_ignored(self) -> None:
        self.write("dovecot-uidlist", "9 something else\n")
        self.write("courierpop3dsizelist", "1700000000.a.host 3\n")  # header-less old format
        deliver(self.box, "1700000000.a.host", b"a\n")
        listing = await self.session_listing()
        self.assertRegex(listing[0].uid, r"\A[0-9a-f]{16}\Z")

    def test_format_matches_dovecot(self) -> None:
        fmt = DovecotUIDLFormat("%08Xu%08Xv")
        self.assertEqual(fmt.format(1, 1795691601, "f", None), "000000016b081451")
        self.assertEqual(DovecotUIDLFormat("%{uid}-%{uidvalidity}").format(3, 9, "f", None), "3-9")
        self.assertEqual(DovecotUIDLFormat("%g").format(3, 9, "f", "abc"), "abc")
        self.assertEqual(DovecotUIDLFormat("%%%u").format(3, 9, "f", None), "%3")

    def test_unsupported_formats(self) -> None:
        for bad in ("%m", "%08Xu%m", "no variable", "%{md5}"):
            self.assertRaises(ValueError, DovecotUIDLFormat, bad)
        self.assertRaises(ValueError, MaildirStore, "/srv/%u", dovecot_uidl_format="%m")


class SizeTests(MaildirTestCase):
    CASES = [
        (b"a\nb\n", 6),
        (b"a\r\nb\r\n", 6),
        (b"a\nb", 4),
        (b"", 0),
        (b"a\rb\n", 5),
        (b"end with cr\r", 13),
        (b"x" * (CHUNK_SIZE - 1) + b"\r\n" + b"y\n", CHUNK_SIZE + 4),  # CRLF across a chunk edge
    ]

    @async_test
    async def test_computed_sizes(self) -> None:
        for i, (content, _) in enumerate(self.CASES):
            deliver(self.box, f"17000000{i:02d}.s{i}.host", content)
        listing = await self.session_listing()
        self.assertEqual([m.size for m in listing], [size for _, size in self.CASES])
        self.assertEqual([m.size for m in listing], [transmitted_size([c]) for c, _ in self.CASES])

    @async_test
    async def test_w_size_honoured_without_reading(self) -> None:
        # ,W= says 999: the content (2 octets) is never read to check it
        deliver(self.box, "1700000000.a.host,S=2,W=999", b"a\n", "cur", "2,S")
        deliver(self.box, "1700000001.b.host,W=12", b"b\n")
        deliver(self.box, "1700000002.c.host,W=1x", b"c\n")  # not a W size
        opened: list[str] = []
        real = maildir.compute_size

        def counting(path: str) -> int:
            opened.append(os.path.basename(path))
            return real(path)

        self.patch(maildir_scan, "compute_size", counting)
        listing = await self.session_listing()
        self.assertEqual([m.size for m in listing], [999, 12, 3])
        self.assertEqual(opened, ["1700000002.c.host,W=1x:2,"])

    @async_test
    async def test_sizes_persisted(self) -> None:
        deliver(self.box, "1700000000.a.host", b"a\nb\n")
        self.assertEqual([m.size for m in await self.session_listing()], [6])
        with open(find(self.box, "1700000000.a.host"), "wb") as f:
            f.write(b"changed behind our back\n")
        self.assertEqual([m.size for m in await self.session_listing()], [6])

    @async_test
    async def test_warm_login_of_10000_messages_reads_no_message_file(self) -> None:
        cur = os.path.join(self.box, "cur")
        for i in range(10000):
            with open(os.path.join(cur, f"{1700000000 + i}.M{i}.host:2,S"), "wb") as f:
                f.write(b"Subject: %d\n\nbody\n" % i)
        cold = await self.session_listing()
        self.assertEqual(len(cold), 10000)
        # empty every file: a reader would now compute other sizes
        for name in os.listdir(cur):
            os.truncate(os.path.join(cur, name), 0)
        opened: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            opened.append(str(file))
            return real_open(file, *args, **kwargs)

        def spy_os_open(path: Any, *args: Any, **kwargs: Any) -> Any:
            opened.append(str(path))
            return real_os_open(path, *args, **kwargs)

        self.patch(builtins, "open", spy_open)
        self.patch(os, "open", spy_os_open)
        warm = await self.session_listing()
        # (cheap comparisons: a failing assertEqual on 10,000 items diffs for minutes)
        differing = sum(1 for a, b in zip(warm, cold) if a != b)
        self.assertEqual((len(warm), differing), (10000, 0))
        message_opens = [p for p in opened if os.sep + "cur" + os.sep in p or os.sep + "new" + os.sep in p]
        self.assertEqual(len(message_opens), 0, message_opens[:3])
        self.assertTrue(any(p.endswith(INDEX_FILE_NAME) for p in opened), "spy saw nothing")


class StreamTests(MaildirTestCase):
    @async_test
    async def test_chunked_stream_of_5_mib(self) -> None:
        line = b"0123456789" * 7 + b"\n"
        content = line * (5 * 1024 * 1024 // len(line) + 1)
        deliver(self.box, "1700000000.big.host", content)
        mbox = await self.open()
        stream = await mbox.open(0)
        chunks = []
        while True:
            chunk = await stream.read()
            if not chunk:
                break
            self.assertLessEqual(len(chunk), CHUNK_SIZE)
            chunks.append(chunk)
        self.assertGreaterEqual(len(chunks), len(content) // CHUNK_SIZE)
        self.assertEqual(b"".join(chunks), content)
        self.assertEqual(await stream.read(), b"")
        stream.close()
        stream.close()
        self.assertEqual((await self.listing(mbox))[0].size, transmitted_size([content]))

    @async_test
    async def test_file_flagged_by_another_process_is_found(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        deliver(self.box, "1700000001.b.host", b"two\n")
        mbox = await self.open()
        os.rename(find(self.box, "1700000000.a.host"),
                  os.path.join(self.box, "cur", "1700000000.a.host:2,ST"))
        os.rename(find(self.box, "1700000001.b.host"), os.path.join(self.box, "new", "1700000001.b.host"))
        self.assertEqual(await self.content(mbox, 0), b"one\n")
        self.assertEqual(await self.content(mbox, 1), b"two\n")

    @async_test
    async def test_file_deleted_underneath(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        mbox = await self.open()
        os.unlink(find(self.box, "1700000000.a.host"))
        with self.assertRaises(MessageGone):
            await mbox.open(0)

    @async_test
    async def test_open_bad_index_and_after_close(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        mbox = await self.open()
        with self.assertRaises(IndexError):
            await mbox.open(1)
        await mbox.close()
        await mbox.close()
        with self.assertRaises(MailboxUnavailable):
            await mbox.open(0)
        with self.assertRaises(MailboxUnavailable):
            await mbox.delete([0])


class DeleteTests(MaildirTestCase):
    @async_test
    async def test_delete_unlinks_and_updates_index(self) -> None:
        for i in range(3):
            deliver(self.box, f"170000000{i}.m{i}.host", b"m%d\n" % i)
        mbox = await self.open()
        listing = await self.listing(mbox)
        self.assertEqual(await mbox.delete([0, 2]), [])
        self.assertEqual(os.listdir(os.path.join(self.box, "cur")), ["1700000001.m1.host:2,"])
        with open(os.path.join(self.box, INDEX_FILE_NAME)) as f:
            index = f.read()
        self.assertNotIn(listing[0].uid, index)
        self.assertIn(listing[1].uid, index)
        self.assertNotIn(listing[2].uid, index)
        with self.assertRaises(MessageGone):
            await mbox.open(0)

    @async_test
    async def test_delete_relocates_renamed_and_accepts_gone(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        deliver(self.box, "1700000001.b.host", b"two\n")
        mbox = await self.open()
        os.rename(find(self.box, "1700000000.a.host"), os.path.join(self.box, "cur", "1700000000.a.host:2,S"))
        os.unlink(find(self.box, "1700000001.b.host"))
        self.assertEqual(await mbox.delete([0, 1]), [])
        self.assertEqual(os.listdir(os.path.join(self.box, "cur")), [])

    @async_test
    async def test_delete_failures_reported(self) -> None:
        for i in range(3):
            deliver(self.box, f"170000000{i}.m{i}.host", b"m%d\n" % i)
        mbox = await self.open()
        real_unlink = os.unlink

        def unlink(path: str, *args: Any, **kwargs: Any) -> None:
            if "m1.host" in str(path):
                raise PermissionError(13, "Permission denied", path)
            real_unlink(path, *args, **kwargs)

        self.patch(os, "unlink", unlink)
        self.assertEqual(await mbox.delete([0, 1, 2, 7]), [1, 7])
        self.assertEqual(os.listdir(os.path.join(self.box, "cur")), ["1700000001.m1.host:2,"])


class PathTests(MaildirTestCase):
    BAD_USERS = ["../x", "a/b", "", "x" * 1000, "a\x00b", ".", "..", "a..b", "-x", "a b", "/etc"]

    @async_test
    async def test_bad_user_names_refused(self) -> None:
        for user in self.BAD_USERS:
            self.assertFalse(valid_user_name(user), user)
            with self.assertRaises(MailboxUnavailable):
                await self.store.open_mailbox(user, None)
        self.assertEqual(sorted(os.listdir(self.root)), ["alice"])

    def test_good_user_names(self) -> None:
        for user in ["alice", "a", "Bob.Smith", "user@example.org", "u+tag", "x" * 64, "0day"]:
            self.assertTrue(valid_user_name(user), user)
        self.assertFalse(valid_user_name("x" * 65))

    def test_home_template(self) -> None:
        store = MaildirStore("~/Maildir")
        self.assertEqual(store.maildir_path("bob", "/home/bob"), "/home/bob/Maildir")
        self.assertEqual(store.maildir_path("../../x", "/home/bob/"), "/home/bob/Maildir")
        self.assertEqual(MaildirStore("~").maildir_path("bob", "/home/bob"), "/home/bob")
        self.assertEqual(MaildirStore("/m/%u/x%%u").maildir_path("bob", None), "/m/bob/x%u")
        for home in (None, "", "relative/home", "/ho\x00me"):
            self.assertRaises(MailboxUnavailable, store.maildir_path, "bob", home)

    @async_test
    async def test_home_missing_fails_open(self) -> None:
        with self.assertRaises(MailboxUnavailable):
            await MaildirStore("~/Maildir").open_mailbox("bob", None)

    def test_templates(self) -> None:
        for bad in ("", "relative/%u", "/srv/%d/%u", "~bob/Maildir", "/srv/%"):
            self.assertRaises(ValueError, MaildirStore, bad)
        self.assertRaises(ValueError, MaildirStore, "/srv/%u", lock_policy="shared")

    def test_from_description(self) -> None:
        store = MaildirStore.from_description("maildir:/srv/mail/%u")
        self.assertEqual(store.template, "/srv/mail/%u")
        self.assertEqual(store.lock_policy, "exclusive")
        store = MaildirStore.from_description("maildir:~/Maildir", lock_policy="none")
        self.assertEqual(store.lock_policy, "none")
        for bad in ("mbox:/var/mail/%u", "/srv/mail/%u", "maildir", "maildir:~/Maildir:INDEX=/x"):
            with self.assertRaises(ValueError) as cm:
                MaildirStore.from_description(bad)
            self.assertIn("maildir", str(cm.exception))

    @async_test
    async def test_missing_maildir_created_private(self) -> None:
        mbox = await self.open(user="newbie")
        self.assertEqual(await self.listing(mbox), [])
        path = os.path.join(os.path.abspath(self.root), "newbie")
        for sub in ("", "cur", "new", "tmp"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(path, sub)).st_mode), 0o700, sub)

    @async_test
    async def test_missing_cur_created(self) -> None:
        os.rmdir(os.path.join(self.box, "cur"))
        deliver(self.box, "1700000000.a.host", b"one\n")
        listing = await self.session_listing()
        self.assertEqual(len(listing), 1)
        self.assertTrue(os.path.exists(os.path.join(self.box, "cur", "1700000000.a.host:2,")))

    @async_test
    async def test_uncreatable_maildir(self) -> None:
        with open(os.path.join(self.root, "blocker"), "w") as f:
            f.write("a file where a directory should be")
        store = MaildirStore(os.path.join(os.path.abspath(self.root), "blocker", "%u"))
        with self.assertRaises(MailboxUnavailable):
            await store.open_mailbox("alice", None)

    @async_test
    async def test_unreadable_message_skipped(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n")
        deliver(self.box, "1700000001.b.host", b"two\n")
        real = maildir.compute_size

        def unreadable(path: str) -> int:
            if "a.host" in path:
                raise PermissionError(13, "Permission denied", path)
            return real(path)

        self.patch(maildir_scan, "compute_size", unreadable)
        logs = LogCapture(self)
        listing = await self.session_listing()
        self.assertEqual([m.size for m in listing], [5])
        self.assertTrue(any("unreadable" in t for t in logs.texts()))
        self.patch(maildir_scan, "compute_size", real)
        listing2 = await self.session_listing()
        self.assertEqual(len(listing2), 2)
        self.assertEqual(listing2[1].uid, listing[0].uid)

    @async_test
    async def test_symlinked_message_not_listed(self) -> None:
        secret = os.path.join(os.path.abspath(self.root), "secret")
        with open(secret, "wb") as f:
            f.write(b"not mail\n")
        os.symlink(secret, os.path.join(self.box, "cur", "1700000000.link.host:2,"))
        self.assertEqual(await self.session_listing(), [])


class LockingTests(MaildirTestCase):
    @async_test
    async def test_second_session_in_use(self) -> None:
        mbox = await self.open()
        with self.assertRaises(MailboxInUse):
            await self.store.open_mailbox("alice", None)
        await mbox.close()
        other = await self.open()
        await other.close()

    @async_test
    async def test_other_store_instance_in_use(self) -> None:
        mbox = await self.open()
        with self.assertRaises(MailboxInUse):
            await MaildirStore(self.store.template).open_mailbox("alice", None)
        await mbox.close()

    @async_test
    async def test_lock_policy_none(self) -> None:
        store = MaildirStore(self.store.template, lock_policy="none")
        deliver(self.box, "1700000000.a.host", b"one\n")
        a = await self.open(store)
        b = await self.open(store)
        self.assertEqual(await self.listing(a), await self.listing(b))
        self.assertFalse(os.path.exists(os.path.join(self.box, "popservice.lock")))

    @async_test
    async def test_failed_open_releases_lock(self) -> None:
        def broken(path: str, fmt: object) -> None:
            raise RuntimeError("bug in the scanner")

        self.patch(maildir_store, "scan_maildir", broken)
        with self.assertRaises(MailboxUnavailable):
            await self.store.open_mailbox("alice", None)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.patch(maildir_store, "scan_maildir", self._real_scan)
        mbox = await self.open()
        await mbox.close()

    @async_test
    async def test_oserror_in_scan_becomes_unavailable(self) -> None:
        def broken(path: str, fmt: object) -> None:
            raise OSError(5, "Input/output error")

        self.patch(maildir_store, "scan_maildir", broken)
        with self.assertRaises(MailboxUnavailable):
            await self.store.open_mailbox("alice", None)

    def setUp(self) -> None:
        super().setUp()
        self._real_scan = maildir.scan_maildir


def reference_parse_lines(body: str) -> dict[str, tuple[str, int]]:
    """The index line parser as it was before the whole-text fast path."""
    entries: dict[str, tuple[str, int]] = {}
    for line in body.split("\n"):
        parts = line.split(" ", 2)
        if (len(parts) != 3 or not UIDL_RE.match(parts[0])
                or not (re.match(r"[0-9]+\Z", parts[1]) or parts[1] == "-") or not parts[2]):
            continue
        entries[parts[2]] = (parts[0], int(parts[1]) if parts[1] != "-" else -1)
    return entries


class FastPathTests(MaildirTestCase):
    def test_sorted_bases_matches_sort_key(self) -> None:
        rnd = random.Random(1939)
        pieces = ["1700000000", "1700000001", "999", "0999", "17000000000", "abc", "", "\u0661\u0662",
                  "1700000000x", "12"]
        for _ in range(500):
            bases = list({rnd.choice(pieces) + rnd.choice([".", "", ".."]) + rnd.choice(["a", "b.c", ""])
                          for _ in range(rnd.randrange(0, 8))} - {""})
            rnd.shuffle(bases)
            self.assertEqual(maildir._sorted_bases(bases), sorted(bases, key=message_sort_key), bases)
        # the common case takes the plain-order shortcut
        plain = [f"{1700000000 + i}.M{i}P1.host" for i in range(50)]
        self.assertTrue(maildir._plain_order(plain))
        self.assertFalse(maildir._plain_order(plain + ["999.M0.host"]))
        self.assertFalse(maildir._plain_order(plain + ["17000000x0.M0.host"]))

    def test_fast_index_parse_matches_line_parser(self) -> None:
        rnd = random.Random(1725)
        good = ["000000016b081451 326 1700000060.M1.popfixture", "u 0 b", "+migrated 12 1700000001.b.host",
                "UID1-1600000000 999 1700000000.a.host,S=2,W=999"]
        odd = ["u - b", "u 1 with space", "u x b", "u 1", "", "u\t1 b", " u 1 b", "u  1 b", "u 1 b\r",
               "\u00e9 1 b", "u \u0661 b", "x" * 71 + " 1 b", "u 1 b\udcff", "u 01 b"]
        fast_taken = 0
        for _ in range(2000):
            lines = [rnd.choice(good if rnd.random() < 0.8 else odd) for _ in range(rnd.randrange(0, 6))]
            lines = [line.replace(" b", f" b{rnd.randrange(4)}", 1) if line.endswith(" b") else line
                     for line in lines]
            body = "".join(line + "\n" for line in lines)
            if rnd.random() < 0.1:
                body = body.rstrip("\n")
            index = maildir.parse_index(f"popservice-uidlist 1 V7 N9\n{body}")
            assert index is not None
            self.assertEqual(list(index.entries.items()), list(reference_parse_lines(body).items()), body)
            if maildir._parse_index_lines_fast(body) is not None:
                fast_taken += 1
        self.assertGreater(fast_taken, 300)

    @async_test
    async def test_warm_login_does_not_write_the_index(self) -> None:
        for i in range(5):
            deliver(self.box, f"170000000{i}.m{i}.host", b"m\n")
        first = await self.session_listing()
        path = os.path.join(self.box, INDEX_FILE_NAME)
        before = os.stat(path)
        for _ in range(3):  # parsed, then from the cache
            self.assertEqual(await self.session_listing(), first)
        after = os.stat(path)
        self.assertEqual((after.st_ino, after.st_mtime_ns), (before.st_ino, before.st_mtime_ns))

    @async_test
    async def test_cached_listing_follows_the_index_content(self) -> None:
        for i in range(3):
            deliver(self.box, f"170000000{i}.m{i}.host", b"m\n")
        first = await self.session_listing()
        self.assertEqual(await self.session_listing(), first)
        # another writer changes a UIDL in place: same size, same times
        path = os.path.join(self.box, INDEX_FILE_NAME)
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(first[1].uid, "Z" * len(first[1].uid)))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing], [first[0].uid, "Z" * len(first[1].uid), first[2].uid])

    @async_test
    async def test_cached_listing_follows_the_files(self) -> None:
        for i in range(4):
            deliver(self.box, f"170000000{i}.m{i}.host", b"m%d\n" % i)
        first = await self.session_listing()
        self.assertEqual(await self.session_listing(), first)
        # flagged by another program: same listing, and the file is found where it is now
        os.rename(find(self.box, "1700000001.m1.host"),
                  os.path.join(self.box, "cur", "1700000001.m1.host:2,S"))
        mbox = await self.open()
        self.assertEqual(await self.listing(mbox), first)
        self.assertEqual(await self.content(mbox, 1), b"m1\n")
        await mbox.close()
        # deleted by another program, and a new delivery
        os.unlink(find(self.box, "1700000002.m2.host"))
        deliver(self.box, "1700000009.m9.host", b"m9\n")
        listing = await self.session_listing()
        self.assertEqual([m.uid for m in listing][:3], [first[0].uid, first[1].uid, first[3].uid])
        self.assertEqual(len(listing), 4)
        self.assertNotIn(listing[3].uid, {m.uid for m in first})
        self.assertEqual(await self.session_listing(), listing)

    @async_test
    async def test_unsorted_index_listed_in_order(self) -> None:
        for i in range(4):
            deliver(self.box, f"170000000{i}.m{i}.host", b"m\n")
        first = await self.session_listing()
        path = os.path.join(self.box, INDEX_FILE_NAME)
        with open(path, encoding="utf-8") as f:
            head, *lines = f.read().splitlines()
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join([head, *reversed(lines)]) + "\n")
        self.assertEqual(await self.session_listing(), first)
        self.assertEqual(await self.session_listing(), first)

    @async_test
    async def test_odd_file_names_skipped(self) -> None:
        deliver(self.box, "1700000000.a.host", b"one\n", "cur", "2,")
        deliver(self.box, "1700000001.b\nhost", b"no\n", "cur", "2,")
        deliver(self.box, ":2,S", b"no\n", "cur")
        deliver(self.box, ".hidden", b"no\n", "cur")
        logs = LogCapture(self)
        listing = await self.session_listing()
        self.assertEqual([m.size for m in listing], [5])
        self.assertTrue(any("line end in its name" in t for t in logs.texts()), logs.texts())

    @async_test
    async def test_file_type_lookup_failure(self) -> None:
        # where the directory gives no file type, is_file() stats, and that can fail
        deliver(self.box, "1700000000.a.host", b"one\n", "cur", "2,")
        deliver(self.box, "1700000001.b.host", b"two\n", "cur", "2,")
        real_scandir = os.scandir

        class Entry:
            def __init__(self, entry: os.DirEntry[str]) -> None:
                self.name = entry.name
                self._entry = entry

            def is_file(self, follow_symlinks: bool = True) -> bool:
                if "b.host" in self.name:
                    raise PermissionError(13, "Permission denied")
                return self._entry.is_file(follow_symlinks=follow_symlinks)

        class Listing:
            def __init__(self, path: str) -> None:
                self._it = real_scandir(path)

            def __enter__(self) -> Any:
                return (Entry(e) for e in self._it)

            def __exit__(self, *exc: object) -> None:
                self._it.close()

        self.patch(os, "scandir", Listing)
        listing = await self.session_listing()
        self.assertEqual([m.size for m in listing], [5])

    def test_listing_cache_bounds(self) -> None:
        cache = maildir._ListingCache(budget=5, minimum=2)
        infos = [MessageInfo(1, "u")]
        cache.put("small", b"i", ["a"], infos)  # under the minimum
        cache.put("huge", b"i", list("abcdef"), infos)  # over the budget
        self.assertIsNone(cache.get("small", b"i"))
        self.assertIsNone(cache.get("huge", b"i"))
        cache.put("x", b"1", ["a", "b", "c"], infos)
        cache.put("y", b"2", ["a", "b"], infos)
        self.assertEqual(cache.get("x", b"1"), (["a", "b", "c"], infos))  # x is now the most recent
        cache.put("z", b"3", ["a", "b"], infos)  # 7 > 5: y (least recently used) goes
        self.assertIsNone(cache.get("y", b"2"))
        self.assertIsNotNone(cache.get("x", b"1"))
        self.assertIsNone(cache.get("z", b"other content"))  # and that drops it
        self.assertIsNone(cache.get("z", b"3"))
        cache.clear()
        self.assertIsNone(cache.get("x", b"1"))


class CompactListingTests(unittest.TestCase):
    """L{Listing}: one string, its offsets and the sizes, read back exactly."""

    def test_round_trip(self) -> None:
        files = ["1700000000.a.host:2,", "new/1700000001.b.host", "1700000002.c \udcff host:2,S"]
        sizes = [5, 2**40, 0]
        uids = ["0000000165432100", "x", "UID-\x7e"]
        listing = Listing(files, sizes, uids)
        self.assertEqual(len(listing), 3)
        self.assertEqual(listing.files(), files)
        self.assertEqual(listing.uids(), uids)
        self.assertEqual([listing.size(i) for i in range(3)], sizes)
        self.assertEqual(list(listing), [MessageInfo(s, u) for s, u in zip(sizes, uids, strict=True)])
        self.assertEqual(listing[1], MessageInfo(2**40, "x"))
        self.assertEqual(listing, list(listing))
        self.assertEqual(listing.subset([2, 0]).files(), [files[2], files[0]])
        self.assertEqual(listing.subset([2, 0]).uids(), [uids[2], uids[0]])
        moved = listing.with_files(["a", "b", "c"])
        self.assertEqual(moved, listing)
        self.assertEqual(moved.files(), ["a", "b", "c"])
        for bad in (3, -1):
            self.assertRaises(IndexError, listing.file, bad)
            self.assertRaises(IndexError, listing.uid, bad)
        self.assertEqual(list(Listing([], [], [])), [])
        self.assertRaises(ValueError, Listing, ["a"], [], [])
