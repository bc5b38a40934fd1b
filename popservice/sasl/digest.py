# -*- test-case-name: tests.test_sasl_mechanisms -*-
"""
DIGEST-MD5 (RFC 2831, obsoleted by RFC 6331: historic, weak).  Implemented
for old clients but never offered by default (not in DEFAULT_MECHANISMS);
enable it explicitly.  Authentication only (C{qop=auth}): no integrity or
confidentiality layer.

It needs each user's plaintext password, from a checker providing
L{ISASLSecretSource} (a passwd-file with C{{PLAIN}} passwords).  The realm is
the server's host name; the C{digest-uri} service type must be C{pop}; its
host is checked only when C{SASLContext.services["digest_uri_hosts"]} (a
collection of names) is set, since clients put whatever name they connected
to there.  After a correct response the server proves it knows the password
too (C{rspauth=...} in a final challenge); the client's empty answer ends the
exchange in C{Authenticated(Verified(user, "DIGEST-MD5"))}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from zope.interface import implementer

from popservice.sasl.base import Challenge, ISASLServerMechanism, SASLContext, SASLStep, Verified
from popservice.sasl.common import MechanismBase, log, sasl_password, secret_sources

__all__ = ["DigestMD5Mechanism", "parse_directives"]


class _ParseError(ValueError):
    pass


def parse_directives(data: bytes) -> dict[str, bytes]:
    """
    Parse a DIGEST-MD5 message: C{key=value} or C{key="quoted\\"value"},
    comma separated, optional whitespace, empty list elements allowed (RFC 2831
    section 7.1).  Keys are lower-cased.

    @raise ValueError: on a malformed message or a repeated directive.
    """
    out: dict[str, bytes] = {}
    i, n = 0, len(data)
    while i < n:
        while i < n and data[i : i + 1] in (b" ", b"\t", b",", b"\r", b"\n"):
            i += 1
        if i >= n:
            break
        eq = data.find(b"=", i)
        if eq < 0:
            raise _ParseError("directive without '='")
        key = data[i:eq].strip().lower()
        if not key or any(c in b' \t",' for c in key):
            raise _ParseError("bad directive name")
        i = eq + 1
        while i < n and data[i : i + 1] in (b" ", b"\t"):
            i += 1
        if data[i : i + 1] == b'"':
            i += 1
            value = bytearray()
            while True:
                if i >= n:
                    raise _ParseError("unterminated quoted string")
                c = data[i : i + 1]
                if c == b"\\":
                    if i + 1 >= n:
                        raise _ParseError("unterminated quoted string")
                    value += data[i + 1 : i + 2]
                    i += 2
                    continue
                if c == b'"':
                    i += 1
                    break
                value += c
                i += 1
            token = bytes(value)
        else:
            end = data.find(b",", i)
            end = n if end < 0 else end
            token = data[i:end].strip()
            i = end
        while i < n and data[i : i + 1] in (b" ", b"\t"):
            i += 1
        if i < n and data[i : i + 1] != b",":
            raise _ParseError("junk after a value")
        name = key.decode("ascii", "replace")
        if name in out:
            raise _ParseError("repeated directive")
        out[name] = token
    return out


def _h(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _hex(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).hexdigest().encode("ascii")


def _latin1_if_possible(text: str) -> bytes:
    """RFC 2831 section 2.1.2.1: strings representable in ISO 8859-1 are hashed in it."""
    try:
        return text.encode("iso-8859-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def digest_response(
    username: str, realm: str, password: str, nonce: bytes, cnonce: bytes, nc: bytes, qop: bytes,
    digest_uri: bytes, authzid: bytes = b"", *, server: bool = False,
) -> bytes:
    """The C{response} (or, with C{server}, the C{rspauth}) value, 32 hex digits."""
    a1 = (
        _h(_latin1_if_possible(username) + b":" + _latin1_if_possible(realm) + b":"
           + _latin1_if_possible(password))
        + b":" + nonce + b":" + cnonce
    )
    if authzid:
        a1 += b":" + authzid
    a2 = (b"" if server else b"AUTHENTICATE") + b":" + digest_uri
    return _hex(_hex(a1) + b":" + nonce + b":" + nc + b":" + cnonce + b":" + qop + b":" + _hex(a2))


def _quote(text: str) -> bytes:
    return b'"' + text.encode("utf-8").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@implementer(ISASLServerMechanism)
class DigestMD5Mechanism(MechanismBase):
    """DIGEST-MD5 (RFC 2831), authentication only; off by default."""

    name = "DIGEST-MD5"
    plaintext = False

    def __init__(self, context: SASLContext) -> None:
        super().__init__(context)
        self.realm = context.hostname
        self.nonce = base64.b64encode(secrets.token_bytes(24))
        self._stage = 0
        self._user: str | None = None

    def challenge(self) -> bytes:
        return (b"realm=" + _quote(self.realm) + b',nonce="' + self.nonce
                + b'",qop="auth",charset=utf-8,algorithm=md5-sess')

    def step(self, response: bytes | None) -> SASLStep:
        if self.finished:
            return self.wrong_state()
        if self._stage == 0:
            if response is not None:
                return self.fail("DIGEST-MD5 takes no initial response")
            self._stage = 1
            return Challenge(self.challenge())
        if response is None:
            return self.wrong_state()
        if self._stage == 1:
            return self._digest_response(response)
        # Stage 2: the client acknowledges rspauth with an empty response.
        if response != b"" or self._user is None:
            return self.fail("Unexpected response")
        return self.succeed(Verified(self._user, self.name))

    def _digest_response(self, response: bytes) -> SASLStep:
        if len(response) > 4096:
            return self.fail("DIGEST-MD5 response too long")
        try:
            d = parse_directives(response)
        except ValueError:
            return self.fail("Malformed DIGEST-MD5 response")
        utf8 = d.get("charset") == b"utf-8"
        if "charset" in d and not utf8:
            return self.fail("Malformed DIGEST-MD5 response")
        try:
            username = d["username"].decode("utf-8" if utf8 else "iso-8859-1")
            realm = d.get("realm", b"").decode("utf-8" if utf8 else "iso-8859-1")
            nonce, cnonce, nc = d["nonce"], d["cnonce"], d["nc"]
            digest_uri, client_response = d["digest-uri"], d["response"].lower()
        except (KeyError, UnicodeDecodeError):
            return self.fail("Malformed DIGEST-MD5 response")
        qop = d.get("qop", b"auth")
        authzid = d.get("authzid", b"")
        if not username or not cnonce or qop != b"auth" or nc != b"00000001":
            return self.fail("Malformed DIGEST-MD5 response")
        if not hmac.compare_digest(nonce, self.nonce):
            return self.fail("Stale or foreign nonce")
        if realm and realm != self.realm:
            return self.fail("Wrong realm")
        serv_type, _, rest = digest_uri.partition(b"/")
        host = rest.partition(b"/")[0].decode("utf-8", "replace").lower()
        hosts = self.context.services.get("digest_uri_hosts")
        if serv_type != b"pop" or not host:
            return self.fail("Wrong digest-uri")
        if hosts is not None and host not in {h.lower() for h in hosts}:
            return self.fail("Wrong digest-uri")
        if authzid and authzid.decode("utf-8", "replace") != username:
            return self.fail("Authorization identity refused")
        if not secret_sources(self.context):
            log.error("DIGEST-MD5 needs a checker providing ISASLSecretSource (e.g. a passwd-file)")
        password_bytes = sasl_password(self.context, username)
        genuine = password_bytes is not None
        try:
            password = (password_bytes or secrets.token_bytes(16).hex().encode()).decode("utf-8")
        except UnicodeDecodeError:
            password, genuine = secrets.token_hex(16), False
        expected = digest_response(username, realm, password, nonce, cnonce, nc, qop, digest_uri, authzid)
        if not (hmac.compare_digest(expected, client_response) and genuine):
            return self.fail()
        self._user = username
        self._stage = 2
        rspauth = digest_response(username, realm, password, nonce, cnonce, nc, qop, digest_uri, authzid,
                                  server=True)
        return Challenge(b"rspauth=" + rspauth)
