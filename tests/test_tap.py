"""`twistd pop3` options and service: Twisted's endpoint strings and strcred --auth."""

from __future__ import annotations

import os
import poplib
from typing import Any

from twisted.application import service
from twisted.internet import defer, threads
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from popservice import tap
from popservice.tlsutil import make_self_signed


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_maildir(root: str, user: str, messages: list[bytes]) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(root, user, sub), exist_ok=True)
    for i, m in enumerate(messages):
        with open(os.path.join(root, user, "new", "%d.M%dP1.test" % (1700000000 + i, i)), "wb") as f:
            f.write(m)


class OptionsTests(unittest.TestCase):
    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_plugin_is_found(self) -> None:
        from twisted.application.service import IServiceMaker

        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("pop3", names)

    def test_auth_required(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--mail", "maildir:/tmp/%u")

    def test_defaults(self) -> None:
        options = self.parse("--auth", "memory:alice:secret")
        self.assertEqual(options["listen"], ["tcp:110"])
        self.assertEqual(options["timeout"], 600)
        self.assertEqual(options["mail"], "maildir:~/Maildir")

    def test_listen_repeatable(self) -> None:
        options = self.parse("--auth", "memory:a:b", "--listen", "tcp:1110", "-l", "unix:/tmp/x.sock")
        self.assertEqual(options["listen"], ["tcp:1110", "unix:/tmp/x.sock"])

    def test_bad_values(self) -> None:
        for argv in (["--tls-certificate", "c.pem"], ["--lock", "maybe"], ["--trusted-networks", "not-a-net"],
                     ["--auth", "nosuchchecker:x"]):
            self.assertRaises(usage.UsageError, self.parse, "--auth", "memory:a:b", *argv)

    def test_backlog_default(self) -> None:
        self.assertEqual(tap.with_backlog("tcp:110"), "tcp:110:backlog=1024")
        self.assertEqual(tap.with_backlog("ssl:995:privateKey=k:certKey=c"),
                         "ssl:995:privateKey=k:certKey=c:backlog=1024")
        self.assertEqual(tap.with_backlog("tcp:110:backlog=5"), "tcp:110:backlog=5")
        self.assertEqual(tap.with_backlog("unix:/tmp/s"), "unix:/tmp/s")

    def test_unknown_store(self) -> None:
        # Refused while the options are parsed (twistd prints one ERROR line, no traceback).
        self.assertRaises(usage.UsageError, self.parse, "--auth", "memory:a:b", "--mail", "mbox:/tmp/x")

    def test_bad_certificate_is_usage_error(self) -> None:
        bad = self.mktemp()
        with open(bad, "w") as f:
            f.write("not a certificate")
        self.assertRaises(usage.UsageError, self.parse, "--auth", "memory:a:b", "--tls-certificate", bad,
                          "--tls-key", bad)


class ServiceTests(unittest.TestCase):
    """The service built from options serves real connections."""

    @defer.inlineCallbacks
    def stop(self, top: Any) -> Any:
        from twisted.internet import reactor, task

        factories = {s.factory for s in top}
        yield top.stopService()
        for _ in range(200):
            if not any(f.connections for f in factories):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(any(f.connections for f in factories))

    @defer.inlineCallbacks
    def serve(self, *argv: str) -> Any:
        options = tap.Options()
        options.parseOptions(list(argv))
        top = tap.makeService(options)
        top.startService()
        self.addCleanup(self.stop, top)
        self.assertIsInstance(top, service.MultiService)
        yield None
        return top

    @defer.inlineCallbacks
    def test_memory_and_file_checkers(self) -> Any:
        root = os.path.abspath(self.mktemp())
        make_maildir(root, "alice", [b"Subject: a\n\nA\n"])
        make_maildir(root, "bob", [b"Subject: b\n\nB\n", b"Subject: c\n\nC\n"])
        users = os.path.join(root, "users")
        with open(users, "w") as f:
            f.write("bob:bobpw\n")
        port = free_port()
        yield self.serve("--mail", "maildir:%s/%%u" % root, "--auth", "memory:alice:secret",
                         "--auth", "file:" + users, "--listen", "tcp:%d:interface=127.0.0.1" % port)

        def check() -> tuple[int, int]:
            counts = []
            for user, password in (("alice", "secret"), ("bob", "bobpw")):
                c = poplib.POP3("127.0.0.1", port, timeout=10)
                c.user(user)
                c.pass_(password)
                counts.append(c.stat()[0])
                c.quit()
            return counts[0], counts[1]

        self.assertEqual((yield threads.deferToThread(check)), (1, 2))

    @defer.inlineCallbacks
    def test_passwd_file_tls_and_home(self) -> Any:
        root = os.path.abspath(self.mktemp())
        home = os.path.join(root, "home", "carol")
        make_maildir(os.path.join(home), "Maildir", [b"Subject: c\n\nhome mail\n"])
        passwd = os.path.join(root, "passwd")
        with open(passwd, "w") as f:
            f.write("carol:{PLAIN}carolpw::::%s::\n" % home)
        cert, key = make_self_signed(os.path.join(root, "tls"))
        port, tls_port = free_port(), free_port()
        yield self.serve("--mail", "maildir:~/Maildir", "--auth", "passwd-file:" + passwd,
                         "--listen", "tcp:%d:interface=127.0.0.1" % port,
                         "--listen",
                         "ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1" % (tls_port, key, cert),
                         "--tls-certificate", cert, "--tls-key", key, "--hostname", "mail.test")

        def check() -> list[bytes]:
            import ssl

            context = ssl.create_default_context(cafile=cert)
            out = []
            c = poplib.POP3("127.0.0.1", port, timeout=10)
            out.append(c.getwelcome())
            c.stls(context)
            c.user("carol")
            c.pass_("carolpw")
            out.append(b"\r\n".join(c.retr(1)[1]))
            c.quit()
            s = poplib.POP3_SSL("127.0.0.1", tls_port, context=context, timeout=10)
            s.user("carol")
            s.pass_("carolpw")
            out.append(str(s.stat()[0]).encode())
            s.quit()
            return out

        greeting, body, count = yield threads.deferToThread(check)
        self.assertIn(b"@mail.test>", greeting)
        self.assertIn(b"home mail", body)
        self.assertEqual(count, b"1")
