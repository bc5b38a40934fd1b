"""
getmail6 against a real C{twistd pop3}: SimplePOP3Retriever (USER/PASS and
APOP) and SimplePOP3SSLRetriever (implicit TLS, verified against the test
certificate) deliver every awkward message shape into a Maildir; a second run
fetches nothing (getmail remembers UIDLs in its oldmail file); deletion with
C{delete = true}.

getmail refuses to deliver as root, so it runs as C{nobody} into
world-writable directories.  What getmail itself changes, and the comparison
therefore undoes (nothing else):

 - it writes its own C{Return-Path:} line first (taken from the message's
   Return-Path, else Sender, else C{<unknown>}) and drops the original one;
 - it re-serialises the header with Python's C{email} package, which refolds
   long header lines (the unfolded header must be identical).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile

from twisted.trial import unittest

from tests.interop.world import World, crlf, run, shared_world, simple_messages

GETMAIL = shutil.which("getmail")
RUNUSER = shutil.which("runuser")
SETPRIV = shutil.which("setpriv")


def _skip_reason() -> str | None:
    if not GETMAIL:
        return "getmail (getmail6) is not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "getmail will not deliver as root and there is no nobody account"
        if not (RUNUSER or SETPRIV):
            return "getmail will not deliver as root and neither runuser nor setpriv is installed"
    return None


def build(world: World) -> None:
    world.add_standard_users()
    world.add_user("gmdel", "gmdelpw", simple_messages("gmdel", 3))


def as_unprivileged(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    if RUNUSER:
        return [RUNUSER, "-u", "nobody", "--", *argv]
    nobody = pwd.getpwnam("nobody")
    assert SETPRIV
    return [SETPRIV, "--reuid=%d" % nobody.pw_uid, "--regid=%d" % nobody.pw_gid, "--clear-groups", *argv]


_RETURN_PATH = re.compile(rb"^Return-Path:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", re.I | re.M)


def normalise(message: bytes) -> bytes:
    """CRLF line ends, Return-Path removed, header unfolded; the body untouched."""
    message = crlf(message)
    end = message.find(b"\r\n\r\n")
    header, body = (message[: end + 2], message[end + 2 :]) if end >= 0 else (message, b"")
    header = _RETURN_PATH.sub(b"", header)
    header = re.sub(rb"\r\n(?=[ \t])", b"", header)
    return header + body


class GetmailTests(unittest.TestCase):
    skip = _skip_reason()

    def setUp(self) -> None:
        self.world = shared_world(__name__, build)
        self.work = tempfile.mkdtemp(prefix="popservice-getmail-")
        self.addCleanup(shutil.rmtree, self.work, True)
        os.chmod(self.work, 0o755)
        self.getmaildir = os.path.join(self.work, "getmail")
        os.makedirs(self.getmaildir)
        os.chmod(self.getmaildir, 0o777)
        self.maildir = os.path.join(self.work, "Maildir")
        for sub in ("", "cur", "new", "tmp"):
            os.makedirs(os.path.join(self.maildir, sub), exist_ok=True)
            os.chmod(os.path.join(self.maildir, sub), 0o777)

    def getmail(
        self,
        user: str,
        *,
        ssl: bool = False,
        apop: bool = False,
        delete: bool = False,
        cafile: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        assert GETMAIL
        retriever = "SimplePOP3SSLRetriever" if ssl else "SimplePOP3Retriever"
        extra = ""
        if ssl:
            extra = "ca_certs = %s\nssl_cert_hostname = localhost\n" % (cafile or self.world.cert)
        rc = os.path.join(self.getmaildir, "getmailrc")
        with open(rc, "w") as f:
            f.write(
                "[retriever]\n"
                "type = %s\nserver = 127.0.0.1\nport = %d\nusername = %s\npassword = %s\n"
                "use_apop = %s\ntimeout = 30\n%s\n"
                "[destination]\ntype = Maildir\npath = %s/\n\n"
                "[options]\nread_all = false\ndelete = %s\ndelivered_to = false\nreceived = false\n"
                "verbose = 2\n"
                % (
                    retriever,
                    self.world.tls_port if ssl else self.world.port,
                    user,
                    self.world.users[user].password,
                    apop,
                    extra,
                    self.maildir,
                    delete,
                )
            )
        os.chmod(rc, 0o644)
        return run(as_unprivileged([GETMAIL, "--getmaildir", self.getmaildir, "--rcfile", rc]))

    def delivered(self) -> list[bytes]:
        out = []
        for sub in ("new", "cur"):
            d = os.path.join(self.maildir, sub)
            for name in os.listdir(d):
                with open(os.path.join(d, name), "rb") as f:
                    out.append(f.read())
        return out

    def check_all(self, user: str, **options: bool) -> None:
        p = self.getmail(user, **options)
        self.assertEqual(p.returncode, 0, p.stdout[-2000:] + p.stderr)
        msgs = self.world.users[user].messages
        got = self.delivered()
        self.assertEqual(len(got), len(msgs))
        # getmail's file names do not keep the order: match each by its Message-ID
        by_id = {}
        for data in got:
            mid = re.search(rb"^Message-ID: *(<[^>]+>)", data, re.I | re.M)
            assert mid is not None, data[:300]
            by_id[mid.group(1)] = data
        for m in msgs:
            mid = re.search(rb"^Message-ID: *(<[^>]+>)", m.retr, re.I | re.M)
            assert mid is not None
            self.assertIn(mid.group(1), by_id, m.tag)
            data = by_id[mid.group(1)]
            self.assertEqual(
                normalise(data), normalise(m.retr), "getmail got message %d (%s) wrong" % (m.number, m.tag)
            )
            # getmail writes its own Return-Path first: the sender's, or <unknown>
            self.assertTrue(
                data.startswith(b"Return-Path: <sender@example.org>\n")
                or data.startswith(b"Return-Path: <unknown>\n"),
                data[:80],
            )
        again = self.getmail(user, **options)
        self.assertEqual(again.returncode, 0, again.stdout[-2000:] + again.stderr)
        self.assertIn(b"0 messages", again.stdout)
        self.assertEqual(len(self.delivered()), len(msgs))
        self.assertEqual(self.world.present(user), [m.number for m in msgs])

    def test_pop3_user_pass(self) -> None:
        self.check_all("alice")

    def test_pop3_apop(self) -> None:
        before = self.world.logins("APOP")
        self.check_all("alice", apop=True)
        self.assertEqual(self.world.logins("APOP"), before + 2)

    def test_pop3_ssl(self) -> None:
        self.check_all("alice", ssl=True)

    def test_pop3_ssl_untrusted_certificate(self) -> None:
        p = self.getmail("alice", ssl=True, cafile=self.world.untrusted_cert())
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(self.delivered(), [])

    def test_empty_mailbox(self) -> None:
        p = self.getmail("bob")
        self.assertEqual(p.returncode, 0, p.stdout[-2000:] + p.stderr)
        self.assertEqual(self.delivered(), [])

    def test_delete(self) -> None:
        msgs = self.world.users["gmdel"].messages
        p = self.getmail("gmdel", delete=True)
        self.assertEqual(p.returncode, 0, p.stdout[-2000:] + p.stderr)
        self.assertEqual(
            sorted(normalise(d) for d in self.delivered()), sorted(normalise(m.retr) for m in msgs)
        )
        self.assertEqual(self.world.present("gmdel"), [])
