"""
fetchmail against a real C{twistd pop3}: every awkward message shape handed to
an MDA byte for byte (fetchmail hands LF line ends to an MDA and, with
C{set invisible} and C{no rewrite}, adds and changes nothing else), a second
poll with the same UIDL file fetches nothing; USER/PASS and APOP; STLS and
implicit TLS with certificate checking against the test certificate; deletion
without C{keep}.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from twisted.trial import unittest

from tests.interop.world import World, crlf, run, shared_world, simple_messages

FETCHMAIL = shutil.which("fetchmail")

#: fetchmail's exit codes (fetchmail(1), EXIT CODES)
PS_SUCCESS, PS_NOMAIL, PS_AUTHFAIL, PS_SOCKET = 0, 1, 3, 2


def build(world: World) -> None:
    world.add_standard_users()
    world.add_user("fmdel", "fmdelpw", simple_messages("fmdel", 3))


class FetchmailTests(unittest.TestCase):
    skip = None if FETCHMAIL else "fetchmail is not installed"

    def make_world(self) -> World:
        """The running server these tests talk to (a subclass may serve another store)."""
        return shared_world(__name__, build)

    def setUp(self) -> None:
        self.world = self.make_world()
        self.work = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.work, "home")
        os.makedirs(self.home, mode=0o700)
        self.out = os.path.join(self.work, "out")
        os.makedirs(self.out)
        # an MDA that stores each message in a numbered file (no % in its path: fetchmail expands those)
        self.mda = os.path.join(self.work, "mda.sh")
        with open(self.mda, "w") as f:
            f.write(
                '#!/bin/sh\nn=$(ls "%s" | wc -l)\nexec cat > "%s/$(printf %%05d "$n")"\n'
                % (self.out, self.out)
            )
        os.chmod(self.mda, 0o755)

    def fetchmail(
        self,
        user: str,
        server_options: str,
        ssl_options: str = "sslproto ''",
        user_options: str = "keep",
        password: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        assert FETCHMAIL
        pw = password if password is not None else self.world.users[user].password
        rc = os.path.join(self.home, "fetchmailrc")
        with open(rc, "w") as f:
            f.write(
                "set no bouncemail\n"
                "set invisible\n"
                "poll 127.0.0.1 %s uidl timeout 30\n"
                '  user "%s" there with password "%s" is "root" here %s %s no rewrite mda "%s"\n'
                % (server_options, user, pw, ssl_options, user_options, self.mda)
            )
        os.chmod(rc, 0o600)
        env = dict(os.environ, FETCHMAILHOME=self.home, HOME=self.home)
        return run(
            # As root fetchmail locks /var/run/fetchmail.pid: a lock file of our own
            # keeps concurrent runs (trial -j, another session) from refusing.
            [FETCHMAIL, "-f", rc, "-v", "--nosyslog", "--idfile", os.path.join(self.home, "ids"),
             "--pidfile", os.path.join(self.home, "fetchmail.pid")], env=env
        )

    def delivered(self) -> list[bytes]:
        out = []
        for name in sorted(os.listdir(self.out)):
            with open(os.path.join(self.out, name), "rb") as f:
                out.append(f.read())
        return out

    def check_all(self, user: str, server_options: str, ssl_options: str = "sslproto ''") -> bytes:
        p = self.fetchmail(user, server_options, ssl_options)
        self.assertEqual(p.returncode, PS_SUCCESS, p.stdout[-2000:] + p.stderr)
        msgs = self.world.users[user].messages
        got = self.delivered()
        self.assertEqual(len(got), len(msgs))
        for data, m in zip(got, msgs):
            self.assertEqual(crlf(data), m.retr, "fetchmail got message %d (%s) wrong" % (m.number, m.tag))
        again = self.fetchmail(user, server_options, ssl_options)
        self.assertEqual(again.returncode, PS_NOMAIL, again.stdout[-2000:] + again.stderr)
        self.assertEqual(len(self.delivered()), len(msgs))
        self.assertEqual(self.world.present(user), [m.number for m in msgs])
        return p.stdout

    def test_user_pass_plaintext_loopback(self) -> None:
        log = self.check_all("alice", "protocol pop3 port %d auth password" % self.world.port)
        self.assertIn(b"POP3> USER alice", log)

    def test_apop(self) -> None:
        log = self.check_all("alice", "protocol apop port %d" % self.world.port)
        self.assertIn(b"POP3> APOP alice", log)

    def test_stls(self) -> None:
        log = self.check_all(
            "alice",
            "protocol pop3 port %d auth password" % self.world.port,
            "sslproto 'tls1.2+' sslcertck sslcommonname localhost sslcertfile '%s'" % self.world.cert,
        )
        self.assertIn(b"POP3> STLS", log)

    def test_implicit_tls(self) -> None:
        self.check_all(
            "alice",
            "protocol pop3 port %d auth password" % self.world.tls_port,
            "ssl sslcertck sslcommonname localhost sslcertfile '%s'" % self.world.cert,
        )

    def test_untrusted_certificate(self) -> None:
        p = self.fetchmail(
            "alice",
            "protocol pop3 port %d auth password" % self.world.tls_port,
            "ssl sslcertck sslcommonname localhost sslcertfile '%s'" % self.world.untrusted_cert(),
        )
        self.assertNotIn(p.returncode, (PS_SUCCESS, PS_NOMAIL))
        self.assertEqual(self.delivered(), [])

    def test_wrong_password(self) -> None:
        p = self.fetchmail("alice", "protocol pop3 port %d auth password" % self.world.port, password="wrong")
        self.assertEqual(p.returncode, PS_AUTHFAIL, p.stdout[-2000:])
        self.assertEqual(self.delivered(), [])

    def test_delete(self) -> None:
        msgs = self.world.users["fmdel"].messages
        p = self.fetchmail(
            "fmdel", "protocol pop3 port %d auth password" % self.world.port, user_options="fetchall"
        )
        self.assertEqual(p.returncode, PS_SUCCESS, p.stdout[-2000:])
        self.assertIn(b"POP3> RETR 1", p.stdout)
        self.assertIn(b"POP3> DELE 3", p.stdout)
        self.assertEqual([crlf(d) for d in self.delivered()], [m.retr for m in msgs])
        self.assertEqual(self.world.present("fmdel"), [])
