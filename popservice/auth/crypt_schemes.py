# -*- test-case-name: tests.test_passwdfile -*-
"""
The C{crypt(3)} family of Dovecot password schemes and the slow key
derivation functions: hashing and verification for CRYPT (dispatch on the
modular-crypt prefix), DES-CRYPT (traditional 13-character crypt),
MD5-CRYPT (C{$1$}), SHA256-CRYPT / SHA512-CRYPT (C{$5$} / C{$6$}, Drepper's
SHA-crypt), BLF-CRYPT (bcrypt, C{$2a$} / C{$2b$} / C{$2y$}) and
ARGON2I / ARGON2ID (RFC 9106, PHC string format C{$argon2id$v=19$...}).

The cost parameters L{hash_password<popservice.auth.schemes.hash_password>}
uses live here (tests lower them on this module).  All of this is slow by
design: call it in a thread from reactor code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from passlib.hash import (  # type: ignore[import-untyped,unused-ignore]
    des_crypt,
    md5_crypt,
    sha256_crypt,
    sha512_crypt,
)

__all__ = [
    "ARGON2_MEMORY_COST",
    "ARGON2_TIME_COST",
    "BCRYPT_ROUNDS",
    "SHA_CRYPT_ROUNDS",
    "argon2i_hash",
    "argon2id_hash",
    "bcrypt_hash",
    "sha256_crypt_hash",
    "sha512_crypt_hash",
    "verify_argon2",
    "verify_blf",
    "verify_crypt",
    "verify_des_crypt",
    "verify_md5_crypt",
    "verify_sha256_crypt",
    "verify_sha512_crypt",
]

#: Cost parameters used by L{hash_password<popservice.auth.schemes.hash_password>}
#: (module-level so tests and deployments can tune them).  bcrypt cost for BLF-CRYPT:
BCRYPT_ROUNDS = 12
#: rounds for SHA256-CRYPT / SHA512-CRYPT (None: passlib's default, 535000/656000)
SHA_CRYPT_ROUNDS: int | None = None
#: argon2 time and memory (KiB) costs; parallelism is 1 (what Dovecot/libsodium want)
ARGON2_TIME_COST = 3
ARGON2_MEMORY_COST = 65536


def _passlib_verify(handler: Any, pw: bytes, h: str) -> bool:
    try:
        return bool(handler.verify(pw, h))
    except (ValueError, TypeError):
        return False


# -- CRYPT: a crypt(3) string of any kind -----------------------------------


def verify_crypt(pw: bytes, secret: str, encoding: str | None) -> bool:
    """CRYPT: a crypt(3) string, dispatched on its prefix."""
    if secret.startswith("$1$"):
        return _passlib_verify(md5_crypt, pw, secret)
    if secret.startswith("$5$"):
        return _passlib_verify(sha256_crypt, pw, secret)
    if secret.startswith("$6$"):
        return _passlib_verify(sha512_crypt, pw, secret)
    if secret.startswith("$2"):
        return _bcrypt_verify(pw, secret)
    if len(secret) == 13 and not secret.startswith("$"):
        return _passlib_verify(des_crypt, pw, secret)
    return False


# -- DES-CRYPT, MD5-CRYPT, SHA256-CRYPT, SHA512-CRYPT ------------------------


def _prefixed(prefix: str, handler: Any) -> Callable[[bytes, str, str | None], bool]:
    def verify(pw: bytes, secret: str, encoding: str | None) -> bool:
        return secret.startswith(prefix) and _passlib_verify(handler, pw, secret)

    return verify


verify_des_crypt = _prefixed("", des_crypt)
verify_md5_crypt = _prefixed("$1$", md5_crypt)
verify_sha256_crypt = _prefixed("$5$", sha256_crypt)
verify_sha512_crypt = _prefixed("$6$", sha512_crypt)


def _sha_crypt(handler: Any, pw: bytes) -> str:
    if SHA_CRYPT_ROUNDS is not None:
        handler = handler.using(rounds=SHA_CRYPT_ROUNDS)
    return str(handler.hash(pw))


def sha256_crypt_hash(pw: bytes) -> str:
    """A new SHA256-CRYPT hash, L{SHA_CRYPT_ROUNDS} rounds."""
    return _sha_crypt(sha256_crypt, pw)


def sha512_crypt_hash(pw: bytes) -> str:
    """A new SHA512-CRYPT hash, L{SHA_CRYPT_ROUNDS} rounds."""
    return _sha_crypt(sha512_crypt, pw)


# -- BLF-CRYPT (bcrypt) -------------------------------------------------------


def _bcrypt_verify(pw: bytes, h: str) -> bool:
    if not h.startswith(("$2a$", "$2b$", "$2y$")):
        return False
    try:
        # crypt(3) and Dovecot use at most 72 bytes; bcrypt>=5 raises instead.
        return bcrypt.checkpw(pw[:72], h.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False


def verify_blf(pw: bytes, secret: str, encoding: str | None) -> bool:
    """BLF-CRYPT: a bcrypt hash."""
    return _bcrypt_verify(pw, secret)


def bcrypt_hash(pw: bytes) -> str:
    """A new bcrypt hash with cost L{BCRYPT_ROUNDS}."""
    return bcrypt.hashpw(pw[:72], bcrypt.gensalt(BCRYPT_ROUNDS)).decode("ascii")


# -- ARGON2I, ARGON2ID ----------------------------------------------------------


def verify_argon2(pw: bytes, secret: str, encoding: str | None) -> bool:
    """ARGON2I / ARGON2ID: an argon2 PHC string."""
    # Like Dovecot (libsodium), accept either variant whatever the scheme name says.
    if not secret.startswith(("$argon2i$", "$argon2id$")):
        return False
    try:
        return PasswordHasher().verify(secret, pw)
    except (VerificationError, InvalidHashError):
        return False


def _argon2(variant: str) -> Callable[[bytes], str]:
    def generate(pw: bytes) -> str:
        from argon2 import Type

        # Dovecot's own parameters; libsodium (Dovecot's verifier) wants p=1.
        kind = Type.ID if variant == "ID" else Type.I
        return PasswordHasher(
            time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_COST, parallelism=1, type=kind
        ).hash(pw)

    return generate


argon2id_hash = _argon2("ID")
argon2i_hash = _argon2("I")
