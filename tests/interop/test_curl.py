"""
curl's POP3 client against a real C{twistd pop3}: LIST, RETR of every awkward
shape (curl prints the body as sent, stuffing undone), UIDL, TOP, STLS with
C{--ssl-reqd}, implicit TLS with C{pop3s://}, APOP, certificate checks.
"""

from __future__ import annotations

import shutil
import subprocess

from twisted.trial import unittest

from tests.interop.world import World, crlf, run, shared_world, simple_messages

CURL = shutil.which("curl")


def build(world: World) -> None:
    world.add_standard_users()
    world.add_user("curldel", "curldelpw", simple_messages("curldel", 2))


class CurlTests(unittest.TestCase):
    skip = None if CURL else "curl is not installed"

    def make_world(self) -> World:
        """The running server these tests talk to (a subclass may serve another store)."""
        return shared_world(__name__, build)

    def setUp(self) -> None:
        self.world = self.make_world()
        self.alice = self.world.users["alice"]

    def url(self, path: str = "/", user: str = "alice", scheme: str = "pop3", host: str = "127.0.0.1") -> str:
        port = self.world.tls_port if scheme == "pop3s" else self.world.port
        return "%s://%s:%s@%s:%d%s" % (scheme, user, self.world.users[user].password, host, port, path)

    def curl(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        assert CURL
        p = run([CURL, "-sS", "--max-time", "20", *args], timeout=30)
        if ok:
            self.assertEqual(p.returncode, 0, "curl %s failed: %r" % (args, p.stderr))
        return p

    def listing(self) -> bytes:
        return b"".join(b"%d %d\r\n" % (m.number, m.size) for m in self.alice.messages)

    def test_list(self) -> None:
        self.assertEqual(self.curl(self.url()).stdout, self.listing())

    def test_list_one(self) -> None:
        # -I: a single-line answer, no body to wait for
        p = self.curl("-v", "-I", "-X", "LIST", self.url("/3"))
        self.assertIn(b"> LIST 3", p.stderr)
        self.assertIn(b"< +OK 3 %d" % self.alice.messages[2].size, p.stderr)

    def test_plaintext_login_on_loopback(self) -> None:
        # curl prefers SASL when CAPA lists it, else APOP when the greeting
        # carries a timestamp, and has no switch to force USER/PASS; on loopback
        # none of them is refused in the clear.
        p = self.curl("-v", self.url())
        self.assertTrue(b"> AUTH " in p.stderr or b"> APOP alice " in p.stderr, p.stderr)
        self.assertIn(b"< +OK Logged in", p.stderr)

    def test_retr_every_shape(self) -> None:
        for m in self.alice.messages:
            out = self.curl(self.url("/%d" % m.number)).stdout
            self.assertEqual(crlf(out), m.retr, "curl RETR %d (%s) differs" % (m.number, m.tag))
            # in fact curl passes the CRLFs through untouched
            self.assertEqual(out, m.retr, m.tag)

    def test_uidl(self) -> None:
        out = self.curl("-X", "UIDL", self.url()).stdout
        lines = out.split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        pairs = [line.split(b" ") for line in lines[:-1]]
        self.assertEqual([int(n) for n, _ in pairs], [m.number for m in self.alice.messages])
        self.assertEqual(len({u for _, u in pairs}), len(pairs))
        # same ids next time
        self.assertEqual(self.curl("-X", "UIDL", self.url()).stdout, out)

    def test_top(self) -> None:
        self.assertEqual(self.curl("-X", "TOP 1 0", self.url()).stdout, self.alice.messages[0].top(0))
        self.assertEqual(self.curl("-X", "TOP 2 4", self.url()).stdout, self.alice.messages[1].top(4))

    def test_stat(self) -> None:
        p = self.curl("-v", "-I", "-X", "STAT", self.url())
        total = sum(m.size for m in self.alice.messages)
        self.assertIn(b"< +OK %d %d" % (len(self.alice.messages), total), p.stderr)

    def test_stls_required(self) -> None:
        p = self.curl("-v", "--ssl-reqd", "--cacert", self.world.cert, self.url("/2"))
        self.assertIn(b"> STLS", p.stderr)
        self.assertEqual(p.stdout, self.alice.messages[1].retr)

    def test_stls_untrusted_certificate_fails(self) -> None:
        p = self.curl("--ssl-reqd", "--cacert", "/dev/null", self.url(), ok=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stdout, b"")

    def test_pop3s_implicit_tls(self) -> None:
        out = self.curl("--cacert", self.world.cert, self.url("/5", scheme="pop3s", host="localhost")).stdout
        self.assertEqual(out, self.alice.messages[4].retr)
        out = self.curl("--cacert", self.world.cert, self.url("/", scheme="pop3s")).stdout
        self.assertEqual(out, self.listing())

    def test_pop3s_untrusted_certificate_fails(self) -> None:
        p = self.curl(self.url("/", scheme="pop3s"), ok=False)
        self.assertEqual(p.returncode, 60, p.stderr)

    def test_apop(self) -> None:
        help_all = run([CURL, "--help", "all"]).stdout  # type: ignore[list-item]
        if b"--login-options" not in help_all:
            raise unittest.SkipTest("this curl has no --login-options")
        p = self.curl("-v", "--login-options", "AUTH=+APOP", self.url("/1"))
        self.assertIn(b"> APOP alice ", p.stderr)
        self.assertNotIn(b"> PASS", p.stderr)
        self.assertEqual(p.stdout, self.alice.messages[0].retr)

    def test_wrong_password(self) -> None:
        p = self.curl("pop3://alice:nope@127.0.0.1:%d/" % self.world.port, ok=False)
        self.assertEqual(p.returncode, 67, p.stderr)  # CURLE_LOGIN_DENIED

    def test_dele(self) -> None:
        p = self.curl("-v", "-I", "-X", "DELE", self.url("/1", user="curldel"))
        self.assertIn(b"> DELE 1", p.stderr)
        self.assertIn(b"< +OK", p.stderr)
        # curl sends QUIT when it tears its connection cache down (not shown by -v)
        self.assertEqual(self.world.present("curldel"), [2])
