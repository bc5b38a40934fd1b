"""
Configuration errors of C{twistd pop3} are one clear line and a non-zero
exit, never a traceback: every option is checked while options are parsed,
and a listener that cannot bind is one log line naming its endpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import error
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from popservice import tap
from popservice.server.startup import ListeningServices, endpoint_problem
from popservice.tlsutil import make_self_signed

TWISTD = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Twistd(unittest.TestCase):
    """As an operator runs it: C{twistd -n pop3 ...} in a subprocess."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="popservice-config-")
        self.addCleanup(subprocess.run, ["rm", "-rf", self.dir], check=False)

    def run_twistd(self, *argv: str) -> tuple[int, str]:
        command = [TWISTD, "-n", "--pidfile=", "pop3", "--auth", "memory:alice:secret",
                   "--mail", "maildir:%s/%%u" % self.dir, *argv]
        done = subprocess.run(command, cwd=self.dir, capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout + done.stderr

    def assertOneLine(self, argv: list[str], *words: str) -> str:
        """twistd exits non-zero, without a traceback, with exactly one line that has all of C{words}."""
        code, output = self.run_twistd(*argv)
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if all(w in line for w in words)]
        self.assertEqual(len(lines), 1, output)
        return lines[0]

    def test_unknown_mail_store(self) -> None:
        line = self.assertOneLine(["--mail", "foo:bar"], "--mail foo:bar", "unknown mail store 'foo'")
        self.assertTrue(line.startswith(TWISTD), line)  # twistd's own usage error, after the usage text

    def test_missing_certificate(self) -> None:
        missing = os.path.join(self.dir, "missing.pem")
        self.assertOneLine(["--tls-certificate", missing, "--tls-key", missing],
                           "cannot load TLS certificate/key", "No such file or directory", missing)

    def test_port_out_of_range(self) -> None:
        self.assertOneLine(["--listen", "tcp:99999"], "--listen tcp:99999", "port 99999 is out of range")

    def test_port_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            description = "tcp:%d:interface=127.0.0.1" % (taken.getsockname()[1],)
            self.assertOneLine(["--listen", description], "cannot listen on %s: " % (description,),
                               "Address already in use")

    def test_unix_socket_in_a_missing_directory(self) -> None:
        path = os.path.join(self.dir, "no-such-dir", "pop3.sock")
        self.assertOneLine(["--listen", "unix:" + path], "cannot listen on unix:%s: " % (path,),
                           "No such file or directory")

    def test_lmtp_endpoint_that_cannot_bind(self) -> None:
        path = os.path.join(self.dir, "no-such-dir", "lmtp")
        listen = "tcp:%d:interface=127.0.0.1" % (free_port(),)
        self.assertOneLine(["--listen", listen, "--lmtp", "unix:" + path],
                           "cannot listen on unix:%s: " % (path,))


class Options(unittest.TestCase):
    """Every check runs at parse time: a UsageError with one line naming the problem."""

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--auth", "memory:a:b", *argv])
        return options

    def refused(self, *argv: str) -> str:
        return str(self.assertRaises(usage.UsageError, self.parse, *argv))

    def test_numbers_in_range(self) -> None:
        for argv, words in ((["--timeout", "0"], "--timeout must be above 0"),
                            (["--timeout", "inf"], "--timeout must be a finite number"),
                            (["--login-timeout", "-1"], "--login-timeout must be at least 0"),
                            (["--max-failures", "0"], "--max-failures must be at least 1"),
                            (["--max-connections", "0"], "--max-connections must be at least 1"),
                            (["--max-connections-per-ip", "-5"],
                             "--max-connections-per-ip must be at least 1"),
                            (["--failure-delay", "nan"], "--failure-delay must be a finite number"),
                            (["--lease-ttl", "0"], "--lease-ttl must be above 0"),
                            (["--login-delay", "-1"], "--login-delay must be at least 0"),
                            # Twisted's own check of the type, before postOptions (one line too)
                            (["--max-failures", "many"], "Parameter type enforcement failed")):
            self.assertIn(words, self.refused(*argv))
        self.parse("--login-timeout", "0", "--handshake-timeout", "0", "--failure-delay", "0")

    def test_mail(self) -> None:
        self.assertIn("unknown mail store 'mbox'", self.refused("--mail", "mbox:/var/mail/%u"))
        self.assertIn("absolute", self.refused("--mail", "maildir:Maildir"))
        self.assertIn("only %u and %%", self.refused("--mail", "maildir:/srv/%d/%u"))
        self.assertIn("--allow-mail-symlinks applies to --mail maildir",
                      self.refused("--mail", "postgresql://pop@db/mail", "--allow-mail-symlinks"))

    def test_endpoints(self) -> None:
        for argv, words in ((["--listen", "tcp:99999"], "--listen tcp:99999: port 99999 is out of range"),
                            (["--listen", "tcp:-1"], "out of range"),
                            (["--listen", "tcp:http"], "--listen tcp:http: invalid literal"),
                            (["--listen", "nosuch:110"], "Unknown endpoint type"),
                            (["--listen", "ssl:995:privateKey=/no/key.pem"], "/no/key.pem"),
                            (["--listen", "systemd:domain=INET:index=0"], "not started by a systemd socket"),
                            (["--lmtp", "tcp:70000"], "--lmtp tcp:70000: port 70000 is out of range")):
            self.assertIn(words, self.refused(*argv))
        self.assertIsNone(endpoint_problem("tcp:0:interface=127.0.0.1"))
        self.assertIsNone(endpoint_problem("unix:/tmp/x.sock"))

    def test_tls_files_loaded_and_matched_at_parse_time(self) -> None:
        base = os.path.abspath(self.mktemp())
        cert, key = make_self_signed(os.path.join(base, "a"))
        other_cert, other_key = make_self_signed(os.path.join(base, "b"))
        options = self.parse("--tls-certificate", cert, "--tls-key", key)
        self.assertIsNotNone(options["tls-options"])
        self.assertIn("cannot be used together",
                      self.refused("--tls-certificate", cert, "--tls-key", other_key))
        self.assertIn("keys do not match",
                      self.refused("--listen", "ssl:0:privateKey=%s:certKey=%s" % (other_key, cert)))
        self.assertIn("--tls-client-ca needs", self.refused("--tls-client-ca", cert))
        # makeService uses what was loaded
        factory = tap.make_factory(options)
        self.assertIs(factory.config.tls_context.current, options["tls-options"])

    def test_sasl_and_oauth_at_parse_time(self) -> None:
        self.assertIn("--sasl", self.refused("--sasl", "NO-SUCH-MECHANISM"))
        self.assertIn("--oauth-keys", self.refused("--oauth-keys", "/no/such/keys.pem"))

    def test_trace_and_quirks(self) -> None:
        self.assertIn("go together", self.refused("--trace-user", "alice"))
        self.assertIn("no such directory",
                      self.refused("--trace-user", "alice", "--trace-dir", "/no/such/dir"))
        self.assertIn("--trace-bodies needs --trace-user", self.refused("--trace-bodies"))
        self.assertIn("unknown client quirk nope", self.refused("--client-quirks", "oe-ns-eoh,nope"))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        options = self.parse("--trace-user", "alice", "--trace-dir", directory, "--client-quirks",
                             "outlook-no-nuls, oe-ns-eoh")
        config = tap.make_factory(options).config
        self.assertEqual(config.client_quirks, {"outlook-no-nuls", "oe-ns-eoh"})
        assert config.trace is not None
        self.assertEqual((config.trace.user, config.trace.directory, config.trace.bodies),
                         ("alice", directory, False))

    def test_help_lists_the_new_options(self) -> None:
        text = str(tap.Options())
        for option in ("--trace-user", "--trace-dir", "--trace-bodies", "--client-quirks",
                       "--allow-mail-symlinks", "--ignore-mail-owner", "LIST sizes then"):
            self.assertIn(option, text)


class ListenerFailure(unittest.TestCase):
    """L{ListeningServices}: one log line naming the endpoint."""

    def setUp(self) -> None:
        self.taken = socket.socket()
        self.addCleanup(self.taken.close)
        self.taken.bind(("127.0.0.1", 0))
        self.taken.listen()
        self.description = "tcp:%d:interface=127.0.0.1" % (self.taken.getsockname()[1],)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def services(self) -> ListeningServices:
        from twisted.application import strports
        from twisted.internet.protocol import Factory

        top = ListeningServices()
        top.listen(self.description, strports.service(self.description, Factory()))
        return top

    def logged(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.critical]

    def test_in_twistd_exit_status_1(self) -> None:
        exit = self.assertRaises(SystemExit, self.services().privilegedStartService)
        self.assertEqual(exit.code, 1)
        self.assertEqual(self.logged(), ["cannot listen on %s: Address already in use" % (self.description,)])

    def test_a_listener_added_without_its_endpoint_string(self) -> None:
        from twisted.application import strports
        from twisted.internet.protocol import Factory

        top = ListeningServices()
        strports.service(self.description, Factory()).setServiceParent(top)
        self.assertRaises(SystemExit, top.privilegedStartService)
        [line] = self.logged()
        self.assertRegex(line, r"^cannot listen: Couldn't listen on 127\.0\.0\.1:\d+: .*"
                               r"Address already in use")

    def test_started_in_process_the_error_is_raised(self) -> None:
        self.assertRaises(error.CannotListenError, self.services().startService)
        self.assertEqual(self.logged(), ["cannot listen on %s: Address already in use" % (self.description,)])
