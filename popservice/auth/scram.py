# -*- test-case-name: tests.test_passwdfile,tests.test_sasl_mechanisms -*-
"""
SCRAM secrets (RFC 5802 section 3; SCRAM-SHA-256 is RFC 7677) in Dovecot's
stored form C{iterations,salt,stored_key,server_key} (salt and keys in
base64): the SCRAM-SHA-1 and SCRAM-SHA-256 password schemes, key derivation
from a password, and the C{scram_sha256=} / C{scram_sha1=} passwd-file extra
fields that carry SCRAM secrets next to a password of another scheme.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable

from popservice.auth.secret_encoding import b64decode, to_bytes

__all__ = [
    "SCRAM_EXTRA_FIELDS",
    "SCRAM_HASHES",
    "SCRAM_ITERATIONS",
    "parse_scram_secret",
    "scram_extra_fields",
    "scram_keys",
    "scram_secret_generator",
    "scram_verifier",
]

#: Iterations used by L{hash_password<popservice.auth.schemes.hash_password>}
#: for SCRAM-SHA-256 (Dovecot's default).
SCRAM_ITERATIONS = 4096

#: The hash function of each SCRAM mechanism.
SCRAM_HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}

#: The extra field holding a user's SCRAM secret for each mechanism, for
#: users whose password field uses another scheme (see L{scram_extra_fields}).
SCRAM_EXTRA_FIELDS = {"SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-1": "scram_sha1"}


def parse_scram_secret(secret: str) -> tuple[int, bytes, bytes, bytes]:
    """
    Split a Dovecot SCRAM-SHA-1/SCRAM-SHA-256 secret (without the C{{SCHEME}}
    prefix), C{iterations,salt,stored_key,server_key} (base64), into
    C{(iterations, salt, stored_key, server_key)}, e.g. for a SCRAM SASL
    mechanism.  Raises L{ValueError} when malformed.
    """
    parts = secret.split(",")
    if len(parts) != 4 or not parts[0].isdigit():
        raise ValueError("malformed SCRAM secret")
    try:
        salt, stored_key, server_key = (b64decode(p) for p in parts[1:])
    except binascii.Error:
        raise ValueError("malformed SCRAM secret")
    return int(parts[0]), salt, stored_key, server_key


def scram_verifier(algorithm: str) -> Callable[[bytes, str, str | None], bool]:
    """The password-scheme verifier of the SCRAM mechanism using hash C{algorithm}."""

    def verify(pw: bytes, secret: str, encoding: str | None) -> bool:
        try:
            iterations, salt, stored_key, _server_key = parse_scram_secret(secret)
        except ValueError:
            return False
        if not 0 < iterations <= 10_000_000:
            return False
        salted = hashlib.pbkdf2_hmac(algorithm, pw, salt, iterations)
        client_key = hmac.new(salted, b"Client Key", algorithm).digest()
        return hmac.compare_digest(hashlib.new(algorithm, client_key).digest(), stored_key)

    return verify


def scram_keys(
    password: bytes | str, mechanism: str = "SCRAM-SHA-256", salt: bytes | None = None,
    iterations: int | None = None,
) -> tuple[bytes, bytes, bytes, int]:
    """
    SCRAM verification data for C{password} (RFC 5802 section 3):
    C{(salt, stored_key, server_key, iterations)}, the order C{scramp}'s
    C{auth_fn} wants.  The password is used as UTF-8 bytes without SASLprep,
    as Dovecot does (identical for ASCII passwords).
    """
    algorithm = SCRAM_HASHES[mechanism]
    salt = secrets.token_bytes(16) if salt is None else salt
    iterations = SCRAM_ITERATIONS if iterations is None else iterations
    salted = hashlib.pbkdf2_hmac(algorithm, to_bytes(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", algorithm).digest()
    server_key = hmac.new(salted, b"Server Key", algorithm).digest()
    return salt, hashlib.new(algorithm, client_key).digest(), server_key, iterations


def scram_secret_generator(mechanism: str) -> Callable[[bytes], str]:
    """A generator of new stored secrets (random salt) for C{mechanism}."""

    def generate(pw: bytes) -> str:
        salt, stored_key, server_key, iterations = scram_keys(pw, mechanism)
        fields = [salt, stored_key, server_key]
        return ",".join([str(iterations)] + [base64.b64encode(f).decode("ascii") for f in fields])

    return generate


def scram_extra_fields(
    password: bytes | str, mechanisms: Iterable[str] = ("SCRAM-SHA-256", "SCRAM-SHA-1")
) -> str:
    """
    Extra fields (C{scram_sha256=ITER,SALT,STOREDKEY,SERVERKEY ...}) storing
    SCRAM secrets next to a password hash of another scheme, so SCRAM works
    for users whose password field is e.g. ARGON2ID.
    """
    pw = to_bytes(password)
    return " ".join(f"{SCRAM_EXTRA_FIELDS[m]}={scram_secret_generator(m)(pw)}" for m in mechanisms)
