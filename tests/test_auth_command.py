"""RFC 5034 AUTH in the server protocol, with a toy two-step mechanism, over loopback."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from popservice.sasl.base import Authenticated, Challenge, Failed, SASLContext, SASLStep
from popservice.server.login import PlainCredentials
from popservice.server.policy import Policy
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker


class EchoMechanism:
    """Asks for the user name, then the password: a LOGIN-like toy."""

    name = "X-TOY"
    plaintext = False

    def __init__(self, context: SASLContext) -> None:
        self.context = context
        self.user: bytes | None = None

    def step(self, response: bytes | None) -> SASLStep:
        if self.user is None:
            if not response:
                return Challenge(b"who?")
            self.user = response
            return Challenge(b"password?")
        if response == b"fail":
            return Failed()
        return Authenticated(PlainCredentials(self.user, response or b""))


class PlainToy(EchoMechanism):
    name = "X-PLAINTOY"
    plaintext = True


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class AuthCommand(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.start()

    def start(self, **policy: Any) -> None:
        store = MemoryStore({"alice": [b"Subject: x\n\nbody\n"]})
        self.listen(make_factory(store, [memory_checker(alice="secret")],
                                 sasl={"X-TOY": EchoMechanism, "X-PLAINTOY": PlainToy},
                                 policy=Policy(failure_delay=0, **policy)))

    @defer.inlineCallbacks
    def test_capa_and_bare_auth_list(self) -> Any:
        client = yield self.connect()
        first, body = yield client.command_multi(b"CAPA")
        self.assertIn(b"SASL X-TOY X-PLAINTOY\r\n", body)
        first, body = yield client.command_multi(b"AUTH")
        self.assertEqual(body, b"X-TOY\r\nX-PLAINTOY\r\n")

    @defer.inlineCallbacks
    def test_two_step_success(self) -> Any:
        client = yield self.connect()
        self.assertEqual((yield client.command(b"AUTH x-toy")), b"+ " + b64(b"who?"))
        self.assertEqual((yield client.command(b64(b"alice"))), b"+ " + b64(b"password?"))
        r = yield client.command(b64(b"secret"))
        self.assertTrue(r.startswith(b"+OK"), r)
        self.assertTrue((yield client.command(b"STAT")).startswith(b"+OK 1 "))

    @defer.inlineCallbacks
    def test_initial_response(self) -> Any:
        client = yield self.connect()
        self.assertEqual((yield client.command(b"AUTH X-TOY " + b64(b"alice"))), b"+ " + b64(b"password?"))
        self.assertTrue((yield client.command(b64(b"secret"))).startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_empty_initial_response(self) -> Any:
        client = yield self.connect()
        self.assertEqual((yield client.command(b"AUTH X-TOY =")), b"+ " + b64(b"who?"))

    @defer.inlineCallbacks
    def test_cancel_bad_base64_wrong_password_keep_session(self) -> Any:
        client = yield self.connect()
        yield client.command(b"AUTH X-TOY")
        r = yield client.command(b"*")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield client.command(b"AUTH X-TOY")
        r = yield client.command(b"!!notbase64!!")
        self.assertTrue(r.startswith(b"-ERR"), r)
        r = yield client.command(b"AUTH X-TOY %%%")
        self.assertTrue(r.startswith(b"-ERR"), r)
        yield client.command(b"AUTH X-TOY " + b64(b"alice"))
        r = yield client.command(b64(b"wrong"))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield client.command(b"AUTH X-TOY " + b64(b"alice"))
        r = yield client.command(b64(b"fail"))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        r = yield client.command(b"AUTH NOPE")
        self.assertTrue(r.startswith(b"-ERR"), r)
        yield client.command(b"USER alice")
        self.assertTrue((yield client.command(b"PASS secret")).startswith(b"+OK"))
        r = yield client.command(b"AUTH X-TOY")
        self.assertTrue(r.startswith(b"-ERR"), r)

    @defer.inlineCallbacks
    def test_plaintext_mechanism_hidden_when_untrusted(self) -> Any:
        yield self.server_port.stopListening()
        self.start(trust_loopback=False)
        client = yield self.connect()
        first, body = yield client.command_multi(b"CAPA")
        self.assertIn(b"SASL X-TOY\r\n", body)
        r = yield client.command(b"AUTH X-PLAINTOY")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        self.assertIn(b"STLS", r)
