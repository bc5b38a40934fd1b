"""RFC 6856 UTF8 and LANG over loopback."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from popservice.server import i18n
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker


class UTF8AndLang(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        checker = memory_checker(alice="secret")
        # "Ä" composed in the database; the client sends it decomposed (A + U+0308).
        checker.addUser("jürgen".encode(), "pässwörd".encode())
        self.listen(make_factory(MemoryStore({"alice": [b"Subject: x\n\nbody\n"], "jürgen": []}), [checker]))

    @defer.inlineCallbacks
    def test_capa_lists_utf8_and_lang(self) -> Any:
        client = yield self.connect()
        first, body = yield client.command_multi(b"CAPA")
        self.assertIn(b"\r\nUTF8 USER\r\n", b"\r\n" + body)
        self.assertIn(b"\r\nLANG\r\n", b"\r\n" + body)

    @defer.inlineCallbacks
    def test_utf8_login_with_saslprep(self) -> Any:
        client = yield self.connect()
        self.assertTrue((yield client.command(b"UTF8")).startswith(b"+OK"))
        yield client.command("USER jürgen".encode())
        # U+00A0 (no-break space) maps to a space and NFKC composes "a" + U+0308 -> "ä".
        r = yield client.command("PASS pa\u0308sswörd".encode())
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_prohibited_characters_refused(self) -> Any:
        client = yield self.connect()
        yield client.command(b"UTF8")
        r = yield client.command("USER bad\u0007name".encode())
        self.assertTrue(r.startswith(b"-ERR"), r)

    @defer.inlineCallbacks
    def test_lang_list_and_switch(self) -> Any:
        client = yield self.connect()
        first, body = yield client.command_multi(b"LANG")
        self.assertEqual(body, b"en English\r\nde Deutsch\r\n")
        r = yield client.command(b"LANG de")
        self.assertTrue(r.startswith(b"+OK de "), r)
        r = yield client.command(b"STAT")
        self.assertEqual(r.decode(), "-ERR Befehl in diesem Zustand nicht erlaubt")
        yield client.command(b"USER alice")
        r = yield client.command(b"PASS wrong")
        self.assertEqual(r.decode(), "-ERR [AUTH] Anmeldung fehlgeschlagen")
        yield client.command(b"USER alice")
        r = yield client.command(b"PASS secret")
        self.assertEqual(r.decode(), "+OK Angemeldet, 1 Nachrichten")
        r = yield client.command(b"LANG *")
        self.assertTrue(r.startswith(b"+OK en "), r)
        r = yield client.command(b"RETR 9")
        self.assertEqual(r, b"-ERR No such message")
        r = yield client.command(b"LANG xx")
        self.assertTrue(r.startswith(b"-ERR"))

    def test_every_fixed_text_has_a_translation_or_number_pattern(self) -> None:
        self.assertEqual(i18n.translate("17 octets", "de"), "17 Oktette")
        self.assertEqual(i18n.localise(b"-ERR [IN-USE] Mailbox is locked by another session\r\n", "de"),
                         b"-ERR [IN-USE] Postfach wird von einer anderen Sitzung benutzt\r\n")
        self.assertEqual(i18n.localise(b"+OK\r\n", "de"), b"+OK\r\n")
        self.assertEqual(i18n.choose("DE-at"), "de")
