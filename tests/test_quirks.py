"""--client-quirks outlook-no-nuls,oe-ns-eoh: opt-in RETR/TOP workarounds, over real loopback sessions."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from popservice.server.quirks import HeaderEnd, parse_quirks
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker

WITH_NULS = b"Subject: n\0uls\n\nbo\0dy\0\n"
ALL_HEADER = b"Subject: only a header\nX-Other: yes"
ALL_HEADER_LF = b"Subject: only a header\n"
NORMAL = b"Subject: normal\n\nbody line\n"


class ParseQuirks(unittest.TestCase):
    def test_names(self) -> None:
        self.assertEqual(parse_quirks(""), frozenset())
        self.assertEqual(parse_quirks("outlook-no-nuls, OE-NS-EOH"), {"outlook-no-nuls", "oe-ns-eoh"})
        error = self.assertRaises(ValueError, parse_quirks, "outlook-no-nuls,nonsense")
        self.assertIn("nonsense", str(error))


class HeaderEndTests(unittest.TestCase):
    def feed(self, *chunks: bytes) -> bool:
        end = HeaderEnd()
        for chunk in chunks:
            end.feed(chunk)
        return end.seen

    def test_any_chunking(self) -> None:
        for message, seen in ((b"A: b\r\n\r\nbody", True), (b"A: b\n\nbody", True), (b"\r\nbody", True),
                              (b"\nbody", True), (b"A: b\r\nC: d\r\n", False), (b"A: b", False)):
            for cut in range(len(message) + 1):
                self.assertEqual(self.feed(message[:cut], message[cut:]), seen, (message, cut))
            self.assertEqual(self.feed(*[message[i:i + 1] for i in range(len(message))]), seen, message)


class Quirks(ServerMixin, unittest.TestCase):
    def start(self, quirks: str) -> None:
        store = MemoryStore({"alice": [WITH_NULS, ALL_HEADER, ALL_HEADER_LF, NORMAL]}, chunk=3)
        self.listen(make_factory(store, [memory_checker(alice="secret")], client_quirks=parse_quirks(quirks)))

    @defer.inlineCallbacks
    def test_no_quirks_by_default(self) -> Any:
        self.start("")
        client = yield self.login()
        first, body = yield client.command_multi(b"RETR 1")
        self.assertEqual(body, b"Subject: n\0uls\r\n\r\nbo\0dy\0\r\n")
        first, body = yield client.command_multi(b"TOP 2 0")
        self.assertEqual(body, b"Subject: only a header\r\nX-Other: yes\r\n")

    @defer.inlineCallbacks
    def test_outlook_no_nuls(self) -> Any:
        self.start("outlook-no-nuls")
        client = yield self.login()
        listed = yield client.command(b"LIST 1")
        first, body = yield client.command_multi(b"RETR 1")
        self.assertEqual(body, b"Subject: nuls\r\n\r\nbody\r\n")
        # LIST and the +OK keep the stored size: 3 octets more than sent (as in Dovecot)
        self.assertEqual(listed, b"+OK 1 %d" % (len(WITH_NULS) + 3,))
        self.assertEqual(first, b"+OK %d octets" % (len(WITH_NULS) + 3,))
        first, body = yield client.command_multi(b"TOP 1 1")
        self.assertEqual(body, b"Subject: nuls\r\n\r\nbody\r\n")
        first, body = yield client.command_multi(b"TOP 2 0")  # the other quirk is off
        self.assertEqual(body, b"Subject: only a header\r\nX-Other: yes\r\n")

    @defer.inlineCallbacks
    def test_oe_ns_eoh(self) -> Any:
        self.start("oe-ns-eoh")
        client = yield self.login()
        for command, expected in (
                (b"TOP 2 0", b"Subject: only a header\r\nX-Other: yes\r\n\r\n"),
                (b"TOP 2 5", b"Subject: only a header\r\nX-Other: yes\r\n\r\n"),
                (b"TOP 3 0", b"Subject: only a header\r\n\r\n"),
                # a header that ends in an empty line gets nothing more
                (b"TOP 4 0", b"Subject: normal\r\n\r\n"),
                (b"TOP 4 1", b"Subject: normal\r\n\r\nbody line\r\n"),
                # RETR is never changed; NULs stay without outlook-no-nuls
                (b"RETR 2", b"Subject: only a header\r\nX-Other: yes\r\n"),
                (b"TOP 1 0", b"Subject: n\0uls\r\n\r\n")):
            first, body = yield client.command_multi(command)
            self.assertTrue(first.startswith(b"+OK"), first)
            self.assertEqual(body, expected, command)

    @defer.inlineCallbacks
    def test_both(self) -> Any:
        self.start("outlook-no-nuls,oe-ns-eoh")
        client = yield self.login()
        first, body = yield client.command_multi(b"TOP 1 0")
        self.assertEqual(body, b"Subject: nuls\r\n\r\n")
        first, body = yield client.command_multi(b"TOP 2 0")
        self.assertEqual(body, b"Subject: only a header\r\nX-Other: yes\r\n\r\n")
