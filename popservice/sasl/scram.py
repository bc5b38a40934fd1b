# -*- test-case-name: tests.test_sasl_mechanisms -*-
"""
SCRAM-SHA-1 (RFC 5802) and SCRAM-SHA-256 (RFC 7677), server side, on
C{scramp}.

The exchange::

    C: n,,n=user,r=CNONCE                         (initial response or after "+ ")
    S: + r=CNONCE SNONCE,s=SALT,i=4096
    C: c=biws,r=CNONCE SNONCE,p=PROOF
    S: + v=SERVERSIGNATURE                        (server-final, a challenge)
    C: (empty)
    S: +OK                                        Authenticated(Verified(user, name))

Secrets come from a checker of the portal providing L{ISASLSecretSource}
(L{PasswdFileChecker.scram_secret}: a C{{SCRAM-SHA-256}} password field, the
C{scram_sha256=} / C{scram_sha1=} extra fields, or derived from a PLAIN
password).  No plaintext is needed once the keys are stored.

Unknown users (and users without SCRAM secrets) get a server-first with a
salt derived from a per-process key and the user name, so the first
challenge looks the same for everyone; such exchanges always fail at the
client-final.  A wrong proof, a client-final whose nonce is not this
exchange's (replayed or tampered), channel binding (C{p=}, not offered) and
an authorization identity (C{a=} in the gs2 header: master-user logins are
PLAIN's business; C{scramp} refuses it, and it cannot be stripped because the
client's proof covers the header) all end in L{Failed}.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import scramp
from zope.interface import implementer

from popservice.auth.credentials import SCRAMSecret
from popservice.sasl.base import Challenge, ISASLServerMechanism, SASLContext, SASLStep, Verified
from popservice.sasl.common import ClientFirstMechanism, log, scram_secret, secret_sources

__all__ = ["ScramMechanismBase", "ScramSHA1Mechanism", "ScramSHA256Mechanism"]

#: Key for the fake salts of unknown users (stable for the process lifetime).
_FAKE_SALT_KEY = secrets.token_bytes(32)
_FAKE_ITERATIONS = 4096


class ScramMechanismBase(ClientFirstMechanism):
    """One SCRAM exchange; subclasses set C{name}."""

    plaintext = False

    def __init__(self, context: SASLContext) -> None:
        super().__init__(context)
        self._server: scramp.core.ScramServer | None = None
        self._stage = 0
        self._user: str | None = None
        self._fake = False

    def _auth_fn(self, user: str) -> SCRAMSecret:
        self._user = user
        if not secret_sources(self.context):
            log.error("{mech} needs a checker providing ISASLSecretSource (e.g. a passwd-file)",
                      mech=self.name)
        secret = scram_secret(self.context, user, self.name)
        if secret is None:
            self._fake = True
            digest = hmac.new(_FAKE_SALT_KEY, (self.name + "\x00" + user).encode("utf-8"),
                              hashlib.sha256).digest()
            size = 20 if self.name == "SCRAM-SHA-1" else 32
            return digest[:16], secrets.token_bytes(size), secrets.token_bytes(size), _FAKE_ITERATIONS
        return secret

    def respond(self, response: bytes) -> SASLStep:
        if self._stage == 0:
            return self._client_first(response)
        if self._stage == 2:
            return self._client_final(response)
        # Stage 3: the client has checked our signature; it must answer empty.
        if response != b"" or self._user is None:
            return self.fail("Unexpected response")
        return self.succeed(Verified(self._user, self.name))

    def _client_first(self, response: bytes) -> SASLStep:
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return self.fail("Malformed SCRAM message")
        parts = text.split(",", 2)
        if len(parts) != 3:
            return self.fail("Malformed SCRAM message")
        if parts[1]:
            return self.fail("Authorization identity refused")
        server = scramp.ScramMechanism(self.name).make_server(self._auth_fn)
        try:
            server.set_client_first(text)
            server_first = server.get_server_first()
        except scramp.ScramException as e:
            log.debug("{mech} client-first refused: {why}", mech=self.name, why=str(e))
            return self.fail("Malformed SCRAM message")
        self._server = server
        self._stage = 2
        return Challenge(server_first.encode("utf-8"))

    def _client_final(self, response: bytes) -> SASLStep:
        assert self._server is not None
        try:
            text = response.decode("utf-8")
            self._server.set_client_final(text)
            server_final = self._server.get_server_final()
        except (UnicodeDecodeError, scramp.ScramException) as e:
            log.debug("{mech} client-final refused: {why}", mech=self.name, why=str(e))
            return self.fail()
        if self._fake:
            # Cannot happen with random keys, but never let a fake secret through.
            return self.fail()
        self._stage = 3
        return Challenge(server_final.encode("utf-8"))


@implementer(ISASLServerMechanism)
class ScramSHA1Mechanism(ScramMechanismBase):
    """SCRAM-SHA-1 (RFC 5802)."""

    name = "SCRAM-SHA-1"


@implementer(ISASLServerMechanism)
class ScramSHA256Mechanism(ScramMechanismBase):
    """SCRAM-SHA-256 (RFC 7677)."""

    name = "SCRAM-SHA-256"
