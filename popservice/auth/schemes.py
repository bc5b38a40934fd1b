# -*- test-case-name: tests.test_passwdfile -*-
"""
Dovecot password schemes: hashing and verification of stored passwords.

A stored password is C{{SCHEME}secret}, C{{SCHEME.HEX}secret} or
C{{SCHEME.B64}secret} (the suffix selects the encoding of digest schemes;
C{.BASE64} is a synonym of C{.B64}); without a prefix it is a C{crypt(3)}
string, Dovecot's default scheme CRYPT.  Scheme names are case-insensitive and
have aliases (CLEARTEXT, CLEAR, SHA1, HMAC-MD5, BLF).  See Dovecot's
"Password Schemes" documentation.

Here live the scheme registry (L{split_scheme}, L{verify_password},
L{hash_password}) and, one section each, the schemes built on plain hash
functions: PLAIN; the unsalted digests MD5 / PLAIN-MD5 / LDAP-MD5 / SHA /
SHA256 / SHA512 and the salted ones SMD5 / SSHA / SSHA256 / SSHA512 (digest
followed by salt); CRAM-MD5 (the RFC 2195 / RFC 2104 HMAC-MD5 context);
PBKDF2 (RFC 8018 PBKDF2-HMAC-SHA1, Dovecot's C{$1$salt$rounds$hex} form).
Elsewhere: the C{crypt(3)} family, bcrypt and argon2 in
L{popservice.auth.crypt_schemes}; SCRAM-SHA-1 / SCRAM-SHA-256 in
L{popservice.auth.scram}; the HEX / B64 encodings in
L{popservice.auth.secret_encoding}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable

from popservice.auth.credentials import CRAM_MD5_CONTEXT_LEN, hmac_md5_context
from popservice.auth.crypt_schemes import (
    argon2i_hash,
    argon2id_hash,
    bcrypt_hash,
    sha256_crypt_hash,
    sha512_crypt_hash,
    verify_argon2,
    verify_blf,
    verify_crypt,
    verify_des_crypt,
    verify_md5_crypt,
    verify_sha256_crypt,
    verify_sha512_crypt,
)
from popservice.auth.scram import scram_secret_generator, scram_verifier
from popservice.auth.secret_encoding import ENCODINGS, decode_digest, decode_plain, to_bytes

__all__ = [
    "DEFAULT_SCHEME",
    "HASH_SCHEMES",
    "RECOVERABLE_SCHEMES",
    "SUPPORTED_SCHEMES",
    "PasswdFileError",
    "UnknownSchemeError",
    "hash_password",
    "split_scheme",
    "verify_password",
]

#: The scheme L{hash_password} uses by default.  (The cost parameters are in
#: L{popservice.auth.crypt_schemes} and L{popservice.auth.scram}.)
DEFAULT_SCHEME = "ARGON2ID"


class UnknownSchemeError(ValueError):
    """A password scheme this module does not know."""


class PasswdFileError(ValueError):
    """A malformed passwd-file line.  The message never contains the secret."""


_ALIASES = {
    "CLEARTEXT": "PLAIN",
    "CLEAR": "PLAIN",
    "SHA1": "SHA",
    "HMAC-MD5": "CRAM-MD5",
    "BLF": "BLF-CRYPT",
}

_Password = bytes


# -- PLAIN --------------------------------------------------------------------


def _verify_plain(pw: _Password, secret: str, encoding: str | None) -> bool:
    stored = decode_plain(secret, encoding)
    return stored is not None and hmac.compare_digest(pw, stored)


def _needs_encoding(pw: bytes) -> bool:
    try:
        text = pw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(c in ":\r\n" or not c.isprintable() for c in text) or text != text.strip()


# -- Unsalted digests: MD5, PLAIN-MD5, LDAP-MD5, SHA, SHA256, SHA512 ---------


def _digest(algorithm: str, default: str) -> Callable[[_Password, str, str | None], bool]:
    size = hashlib.new(algorithm).digest_size

    def verify(pw: _Password, secret: str, encoding: str | None) -> bool:
        stored = decode_digest(secret, encoding, default, lambda n: n == size)
        return stored is not None and hmac.compare_digest(hashlib.new(algorithm, pw).digest(), stored)

    return verify


def _verify_md5(pw: _Password, secret: str, encoding: str | None) -> bool:
    """Dovecot's MD5 scheme: MD5-CRYPT if it looks like one, else PLAIN-MD5."""
    if secret.startswith("$1$"):
        return verify_md5_crypt(pw, secret, encoding)
    return _digest("md5", "HEX")(pw, secret, encoding)


# -- Salted digests: SMD5, SSHA, SSHA256, SSHA512 ------------------------------


def _salted(algorithm: str) -> Callable[[_Password, str, str | None], bool]:
    size = hashlib.new(algorithm).digest_size

    def verify(pw: _Password, secret: str, encoding: str | None) -> bool:
        stored = decode_digest(secret, encoding, "B64", lambda n: n > size)
        if stored is None:
            return False
        digest, salt = stored[:size], stored[size:]
        return hmac.compare_digest(hashlib.new(algorithm, pw + salt).digest(), digest)

    return verify


def _ssha512(pw: bytes) -> str:
    salt = secrets.token_bytes(16)
    return base64.b64encode(hashlib.sha512(pw + salt).digest() + salt).decode("ascii")


def _ssha256(pw: bytes) -> str:
    salt = secrets.token_bytes(16)
    return base64.b64encode(hashlib.sha256(pw + salt).digest() + salt).decode("ascii")


# -- CRAM-MD5 -------------------------------------------------------------------


def _verify_cram_md5(pw: _Password, secret: str, encoding: str | None) -> bool:
    stored = decode_digest(secret, encoding, "HEX", lambda n: n == CRAM_MD5_CONTEXT_LEN)
    return stored is not None and hmac.compare_digest(hmac_md5_context(pw), stored)


# -- PBKDF2 ---------------------------------------------------------------------


def _verify_pbkdf2(pw: _Password, secret: str, encoding: str | None) -> bool:
    """Dovecot PBKDF2: C{$1$salt$rounds$hex(pbkdf2-sha1)}."""
    parts = secret.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "1" or not parts[3].isdigit():
        return False
    try:
        stored = bytes.fromhex(parts[4])
    except ValueError:
        return False
    rounds = int(parts[3])
    if not 0 < rounds <= 10_000_000 or not stored:
        return False
    computed = hashlib.pbkdf2_hmac("sha1", pw, parts[2].encode("utf-8"), rounds, len(stored))
    return hmac.compare_digest(computed, stored)


# -- Every scheme ----------------------------------------------------------------

_VERIFIERS: dict[str, Callable[[_Password, str, str | None], bool]] = {
    "PLAIN": _verify_plain,
    "CRYPT": verify_crypt,
    "DES-CRYPT": verify_des_crypt,
    "MD5-CRYPT": verify_md5_crypt,
    "SHA256-CRYPT": verify_sha256_crypt,
    "SHA512-CRYPT": verify_sha512_crypt,
    "BLF-CRYPT": verify_blf,
    "ARGON2I": verify_argon2,
    "ARGON2ID": verify_argon2,
    "MD5": _verify_md5,
    "PLAIN-MD5": _digest("md5", "HEX"),
    "LDAP-MD5": _digest("md5", "B64"),
    "SHA": _digest("sha1", "B64"),
    "SHA256": _digest("sha256", "B64"),
    "SHA512": _digest("sha512", "B64"),
    "SMD5": _salted("md5"),
    "SSHA": _salted("sha1"),
    "SSHA256": _salted("sha256"),
    "SSHA512": _salted("sha512"),
    "CRAM-MD5": _verify_cram_md5,
    "PBKDF2": _verify_pbkdf2,
    "SCRAM-SHA-1": scram_verifier("sha1"),
    "SCRAM-SHA-256": scram_verifier("sha256"),
}

_GENERATORS: dict[str, Callable[[bytes], str]] = {
    "ARGON2ID": argon2id_hash,
    "ARGON2I": argon2i_hash,
    "BLF-CRYPT": bcrypt_hash,
    "SHA512-CRYPT": sha512_crypt_hash,
    "SHA256-CRYPT": sha256_crypt_hash,
    "SSHA512": _ssha512,
    "SSHA256": _ssha256,
    "CRAM-MD5": lambda pw: hmac_md5_context(pw).hex(),
    "SCRAM-SHA-256": scram_secret_generator("SCRAM-SHA-256"),
    "SCRAM-SHA-1": scram_secret_generator("SCRAM-SHA-1"),
}

#: Canonical names of the schemes L{verify_password} understands (aliases:
#: CLEARTEXT, CLEAR, SHA1, HMAC-MD5, BLF).
SUPPORTED_SCHEMES = frozenset(_VERIFIERS)

#: Schemes L{hash_password} can produce.
HASH_SCHEMES = frozenset(_GENERATORS) | {"PLAIN"}

#: Schemes whose secret is the password itself (usable by APOP / CRAM-MD5).
RECOVERABLE_SCHEMES = frozenset({"PLAIN"})

#: Schemes verified without a thread: one hash or a comparison.
CHEAP_SCHEMES = frozenset({"PLAIN", "CLEAR", "CLEARTEXT", "PLAIN-MD5", "LDAP-MD5", "SHA", "SHA1",
                            "SHA256", "SHA512", "SMD5", "SSHA", "SSHA256", "SSHA512", "CRAM-MD5",
                            "HMAC-MD5"})


def split_scheme(hashed: str) -> tuple[str, str | None, str]:
    """
    Split a stored password into C{(scheme, encoding, secret)}.  The scheme is
    canonical and upper case (C{"CRYPT"} when there is no C{{...}} prefix);
    encoding is C{"HEX"}, C{"B64"} or C{None}.

    @raise PasswdFileError: on a C{{} without C{}}.
    @raise UnknownSchemeError: on an unknown scheme or encoding suffix.
    """
    if not hashed.startswith("{"):
        return "CRYPT", None, hashed
    end = hashed.find("}")
    if end < 0:
        raise PasswdFileError("password scheme prefix has no closing brace")
    name = hashed[1:end].upper()
    secret = hashed[end + 1 :]
    encoding: str | None = None
    if "." in name:
        name, _, suffix = name.partition(".")
        if suffix not in ENCODINGS:
            raise UnknownSchemeError(f"{name}.{suffix}")
        encoding = ENCODINGS[suffix]
    name = _ALIASES.get(name, name)
    if name not in _VERIFIERS:
        raise UnknownSchemeError(name)
    return name, encoding, secret


def verify_password(password: bytes | str, hashed: str) -> bool:
    """
    Check C{password} (str is UTF-8 encoded) against a Dovecot password
    string such as C{"{SSHA512}..."} or a bare crypt string, in constant time
    where the scheme allows.  May be slow (bcrypt, argon2, crypt): call it in
    a thread from reactor code.

    @raise UnknownSchemeError: when the scheme is not supported.
    @return: C{False} for a wrong password or a malformed hash.
    """
    scheme, encoding, secret = split_scheme(hashed)
    return _VERIFIERS[scheme](to_bytes(password), secret, encoding)


def hash_password(password: bytes | str, scheme: str = DEFAULT_SCHEME) -> str:
    """
    A Dovecot-compatible stored password for C{password}, with its
    C{{SCHEME}} prefix, e.g. C{hash_password("pw", "BLF-CRYPT")} ->
    C{"{BLF-CRYPT}$2b$12$..."}.  PLAIN passwords that cannot be stored
    verbatim in a passwd-file (colons, control characters, edge spaces, non
    UTF-8) come out as C{{PLAIN.B64}...}.  Slow for the crypt schemes.

    @raise UnknownSchemeError: when C{scheme} is not in L{HASH_SCHEMES}.
    """
    name = _ALIASES.get(scheme.upper(), scheme.upper())
    pw = to_bytes(password)
    if name == "PLAIN":
        if _needs_encoding(pw):
            return "{PLAIN.B64}" + base64.b64encode(pw).decode("ascii")
        return "{PLAIN}" + pw.decode("utf-8")
    generator = _GENERATORS.get(name)
    if generator is None:
        raise UnknownSchemeError(scheme)
    return "{" + name + "}" + generator(pw)
