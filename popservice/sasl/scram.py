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
exchange's (replayed or tampered) and channel binding (C{p=}, not offered)
all end in L{Failed}.

Authorization identity
======================

A client may name an authorization identity in the GS2 header
(C{n,a=carol,n=carol,...}): GNU SASL (NeoMutt's default login) always sends
the user's own name there, Cyrus SASL's C{-u} does the same.  As with PLAIN, an
authzid equal to the authenticating user logs in as that user; a different one
is allowed only by the master-user rule (C{SASLContext.services["master_users"]},
see L{popservice.sasl.plain}): the master proves its own keys and the session
is the target's mailbox.  The rule is asked only once the proof has been
checked, so a refusal costs the same exchange as a wrong password.

C{scramp} parses the client-first and makes the server-first; it refuses any
authzid, and the client's proof covers the GS2 header (C{c=} in the
client-final), so the client-final is verified here with the RFC 5802 section 3
formulas over the header the client really sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

import scramp
from zope.interface import implementer

from popservice.auth.credentials import SCRAMSecret
from popservice.sasl.base import Challenge, Failed, ISASLServerMechanism, SASLContext, SASLStep, Verified
from popservice.sasl.common import ClientFirstMechanism, log, scram_secret, secret_sources
from popservice.sasl.plain import master_rule

__all__ = ["ScramMechanismBase", "ScramSHA1Mechanism", "ScramSHA256Mechanism"]

#: Key for the fake salts of unknown users (stable for the process lifetime).
_FAKE_SALT_KEY = secrets.token_bytes(32)
_FAKE_ITERATIONS = 4096

_HASHES = {"SCRAM-SHA-1": hashlib.sha1, "SCRAM-SHA-256": hashlib.sha256}


def _unescape_saslname(value: str) -> str | None:
    """RFC 5802 section 5.1 saslname: C{=2C} is C{,}, C{=3D} is C{=}; any other C{=} is malformed."""
    if re.search(r"=(?!2C|3D)", value):
        return None
    return value.replace("=2C", ",").replace("=3D", "=")


class ScramMechanismBase(ClientFirstMechanism):
    """One SCRAM exchange; subclasses set C{name}."""

    plaintext = False

    def __init__(self, context: SASLContext) -> None:
        super().__init__(context)
        self._stage = 0
        self._user: str | None = None
        self._fake = False
        #: the GS2 header exactly as the client sent it (its proof covers it)
        self._gs2_header = b""
        self._authzid: str | None = None
        #: what the client-final's proof covers, besides the client-final itself
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        #: (StoredKey, ServerKey) of the user, or random ones for unknown users
        self._keys = (b"", b"")

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
            secret = digest[:16], secrets.token_bytes(size), secrets.token_bytes(size), _FAKE_ITERATIONS
        self._keys = secret[1], secret[2]
        return secret

    def respond(self, response: bytes) -> SASLStep:
        if self._stage == 0:
            return self._client_first(response)
        if self._stage == 2:
            return self._client_final(response)
        # Stage 3: the client has checked our signature; it must answer empty.
        if response != b"" or self._user is None:
            return self.fail("Unexpected response")
        return self.succeed(Verified(self._authzid or self._user, self.name))

    def fail(self, reason: str = "Authentication failed", user: str | None = None) -> Failed:
        # The failure names the user the client tried (for the login_failed event).
        return super().fail(reason, user=user or self._authzid or self._user)

    def _client_first(self, response: bytes) -> SASLStep:
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return self.fail("Malformed SCRAM message")
        parts = text.split(",", 2)
        if len(parts) != 3:
            return self.fail("Malformed SCRAM message")
        flag, authzid, bare = parts
        if authzid:
            name = _unescape_saslname(authzid[2:]) if authzid.startswith("a=") else None
            if not name:
                return self.fail("Malformed SCRAM message")
            self._authzid = name
        server = scramp.ScramMechanism(self.name).make_server(self._auth_fn)
        try:
            # scramp refuses an authzid: it sees the header without it, and
            # the client-final is checked against the real header below.
            server.set_client_first(flag + ",," + bare)
            server_first = server.get_server_first()
        except scramp.ScramException as e:
            log.debug("{mech} client-first refused: {why}", mech=self.name, why=str(e))
            return self.fail("Malformed SCRAM message")
        if self._authzid == self._user:
            self._authzid = None
        elif self._authzid is not None and master_rule(self.context.services.get("master_users")) is None:
            return self.fail("Authorization identity refused")
        self._gs2_header = (flag + "," + authzid + ",").encode("utf-8")
        self._client_first_bare = bare
        self._server_first = server_first
        self._nonce = server_first.split(",", 1)[0][2:]
        self._stage = 2
        return Challenge(server_first.encode("utf-8"))

    def _client_final(self, response: bytes) -> SASLStep:
        """RFC 5802 section 3: check the proof over the AuthMessage; answer the server signature."""
        try:
            text = response.decode("utf-8")
            without_proof, marker, proof_text = text.rpartition(",p=")
            attributes = without_proof.split(",")
            if not marker or len(attributes) < 2 or attributes[0][:2] != "c=" or attributes[1][:2] != "r=":
                raise ValueError("malformed client-final")
            binding = base64.b64decode(attributes[0][2:], validate=True)
            proof = base64.b64decode(proof_text, validate=True)
        except (UnicodeDecodeError, ValueError, binascii.Error) as e:
            log.debug("{mech} client-final refused: {why}", mech=self.name, why=str(e))
            return self.fail()
        if not hmac.compare_digest(binding, self._gs2_header) or attributes[1][2:] != self._nonce:
            # Another exchange's nonce (a replay), or a header other than the one sent first.
            return self.fail()
        digest = _HASHES[self.name]
        stored_key, server_key = self._keys
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof)).encode("utf-8")
        signature = hmac.new(stored_key, auth_message, digest).digest()
        if len(proof) != len(signature) or self._fake:
            return self.fail()
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(digest(client_key).digest(), stored_key):
            return self.fail()
        if self._authzid is not None and not self._master_allowed(self._user or "", self._authzid):
            return self.fail()
        self._stage = 3
        server_signature = hmac.new(server_key, auth_message, digest).digest()
        return Challenge(b"v=" + base64.b64encode(server_signature))

    def _master_allowed(self, master: str, target: str) -> bool:
        """May C{master}, who has just proved its keys, log in as C{target} (PLAIN's rule)?"""
        rule = master_rule(self.context.services.get("master_users"))
        try:
            allowed = rule is not None and bool(rule(master, target))
        except Exception:
            log.failure("master user rule failed")
            allowed = False
        if allowed:
            log.info("master user {master!r} logs in as {target!r}", master=master, target=target)
        else:
            log.info("master login of {master!r} as {target!r} refused by the rule",
                     master=master, target=target)
        return allowed


@implementer(ISASLServerMechanism)
class ScramSHA1Mechanism(ScramMechanismBase):
    """SCRAM-SHA-1 (RFC 5802)."""

    name = "SCRAM-SHA-1"


@implementer(ISASLServerMechanism)
class ScramSHA256Mechanism(ScramMechanismBase):
    """SCRAM-SHA-256 (RFC 7677)."""

    name = "SCRAM-SHA-256"
