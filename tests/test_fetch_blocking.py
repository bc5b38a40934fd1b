"""
The blocking fetch engine (popservice.client.blocking) against a live Dovecot:
plaintext, STLS and implicit TLS, byte-identical delivery of 1,000 messages,
keep/delete modes, certificate verification, start-up without Twisted, and
SIGKILL at random moments followed by a rerun (exactly-once delivery).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial import unittest

from popservice.client import blocking
from popservice.client.delivery import FetchOptions, FetchResult, MaildirTarget, make_target
from popservice.client.url import parse_url
from tests import dovecot_fixture as fx
from tests import test_fetch
from tests.test_fetch import maildir_contents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: modules the fast path must never load
HEAVY = ("twisted", "OpenSSL", "cryptography", "service_identity", "scramp")


class BlockingBase(unittest.TestCase):
    skip = fx.skip_reason()

    def setUp(self) -> None:
        self.server = fx.get_dovecot()
        self.tmp = tempfile.mkdtemp(prefix="popservice-blocking-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def url(self, user: str, mode: str) -> str:
        if mode == "tls":
            return f"pop3s://{user}@127.0.0.1:{self.server.tls_port}"
        return f"pop3://{user}@127.0.0.1:{self.server.port}"

    def fetch(self, user: str, spec: str, keep: bool, mode: str = "plain",
              ca_file: str | None = None, **kw: Any) -> FetchResult:
        starttls = {"plain": "none", "stls": "required", "tls": "none"}[mode]
        creds = blocking.Credentials(user, fx.USERS[user], allow_plaintext=mode == "plain")
        state = os.path.join(self.tmp, "state-" + user)
        target = make_target(spec, username=user, state_dir=state, tag=user)
        return blocking.run_fetch(parse_url(self.url(user, mode)), creds, target, state,
                                  FetchOptions(keep=keep, **kw), starttls=starttls,
                                  ca_file=ca_file or self.server.cert, timeout=30)

    def server_count(self, user: str) -> int:
        md = self.server.maildir(user)
        return sum(len(os.listdir(os.path.join(md, sub))) for sub in ("cur", "new"))


class BlockingFetchTests(BlockingBase):
    def test_thousand_messages_byte_identical(self) -> None:
        """1,000 x 20 KiB over plaintext, STLS and implicit TLS: identical to the server's files."""
        msgs = fx.bulk_messages("bulk", 1000, 20 * 1024)
        self.server.set_mailbox("bulk", fx.USERS["bulk"], msgs)
        server_files = sorted(
            hashlib.sha256(c).hexdigest() for c in maildir_contents(self.server.maildir("bulk")))
        for mode in ("plain", "stls", "tls"):
            md = os.path.join(self.tmp, f"Mail-{mode}")
            r = self.fetch("bulk", f"maildir:{md}", keep=True, mode=mode)
            self.assertEqual((r.fetched, r.deleted, r.total_on_server), (1000, 0, 1000), mode)
            mine = sorted(hashlib.sha256(c).hexdigest() for c in maildir_contents(md))
            self.assertEqual(mine, server_files, mode)
            self.assertEqual(os.listdir(os.path.join(md, "tmp")), [])
            # --keep: a second run fetches nothing
            r = self.fetch("bulk", f"maildir:{md}", keep=True, mode=mode)
            self.assertEqual((r.fetched, r.already, r.deleted), (0, 1000, 0), mode)
            self.assertEqual(len(maildir_contents(md)), 1000)
            shutil.rmtree(os.path.join(self.tmp, "state-bulk"))
        self.assertEqual(self.server_count("bulk"), 1000)

    def test_varied_messages_crlf_and_dots(self) -> None:
        msgs = fx.varied_messages("alice")
        self.server.set_mailbox("alice", fx.USERS["alice"], msgs)
        for threaded in (False, True):  # batches made durable inline or in a thread
            md = os.path.join(self.tmp, f"Mail-{threaded}")
            r = self.fetch("alice", f"maildir:{md}", keep=True, window=3, batch_messages=2,
                           threaded_sync=threaded)
            self.assertEqual(r.fetched, len(msgs))
            self.assertEqual(sorted(maildir_contents(md)), sorted(msgs))
            self.assertEqual(os.listdir(os.path.join(md, "tmp")), [])
            shutil.rmtree(os.path.join(self.tmp, "state-alice"))

    def test_delete_limit_max_size(self) -> None:
        msgs = fx.bulk_messages("limits", 6, 1500) + [fx.message("limits", 7, b"x" * 50_000 + b"\n")]
        self.server.set_mailbox("limits", fx.USERS["limits"], msgs)
        md = os.path.join(self.tmp, "Mail")
        r = self.fetch("limits", f"maildir:{md}", keep=False, limit=4, max_size=10_000, mode="stls")
        self.assertEqual((r.fetched, r.deleted, r.skipped_size), (4, 4, 1))
        self.assertEqual(self.server_count("limits"), 3)
        r = self.fetch("limits", f"maildir:{md}", keep=False, max_size=10_000, mode="tls")
        self.assertEqual((r.fetched, r.deleted, r.skipped_size), (2, 2, 1))
        self.assertEqual(self.server_count("limits"), 1)
        self.assertEqual(sorted(maildir_contents(md)), sorted(msgs[:6]))

    def test_delete_mode_bulk(self) -> None:
        msgs = fx.bulk_messages("deleting", 300, 5000)
        self.server.set_mailbox("deleting", fx.USERS["deleting"], msgs)
        md = os.path.join(self.tmp, "Mail")
        r = self.fetch("deleting", f"maildir:{md}", keep=False, batch_messages=64, threaded_sync=True)
        self.assertEqual((r.fetched, r.deleted), (300, 300))
        self.assertEqual(self.server_count("deleting"), 0)
        self.assertEqual(sorted(maildir_contents(md)), sorted(msgs))
        r = self.fetch("deleting", f"maildir:{md}", keep=False)
        self.assertEqual((r.fetched, r.deleted, r.total_on_server), (0, 0, 0))

    def test_background_sync_failure_loses_nothing(self) -> None:
        """A batch whose sync fails in the thread: the fetch fails, nothing of it is deleted or kept."""
        msgs = fx.bulk_messages("syncfail", 10, 2000)
        self.server.set_mailbox("syncfail", fx.USERS["syncfail"], msgs)
        md = os.path.join(self.tmp, "Mail")
        state = os.path.join(self.tmp, "state-syncfail")

        class FailingSecondBatch(MaildirTarget):
            batches = 0

            def prepare(self, writers: list[Any]) -> None:
                FailingSecondBatch.batches += 1
                if FailingSecondBatch.batches == 2:
                    raise OSError(5, "simulated I/O error")
                super().prepare(writers)

        creds = blocking.Credentials("syncfail", fx.USERS["syncfail"], allow_plaintext=True)
        url = parse_url(self.url("syncfail", "plain"))
        options = FetchOptions(keep=False, batch_messages=3, threaded_sync=True)
        with self.assertRaises(OSError):
            blocking.run_fetch(url, creds, FailingSecondBatch(md, tag="syncfail"), state, options,
                               starttls="none", timeout=30)
        self.assertEqual(len(maildir_contents(md)), 3)  # the first batch only
        self.assertEqual(self.server_count("syncfail"), 10)  # no QUIT: no deletion took effect
        r = blocking.run_fetch(url, creds, MaildirTarget(md, tag="syncfail"), state, options,
                               starttls="none", timeout=30)
        self.assertEqual((r.fetched, r.already, r.deleted), (7, 3, 10))
        self.assertEqual(self.server_count("syncfail"), 0)
        self.assertEqual(sorted(maildir_contents(md)), sorted(msgs))
        self.assertEqual(os.listdir(os.path.join(md, "tmp")), [])

    def test_mbox_and_mda(self) -> None:
        msgs = fx.bulk_messages("mboxer", 3, 1000)
        msgs.append(fx.message("mboxer", 4, b"From the start\n>From quoted\n"))
        self.server.set_mailbox("mboxer", fx.USERS["mboxer"], msgs)
        mbox = os.path.join(self.tmp, "mbox")
        r = self.fetch("mboxer", f"mbox:{mbox}", keep=True)
        self.assertEqual(r.fetched, 4)
        data = open(mbox, "rb").read()
        self.assertEqual(data.count(b"\nFrom MAILER-DAEMON ") + data.startswith(b"From MAILER-DAEMON "), 4)
        self.assertIn(b"\n>From the start\n>>From quoted\n", data)
        outdir = os.path.join(self.tmp, "mda")
        os.makedirs(outdir)
        self.server.set_mailbox("mda", fx.USERS["mda"], msgs[:3])
        r = self.fetch("mda", f"mda:cat > {outdir}/$$.%u", keep=False)
        self.assertEqual((r.fetched, r.deleted), (3, 3))
        got = sorted(open(os.path.join(outdir, n), "rb").read() for n in os.listdir(outdir))
        self.assertEqual(got, sorted(msgs[:3]))

    def test_untrusted_ca_refused(self) -> None:
        """A certificate that does not chain to --ca-file fails the handshake; nothing is fetched."""
        self.server.set_mailbox("alice", fx.USERS["alice"], fx.bulk_messages("alice", 2, 500))
        other = os.path.join(self.tmp, "other-ca")
        os.makedirs(other)
        untrusted, _ = fx.make_cert(other)
        for mode in ("tls", "stls"):
            md = os.path.join(self.tmp, f"Mail-{mode}")
            e = self.assertRaises(blocking.TLSError, self.fetch, "alice", f"maildir:{md}",
                                  keep=True, mode=mode, ca_file=untrusted)
            self.assertIn("certificate verif", str(e))
            self.assertEqual(maildir_contents(md), [])
        # the platform trust store does not know the fixture's self-signed certificate either
        self.assertRaises(blocking.TLSError, blocking.connect, parse_url(self.url("alice", "tls")),
                          None, timeout=10)

    def test_wrong_password(self) -> None:
        creds = blocking.Credentials("alice", "wrong", allow_plaintext=True)
        self.assertRaises(blocking.AuthError, blocking.connect, parse_url(self.url("alice", "plain")),
                          creds, starttls="none", timeout=10)


class CommandLineTests(BlockingBase):
    def run_cli(self, code: str, *args: str, user: str = "alice") -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, POPSERVICE_PASSWORD=fx.USERS[user])
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    def test_fast_path_imports_no_twisted(self) -> None:
        """`fetch` (plain and TLS) runs without loading Twisted or pyOpenSSL/cryptography."""
        msgs = fx.bulk_messages("alice", 3, 800)
        code = ("import sys\nfrom popservice.client import cli\nrc = cli.main(sys.argv[1:])\n"
                f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
                "print('HEAVY', heavy)\nsys.exit(rc)\n")
        for mode, extra in (("plain", ["--starttls", "none", "--allow-plaintext"]),
                            ("stls", ["--ca-file", self.server.cert]),
                            ("tls", ["--ca-file", self.server.cert])):
            self.server.set_mailbox("alice", fx.USERS["alice"], msgs)
            md = os.path.join(self.tmp, f"Mail-{mode}")
            p = self.run_cli(code, "fetch", self.url("alice", mode), "--to", f"maildir:{md}",
                             "--state-dir", os.path.join(self.tmp, f"state-{mode}"), *extra)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("HEAVY []", p.stdout)
            self.assertIn("3 messages fetched", p.stderr)
            self.assertEqual(sorted(maildir_contents(md)), sorted(msgs))

    def test_module_entry_point_and_bad_ca(self) -> None:
        self.server.set_mailbox("alice", fx.USERS["alice"], fx.bulk_messages("alice", 2, 500))
        other = os.path.join(self.tmp, "other-ca")
        os.makedirs(other)
        untrusted, _ = fx.make_cert(other)
        code = "import runpy; runpy.run_module('popservice.client.cli', run_name='__main__')"
        md = os.path.join(self.tmp, "Mail")
        p = self.run_cli(code, "fetch", self.url("alice", "tls"), "--to", f"maildir:{md}",
                         "--state-dir", os.path.join(self.tmp, "state"), "--ca-file", untrusted)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("TLS: certificate verification failed", p.stderr)
        # --insecure skips verification (only when asked)
        p = self.run_cli(code, "fetch", self.url("alice", "tls"), "--to", f"maildir:{md}",
                         "--state-dir", os.path.join(self.tmp, "state"), "--insecure", "-q")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(len(maildir_contents(md)), 2)


class BlockingCrashTests(test_fetch.CrashTests):
    """The SIGKILL trials of tests.test_fetch, with the blocking engine."""

    ENGINE = "blocking"
