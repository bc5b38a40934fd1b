"""
What the client refuses to send, decided locally and the same in both
engines, against popservice's own server (which records every command):

- a password in clear over a connection without TLS unless
  C{--allow-plaintext} (C{--starttls none} alone is not enough, as
  C{--help} says);
- a login mechanism the server does not list (C{--auth SCRAM-SHA-256},
  C{--auth XOAUTH2});
- an empty OAuth token (C{--oauth-token-command} printing nothing).

Each is a configuration problem: exit status 2 (EX_USAGE), one message.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from popservice.auth.tokens import JWK, JWTValidator
from popservice.client import blocking
from popservice.client.cli_common import EX_OK, EX_USAGE
from popservice.client.common import Credentials, NoMechanismError, PlaintextRefusedError
from popservice.client.connect import connect
from popservice.client.url import parse_url
from popservice.sasl.server import mechanisms_from_option
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker, record_events
from tests.test_client_tls import run_cli

#: commands that carry (or prove) a credential
LOGIN_COMMANDS = {"USER", "PASS", "AUTH", "APOP"}


class LoginRefusalTests(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)

    def start(self, **config: Any) -> list[tuple[str, dict[str, Any]]]:
        config.setdefault("apop", False)  # else APOP logs in without the password in clear
        factory = make_factory(MemoryStore({"alice": [b"Subject: x\n\nbody\n"]}),
                               [memory_checker(alice="secret")], **config)
        events = record_events(factory)
        self.listen(factory)
        self.url = f"pop3://alice@127.0.0.1:{self.server_port.getHost().port}"
        return events

    def sent(self, events: list[tuple[str, dict[str, Any]]]) -> list[str]:
        return [f["command"] for name, f in events if name == "command" and f["command"] in LOGIN_COMMANDS]

    @defer.inlineCallbacks
    def fetch_both(self, *args: str, password: str | None = "secret") -> Any:
        """C{fetch URL ARGS} with each engine: {engine: (status, stderr)}."""
        out = {}
        for engine in ("twisted", "blocking"):
            p = yield run_cli("fetch", self.url, "--to", f"maildir:{self.tmp}/Mail-{engine}",
                              "--state-dir", f"{self.tmp}/state-{engine}", "--engine", engine, "-q",
                              "--timeout", "10", *args, password=password)
            out[engine] = (p.returncode, p.stderr)
        return out

    def assertRefused(self, runs: dict[str, tuple[int, str]], text: str) -> None:
        self.assertEqual(runs["twisted"], runs["blocking"])
        status, stderr = runs["blocking"]
        self.assertEqual(status, EX_USAGE, stderr)
        self.assertIn(text, stderr)
        self.assertEqual(stderr.count("\n"), 1, stderr)  # one line, no traceback

    # -- item: --starttls none is not --allow-plaintext -------------------------------------

    @defer.inlineCallbacks
    def test_starttls_none_alone_sends_no_password(self) -> Any:
        events = self.start()
        runs = yield self.fetch_both("--starttls", "none")
        self.assertRefused(runs, "popservice: login: refusing to send the password in clear")
        self.assertIn("--allow-plaintext", runs["blocking"][1])
        self.assertEqual(self.sent(events), [])
        # the same with a plaintext method asked for by name
        runs = yield self.fetch_both("--starttls", "none", "--auth", "USER")
        self.assertRefused(runs, "popservice: login: refusing to send the password in clear")
        self.assertEqual(self.sent(events), [])
        # with --allow-plaintext it is sent, as asked
        runs = yield self.fetch_both("--starttls", "none", "--allow-plaintext")
        self.assertEqual(runs["twisted"][0], EX_OK, runs)
        self.assertEqual(runs["blocking"][0], EX_OK, runs)
        self.assertEqual(self.sent(events), ["USER", "PASS"] * 2)

    @defer.inlineCallbacks
    def test_library_refuses_plaintext_in_both_engines(self) -> Any:
        events = self.start()
        creds = Credentials("alice", "secret")
        yield self.assertFailure(connect(reactor, self.url, creds, starttls="none", timeout=10),
                                 PlaintextRefusedError)
        yield self.assertFailure(threads.deferToThread(blocking.connect, parse_url(self.url), creds,
                                                       starttls="none", timeout=10),
                                 PlaintextRefusedError)
        self.assertEqual(self.sent(events), [])

    # -- item: mechanisms the server does not list; empty tokens -------------------------------

    @defer.inlineCallbacks
    def test_unlisted_mechanism_refused(self) -> Any:
        events = self.start()  # USER only: no SASL at all
        runs = yield self.fetch_both("--starttls", "none", "--allow-plaintext", "--auth", "SCRAM-SHA-256")
        self.assertRefused(runs, "popservice: login: the server does not offer SCRAM-SHA-256")
        runs = yield self.fetch_both("--starttls", "none", "--allow-plaintext", "--auth", "XOAUTH2",
                                     "--oauth-token-command", "echo a-token", password=None)
        self.assertRefused(runs, "popservice: login: the server does not offer XOAUTH2")
        self.assertEqual(self.sent(events), [])

    @defer.inlineCallbacks
    def test_empty_token_refused(self) -> Any:
        validator = JWTValidator([JWK.secret(b"s" * 32)], audience="pop")
        events = self.start(sasl=mechanisms_from_option("OAUTHBEARER,XOAUTH2"),
                            sasl_services={"token_validator": validator})
        for extra in ((), ("--auth", "XOAUTH2")):
            runs = yield self.fetch_both("--starttls", "none", "--allow-plaintext",
                                         "--oauth-token-command", "true", *extra, password=None)
            self.assertRefused(runs, "popservice: login: the OAuth token is empty")
        self.assertEqual(self.sent(events), [])

    @defer.inlineCallbacks
    def test_library_refuses_in_both_engines(self) -> Any:
        validator = JWTValidator([JWK.secret(b"s" * 32)], audience="pop")
        events = self.start(sasl=mechanisms_from_option("XOAUTH2"),
                            sasl_services={"token_validator": validator})
        for creds, text in ((Credentials("alice", "secret", mechanisms=("SCRAM-SHA-256",),
                                         allow_plaintext=True), "does not offer SCRAM-SHA-256"),
                            (Credentials("alice", token="", allow_plaintext=True), "token is empty"),
                            (Credentials("alice", token=" ", mechanisms=("XOAUTH2",), allow_plaintext=True),
                             "token is empty")):
            e1 = yield self.assertFailure(connect(reactor, self.url, creds, starttls="none", timeout=10),
                                          NoMechanismError)
            e2 = yield self.assertFailure(threads.deferToThread(blocking.connect, parse_url(self.url),
                                                                creds, starttls="none", timeout=10),
                                          NoMechanismError)
            self.assertEqual(str(e1), str(e2))
            self.assertIn(text, str(e1))
        self.assertEqual(self.sent(events), [])
