"""
mpop against a real C{twistd pop3}: every awkward message shape delivered into
a Maildir byte for byte (up to the LF line ends Maildir delivery uses), a second
run with the same UIDL file fetches nothing; USER and APOP logins; STLS and
implicit TLS with the test certificate as the trust file; deletion with
C{--keep=off}.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from twisted.trial import unittest

from tests.interop.world import World, crlf, run, shared_world, simple_messages

MPOP = shutil.which("mpop")


def build(world: World) -> None:
    world.add_standard_users()
    world.add_user("mpopdel", "mpopdelpw", simple_messages("mpopdel", 3))


def delivered(maildir: str) -> list[bytes]:
    """Messages in C{maildir}/new in delivery order (mpop names them ...Q<n>...)."""
    names = os.listdir(os.path.join(maildir, "new"))

    def order(name: str) -> tuple[int, int, str]:
        m = re.search(r"^(\d+)\.M(\d+)", name)
        return (int(m.group(1)), int(m.group(2)), name) if m else (0, 0, name)

    out = []
    for name in sorted(names, key=order):
        with open(os.path.join(maildir, "new", name), "rb") as f:
            out.append(f.read())
    return out


class MpopTests(unittest.TestCase):
    skip = None if MPOP else "mpop is not installed"

    def make_world(self) -> World:
        """The running server these tests talk to (a subclass may serve another store)."""
        return shared_world(__name__, build)

    def setUp(self) -> None:
        self.world = self.make_world()
        self.work = os.path.abspath(self.mktemp())
        self.maildir = os.path.join(self.work, "Maildir")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.maildir, sub))
        self.uidls = os.path.join(self.work, "uidls")

    def mpop(
        self, user: str, *options: str, password: str | None = None, port: int | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        assert MPOP
        pw = password if password is not None else self.world.users[user].password
        argv = [
            MPOP,
            "-q",
            "--host=127.0.0.1",
            "--port=%d" % (port or self.world.port),
            "--user=" + user,
            "--passwordeval=echo " + pw,
            "--keep=on",
            "--only-new=on",
            "--uidls-file=" + self.uidls,
            "--delivery=maildir," + self.maildir,
            "--received-header=off",
            "--timeout=30",
            *options,
        ]
        return run(argv)

    def check_all(self, user: str, *options: str, port: int | None = None) -> None:
        p = self.mpop(user, *options, port=port)
        self.assertEqual(p.returncode, 0, p.stderr)
        got = delivered(self.maildir)
        msgs = self.world.users[user].messages
        self.assertEqual(len(got), len(msgs))
        for data, m in zip(got, msgs):
            # Maildir delivery stores LF line ends; nothing else may differ
            self.assertEqual(crlf(data), m.retr, "mpop got message %d (%s) wrong" % (m.number, m.tag))
        # the second run knows every UIDL
        p = self.mpop(user, *options, port=port)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(len(delivered(self.maildir)), len(msgs))
        # and nothing was deleted on the server
        self.assertEqual(self.world.present(user), [m.number for m in msgs])

    def test_user_plaintext_loopback(self) -> None:
        self.check_all("alice", "--auth=user", "--tls=off")

    def apop_logins(self) -> int:
        return self.world.logins("APOP")

    def test_apop(self) -> None:
        before = self.apop_logins()
        self.check_all("alice", "--auth=apop", "--tls=off")
        self.assertEqual(self.apop_logins(), before + 2)

    def test_stls(self) -> None:
        self.check_all(
            "alice", "--auth=user", "--tls=on", "--tls-starttls=on", "--tls-trust-file=" + self.world.cert
        )

    def test_implicit_tls(self) -> None:
        self.check_all(
            "alice",
            "--auth=user",
            "--tls=on",
            "--tls-starttls=off",
            "--tls-trust-file=" + self.world.cert,
            port=self.world.tls_port,
        )

    def test_implicit_tls_apop(self) -> None:
        before = self.apop_logins()
        self.check_all(
            "carol",
            "--auth=apop",
            "--tls=on",
            "--tls-starttls=off",
            "--tls-trust-file=" + self.world.cert,
            port=self.world.tls_port,
        )
        self.assertEqual(self.apop_logins(), before + 2)

    def test_untrusted_certificate(self) -> None:
        p = self.mpop(
            "alice",
            "--auth=user",
            "--tls=on",
            "--tls-starttls=on",
            "--tls-trust-file=" + self.world.untrusted_cert(),
        )
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(delivered(self.maildir), [])

    def test_wrong_password(self) -> None:
        p = self.mpop("alice", "--auth=user", "--tls=off", password="wrong")
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(b"authentication failed", p.stderr.lower())
        self.assertEqual(delivered(self.maildir), [])

    def test_empty_mailbox(self) -> None:
        p = self.mpop("bob", "--auth=user", "--tls=off")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(delivered(self.maildir), [])

    def test_delete(self) -> None:
        msgs = self.world.users["mpopdel"].messages
        p = self.mpop(
            "mpopdel",
            "--auth=user",
            "--tls=on",
            "--tls-starttls=on",
            "--tls-trust-file=" + self.world.cert,
            "--keep=off",
        )
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual([crlf(d) for d in delivered(self.maildir)], [m.retr for m in msgs])
        self.assertEqual(self.world.present("mpopdel"), [])
