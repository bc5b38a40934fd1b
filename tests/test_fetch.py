"""
The fetcher: journal and targets in isolation, then against a live Dovecot:
keep/delete modes, byte-identical Maildir copies of 1,000 messages, and
SIGKILL at random moments followed by a rerun (exactly-once delivery).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from popservice.client.connect import connect
from popservice.client.fetch import (
    FetchOptions,
    Journal,
    MaildirTarget,
    MboxTarget,
    StateLocked,
    fetch,
    make_target,
)
from popservice.client.protocol import Credentials
from tests import dovecot_fixture as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def maildir_contents(path: str) -> list[bytes]:
    out = []
    for sub in ("new", "cur"):
        d = os.path.join(path, sub)
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                with open(os.path.join(d, name), "rb") as f:
                    out.append(f.read())
    return out


def message_ids(contents: list[bytes]) -> list[bytes]:
    ids = []
    for c in contents:
        for line in c.split(b"\n"):
            if line.startswith(b"Message-ID:"):
                ids.append(line)
                break
    return ids


class JournalTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def test_torn_record_ignored_and_cut(self) -> None:
        j = Journal(self.dir)
        j.append(["D a", "D b"])
        j.close()
        with open(os.path.join(self.dir, "journal"), "ab") as f:
            f.write(b"D c")  # crash in the middle of an append
        j = Journal(self.dir)
        self.assertEqual(j.delivered, {"a", "b"})
        j.append(["D d"])
        j.close()
        self.assertEqual(Journal(self.dir).delivered, {"a", "b", "d"})

    def test_lock(self) -> None:
        j = Journal(self.dir)
        self.addCleanup(j.close)
        self.assertRaises(StateLocked, Journal, self.dir)

    def test_compaction(self) -> None:
        j = Journal(self.dir)
        j.append(["D a", "M b t1 f1", "B 0", "D c", "C", "B 10", "D e", "I f"])
        j.close()
        j = Journal(self.dir)
        self.assertEqual(j.delivered, {"a", "b", "c"})
        self.assertEqual(j.open_mbox_batch, 10)
        self.assertEqual(j.mda_unknown, {"f"})
        self.assertTrue(j.needs_compaction)
        j.compact(keep={"a", "c", "z"})
        j.close()
        with open(os.path.join(self.dir, "journal")) as f:
            self.assertEqual(f.read(), "D a\nD c\n")

    def test_maildir_recovery(self) -> None:
        md = os.path.join(self.dir, "Mail")
        target = MaildirTarget(md, tag="t")
        state = os.path.join(self.dir, "state")
        j = Journal(state)
        w1 = target.open("u1", 1)
        w1.write(b"one\n")
        target.finished(w1)
        target.prepare([w1])
        j.append([f"M u1 {w1.name} {w1.final}"])  # crash before the rename
        w2 = target.open("u2", 1)  # crash before the journal: an orphan
        w2.write(b"two\n")
        os.close(w2.fd)
        j.close()
        j = Journal(state)
        self.addCleanup(j.close)
        MaildirTarget(md, tag="t").recover(j)
        self.assertEqual(maildir_contents(md), [b"one\n"])
        self.assertEqual(os.listdir(os.path.join(md, "tmp")), [])

    def test_mbox_rollback_and_quoting(self) -> None:
        path = os.path.join(self.dir, "mbox")
        state = os.path.join(self.dir, "state")
        j = Journal(state)
        t = MboxTarget(path)
        t.recover(j)
        w = t.open("u1", 0)
        for chunk in (b"Subject: a\n\nFrom me\n>Fr", b"om you\n>From x\nlast"):
            w.write(chunk)
        t.finished(w)
        t.prepare([w])
        t.commit(j, ["u1"], [w])
        committed = open(path, "rb").read()
        w = t.open("u2", 0)  # a second batch, never committed
        w.write(b"Subject: b\n\npartial")
        t.close()
        j.close()
        j = Journal(state)
        self.addCleanup(j.close)
        self.assertEqual(j.delivered, {"u1"})
        t = MboxTarget(path)
        t.recover(j)
        t.close()
        data = open(path, "rb").read()
        self.assertEqual(data, committed)
        self.assertTrue(data.startswith(b"From MAILER-DAEMON "))
        self.assertIn(b"\n\n>From me\n>>From you\n>>From x\nlast\n\n", data)

    def test_target_specs(self) -> None:
        self.assertIsInstance(make_target(f"maildir:{self.dir}/m", username="u", state_dir=self.dir),
                              MaildirTarget)
        self.assertRaises(ValueError, make_target, "imap:x", username="u", state_dir=self.dir)


class DovecotFetchBase(unittest.TestCase):
    skip = fx.skip_reason()

    def setUp(self) -> None:
        self.server = fx.get_dovecot()
        self.tmp = tempfile.mkdtemp(prefix="popservice-fetch-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    @defer.inlineCallbacks
    def run_fetch(self, user: str, spec: str, keep: bool, tls: bool = False, **kw: Any) -> Any:
        url = (f"pop3s://{user}@127.0.0.1:{self.server.tls_port}" if tls
               else f"pop3://{user}@127.0.0.1:{self.server.port}")
        client = yield connect(reactor, url, Credentials(user, fx.USERS[user], allow_plaintext=True),
                               ca_file=self.server.cert, starttls="none")
        state = os.path.join(self.tmp, "state-" + user)
        target = make_target(spec, username=user, state_dir=state, tag=user)
        result = yield fetch(client, target, state, FetchOptions(keep=keep, **kw))
        return result

    @defer.inlineCallbacks
    def server_count(self, user: str) -> Any:
        client = yield connect(reactor, f"pop3://{user}@127.0.0.1:{self.server.port}",
                               Credentials(user, fx.USERS[user], allow_plaintext=True), starttls="none")
        count, _ = yield client.stat()
        yield client.quit()
        return count


class DovecotFetchTests(DovecotFetchBase):
    @defer.inlineCallbacks
    def test_keep_fetches_only_new(self) -> Any:
        msgs = fx.bulk_messages("keeper", 5, 2000)
        self.server.set_mailbox("keeper", fx.USERS["keeper"], msgs)
        md = os.path.join(self.tmp, "Mail")
        r = yield self.run_fetch("keeper", f"maildir:{md}", keep=True)
        self.assertEqual((r.fetched, r.deleted), (5, 0))
        r = yield self.run_fetch("keeper", f"maildir:{md}", keep=True)
        self.assertEqual((r.fetched, r.already), (0, 5))
        # a new delivery on the server
        extra = fx.message("keeper", 99, b"new one\n")
        path = os.path.join(self.server.maildir("keeper"), "new", "1800000000.M1P1.extra")
        with open(path, "wb") as f:
            f.write(extra)
        os.chown(path, self.server.uid, self.server.gid)
        r = yield self.run_fetch("keeper", f"maildir:{md}", keep=True)
        self.assertEqual(r.fetched, 1)
        self.assertEqual(sorted(maildir_contents(md)), sorted(msgs + [extra]))
        self.assertEqual((yield self.server_count("keeper")), 6)

    @defer.inlineCallbacks
    def test_delete_limit_max_size(self) -> Any:
        msgs = fx.bulk_messages("limits", 6, 1500) + [fx.message("limits", 7, b"x" * 50_000 + b"\n")]
        self.server.set_mailbox("limits", fx.USERS["limits"], msgs)
        md = os.path.join(self.tmp, "Mail")
        r = yield self.run_fetch("limits", f"maildir:{md}", keep=False, limit=4, max_size=10_000)
        self.assertEqual((r.fetched, r.deleted, r.skipped_size), (4, 4, 1))
        self.assertEqual((yield self.server_count("limits")), 3)
        r = yield self.run_fetch("limits", f"maildir:{md}", keep=False, max_size=10_000)
        self.assertEqual((r.fetched, r.deleted, r.skipped_size), (2, 2, 1))
        self.assertEqual(sorted(maildir_contents(md)), sorted(msgs[:6]))

    @defer.inlineCallbacks
    def test_mbox_and_mda(self) -> Any:
        msgs = fx.bulk_messages("mboxer", 3, 1000)
        msgs.append(fx.message("mboxer", 4, b"From the start\n>From quoted\n"))
        self.server.set_mailbox("mboxer", fx.USERS["mboxer"], msgs)
        mbox = os.path.join(self.tmp, "mbox")
        r = yield self.run_fetch("mboxer", f"mbox:{mbox}", keep=True)
        self.assertEqual(r.fetched, 4)
        data = open(mbox, "rb").read()
        self.assertEqual(data.count(b"\nFrom MAILER-DAEMON ") + data.startswith(b"From MAILER-DAEMON "), 4)
        self.assertIn(b"\n>From the start\n>>From quoted\n", data)
        outdir = os.path.join(self.tmp, "mda")
        os.makedirs(outdir)
        self.server.set_mailbox("mda", fx.USERS["mda"], msgs[:3])
        r = yield self.run_fetch("mda", f"mda:cat > {outdir}/$$.%u", keep=False)
        self.assertEqual((r.fetched, r.deleted), (3, 3))
        names = os.listdir(outdir)
        self.assertTrue(all(n.endswith(".mda") for n in names))
        got = sorted(open(os.path.join(outdir, n), "rb").read() for n in names)
        self.assertEqual(got, sorted(msgs[:3]))

    @defer.inlineCallbacks
    def test_thousand_messages_byte_identical(self) -> Any:
        """1,000 x 20 KiB, pipelined, crash-safe, plain and TLS: identical to the server's files."""
        msgs = fx.bulk_messages("bulk", 1000, 20 * 1024)
        self.server.set_mailbox("bulk", fx.USERS["bulk"], msgs)
        server_files = sorted(
            hashlib.sha256(c).hexdigest() for c in maildir_contents(self.server.maildir("bulk")))
        for tls in (False, True):
            md = os.path.join(self.tmp, f"Mail-{tls}")
            r = yield self.run_fetch("bulk", f"maildir:{md}", keep=True, tls=tls)
            self.assertEqual(r.fetched, 1000)
            mine = sorted(hashlib.sha256(c).hexdigest() for c in maildir_contents(md))
            self.assertEqual(mine, server_files)
            shutil.rmtree(os.path.join(self.tmp, "state-bulk"))


class CrashTests(DovecotFetchBase):
    """SIGKILL a `fetch` subprocess at a random moment, rerun, expect exactly-once."""

    TRIALS = int(os.environ.get("POPSERVICE_CRASH_TRIALS", "20"))
    MESSAGES = 300
    #: `fetch --engine` (tests.test_fetch_blocking runs these trials with "blocking")
    ENGINE = "twisted"

    def cli(self, md: str, state: str, keep: bool) -> list[str]:
        args = [sys.executable, "-m", "popservice.client.cli", "fetch",
                f"pop3://crash@127.0.0.1:{self.server.port}", "--to", f"maildir:{md}",
                "--state-dir", state, "--starttls", "none", "--allow-plaintext", "-q"]
        # small batches: more commit points for a kill to land between
        return args + ["--batch", "16", "--engine", self.ENGINE] + (["--keep"] if keep else [])

    def env(self) -> dict[str, str]:
        env = dict(os.environ, POPSERVICE_PASSWORD=fx.USERS["crash"])
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def test_sigkill_at_random_points(self) -> None:
        rnd = random.Random(int(os.environ.get("POPSERVICE_CRASH_SEED", "4242")))
        msgs = fx.bulk_messages("crash", self.MESSAGES, 3000)
        expected = sorted(message_ids(msgs))
        # calibrate: how long a clean run takes
        self.server.set_mailbox("crash", fx.USERS["crash"], msgs)
        # (the shorter of two runs: the first pays for cold caches, and a calibration longer than
        # the trials' runs would send most kills after the fetch had ended)
        durations = []
        for calibration in range(2):
            md = os.path.join(self.tmp, "cal-md%d" % (calibration,))
            state = os.path.join(self.tmp, "cal-state%d" % (calibration,))
            t0 = time.monotonic()
            subprocess.run(self.cli(md, state, keep=True), env=self.env(), check=True, cwd=ROOT)
            durations.append(time.monotonic() - t0)
            self.assertEqual(sorted(message_ids(maildir_contents(md))), expected)
        duration = min(durations)
        killed = 0
        for trial in range(self.TRIALS):
            keep = trial % 3 == 2
            self.server.set_mailbox("crash", fx.USERS["crash"], msgs)
            md = os.path.join(self.tmp, f"md{trial}")
            state = os.path.join(self.tmp, f"state{trial}")
            kills = 2 if trial % 4 == 3 else 1  # sometimes the rerun is killed too
            for _ in range(kills):
                proc = subprocess.Popen(self.cli(md, state, keep), env=self.env(), cwd=ROOT,
                                        stderr=subprocess.DEVNULL)
                time.sleep(rnd.uniform(0.05, duration * 0.9))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed += 1
                proc.wait()
            done = subprocess.run(self.cli(md, state, keep), env=self.env(), cwd=ROOT,
                                  capture_output=True, timeout=120)
            self.assertEqual(done.returncode, 0, done.stderr)
            got = sorted(message_ids(maildir_contents(md)))
            self.assertEqual(len(got), len(expected), f"trial {trial}: {len(got)} delivered")
            self.assertEqual(got, expected, f"trial {trial}")
            self.assertEqual(os.listdir(os.path.join(md, "tmp")), [], f"trial {trial}: tmp not empty")
            remaining = len(os.listdir(os.path.join(self.server.maildir("crash"), "cur")))
            self.assertEqual(remaining, self.MESSAGES if keep else 0, f"trial {trial}")
        # the trials are only meaningful if most kills landed while the fetch ran
        self.assertGreater(killed, self.TRIALS // 2)
