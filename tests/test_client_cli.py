"""
The client subcommands end to end: C{probe} and C{migrate} against the
private Dovecot, the password sources (C{--netrc}, C{--password-command}),
the progress bar (only on a terminal), the migrate index lock, and a server
without UIDL (the fetcher refuses: exactly-once is impossible without it).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from popservice.client.cli import resolve_credentials
from popservice.client.connect import connect, parse_url
from popservice.client.fetch import FetchOptions, NoUIDLError, fetch, make_target
from popservice.client.protocol import Credentials
from tests import dovecot_fixture as fx
from tests.test_client_protocol import LoopbackMixin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "popservice.client.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "POPSERVICE_PASSWORD"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def namespace(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = dict(user=None, auth=None, password_env="POPSERVICE_TEST_NO_SUCH_VAR",
                                password_command=None, netrc=None, oauth_token_command=None,
                                allow_plaintext=False, starttls="required")
    base.update(kw)
    return argparse.Namespace(**base)


class PasswordSourceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def test_password_command_first_line(self) -> None:
        url = parse_url("pop3://alice@mail.example.org")
        creds = resolve_credentials(namespace(password_command="printf 's3cr et\\nsecond\\n'"), url)
        self.assertEqual((creds.username, creds.password), ("alice", "s3cr et"))

    def test_password_command_failure(self) -> None:
        url = parse_url("pop3://alice@mail.example.org")
        self.assertRaises(subprocess.CalledProcessError, resolve_credentials,
                          namespace(password_command="exit 3"), url)

    def test_netrc_file(self) -> None:
        path = os.path.join(self.dir, "netrc")
        with open(path, "w") as f:
            f.write("machine other.example.org login bob password nope\n"
                    "machine mail.example.org login carol password c#pw\n")
        os.chmod(path, 0o600)
        # the netrc login is used when neither --user nor the URL names one
        creds = resolve_credentials(namespace(netrc=path), parse_url("pop3://mail.example.org"))
        self.assertEqual((creds.username, creds.password), ("carol", "c#pw"))
        # a user name from the URL wins; the password still comes from netrc
        creds = resolve_credentials(namespace(netrc=path), parse_url("pop3://dave@mail.example.org"))
        self.assertEqual((creds.username, creds.password), ("dave", "c#pw"))
        e = self.assertRaises(SystemExit, resolve_credentials, namespace(netrc=path),
                              parse_url("pop3://unknown.example.org"))
        self.assertIn("no netrc entry", str(e))

    def test_netrc_default_is_home(self) -> None:
        home = os.path.join(self.dir, "home")
        os.makedirs(home)
        with open(os.path.join(home, ".netrc"), "w") as f:
            f.write("machine mail.example.org login erin password epw\n")
        os.chmod(os.path.join(home, ".netrc"), 0o600)
        old = os.environ.get("HOME")
        os.environ["HOME"] = home
        try:
            creds = resolve_credentials(namespace(netrc=""), parse_url("pop3://mail.example.org"))
        finally:
            if old is None:
                del os.environ["HOME"]
            else:
                os.environ["HOME"] = old
        self.assertEqual((creds.username, creds.password), ("erin", "epw"))


class DovecotCLITests(unittest.TestCase):
    skip = fx.skip_reason()

    def setUp(self) -> None:
        self.server = fx.get_dovecot()
        self.tmp = tempfile.mkdtemp(prefix="popservice-cli-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def run_cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli(*args), env=cli_env(**env), cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    # -- probe -----------------------------------------------------------------

    def test_probe_stls(self) -> None:
        p = self.run_cli("probe", f"pop3://127.0.0.1:{self.server.port}", "--ca-file", self.server.cert)
        self.assertEqual(p.returncode, 0, p.stderr)
        out = p.stdout
        self.assertRegex(out, r"greeting:  \+OK ")
        self.assertIn("TLS:       STLS", out)
        before, _, after = out.partition("CAPA before STLS:")
        self.assertTrue(after)
        capa_before, _, rest = after.partition("certificate (verified):")
        self.assertIn("  STLS", capa_before)
        self.assertIn("subject: CN=localhost", rest)
        self.assertIn("names:   localhost, 127.0.0.1", rest)
        self.assertRegex(rest, r"sha256:  ([0-9a-f]{2}:){31}[0-9a-f]{2}")
        capa_after = rest.partition("CAPA after STLS:")[2]
        self.assertTrue(capa_after)
        self.assertNotIn("  STLS\n", capa_after)  # RFC 2595: no STLS once TLS is on
        self.assertIn("  UIDL", capa_after)
        mechs = [line for line in out.splitlines() if line.startswith("mechanisms:")]
        self.assertEqual(len(mechs), 1)
        for m in ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"):
            self.assertIn(m, mechs[0].split())
        self.assertIn("+USER", mechs[0])
        self.assertIn("pipelining: yes", out)

    def test_probe_implicit_tls_unverified(self) -> None:
        # no --ca-file: verification fails, probe says so and shows the certificate anyway
        p = self.run_cli("probe", f"pop3s://127.0.0.1:{self.server.tls_port}")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("verified connection failed", p.stdout)
        self.assertIn("TLS:       implicit (pop3s)", p.stdout)
        self.assertIn("certificate (NOT VERIFIED):", p.stdout)
        self.assertIn("subject: CN=localhost", p.stdout)
        self.assertNotIn("CAPA before STLS", p.stdout)

    # -- migrate -----------------------------------------------------------------

    @defer.inlineCallbacks
    def dovecot_uidls(self, user: str) -> Any:
        client = yield connect(reactor, f"pop3://{user}@127.0.0.1:{self.server.port}",
                               Credentials(user, fx.USERS[user], allow_plaintext=True), starttls="none")
        entries = yield client.uidl()
        sizes = yield client.list()
        yield client.quit()
        return [e.uid for e in entries], [e.size for e in sizes]

    @defer.inlineCallbacks
    def store_listing(self, path: str) -> Any:
        from popservice.stores.maildir import MaildirStore

        store = MaildirStore(path, lock_policy="none")
        mailbox = yield store.open_mailbox("migrant", None)
        try:
            listing = yield mailbox.listing()
            contents = []
            for i in range(len(listing)):
                stream = yield mailbox.open(i)
                chunks = []
                while True:
                    chunk = yield stream.read()
                    if not chunk:
                        break
                    chunks.append(chunk)
                stream.close()
                contents.append(b"".join(chunks))
        finally:
            yield mailbox.close()
        return listing, contents

    @defer.inlineCallbacks
    def test_migrate_keeps_uidls(self) -> Any:
        msgs = fx.bulk_messages("migrant", 12, 1500) + fx.varied_messages("migrant")[:3]
        self.server.set_mailbox("migrant", fx.USERS["migrant"], msgs)
        uidls, sizes = yield self.dovecot_uidls("migrant")
        md = os.path.join(self.tmp, "migrated")
        args = ("migrate", f"pop3://migrant@127.0.0.1:{self.server.port}", "--to", f"maildir:{md}",
                "--starttls", "none", "--allow-plaintext")
        p = yield deferred_run(cli(*args), cli_env(POPSERVICE_PASSWORD=fx.USERS["migrant"]))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("migrated 15 messages", p.stderr)
        listing, contents = yield self.store_listing(md)
        self.assertEqual([m.uid for m in listing], uidls)
        self.assertEqual([m.size for m in listing], sizes)
        self.assertEqual(contents, msgs)  # the files: LF line ends, dots unstuffed
        # read-only: everything is still on the old server
        self.assertEqual((yield self.dovecot_uidls("migrant"))[0], uidls)
        # a rerun copies nothing twice
        p = yield deferred_run(cli(*args), cli_env(POPSERVICE_PASSWORD=fx.USERS["migrant"]))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("migrated 0 messages", p.stderr)
        self.assertIn("15 already there", p.stderr)
        self.assertEqual(len(os.listdir(os.path.join(md, "cur"))), 15)

    @defer.inlineCallbacks
    def test_migrate_waits_for_index_lock(self) -> Any:
        msgs = fx.bulk_messages("migrant", 3, 800)
        self.server.set_mailbox("migrant", fx.USERS["migrant"], msgs)
        md = os.path.join(self.tmp, "locked")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(md, sub))
        lock_fd = os.open(os.path.join(md, "popservice-uidlist.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            cli("migrate", f"pop3://migrant@127.0.0.1:{self.server.port}", "--to", f"maildir:{md}",
                "--starttls", "none", "--allow-plaintext", "-q"),
            env=cli_env(POPSERVICE_PASSWORD=fx.USERS["migrant"]), cwd=ROOT)
        try:
            # the messages get copied, but the index waits for the lock
            deadline = time.monotonic() + 60
            while len(os.listdir(os.path.join(md, "cur"))) < 3 and time.monotonic() < deadline:
                yield deferred_sleep(0.05)
            yield deferred_sleep(0.5)
            self.assertIsNone(proc.poll())
            self.assertFalse(os.path.exists(os.path.join(md, "popservice-uidlist")))
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            yield deferred_sleep(0.05)
        self.assertEqual(proc.wait(), 0)
        uidls, _ = yield self.dovecot_uidls("migrant")
        listing, _ = yield self.store_listing(md)
        self.assertEqual([m.uid for m in listing], uidls)

    # -- progress bar --------------------------------------------------------

    def fetch_args(self, md: str, state: str) -> list[str]:
        return cli("fetch", f"pop3://keeper@127.0.0.1:{self.server.port}", "--to", f"maildir:{md}",
                   "--keep", "--state-dir", state, "--starttls", "none", "--allow-plaintext")

    def test_progress_only_on_a_tty(self) -> None:
        self.server.set_mailbox("keeper", fx.USERS["keeper"], fx.bulk_messages("keeper", 20, 2000))
        env = cli_env(POPSERVICE_PASSWORD=fx.USERS["keeper"])
        # not a terminal: the summary only
        p = subprocess.run(self.fetch_args(os.path.join(self.tmp, "m1"), os.path.join(self.tmp, "s1")),
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("20 messages fetched", p.stderr)
        self.assertNotIn("\r[", p.stderr)
        self.assertNotIn("ETA", p.stderr)
        # stderr on a pseudo-terminal: the bar, ending at 20/20
        primary, secondary = pty.openpty()
        proc = subprocess.Popen(
            self.fetch_args(os.path.join(self.tmp, "m2"), os.path.join(self.tmp, "s2")),
            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary)
        os.close(secondary)
        out = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
        os.close(primary)
        self.assertEqual(proc.wait(), 0, out)
        text = out.decode("utf-8", "replace")
        self.assertIn("\r[", text)
        self.assertIn("20/20 msgs", text)
        self.assertIn("ETA", text)
        self.assertIn("20 messages fetched", text)


def deferred_sleep(seconds: float) -> "defer.Deferred[None]":
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def deferred_run(args: list[str], env: dict[str, str]) -> "defer.Deferred[subprocess.CompletedProcess[str]]":
    """subprocess.run in a thread: the reactor keeps serving (nothing in-process blocks)."""
    from twisted.internet import threads

    return threads.deferToThread(subprocess.run, args, env=env, cwd=ROOT, capture_output=True,
                                 text=True, timeout=120)


class NoUIDLTests(LoopbackMixin, unittest.TestCase):
    """A server without UIDL: the fetcher refuses (keep or delete), touching nothing."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def answer(self, proto: Any, line: bytes) -> bytes | None:
        self.seen.append(line)
        if line == b"CAPA":
            return b"+OK\r\nUSER\r\nPIPELINING\r\n.\r\n"
        if line.startswith((b"USER", b"PASS", b"APOP", b"NOOP", b"QUIT")):
            return b"+OK\r\n"
        if line == b"STAT":
            return b"+OK 2 20\r\n"
        if line == b"LIST":
            return b"+OK\r\n1 10\r\n2 10\r\n.\r\n"
        if line.startswith(b"RETR"):
            return b"+OK\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
        return b"-ERR unknown command\r\n"

    @defer.inlineCallbacks
    def check(self, keep: bool) -> Any:
        self.seen: list[bytes] = []
        self.serve(self.answer)
        client = yield connect(reactor, f"pop3://u@127.0.0.1:{self.port}",
                               Credentials("u", "pw", allow_plaintext=True), starttls="none")
        self.addCleanup(client.abort)
        md = os.path.join(self.tmp, f"Mail-{keep}")
        state = os.path.join(self.tmp, f"state-{keep}")
        target = make_target(f"maildir:{md}", username="u", state_dir=state)
        e = yield self.assertFailure(fetch(client, target, state, FetchOptions(keep=keep)), NoUIDLError)
        self.assertIn("does not support UIDL", str(e))
        self.assertIn("exactly once", str(e))
        self.assertFalse([line for line in self.seen if line.startswith((b"RETR", b"DELE"))])
        self.assertEqual(os.listdir(os.path.join(md, "new")), [])

    def test_keep_refused(self) -> Any:
        return self.check(keep=True)

    def test_delete_refused(self) -> Any:
        return self.check(keep=False)
