"""
RFC 6856 UTF-8 user names get their Maildir: poplib sends UTF8, then USER/PASS
with a name in several scripts, against a real server over a passwd-file and
Maildirs on disk.  Names that would be unsafe as paths stay refused.
"""

from __future__ import annotations

import os
import poplib
from typing import Any

from twisted.internet import defer, threads
from twisted.trial import unittest

from popservice.auth.passwdfile import PasswdFileChecker
from popservice.stores.maildir import MaildirStore
from popservice.stores.maildir.store import valid_user_name
from tests.support import ServerMixin, make_factory

NAME = "utf8-müller-日本"


class UTF8UserNames(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        root = os.path.abspath(self.mktemp())
        box = os.path.join(root, "mail", NAME)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(box, sub))
        with open(os.path.join(box, "new", "1700000000.M1.test"), "wb") as f:
            f.write("Subject: Grüße\n\nbody\n".encode())
        passwd = os.path.join(root, "passwd")
        with open(passwd, "w", encoding="utf-8") as f:
            f.write("%s:{PLAIN}pässwört:::::\n" % (NAME,))
        store = MaildirStore(os.path.join(root, "mail", "%u"))
        self.port = self.listen(make_factory(store, [PasswdFileChecker(passwd)]))

    @defer.inlineCallbacks
    def test_poplib_after_utf8(self) -> Any:
        def session() -> tuple[bytes, tuple[int, int]]:
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            try:
                answer = client.utf8()
                client.user(NAME)
                client.pass_("pässwört")
                return answer, client.stat()
            finally:
                client.quit()

        answer, stat = yield threads.deferToThread(session)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertEqual(stat[0], 1)

    def test_unsafe_names_still_refused(self) -> None:
        for name in ("../etc", "a/b", ".hidden", "a..b", "a\x00b", "tab\tname", "x" * 65,
                     "Mu\u0308ller",  # not NFC
                     "\udcff"):  # an undecodable byte
            self.assertFalse(valid_user_name(name), repr(name))
        for name in (NAME, "Müller", "δοκιμή", "user.name+tag@example.org"):
            self.assertTrue(valid_user_name(name), repr(name))
