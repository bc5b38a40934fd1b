# -*- test-case-name: tests.test_sasl_mechanisms -*-
"""
OAuth 2.0 bearer tokens over SASL: OAUTHBEARER (RFC 7628) and Google's
XOAUTH2.

Bearer tokens are replayable secrets, so both factories say C{plaintext =
True}: the server offers them only over TLS or to trusted peers.

Tokens are checked by the L{ITokenValidator} in
C{SASLContext.services["token_validator"]} (e.g. L{JWTValidator}); the user
the client asks for (the OAUTHBEARER gs2 authzid, the XOAUTH2 C{user=}) is
passed to it as the hint and the token must be for that user.  Optional
C{services["oauth_scope"]} and C{services["oauth_configuration"]} (an
OpenID discovery URL) are echoed in the error JSON.

OAUTHBEARER::

    C: n,a=user,^Ahost=...^Aport=...^Aauth=Bearer TOKEN^A^A
    S: +OK                                  (valid)
    S: + {"status":"invalid_token",...}     (invalid: an error challenge)
    C: ^A                                   (the client's dummy response)
    S: -ERR [AUTH] ...

XOAUTH2 (one-line form C{AUTH XOAUTH2 base64(...)}, or C{AUTH XOAUTH2} then
an empty C{+ } challenge and the message)::

    C: user=USER^Aauth=Bearer TOKEN^A^A
    S: + {"status":"401","schemes":"bearer",...}   (invalid)
    C: (empty)
    S: -ERR [AUTH] ...
"""

from __future__ import annotations

import json
from typing import Any, Union

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from popservice.auth.tokens import ITokenValidator
from popservice.sasl.base import Challenge, ISASLServerMechanism, SASLContext, SASLStep, Verified
from popservice.sasl.common import ClientFirstMechanism, log, utf8

__all__ = ["OAuthBearerMechanism", "XOAuth2Mechanism", "parse_oauthbearer", "parse_xoauth2"]

_MAX_MESSAGE = 16384


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        return None
    return token


def _kvpairs(text: str) -> dict[str, str] | None:
    """C{key=value^A...^A^A} (RFC 7628 section 3.1); C{None} when malformed."""
    if not text.endswith("\x01\x01"):
        return None
    pairs: dict[str, str] = {}
    for item in text[:-2].split("\x01"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key or not key.isascii() or not key.isalpha() or key in pairs:
            return None
        pairs[key] = value
    return pairs


def parse_oauthbearer(message: bytes) -> tuple[str | None, str] | None:
    """
    C{(authzid or None, token)} from an OAUTHBEARER client response, or
    C{None} when malformed (or asking for channel binding).
    """
    text = utf8(message)
    if text is None:
        return None
    gs2, sep, rest = text.partition("\x01")
    if not sep:
        return None
    fields = gs2.split(",")
    if len(fields) != 3 or fields[0] not in ("n", "y") or fields[2] != "":
        return None
    authzid: str | None = None
    if fields[1]:
        if not fields[1].startswith("a="):
            return None
        authzid = fields[1][2:].replace("=2C", ",").replace("=3D", "=")
        if not authzid:
            return None
    pairs = _kvpairs("\x01" + rest)
    if pairs is None or "auth" not in pairs:
        return None
    token = _bearer(pairs["auth"])
    return None if token is None else (authzid, token)


def parse_xoauth2(message: bytes) -> tuple[str, str] | None:
    """C{(user, token)} from an XOAUTH2 client response, or C{None}."""
    text = utf8(message)
    if text is None:
        return None
    pairs = _kvpairs(text)
    if pairs is None or not pairs.get("user") or "auth" not in pairs:
        return None
    token = _bearer(pairs["auth"])
    return None if token is None else (pairs["user"], token)


class _TokenMechanism(ClientFirstMechanism):
    #: A bearer token is a replayable secret: like a password, only over TLS
    #: or from trusted peers (RFC 7628 section 5, RFC 6750 section 5.3).
    plaintext = True

    def __init__(self, context: SASLContext) -> None:
        super().__init__(context)
        self._stage = 0

    def parse(self, message: bytes) -> tuple[str | None, str] | None:
        raise NotImplementedError

    def error_challenge(self) -> bytes:
        raise NotImplementedError

    def _error_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        scope = self.context.services.get("oauth_scope")
        if scope:
            fields["scope"] = str(scope)
        configuration = self.context.services.get("oauth_configuration")
        if configuration:
            fields["openid-configuration"] = str(configuration)
        return fields

    def respond(self, response: bytes) -> Union[SASLStep, "defer.Deferred[SASLStep]"]:
        if self._stage == 0:
            self._stage = 2
            return self._message(response)
        if self._stage == 3:
            # The client's answer to our error challenge: the exchange fails whatever it says.
            return self.fail()
        return self.wrong_state()

    def _message(self, response: bytes) -> Union[SASLStep, "defer.Deferred[SASLStep]"]:
        parsed = self.parse(response) if len(response) <= _MAX_MESSAGE else None
        if parsed is None:
            return self.fail("Malformed %s message" % (self.name,))
        user_hint, token = parsed
        validator = self.context.services.get("token_validator")
        if validator is None or not ITokenValidator.providedBy(validator):
            log.error("{mech} is enabled but no token_validator service is configured", mech=self.name)
            return self._invalid()
        d: defer.Deferred[Any] = defer.maybeDeferred(validator.validate, token, user_hint)

        def valid(user: object) -> SASLStep:
            if not isinstance(user, str) or not user:
                return self._invalid()
            return self.succeed(Verified(user, self.name))

        def invalid(failure: Failure) -> SASLStep:
            if not failure.check(UnauthorizedLogin):
                log.failure("token validation failed", failure)
            else:
                log.info("{mech}: token refused: {why}", mech=self.name, why=failure.getErrorMessage())
            return self._invalid()

        return d.addCallbacks(valid, invalid)

    def _invalid(self) -> SASLStep:
        self._stage = 3
        return Challenge(self.error_challenge())


@implementer(ISASLServerMechanism)
class OAuthBearerMechanism(_TokenMechanism):
    """OAUTHBEARER (RFC 7628)."""

    name = "OAUTHBEARER"

    def parse(self, message: bytes) -> tuple[str | None, str] | None:
        return parse_oauthbearer(message)

    def error_challenge(self) -> bytes:
        fields = {"status": "invalid_token", "schemes": "bearer", **self._error_fields()}
        return json.dumps(fields, separators=(",", ":")).encode("utf-8")

    def respond(self, response: bytes) -> Union[SASLStep, "defer.Deferred[SASLStep]"]:
        if self._stage == 3 and response != b"\x01":
            # RFC 7628 section 3.2.3: the client must answer the error with %x01.
            return self.fail("Unexpected response")
        return super().respond(response)


@implementer(ISASLServerMechanism)
class XOAuth2Mechanism(_TokenMechanism):
    """XOAUTH2 (Google's pre-standard form of OAUTHBEARER)."""

    name = "XOAUTH2"

    def parse(self, message: bytes) -> tuple[str | None, str] | None:
        return parse_xoauth2(message)

    def error_challenge(self) -> bytes:
        fields = {"status": "401", "schemes": "bearer", **self._error_fields()}
        return json.dumps(fields, separators=(",", ":")).encode("utf-8")
