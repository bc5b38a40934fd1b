"""
Credentials for the challenge-response logins of POP3: APOP (RFC 1939) and
CRAM-MD5 (RFC 2195), with constant-time checks; master-user credentials for
SASL PLAIN with an authorization identity (L{MasterUserCredentials}); and
L{ISASLSecretSource}, what a user database offers to SASL mechanisms that
verify proofs themselves (SCRAM, DIGEST-MD5).

Twisted ships both (L{twisted.mail.pop3.APOPCredentials},
L{twisted.cred.credentials.CramMD5Credentials}) but compares digests with
C{==} and builds CRAM-MD5 challenges from L{random}; these classes fix that.

This module also holds the tiny pure-Python MD5 compression function needed to
work with Dovecot's C{{CRAM-MD5}} password scheme, which stores the HMAC-MD5
I{context} (the inner and outer MD5 states after absorbing the key XOR
ipad/opad) instead of the password.  L{hmac_md5_context} produces that context
from a key; L{hmac_md5_from_context} completes an HMAC-MD5 from it, so a
CRAM-MD5 response can be verified without the plaintext password.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import socket
import struct
import time

from twisted.cred.credentials import ICredentials, IUsernameHashedPassword, IUsernamePassword
from zope.interface import Attribute, Interface, implementer  # type: ignore[import-untyped,unused-ignore]

__all__ = [
    "APOPCredentials",
    "CramMD5Credentials",
    "IHMACMD5ContextCredentials",
    "IMasterUserCredentials",
    "IRecordsVersion",
    "ISASLSecretSource",
    "MasterUserCredentials",
    "SCRAMSecret",
    "CRAM_MD5_CONTEXT_LEN",
    "hmac_md5_context",
    "hmac_md5_from_context",
]

#: Length in bytes of a Dovecot CRAM-MD5 context (outer state, inner state).
CRAM_MD5_CONTEXT_LEN = 32

_BLOCK = 64
_MASK = 0xFFFFFFFF
_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_K = [int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64)]

_State = tuple[int, int, int, int]


def _to_bytes(value: bytes | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def _md5_compress(state: _State, block: bytes) -> _State:
    """The MD5 compression function (RFC 1321) applied to one 64-byte block."""
    a, b, c, d = state
    words = struct.unpack("<16I", block)
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
            g = i
        elif i < 32:
            f = (d & b) | (~d & c)
            g = (5 * i + 1) % 16
        elif i < 48:
            f = b ^ c ^ d
            g = (3 * i + 5) % 16
        else:
            f = c ^ (b | (~d & _MASK))
            g = (7 * i) % 16
        f = (f + a + _K[i] + words[g]) & _MASK
        rotated = ((f << _SHIFTS[i]) | (f >> (32 - _SHIFTS[i]))) & _MASK
        a, d, c, b = d, c, b, (b + rotated) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _md5_finish(state: _State, data: bytes, already: int) -> bytes:
    """
    Finish an MD5 computation whose first C{already} bytes (a multiple of 64)
    have been absorbed into C{state}, appending C{data} and the padding.
    """
    total = already + len(data)
    padded = data + b"\x80" + b"\x00" * ((55 - total) % 64) + struct.pack("<Q", (total * 8) & (2**64 - 1))
    for start in range(0, len(padded), _BLOCK):
        state = _md5_compress(state, padded[start : start + _BLOCK])
    return struct.pack("<4I", *state)


def _padded_key(key: bytes) -> bytes:
    if len(key) > _BLOCK:
        key = hashlib.md5(key, usedforsecurity=False).digest()
    return key.ljust(_BLOCK, b"\x00")


def hmac_md5_context(key: bytes | str) -> bytes:
    """
    The 32-byte HMAC-MD5 context of C{key} as Dovecot stores it in its
    C{{CRAM-MD5}} scheme (hex-encoded there): the outer MD5 state, then the
    inner MD5 state, each as four little-endian 32-bit words.
    """
    padded = _padded_key(_to_bytes(key))
    inner = _md5_compress(_IV, bytes(k ^ 0x36 for k in padded))
    outer = _md5_compress(_IV, bytes(k ^ 0x5C for k in padded))
    return struct.pack("<4I", *outer) + struct.pack("<4I", *inner)


def hmac_md5_from_context(context: bytes, message: bytes) -> bytes:
    """
    HMAC-MD5 of C{message} under the key whose L{hmac_md5_context} is
    C{context}; equal to C{hmac.new(key, message, "md5").digest()}.
    """
    if len(context) != CRAM_MD5_CONTEXT_LEN:
        raise ValueError("an HMAC-MD5 context is 32 bytes")
    outer: _State = struct.unpack("<4I", context[:16])
    inner: _State = struct.unpack("<4I", context[16:])
    inner_digest = _md5_finish(inner, message, _BLOCK)
    return _md5_finish(outer, inner_digest, _BLOCK)


class IHMACMD5ContextCredentials(Interface):  # type: ignore[misc,unused-ignore]
    """
    Credentials that can be verified against a stored HMAC-MD5 context
    (Dovecot's C{{CRAM-MD5}} scheme) instead of a plaintext password.
    """

    def checkHMACMD5Context(context: bytes) -> bool:  # type: ignore[empty-body,unused-ignore]
        """
        True if the response matches the key whose 32-byte
        L{hmac_md5_context} is C{context}.
        """


@implementer(IUsernamePassword)
class PlainCredentials:
    """
    A user name and password as the client sent them (USER/PASS, SASL PLAIN
    and LOGIN); the checker compares the password in constant time.
    """

    def __init__(self, username: bytes, password: bytes) -> None:
        self.username = username
        self.password = password

    def __repr__(self) -> str:
        return f"PlainCredentials(username={self.username!r}, password=<hidden>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlainCredentials):
            return NotImplemented
        return self.username == other.username and hmac.compare_digest(self.password, other.password)

    __hash__ = None  # type: ignore[assignment]

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(self.password, password)


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """
    APOP credentials (RFC 1939 section 7): the client sends the hex MD5 of the
    greeting's timestamp (C{magic}) followed by the shared secret.

    @ivar magic: the timestamp, angle brackets included, e.g. C{b"<1.2@host>"}.
    @ivar username: the user name as sent by the client.
    @ivar digest: the client's digest, 32 hex digits.
    """

    def __init__(self, magic: bytes, username: bytes, digest: bytes) -> None:
        self.magic = magic
        self.username = username
        self.digest = digest

    def __repr__(self) -> str:
        return f"<APOPCredentials username={self.username!r}>"

    def checkPassword(self, password: bytes | str) -> bool:
        """
        True if C{digest} is the MD5 of C{magic} + C{password}; constant time.
        """
        expected = (
            hashlib.md5(self.magic + _to_bytes(password), usedforsecurity=False).hexdigest().encode("ascii")
        )
        return hmac.compare_digest(expected, _to_bytes(self.digest).lower())


@implementer(IUsernameHashedPassword, IHMACMD5ContextCredentials)
class CramMD5Credentials:
    """
    CRAM-MD5 credentials (RFC 2195), a constant-time replacement for
    L{twisted.cred.credentials.CramMD5Credentials} with the same protocol:
    L{getChallenge}, L{setResponse}, L{moreChallenges}, L{checkPassword}.

    It can also be verified against Dovecot's stored C{{CRAM-MD5}} context
    (L{checkHMACMD5Context}), without knowing the password.

    @ivar challenge: the challenge sent to the client (bytes, an RFC 822 msg-id).
    @ivar response: the client's hex HMAC-MD5 (bytes).
    @ivar username: the user name from the client's response, or C{None}.
    """

    username: bytes | None = None
    challenge: bytes = b""
    response: bytes = b""

    def __init__(self, host: bytes | str | None = None, challenge: bytes | None = None) -> None:
        self.host = host
        if challenge is not None:
            self.challenge = challenge

    def __repr__(self) -> str:
        return f"<CramMD5Credentials username={self.username!r}>"

    def getChallenge(self) -> bytes:
        """The challenge, generated on first call: C{<random.pid.time@host>}."""
        if not self.challenge:
            host = self.host if self.host is not None else socket.getfqdn()
            host_s = host.decode("ascii", "replace") if isinstance(host, bytes) else host
            self.challenge = f"<{secrets.randbelow(2**63)}.{os.getpid()}.{time.time_ns()}@{host_s}>".encode(
                "ascii", "replace"
            )
        return self.challenge

    def setResponse(self, response: bytes) -> None:
        """
        Parse the client's decoded response, C{username SP hex-digest}.

        @raise ValueError: when the response does not have that shape.
        """
        username, sep, digest = response.rstrip().rpartition(b" ")
        if not sep or not username or not digest:
            raise ValueError("CRAM-MD5 response must be 'username digest'")
        self.username, self.response = username, digest.lower()

    def moreChallenges(self) -> bool:
        return False

    def checkPassword(self, password: bytes | str) -> bool:
        """True if the response is the HMAC-MD5 of the challenge keyed with C{password}."""
        expected = hmac.new(_to_bytes(password), self.challenge, "md5").hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.response)

    def checkHMACMD5Context(self, context: bytes) -> bool:
        """True if the response matches the stored Dovecot CRAM-MD5 C{context} (32 bytes)."""
        expected = hmac_md5_from_context(context, self.challenge).hex().encode("ascii")
        return hmac.compare_digest(expected, self.response)


# ---------------------------------------------------------------------------
# Master users (SASL PLAIN with an authorization identity)
# ---------------------------------------------------------------------------


class IMasterUserCredentials(ICredentials):  # type: ignore[misc,unused-ignore]
    """
    A I{master user} (an administrator, a migration tool) proving its own
    password in order to log in as another user (the SASL authorization
    identity, RFC 4616 C{authzid}).  A checker for these credentials verifies
    C{master}'s password, checks that C{master} may act for C{username}, and
    returns C{username} as the avatar id.
    """

    username = Attribute("The user to log in as (bytes, the authzid).")
    master = Attribute("The user whose password is proved (bytes, the authcid).")

    def master_credentials() -> IUsernamePassword:  # type: ignore[empty-body,misc,unused-ignore]
        """C{IUsernamePassword} credentials of the master user alone."""


@implementer(IUsernamePassword)
class _MasterPassword:
    def __init__(self, username: bytes, password: bytes) -> None:
        self.username = username
        self.password = password

    def __repr__(self) -> str:
        return f"<master password of {self.username!r}>"

    def checkPassword(self, password: bytes | str) -> bool:
        return hmac.compare_digest(self.password, _to_bytes(password))


@implementer(IMasterUserCredentials)
class MasterUserCredentials:
    """
    PLAIN with C{authzid != authcid}: C{master} proves C{password} and asks to
    be C{username}.  See L{popservice.sasl.plain.MasterUserChecker}.
    """

    def __init__(self, username: bytes, master: bytes, password: bytes) -> None:
        self.username = username
        self.master = master
        self.password = password

    def __repr__(self) -> str:
        return f"<MasterUserCredentials {self.master!r} as {self.username!r}>"

    def master_credentials(self) -> IUsernamePassword:
        return _MasterPassword(self.master, self.password)


# ---------------------------------------------------------------------------
# Secrets for mechanisms that verify proofs themselves
# ---------------------------------------------------------------------------

#: SCRAM verification data as C{scramp}'s C{auth_fn} wants it:
#: C{(salt, stored_key, server_key, iterations)}.
SCRAMSecret = tuple[bytes, bytes, bytes, int]


class ISASLSecretSource(Interface):  # type: ignore[misc,unused-ignore]
    """
    A user database that can hand SASL mechanisms the secrets they verify
    proofs against (SCRAM keys, a recoverable password for DIGEST-MD5).
    Both return C{None} for unknown users, users who may not log in, and
    users without such a secret.
    """

    def scram_secret(user: str, mechanism: str) -> SCRAMSecret | None:  # type: ignore[empty-body,unused-ignore]
        """C{(salt, stored_key, server_key, iterations)} for C{mechanism}
        (C{"SCRAM-SHA-1"} or C{"SCRAM-SHA-256"})."""

    def sasl_password(user: str) -> bytes | None:  # type: ignore[empty-body,unused-ignore]
        """The plaintext password of C{user}, if stored recoverably."""


class IRecordsVersion(Interface):  # type: ignore[misc,unused-ignore]
    """
    A user database whose records change while the server runs (a
    passwd-file re-read when it changes, a users table refreshed): what
    remembers its answers (L{popservice.auth.cache}) forgets them when the
    version changes.
    """

    def records_version() -> int:  # type: ignore[empty-body,unused-ignore]
        """The version of the records now, after looking whether they changed
        (cheaply: at most a C{stat} now and then); each reload makes a new one."""
