# -*- test-case-name: tests.test_sasl_mechanisms -*-
"""
OAuth 2.0 bearer token validation for the OAUTHBEARER (RFC 7628) and XOAUTH2
SASL mechanisms.

L{ITokenValidator} is the seam: C{validate(token, user_hint)} fires with the
user name the token grants access to, or fails with L{InvalidToken}.  The
mechanisms find a validator in C{SASLContext.services["token_validator"]}.

L{JWTValidator} checks self-contained JWT access tokens (RFC 7519 / RFC 9068)
offline, with C{cryptography} only: the JWS signature (RS256, ES256 or HS256,
RFC 7515/7518) against configured keys (a PEM public key, a JWKS file, or a
shared secret for HS256), then the C{exp}, C{nbf}, C{iss} and C{aud} claims.
The algorithm must match the key type (no RS256/HS256 key confusion, no
C{alg: none}).  The user name comes from a configurable claim (C{sub} by
default; C{email} or C{preferred_username} are common).

L{StaticTokenValidator} maps fixed tokens to users (tests, simple setups).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer  # type: ignore[import-untyped,unused-ignore]

from popservice.interfaces import ITokenValidator

__all__ = [
    "ITokenValidator",
    "InvalidToken",
    "JWK",
    "JWTValidator",
    "StaticTokenValidator",
    "load_keys",
]

#: Algorithms L{JWTValidator} knows.
SUPPORTED_ALGORITHMS = ("RS256", "ES256", "HS256")

#: Tokens longer than this are refused before any parsing (RFC 5034 lines are 16 KiB anyway).
MAX_TOKEN_LENGTH = 16384


class InvalidToken(UnauthorizedLogin):
    """The token is malformed, forged, expired or not for this server/user.  The
    message names the check that failed, never the token."""


# ---------------------------------------------------------------------------
# base64url and keys
# ---------------------------------------------------------------------------


def _b64url_decode(text: str) -> bytes:
    if not text or any(c not in _B64URL for c in text) or len(text) % 4 == 1:
        raise InvalidToken("malformed token encoding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed token encoding")


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2), for building tokens in tests and tools."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_int(text: object) -> int:
    if not isinstance(text, str):
        raise ValueError("JWK number is not a string")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("JWK number is not base64url")
    return int.from_bytes(raw, "big")


@dataclass(frozen=True)
class JWK:
    """A verification key: C{kty} is C{"RSA"}, C{"EC"} (P-256) or C{"oct"}."""

    kty: str
    key: Any  # RSAPublicKey | EllipticCurvePublicKey | bytes
    kid: str | None = None
    alg: str | None = None

    def __repr__(self) -> str:
        return f"<JWK kty={self.kty} kid={self.kid!r}>"

    def fits(self, alg: str) -> bool:
        """True if this key may verify a signature of algorithm C{alg}."""
        if self.alg is not None and self.alg != alg:
            return False
        return {"RS256": "RSA", "ES256": "EC", "HS256": "oct"}.get(alg) == self.kty

    @classmethod
    def from_public_key(cls, key: Any, kid: str | None = None) -> "JWK":
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
    def from_json(cls, data: Mapping[str, Any]) -> "JWK":
        """One key of a JWKS (RFC 7517); private parts, if any, are ignored."""
        kty = data.get("kty")
        kid = data.get("kid")
        alg = data.get("alg")
        use = data.get("use")
        if use is not None and use != "sig":
            raise ValueError("key is not for signatures")
        if kid is not None and not isinstance(kid, str):
            raise ValueError("kid is not a string")
        if alg is not None and alg not in SUPPORTED_ALGORITHMS:
            raise ValueError("unsupported alg %r" % (alg,))
        if kty == "RSA":
            public = rsa.RSAPublicNumbers(_b64url_int(data.get("e")), _b64url_int(data.get("n"))).public_key()
            key = cls.from_public_key(public, kid)
        elif kty == "EC":
            if data.get("crv") != "P-256":
                raise ValueError("only the P-256 curve is supported")
            point = ec.EllipticCurvePublicNumbers(
                _b64url_int(data.get("x")), _b64url_int(data.get("y")), ec.SECP256R1()
            )
            key = cls.from_public_key(point.public_key(), kid)
        elif kty == "oct":
            k = data.get("k")
            if not isinstance(k, str):
                raise ValueError("oct key without k")
            secret = base64.urlsafe_b64decode(k + "=" * (-len(k) % 4))
            key = cls.secret(secret, kid)
        else:
            raise ValueError("unsupported kty %r" % (kty,))
        return JWK(key.kty, key.key, kid, alg)

    @classmethod
    def secret(cls, secret: bytes, kid: str | None = None) -> "JWK":
        """An HS256 shared secret (at least 32 bytes, RFC 7518 section 3.2)."""
        if len(secret) < 32:
            raise ValueError("HS256 secrets must be at least 32 bytes")
        return cls("oct", bytes(secret), kid)


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
        entries = document.get("keys", [document])
        if not isinstance(entries, list):
            raise ValueError("'keys' must be a list")
        keys = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise ValueError("a JWK must be a JSON object")
            try:
                keys.append(JWK.from_json(entry))
            except ValueError:
                # Keys we cannot use (encryption keys, other curves) are skipped.
                if len(entries) == 1:
                    raise
        if not keys:
            raise ValueError("no usable signature key in the JWKS")
        return keys
    keys = []
    for block in text.split(b"-----END ")[:-1]:
        start = block.find(b"-----BEGIN ")
        if start < 0:
            continue
        kind_end = block.find(b"-----", start + 11)
        kind = block[start + 11 : kind_end]
        end_marker = b"-----END " + kind + b"-----"
        pem = block[start:] + end_marker
        public: Any
        if kind == b"CERTIFICATE":
            from cryptography import x509

            public = x509.load_pem_x509_certificate(pem).public_key()
        elif kind == b"PUBLIC KEY":
            public = serialization.load_pem_public_key(pem)
        else:
            name = kind.decode("ascii", "replace")
            raise ValueError("PEM block %r is not a public key or certificate" % (name,))
        keys.append(JWK.from_public_key(public))
    if not keys:
        raise ValueError("no PEM public key, certificate or JWKS found")
    return keys


# ---------------------------------------------------------------------------
# JWT
# ---------------------------------------------------------------------------


def _verify_signature(key: JWK, alg: str, signing_input: bytes, signature: bytes) -> bool:
    try:
        if alg == "HS256":
            expected = hmac.new(key.key, signing_input, hashlib.sha256).digest()
            return hmac.compare_digest(expected, signature)
        if alg == "RS256":
            key.key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
            return True
        if alg == "ES256":
            if len(signature) != 64:
                return False
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            key.key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
            return True
    except (InvalidSignature, ValueError):
        return False
    return False


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
    @param algorithms: accepted C{alg} values.
    @param leeway: seconds of clock skew tolerated for C{exp} and C{nbf}.
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

    @classmethod
    def from_file(cls, path: str, **options: Any) -> "JWTValidator":
        """Keys from a PEM public key/certificate or a JWKS file (see L{load_keys})."""
        with open(path, "rb") as f:
            return cls(load_keys(f.read()), **options)

    def __repr__(self) -> str:
        return f"<JWTValidator keys={len(self.keys)} iss={self.issuer!r} aud={self.audience!r}>"

    def validate(self, token: str, user_hint: str | None) -> "defer.Deferred[str]":
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
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("not a JWS compact serialization")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            payload = json.loads(_b64url_decode(parts[1]))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidToken("malformed token JSON")
        if not isinstance(header, dict) or not isinstance(payload, dict):
            raise InvalidToken("malformed token JSON")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidToken("algorithm not accepted")
        if "crit" in header:
            raise InvalidToken("critical header extensions are not supported")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ("jwt", "at+jwt",
                                                                                  "application/at+jwt")):
            raise InvalidToken("not a JWT")
        signature = _b64url_decode(parts[2])
        kid = header.get("kid")
        candidates = [k for k in self.keys if k.fits(alg) and (kid is None or k.kid is None or k.kid == kid)]
        signing_input = (parts[0] + "." + parts[1]).encode("ascii")
        if not any(_verify_signature(k, alg, signing_input, signature) for k in candidates):
            raise InvalidToken("bad signature")
        self._check_claims(payload)
        return payload

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        now = self.clock()
        exp = _number(claims, "exp")
        if exp is None:
            if self.require_exp:
                raise InvalidToken("token has no expiry")
        elif now > exp + self.leeway:
            raise InvalidToken("token expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + self.leeway < nbf:
            raise InvalidToken("token not yet valid")
        iat = _number(claims, "iat")
        if iat is not None and now + self.leeway < iat:
            raise InvalidToken("token issued in the future")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise InvalidToken("wrong issuer")
        if self.audience is not None:
            aud = claims.get("aud")
            values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(isinstance(v, str) and v in self.audience for v in values):
                raise InvalidToken("wrong audience")

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


def make_jwt(claims: Mapping[str, Any], key: Any, alg: str, kid: str | None = None) -> str:
    """
    Sign C{claims} into a compact JWT: C{key} is an RSA/EC private key
    (RS256/ES256) or secret bytes (HS256).  For tests and tools.
    """
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = (
        b64url_encode(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url_encode(json.dumps(dict(claims), separators=(",", ":")).encode())
    ).encode("ascii")
    if alg == "HS256":
        signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    elif alg == "RS256":
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256":
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        raise ValueError("unsupported algorithm %r" % (alg,))
    return signing_input.decode("ascii") + "." + b64url_encode(signature)


@implementer(ITokenValidator)
class StaticTokenValidator:
    """Fixed tokens for fixed users (tests and small setups); compared in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(hashlib.sha256(t.encode("utf-8")).digest(), u) for t, u in tokens.items()]

    def validate(self, token: str, user_hint: str | None) -> "defer.Deferred[str]":
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
