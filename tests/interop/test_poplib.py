"""
Python's poplib against a real C{twistd pop3}: USER/PASS, STLS with a verifying
context, implicit TLS, APOP, TOP, UIDL, LIST, STAT, byte-exact RETR of every
awkward message shape, DELE semantics and the session lock.
"""

from __future__ import annotations

import poplib
import re
import socket
import ssl
import time

from twisted.trial import unittest

from tests.interop.world import TIMEOUT, World, shared_world, simple_messages, stuff


def build(world: World) -> None:
    world.add_standard_users()
    for name in ("delquit", "delrset", "delabort", "deltwice", "inuse", "inuse2"):
        world.add_user(name, name + "pw", simple_messages(name, 3))


class PoplibTests(unittest.TestCase):
    def make_world(self) -> World:
        """The running server these tests talk to (a subclass may serve another store)."""
        return shared_world(__name__, build)

    def setUp(self) -> None:
        self.world = self.make_world()
        self.alice = self.world.users["alice"]
        self.patch(poplib, "_MAXLINE", 1 << 20)

    def connect(self, user: str | None = None) -> poplib.POP3:
        p = poplib.POP3("127.0.0.1", self.world.port, timeout=TIMEOUT)
        self.addCleanup(self._close, p)
        if user:
            p.user(user)
            p.pass_(self.world.users[user].password)
        return p

    @staticmethod
    def _close(p: poplib.POP3) -> None:
        try:
            p.close()
        except OSError:
            pass

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.world.cert)

    def raw_retr(self, p: poplib.POP3, n: int) -> tuple[bytes, bytes]:
        """RETR n read off poplib's socket file: (wire body, body with stuffing undone)."""
        p._putcmd("RETR %d" % n)
        status = p.file.readline()
        self.assertTrue(status.startswith(b"+OK"), status)
        wire = []
        while True:
            line = p.file.readline()
            self.assertTrue(line.endswith(b"\r\n"), "line without CRLF / connection closed: %r" % line[:100])
            if line == b".\r\n":
                break
            wire.append(line)
        body = b"".join(x[1:] if x.startswith(b".") else x for x in wire)
        return b"".join(wire), body

    # -- login ------------------------------------------------------------------------------------

    def test_user_pass_plaintext_on_loopback(self) -> None:
        p = self.connect()
        self.assertTrue(p.getwelcome().startswith(b"+OK"))
        caps = p.capa()
        self.assertIn("USER", caps)
        self.assertIn("STLS", caps)
        self.assertIn("UIDL", caps)
        self.assertIn("TOP", caps)
        self.assertTrue(p.user("alice").startswith(b"+OK"))
        self.assertTrue(p.pass_("alicepw").startswith(b"+OK"))
        self.assertEqual(p.stat(), (len(self.alice.messages), sum(m.size for m in self.alice.messages)))
        self.assertTrue(p.quit().startswith(b"+OK"))

    def test_wrong_password(self) -> None:
        p = self.connect()
        p.user("alice")
        with self.assertRaises(poplib.error_proto) as cm:
            p.pass_("wrong")
        self.assertTrue(cm.exception.args[0].startswith(b"-ERR [AUTH]"), cm.exception.args)
        # the connection is still usable
        p.user("alice")
        self.assertTrue(p.pass_("alicepw").startswith(b"+OK"))

    def test_stls_verified(self) -> None:
        p = self.connect()
        p.stls(self.context())
        self.assertIsInstance(p.sock, ssl.SSLSocket)
        self.assertNotIn("STLS", p.capa())
        p.user("alice")
        p.pass_("alicepw")
        self.assertEqual(p.stat()[0], len(self.alice.messages))
        self.assertEqual(b"".join(ln + b"\r\n" for ln in p.retr(2)[1]), self.alice.messages[1].retr)
        p.quit()

    def test_stls_untrusted_certificate_fails(self) -> None:
        p = self.connect()
        with self.assertRaises(ssl.SSLCertVerificationError):
            p.stls(ssl.create_default_context(cafile=None, cadata=None))

    def test_stls_twice_refused(self) -> None:
        p = self.connect()
        p.stls(self.context())
        with self.assertRaises(poplib.error_proto):
            p._shortcmd("STLS")

    def test_pop3_ssl_implicit(self) -> None:
        p = poplib.POP3_SSL("127.0.0.1", self.world.tls_port, context=self.context(), timeout=TIMEOUT)
        self.addCleanup(self._close, p)
        self.assertTrue(p.getwelcome().startswith(b"+OK"))
        self.assertNotIn("STLS", p.capa())
        p.user("alice")
        p.pass_("alicepw")
        m = self.alice.messages[4]
        self.assertEqual(self.raw_retr(p, m.number)[1], m.retr)
        p.quit()

    def test_apop(self) -> None:
        p = self.connect()
        self.assertRegex(p.getwelcome(), rb"<[^<>]+@[^<>]+>")
        self.assertTrue(p.apop("alice", "alicepw").startswith(b"+OK"))
        self.assertEqual(p.stat()[0], len(self.alice.messages))
        p.quit()

    def test_apop_wrong_password(self) -> None:
        p = self.connect()
        with self.assertRaises(poplib.error_proto) as cm:
            p.apop("alice", "wrong")
        self.assertTrue(cm.exception.args[0].startswith(b"-ERR"), cm.exception.args)

    def test_apop_timestamps_unique(self) -> None:
        stamps = set()
        for _ in range(5):
            p = self.connect()
            stamps.add(re.search(rb"<[^<>]+>", p.getwelcome()).group(0))
            p.quit()
        self.assertEqual(len(stamps), 5)

    # -- transaction ------------------------------------------------------------------------------

    def test_stat_and_list_sizes(self) -> None:
        p = self.connect("alice")
        resp, listing, octets = p.list()
        self.assertTrue(resp.startswith(b"+OK"))
        got = [tuple(int(x) for x in line.split()) for line in listing]
        self.assertEqual(got, [(m.number, m.size) for m in self.alice.messages])
        for m in self.alice.messages:
            self.assertEqual(p.list(m.number), b"+OK %d %d" % (m.number, m.size))
        self.assertEqual(p.stat(), (len(self.alice.messages), sum(m.size for m in self.alice.messages)))
        with self.assertRaises(poplib.error_proto):
            p.list(len(self.alice.messages) + 1)

    def test_retr_every_shape_byte_exact(self) -> None:
        p = self.connect("alice")
        for m in self.alice.messages:
            wire, body = self.raw_retr(p, m.number)
            self.assertEqual(body, m.retr, "RETR %d (%s) differs" % (m.number, m.tag))
            self.assertEqual(wire, stuff(m.retr), "RETR %d (%s) stuffed wrongly" % (m.number, m.tag))
        p.quit()

    def test_retr_with_poplib_api(self) -> None:
        p = self.connect("alice")
        for m in self.alice.messages:
            resp, lines, octets = p.retr(m.number)
            self.assertTrue(resp.startswith(b"+OK"))
            self.assertEqual(b"".join(ln + b"\r\n" for ln in lines), m.retr, m.tag)
        p.quit()

    def test_top(self) -> None:
        p = self.connect("alice")
        for m in self.alice.messages:
            for n in (0, 1, 3, 100000):
                resp, lines, _ = p.top(m.number, n)
                self.assertEqual(
                    b"".join(ln + b"\r\n" for ln in lines), m.top(n), "TOP %d %d (%s)" % (m.number, n, m.tag)
                )
        p.quit()

    def test_uidl(self) -> None:
        p = self.connect("alice")
        resp, listing, _ = p.uidl()
        pairs = [line.split() for line in listing]
        self.assertEqual([int(n) for n, _ in pairs], [m.number for m in self.alice.messages])
        uids = [u for _, u in pairs]
        self.assertEqual(len(set(uids)), len(uids))
        for u in uids:
            self.assertRegex(u, rb"^[\x21-\x7e]{1,70}$")
        self.assertEqual(p.uidl(3), b"+OK 3 " + uids[2])
        p.quit()
        # stable across sessions
        p = self.connect("alice")
        self.assertEqual([line.split()[1] for line in p.uidl()[1]], uids)
        p.quit()

    def test_noop_and_unknown_message(self) -> None:
        p = self.connect("alice")
        self.assertTrue(p.noop().startswith(b"+OK"))
        for cmd in ("RETR 0", "RETR 99", "TOP 99 0", "UIDL 99", "DELE 99", "RETR x"):
            with self.assertRaises(poplib.error_proto, msg=cmd):
                p._shortcmd(cmd)
        p.quit()

    # -- deletion ---------------------------------------------------------------------------------

    def test_dele_quit_deletes(self) -> None:
        p = self.connect("delquit")
        p.dele(1)
        p.dele(3)
        self.assertEqual(p.stat()[0], 1)
        with self.assertRaises(poplib.error_proto):
            p.retr(1)
        self.assertEqual(self.world.present("delquit"), [1, 2, 3])  # only marked so far
        self.assertTrue(p.quit().startswith(b"+OK"))
        self.assertEqual(self.world.present("delquit"), [2])
        p = self.connect("delquit")
        m2 = self.world.users["delquit"].messages[1]
        self.assertEqual(p.stat(), (1, m2.size))
        self.assertEqual(b"".join(ln + b"\r\n" for ln in p.retr(1)[1]), m2.retr)
        p.quit()

    def test_dele_abrupt_close_deletes_nothing(self) -> None:
        p = self.connect("delabort")
        p.dele(1)
        p.dele(2)
        p.sock.shutdown(socket.SHUT_RDWR)
        p.sock.close()
        # the next login only succeeds once the server has noticed the close
        deadline = time.monotonic() + 5
        while True:
            p = self.connect()
            p.user("delabort")
            try:
                p.pass_("delabortpw")
                break
            except poplib.error_proto as e:
                if not e.args[0].startswith(b"-ERR [IN-USE]") or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.assertEqual(p.stat()[0], 3)
        p.quit()
        self.assertEqual(self.world.present("delabort"), [1, 2, 3])

    def test_dele_rset_deletes_nothing(self) -> None:
        p = self.connect("delrset")
        p.dele(1)
        p.dele(2)
        self.assertEqual(p.stat()[0], 1)
        p.rset()
        self.assertEqual(p.stat()[0], 3)
        self.assertTrue(p.quit().startswith(b"+OK"))
        self.assertEqual(self.world.present("delrset"), [1, 2, 3])

    def test_deleted_message_cannot_be_used(self) -> None:
        p = self.connect("deltwice")
        p.dele(2)
        for cmd in ("DELE 2", "RETR 2", "TOP 2 0", "LIST 2", "UIDL 2"):
            with self.assertRaises(poplib.error_proto, msg=cmd):
                p._shortcmd(cmd)
        self.assertEqual([ln.split()[0] for ln in p.list()[1]], [b"1", b"3"])
        self.assertEqual([ln.split()[0] for ln in p.uidl()[1]], [b"1", b"3"])
        p.rset()
        p.quit()

    def test_second_login_in_use(self) -> None:
        first = self.connect("inuse")
        second = self.connect()
        second.user("inuse")
        with self.assertRaises(poplib.error_proto) as cm:
            second.pass_("inusepw")
        self.assertTrue(cm.exception.args[0].startswith(b"-ERR [IN-USE]"), cm.exception.args)
        # APOP too
        third = self.connect()
        with self.assertRaises(poplib.error_proto) as cm:
            third.apop("inuse", "inusepw")
        self.assertTrue(cm.exception.args[0].startswith(b"-ERR [IN-USE]"), cm.exception.args)
        first.quit()
        again = self.connect("inuse")
        self.assertEqual(again.stat()[0], 3)
        again.quit()

    def test_other_users_not_blocked_by_lock(self) -> None:
        a = self.connect("inuse2")
        b = self.connect("carol")
        self.assertEqual(a.stat()[0], 3)
        self.assertEqual(b.stat()[0], 3)
        a.quit()
        b.quit()
