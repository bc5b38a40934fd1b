# -*- test-case-name: tests.test_sasl_mechanisms -*-
"""
OAuth 2.0 bearer token validation for the OAUTHBEARER (RFC 7628) and XOAUTH2
SASL mechanisms.

L{ITokenValidator} is the seam: C{validate(token, user_hint)} fires with the
user name the token grants access to, or fails with L{InvalidToken}.  The
mechanisms find a validator in C{SASLContext.services["token_validator"]}.

L{JWTValidator} checks self-contained JWT access tokens (RFC 7519 / RFC 9068)
offline with PyJWT: PyJWT parses the token and the JWKS and checks the
signature, the required claims, C{iss} and C{aud}.  Each key verifies exactly
one algorithm, the one of its type (RSA: RS256, EC P-256: ES256, a shared
secret: HS256), and only that one is passed to C{jwt.decode}: no RS256/HS256
key confusion, no C{alg: none}.  C{exp}, C{nbf} and C{iat} are compared here,
with the validator's clock (PyJWT only reads the system clock).  The user name
comes from a configurable claim (C{sub} by default; C{email} or
C{preferred_username} are common).

L{StaticTokenValidator} maps fixed tokens to users (tests, simple setups).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import HMACAlgorithm
from jwt.utils import base64url_encode
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer  # type: ignore[import-untyped,unused-ignore]

from popservice.interfaces import ITokenValidator

if TYPE_CHECKING:
    from jwt.types import Options

__all__ = [
    "ITokenValidator",
    "InvalidToken",
    "JWK",
    "JWTValidator",
    "StaticTokenValidator",
    "load_keys",
]

#: The one algorithm a key of each type verifies.
ALGORITHM_FOR_KTY = {"RSA": "RS256", "EC": "ES256", "oct": "HS256"}

#: Algorithms L{JWTValidator} knows.
SUPPORTED_ALGORITHMS = tuple(ALGORITHM_FOR_KTY.values())

#: Tokens longer than this are refused before any parsing (RFC 5034 lines are 16 KiB anyway).
MAX_TOKEN_LENGTH = 16384

_JWT_TYPES = ("jwt", "at+jwt", "application/at+jwt")


class InvalidToken(UnauthorizedLogin):
    """The token is malformed, forged, expired or not for this server/user.  The
    message names the check that failed, never the token."""


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2), for building tokens in tests and tools."""
    return base64url_encode(data).decode("ascii")


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JWK:
    """A verification key: C{kty} is C{"RSA"}, C{"EC"} (P-256) or C{"oct"}."""

    kty: str
    key: Any  # RSAPublicKey | EllipticCurvePublicKey | bytes
    kid: str | None = None

    def __repr__(self) -> str:
        return f"<JWK kty={self.kty} kid={self.kid!r}>"

    @property
    def algorithm(self) -> str:
        """The only algorithm this key verifies (C{jwt.decode}'s C{algorithms})."""
        return ALGORITHM_FOR_KTY[self.kty]

    @classmethod
    def from_public_key(cls, key: Any, kid: str | None = None) -> JWK:
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise ValueError("RSA keys shorter than 2048 bits are refused")
            return cls("RSA", key, kid)
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(key.curve, ec.SECP256R1):
                raise ValueError("only P-256 EC keys are supported (ES256)")
            return cls("EC", key, kid)
        raise ValueError("unsupported public key type %s" % (type(key).__name__,))

    @classmethod
    def secret(cls, secret: bytes, kid: str | None = None) -> JWK:
        """An HS256 shared secret (at least 32 bytes, RFC 7518 section 3.2)."""
        if len(secret) < 32:
            raise ValueError("HS256 secrets must be at least 32 bytes")
        return cls("oct", bytes(secret), kid)

    @classmethod
    def from_pyjwk(cls, jwk: jwt.PyJWK) -> JWK:
        """One key of a JWKS as PyJWT parsed it; private parts, if any, are dropped."""
        if jwk.public_key_use not in (None, "sig"):
            raise ValueError("key is not for signatures")
        kid = jwk.key_id
        if kid is not None and not isinstance(kid, str):
            raise ValueError("kid is not a string")
        if jwk.algorithm_name != ALGORITHM_FOR_KTY.get(jwk.key_type or ""):
            raise ValueError("unsupported alg %r for kty %r" % (jwk.algorithm_name, jwk.key_type))
        if jwk.key_type == "oct":
            return cls.secret(jwk.key, kid)
        key = jwk.key
        if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            key = key.public_key()
        return cls.from_public_key(key, kid)


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)


def load_keys(data: bytes) -> list[JWK]:
    """
    Keys from the contents of a file: a JWKS (C{{"keys": [...]}}), a single
    JWK (JSON object), or one or more PEM public keys / certificates.

    @raise ValueError: when nothing usable is found.
    """
    text = data.strip()
    if text.startswith(b"{"):
        try:
            document = json.loads(text)
        except ValueError:
            raise ValueError("not valid JSON")
        if not isinstance(document, dict):
            raise ValueError("a JWKS must be a JSON object")
        try:
            if "keys" not in document:
                return [JWK.from_pyjwk(jwt.PyJWK(document))]
            found = jwt.PyJWKSet.from_dict(document)
        except jwt.PyJWTError as e:
            # PyJWT's messages may quote the key, secret parts included.
            raise ValueError("unusable JWK or JWKS (%s)" % (type(e).__name__,))
        keys = []
        for key in found:
            try:
                keys.append(JWK.from_pyjwk(key))
            except ValueError:
                pass  # keys we cannot use (encryption keys, other algorithms or curves) are skipped
        if not keys:
            raise ValueError("no usable signature key in the JWKS")
        return keys
    keys = []
    for block in _PEM_BLOCK.finditer(text):
        kind, pem = block.group(1), block.group(0)
        if kind == b"CERTIFICATE":
            keys.append(JWK.from_public_key(x509.load_pem_x509_certificate(pem).public_key()))
        elif kind == b"PUBLIC KEY":
            keys.append(JWK.from_public_key(serialization.load_pem_public_key(pem)))
        else:
            name = kind.decode("ascii", "replace")
            raise ValueError("PEM block %r is not a public key or certificate" % (name,))
    if not keys:
        raise ValueError("no PEM public key, certificate or JWKS found")
    return keys


# ---------------------------------------------------------------------------
# JWT
# ---------------------------------------------------------------------------


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken("claim %s is not a number" % (name,))
    return float(value)


@implementer(ITokenValidator)
class JWTValidator:
    """
    Validate JWT bearer tokens offline.

    @param keys: verification keys (see L{load_keys}, L{JWK.secret}).
    @param issuer: required C{iss} value, or C{None} not to check it.
    @param audience: accepted C{aud} values (the token's C{aud}, a string or
        a list, must contain one of them), or C{None} not to check it.
    @param user_claim: the claim naming the user (C{sub}, C{email} ...).
    @param algorithms: accepted C{alg} values; keys of other types are unused.
    @param leeway: seconds of clock skew tolerated for C{exp}, C{nbf} and C{iat}.
    @param require_exp: refuse tokens without C{exp} (the default).
    @param user_map: optional mapping of the claim value to a local user
        name (e.g. strip a domain); return C{None} to refuse.
    """

    def __init__(
        self,
        keys: Iterable[JWK],
        *,
        issuer: str | None = None,
        audience: str | Sequence[str] | None = None,
        user_claim: str = "sub",
        algorithms: Sequence[str] = SUPPORTED_ALGORITHMS,
        leeway: float = 60.0,
        require_exp: bool = True,
        clock: Callable[[], float] = time.time,
        user_map: Callable[[str], str | None] | None = None,
    ) -> None:
        self.keys = list(keys)
        if not self.keys:
            raise ValueError("JWTValidator needs at least one key")
        unknown = set(algorithms) - set(SUPPORTED_ALGORITHMS)
        if unknown:
            raise ValueError("unsupported JWT algorithms: %s" % (", ".join(sorted(unknown)),))
        self.issuer = issuer
        self.audience: tuple[str, ...] | None = (
            None if audience is None else (audience,) if isinstance(audience, str) else tuple(audience)
        )
        self.user_claim = user_claim
        self.algorithms = tuple(algorithms)
        self.leeway = leeway
        self.require_exp = require_exp
        self.clock = clock
        self.user_map = user_map
        self._options: Options = {
            "require": (["exp"] if require_exp else []) + [user_claim],
            # exp, nbf and iat are checked against self.clock in _check_times.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            # PyJWT refuses any token with an aud when no audience is given: not checked then.
            "verify_aud": self.audience is not None,
        }

    @classmethod
    def from_file(cls, path: str, **options: Any) -> JWTValidator:
        """Keys from a PEM public key/certificate or a JWKS file (see L{load_keys})."""
        with open(path, "rb") as f:
            return cls(load_keys(f.read()), **options)

    def __repr__(self) -> str:
        return f"<JWTValidator keys={len(self.keys)} iss={self.issuer!r} aud={self.audience!r}>"

    def validate(self, token: str, user_hint: str | None) -> defer.Deferred[str]:
        try:
            return defer.succeed(self.user_for(token, user_hint))
        except InvalidToken:
            return defer.fail()

    def claims(self, token: str) -> dict[str, Any]:
        """
        The verified claims of C{token} (signature and time/issuer/audience
        checks passed).

        @raise InvalidToken: otherwise.
        """
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token or unsupported header")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _JWT_TYPES):
            raise InvalidToken("not a JWT")
        kid = header.get("kid")
        for key in self.keys:
            if key.algorithm not in self.algorithms or (kid is not None and key.kid not in (None, kid)):
                continue
            try:
                claims = jwt.decode(token, key.key, algorithms=[key.algorithm], options=self._options,
                                    audience=self.audience, issuer=self.issuer)
            except (jwt.InvalidAlgorithmError, jwt.InvalidSignatureError):
                continue  # a key of another type, or another key of this type
            except jwt.MissingRequiredClaimError as e:
                raise InvalidToken("token has no %s claim" % (e.claim,))
            except jwt.PyJWTError as e:
                raise InvalidToken("token refused: %s" % (type(e).__name__,))
            self._check_times(claims)
            return claims
        raise InvalidToken("no key verifies the token (algorithm, kid or signature)")

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self.clock()
        exp = _number(claims, "exp")
        if exp is not None and now > exp + self.leeway:
            raise InvalidToken("token expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + self.leeway < nbf:
            raise InvalidToken("token not yet valid")
        iat = _number(claims, "iat")
        if iat is not None and now + self.leeway < iat:
            raise InvalidToken("token issued in the future")

    def user_for(self, token: str, user_hint: str | None) -> str:
        """The user C{token} grants access to (synchronous L{validate})."""
        claims = self.claims(token)
        value = claims.get(self.user_claim)
        if not isinstance(value, str) or not value:
            raise InvalidToken("token has no %s claim" % (self.user_claim,))
        user = self.user_map(value) if self.user_map is not None else value
        if not user:
            raise InvalidToken("token user not mapped to a local user")
        if user_hint is not None and user_hint not in (user, value):
            raise InvalidToken("token is for another user")
        return user


class _AnyBytesHS256(HMACAlgorithm):
    """HS256 that signs with any bytes, a PEM public key too, which PyJWT rightly
    refuses: L{make_jwt} forges the key-confusion tokens that must be refused.
    Never used to verify."""

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)

    def prepare_key(self, key: str | bytes) -> bytes:
        return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def make_jwt(claims: Mapping[str, Any], key: Any, alg: str, kid: str | None = None) -> str:
    """
    Sign C{claims} into a compact JWT: C{key} is an RSA/EC private key
    (RS256/ES256) or secret bytes (HS256).  For tests and tools.
    """
    signer = jwt.PyJWS(algorithms=["RS256", "ES256"])
    signer.register_algorithm("HS256", _AnyBytesHS256())
    payload = json.dumps(dict(claims), separators=(",", ":")).encode()
    return signer.encode(payload, key, algorithm=alg, headers=None if kid is None else {"kid": kid})


@implementer(ITokenValidator)
class StaticTokenValidator:
    """Fixed tokens for fixed users (tests and small setups); compared in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(hashlib.sha256(t.encode("utf-8")).digest(), u) for t, u in tokens.items()]

    def validate(self, token: str, user_hint: str | None) -> defer.Deferred[str]:
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found: str | None = None
        for known, user in self._tokens:
            if hmac.compare_digest(known, digest):
                found = user
        if found is None:
            return defer.fail(InvalidToken("unknown token"))
        if user_hint is not None and user_hint != found:
            return defer.fail(InvalidToken("token is for another user"))
        return defer.succeed(found)
