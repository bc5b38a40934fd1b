# -*- test-case-name: tests.test_passwdfile -*-
"""
Dovecot-style passwd-file authentication.

File format (one user per line, C{#} comments and blank lines ignored)::

    user:password:uid:gid:(gecos):home:(shell):extra_fields

Every field after the password is optional.  The password may start with a
C{{SCHEME}} prefix (C{{SCHEME.HEX}} / C{{SCHEME.B64}} select the encoding of
digest schemes); without one it is a C{crypt(3)} string (Dovecot's default
scheme, CRYPT).  Extra fields are space-separated C{key=value} pairs (a bare
C{key} means C{key=""}); they may contain colons.

Public API:
  - L{verify_password}, L{hash_password}, L{SUPPORTED_SCHEMES}, L{HASH_SCHEMES}
  - L{parse_passwd_file}, L{parse_passwd_line}, L{PasswdRecord}
  - L{PasswdFileChecker}: an L{ICredentialsChecker} and L{IUserDirectory}
  - L{PasswdFileCheckerFactory}: the C{passwd-file} strcred plugin factory
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from passlib.hash import (  # type: ignore[import-untyped,unused-ignore]
    des_crypt,
    md5_crypt,
    sha256_crypt,
    sha512_crypt,
)
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory, InvalidAuthArgumentString
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer  # type: ignore[import-untyped,unused-ignore]

from popservice.auth.credentials import (
    CRAM_MD5_CONTEXT_LEN,
    IHMACMD5ContextCredentials,
    ISASLSecretSource,
    SCRAMSecret,
    hmac_md5_context,
)
from popservice.interfaces import IUserDirectory

__all__ = [
    "DEFAULT_SCHEME",
    "HASH_SCHEMES",
    "SUPPORTED_SCHEMES",
    "PasswdFileChecker",
    "PasswdFileCheckerFactory",
    "PasswdFileError",
    "PasswdRecord",
    "UnknownSchemeError",
    "hash_password",
    "parse_passwd_file",
    "parse_passwd_line",
    "parse_scram_secret",
    "scram_extra_fields",
    "scram_keys",
    "split_scheme",
    "verify_password",
]

log = Logger(namespace="popservice.auth.passwdfile")

#: The scheme L{hash_password} uses by default.
DEFAULT_SCHEME = "ARGON2ID"
#: Cost parameters used by L{hash_password} (module-level so tests and
#: deployments can tune them).  bcrypt cost for BLF-CRYPT:
BCRYPT_ROUNDS = 12
#: rounds for SHA256-CRYPT / SHA512-CRYPT (None: passlib's default, 535000/656000)
SHA_CRYPT_ROUNDS: int | None = None
#: argon2 time and memory (KiB) costs; parallelism is 1 (what Dovecot/libsodium want)
ARGON2_TIME_COST = 3
ARGON2_MEMORY_COST = 65536
#: Iterations used by L{hash_password} for SCRAM-SHA-256 (Dovecot's default).
SCRAM_ITERATIONS = 4096


class UnknownSchemeError(ValueError):
    """A password scheme this module does not know."""


class PasswdFileError(ValueError):
    """A malformed passwd-file line.  The message never contains the secret."""


# ---------------------------------------------------------------------------
# Schemes
# ---------------------------------------------------------------------------

_ALIASES = {
    "CLEARTEXT": "PLAIN",
    "CLEAR": "PLAIN",
    "SHA1": "SHA",
    "HMAC-MD5": "CRAM-MD5",
    "BLF": "BLF-CRYPT",
}

_Password = bytes


def _to_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _decode(text: str, encoding: str | None, default: str, ok: Callable[[int], bool]) -> bytes | None:
    """
    Decode a digest field as Dovecot does: with the explicit encoding if any,
    else the scheme's default one, falling back to the other one when the
    length does not fit (Dovecot accepts both).
    """
    if encoding is not None:
        order = [encoding]
    else:
        order = [default, "B64" if default == "HEX" else "HEX"]
    for enc in order:
        try:
            raw = bytes.fromhex(text) if enc == "HEX" else _b64decode(text)
        except (ValueError, binascii.Error):
            continue
        if ok(len(raw)):
            return raw
    return None


def _decode_plain(text: str, encoding: str | None) -> bytes | None:
    if encoding is None:
        return text.encode("utf-8")
    try:
        return bytes.fromhex(text) if encoding == "HEX" else _b64decode(text)
    except (ValueError, binascii.Error):
        return None


def _verify_plain(pw: _Password, secret: str, encoding: str | None) -> bool:
    stored = _decode_plain(secret, encoding)
    return stored is not None and hmac.compare_digest(pw, stored)


def _bcrypt_verify(pw: _Password, h: str) -> bool:
    if not h.startswith(("$2a$", "$2b$", "$2y$")):
        return False
    try:
        # crypt(3) and Dovecot use at most 72 bytes; bcrypt>=5 raises instead.
        return bcrypt.checkpw(pw[:72], h.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False


def _passlib_verify(handler: Any, pw: _Password, h: str) -> bool:
    try:
        return bool(handler.verify(pw, h))
    except (ValueError, TypeError):
        return False


def _verify_crypt(pw: _Password, secret: str, encoding: str | None) -> bool:
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


def _prefixed(prefix: str, handler: Any) -> Callable[[_Password, str, str | None], bool]:
    def verify(pw: _Password, secret: str, encoding: str | None) -> bool:
        return secret.startswith(prefix) and _passlib_verify(handler, pw, secret)

    return verify


def _verify_blf(pw: _Password, secret: str, encoding: str | None) -> bool:
    return _bcrypt_verify(pw, secret)


def _verify_argon2(pw: _Password, secret: str, encoding: str | None) -> bool:
    # Like Dovecot (libsodium), accept either variant whatever the scheme name says.
    if not secret.startswith(("$argon2i$", "$argon2id$")):
        return False
    try:
        return PasswordHasher().verify(secret, pw)
    except (VerificationError, InvalidHashError):
        return False


def _verify_md5(pw: _Password, secret: str, encoding: str | None) -> bool:
    """Dovecot's MD5 scheme: MD5-CRYPT if it looks like one, else PLAIN-MD5."""
    if secret.startswith("$1$"):
        return _passlib_verify(md5_crypt, pw, secret)
    return _digest("md5", "HEX")(pw, secret, encoding)


def _digest(algorithm: str, default: str) -> Callable[[_Password, str, str | None], bool]:
    size = hashlib.new(algorithm).digest_size

    def verify(pw: _Password, secret: str, encoding: str | None) -> bool:
        stored = _decode(secret, encoding, default, lambda n: n == size)
        return stored is not None and hmac.compare_digest(hashlib.new(algorithm, pw).digest(), stored)

    return verify


def _salted(algorithm: str) -> Callable[[_Password, str, str | None], bool]:
    size = hashlib.new(algorithm).digest_size

    def verify(pw: _Password, secret: str, encoding: str | None) -> bool:
        stored = _decode(secret, encoding, "B64", lambda n: n > size)
        if stored is None:
            return False
        digest, salt = stored[:size], stored[size:]
        return hmac.compare_digest(hashlib.new(algorithm, pw + salt).digest(), digest)

    return verify


def _verify_cram_md5(pw: _Password, secret: str, encoding: str | None) -> bool:
    stored = _decode(secret, encoding, "HEX", lambda n: n == CRAM_MD5_CONTEXT_LEN)
    return stored is not None and hmac.compare_digest(hmac_md5_context(pw), stored)


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
        salt, stored_key, server_key = (_b64decode(p) for p in parts[1:])
    except binascii.Error:
        raise ValueError("malformed SCRAM secret")
    return int(parts[0]), salt, stored_key, server_key


def _scram(algorithm: str) -> Callable[[_Password, str, str | None], bool]:
    def verify(pw: _Password, secret: str, encoding: str | None) -> bool:
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


_VERIFIERS: dict[str, Callable[[_Password, str, str | None], bool]] = {
    "PLAIN": _verify_plain,
    "CRYPT": _verify_crypt,
    "DES-CRYPT": _prefixed("", des_crypt),
    "MD5-CRYPT": _prefixed("$1$", md5_crypt),
    "SHA256-CRYPT": _prefixed("$5$", sha256_crypt),
    "SHA512-CRYPT": _prefixed("$6$", sha512_crypt),
    "BLF-CRYPT": _verify_blf,
    "ARGON2I": _verify_argon2,
    "ARGON2ID": _verify_argon2,
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
    "SCRAM-SHA-1": _scram("sha1"),
    "SCRAM-SHA-256": _scram("sha256"),
}

#: Canonical names of the schemes L{verify_password} understands (aliases:
#: CLEARTEXT, CLEAR, SHA1, HMAC-MD5, BLF).
SUPPORTED_SCHEMES = frozenset(_VERIFIERS)

#: Schemes whose secret is the password itself (usable by APOP / CRAM-MD5).
RECOVERABLE_SCHEMES = frozenset({"PLAIN"})

_ENCODINGS = {"HEX": "HEX", "B64": "B64", "BASE64": "B64"}


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
        if suffix not in _ENCODINGS:
            raise UnknownSchemeError(f"{name}.{suffix}")
        encoding = _ENCODINGS[suffix]
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
    return _VERIFIERS[scheme](_to_bytes(password), secret, encoding)


def _needs_encoding(pw: bytes) -> bool:
    try:
        text = pw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(c in ":\r\n" or not c.isprintable() for c in text) or text != text.strip()


def _ssha512(pw: bytes) -> str:
    salt = secrets.token_bytes(16)
    return base64.b64encode(hashlib.sha512(pw + salt).digest() + salt).decode("ascii")


def _ssha256(pw: bytes) -> str:
    salt = secrets.token_bytes(16)
    return base64.b64encode(hashlib.sha256(pw + salt).digest() + salt).decode("ascii")


_SCRAM_HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}

#: The extra field holding a user's SCRAM secret for each mechanism, for
#: users whose password field uses another scheme (see L{scram_extra_fields}).
SCRAM_EXTRA_FIELDS = {"SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-1": "scram_sha1"}


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
    algorithm = _SCRAM_HASHES[mechanism]
    salt = secrets.token_bytes(16) if salt is None else salt
    iterations = SCRAM_ITERATIONS if iterations is None else iterations
    salted = hashlib.pbkdf2_hmac(algorithm, _to_bytes(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", algorithm).digest()
    server_key = hmac.new(salted, b"Server Key", algorithm).digest()
    return salt, hashlib.new(algorithm, client_key).digest(), server_key, iterations


def _scram_secret(mechanism: str) -> Callable[[bytes], str]:
    def generate(pw: bytes) -> str:
        salt, stored_key, server_key, iterations = scram_keys(pw, mechanism)
        fields = [salt, stored_key, server_key]
        return ",".join([str(iterations)] + [base64.b64encode(f).decode("ascii") for f in fields])

    return generate


_scram_sha256 = _scram_secret("SCRAM-SHA-256")


def scram_extra_fields(
    password: bytes | str, mechanisms: Iterable[str] = ("SCRAM-SHA-256", "SCRAM-SHA-1")
) -> str:
    """
    Extra fields (C{scram_sha256=ITER,SALT,STOREDKEY,SERVERKEY ...}) storing
    SCRAM secrets next to a password hash of another scheme, so SCRAM works
    for users whose password field is e.g. ARGON2ID.
    """
    pw = _to_bytes(password)
    return " ".join(f"{SCRAM_EXTRA_FIELDS[m]}={_scram_secret(m)(pw)}" for m in mechanisms)


def _argon2(variant: str) -> Callable[[bytes], str]:
    def generate(pw: bytes) -> str:
        from argon2 import Type

        # Dovecot's own parameters; libsodium (Dovecot's verifier) wants p=1.
        kind = Type.ID if variant == "ID" else Type.I
        return PasswordHasher(
            time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_COST, parallelism=1, type=kind
        ).hash(pw)

    return generate


def _sha_crypt(handler: Any, pw: bytes) -> str:
    if SHA_CRYPT_ROUNDS is not None:
        handler = handler.using(rounds=SHA_CRYPT_ROUNDS)
    return str(handler.hash(pw))


def _bcrypt_hash(pw: bytes) -> str:
    return bcrypt.hashpw(pw[:72], bcrypt.gensalt(BCRYPT_ROUNDS)).decode("ascii")


_GENERATORS: dict[str, Callable[[bytes], str]] = {
    "ARGON2ID": _argon2("ID"),
    "ARGON2I": _argon2("I"),
    "BLF-CRYPT": _bcrypt_hash,
    "SHA512-CRYPT": lambda pw: _sha_crypt(sha512_crypt, pw),
    "SHA256-CRYPT": lambda pw: _sha_crypt(sha256_crypt, pw),
    "SSHA512": _ssha512,
    "SSHA256": _ssha256,
    "CRAM-MD5": lambda pw: hmac_md5_context(pw).hex(),
    "SCRAM-SHA-256": _scram_sha256,
    "SCRAM-SHA-1": _scram_secret("SCRAM-SHA-1"),
}

#: Schemes L{hash_password} can produce.
HASH_SCHEMES = frozenset(_GENERATORS) | {"PLAIN"}


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
    pw = _to_bytes(password)
    if name == "PLAIN":
        if _needs_encoding(pw):
            return "{PLAIN.B64}" + base64.b64encode(pw).decode("ascii")
        return "{PLAIN}" + pw.decode("utf-8")
    generator = _GENERATORS.get(name)
    if generator is None:
        raise UnknownSchemeError(scheme)
    return "{" + name + "}" + generator(pw)


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PasswdRecord:
    """
    One passwd-file entry.  Optional fields absent or empty in the file are
    C{None}.  C{scheme} is C{None} when the password field is empty or its
    scheme is unknown: such a user cannot log in.
    """

    user: str
    #: the password field as written, C{{SCHEME}} prefix included (secret!)
    password: str = field(repr=False)
    scheme: str | None
    uid: str | None = None
    gid: str | None = None
    gecos: str | None = None
    home: str | None = None
    shell: str | None = None
    #: extra fields, e.g. C{{"userdb_quota_rule": "*:storage=1G", "login_delay": "60"}}
    extra: Mapping[str, str] = field(default_factory=dict)
    #: line number in the file (1-based), for log messages
    lineno: int = 0

    @property
    def recoverable(self) -> bool:
        """True if the stored secret is the plaintext password."""
        return self.scheme in RECOVERABLE_SCHEMES

    @property
    def home_directory(self) -> str | None:
        """The home field, else the C{userdb_home} / C{home} extra field."""
        return self.home or self.extra.get("userdb_home") or self.extra.get("home") or None


def _bad_char(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def parse_passwd_line(line: str, lineno: int = 0) -> PasswdRecord | None:
    """
    Parse one line; C{None} for blank and comment lines.

    @raise PasswdFileError: for a malformed line (message without secrets).
    @raise UnknownSchemeError: never; an unknown scheme gives C{scheme=None}.
    """
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    if ":" not in line:
        raise PasswdFileError("no ':' after the user name")
    fields = line.split(":", 7)
    user, password = fields[0], fields[1]
    if not user:
        raise PasswdFileError("empty user name")
    if _bad_char(user) or user != user.strip():
        raise PasswdFileError("user name has control characters or edge spaces")
    if _bad_char(password):
        raise PasswdFileError("password field has control characters")
    rest: list[str | None] = [f or None for f in fields[2:7]]
    rest += [None] * (5 - len(rest))
    extra: dict[str, str] = {}
    if len(fields) == 8:
        for token in fields[7].split():
            key, _, value = token.partition("=")
            if not key:
                raise PasswdFileError("extra field without a name")
            extra[key] = value
    scheme: str | None = None
    if password:
        try:
            scheme = split_scheme(password)[0]
        except UnknownSchemeError:
            scheme = None
    uid, gid, gecos, home, shell = rest
    return PasswdRecord(user, password, scheme, uid, gid, gecos, home, shell, extra, lineno)


def parse_passwd_file(data: bytes, source: str = "<passwd-file>") -> dict[str, PasswdRecord]:
    """
    Parse a whole passwd-file.  Malformed lines, duplicates (the first entry
    wins, as in Dovecot) and unknown schemes are logged with their line
    number, never with their content.
    """
    records: dict[str, PasswdRecord] = {}
    unknown: dict[str, list[int]] = {}
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            log.warn("{source}:{lineno}: skipped: not UTF-8", source=source, lineno=lineno)
            continue
        try:
            record = parse_passwd_line(line, lineno)
        except PasswdFileError as e:
            log.warn("{source}:{lineno}: skipped: {reason}", source=source, lineno=lineno, reason=str(e))
            continue
        if record is None:
            continue
        if record.user in records:
            log.warn(
                "{source}:{lineno}: skipped: user {user!r} already defined on line {first}",
                source=source,
                lineno=lineno,
                user=record.user,
                first=records[record.user].lineno,
            )
            continue
        if record.password and record.scheme is None:
            try:
                split_scheme(record.password)
            except (UnknownSchemeError, PasswdFileError) as e:
                unknown.setdefault(str(e), []).append(lineno)
        records[record.user] = record
    for scheme, lines in unknown.items():
        log.warn(
            "{source}: unknown password scheme {scheme!r} on lines {lines}: those users cannot log in",
            source=source,
            scheme=scheme,
            lines=", ".join(map(str, lines)),
        )
    return records


# ---------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------


def _random_password() -> bytes:
    return b"\x00never-" + secrets.token_bytes(32)


_dummy_hash: str | None = None


def _fallback_dummy_hash() -> str:
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_bytes(16), DEFAULT_SCHEME)
    return _dummy_hash


def _representative_hash(records: Mapping[str, PasswdRecord]) -> str | None:
    """The first stored hash of the most common scheme: unknown users cost the same."""
    usable = [r for r in records.values() if r.scheme is not None]
    if not usable:
        return None
    common = Counter(r.scheme for r in usable).most_common(1)[0][0]
    return next(r.password for r in usable if r.scheme == common)


_StatKey = tuple[int, int, int, int]


#: Schemes verified without a thread: one hash or a comparison.
_CHEAP_SCHEMES = frozenset({"PLAIN", "CLEAR", "CLEARTEXT", "PLAIN-MD5", "LDAP-MD5", "SHA", "SHA1",
                            "SHA256", "SHA512", "SMD5", "SSHA", "SSHA256", "SSHA512", "CRAM-MD5",
                            "HMAC-MD5"})


@implementer(ICredentialsChecker, IUserDirectory, ISASLSecretSource)
class PasswdFileChecker:
    """
    Check credentials against a Dovecot passwd-file, re-read when it changes
    (checked with C{os.stat} at most once per C{reload_interval} seconds of
    C{clock}).  If the file becomes unreadable the last good copy is kept.

    C{requestAvatarId} fires with the user name as C{str}.

      - L{IUsernamePassword}: the password is verified in a thread
        (C{run_in_thread}, default L{deferToThread}), every scheme.
      - L{IUsernameHashedPassword} (APOP, CRAM-MD5): only for users with a
        recoverable (PLAIN) secret, or a CRAM-MD5 secret when the credentials
        provide L{IHMACMD5ContextCredentials}.

    Unknown users are checked against a real-looking hash so that timing does
    not tell them apart.  A record with the extra field C{nologin} never logs
    in.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        reload_interval: float = 1.0,
        run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] = deferToThread,
    ) -> None:
        self.path = path
        self._clock = clock
        self._reload_interval = reload_interval
        self._run_in_thread = run_in_thread
        self._records: dict[str, PasswdRecord] = {}
        self._dummy: str | None = None
        self._stat_key: _StatKey | None = None
        self._checked_at: float | None = None
        self._failing: str | None = None
        self.reload()

    def __repr__(self) -> str:
        return f"<PasswdFileChecker {self.path!r}: {len(self._records)} users>"

    # -- loading ----------------------------------------------------------

    def reload(self) -> bool:
        """
        Re-read the file now if it changed since the last read; returns
        C{True} when it was (re)parsed.  Errors are logged, the last good copy
        is kept.
        """
        self._checked_at = self._clock()
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
            if key == self._stat_key:
                self._recovered()
                return False
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            reason = f"{type(e).__name__}: {e.strerror or e}"
            if reason != self._failing:
                log.error(
                    "passwd-file {path!r} unreadable ({reason}); keeping {count} users from the last read",
                    path=self.path,
                    reason=reason,
                    count=len(self._records),
                )
                self._failing = reason
            return False
        self._recovered()
        self._records = parse_passwd_file(data, self.path)
        self._dummy = _representative_hash(self._records)
        self._stat_key = key
        log.info("passwd-file {path!r}: {count} users", path=self.path, count=len(self._records))
        return True

    def _recovered(self) -> None:
        if self._failing is not None:
            log.info("passwd-file {path!r} readable again", path=self.path)
            self._failing = None

    def _maybe_reload(self) -> None:
        if self._checked_at is not None:
            elapsed = self._clock() - self._checked_at
            if 0 <= elapsed < self._reload_interval:
                return
        self.reload()

    # -- IUserDirectory ---------------------------------------------------

    def record(self, user: str) -> PasswdRecord | None:
        """The parsed entry of C{user} (exact, case-sensitive match), or C{None}."""
        self._maybe_reload()
        return self._records.get(user)

    def records(self) -> list[PasswdRecord]:
        """Every entry of the file (re-read first if it changed), in file order."""
        self._maybe_reload()
        return list(self._records.values())

    def home(self, user: str) -> str | None:
        """The home directory of C{user}, or C{None}."""
        rec = self.record(user)
        return rec.home_directory if rec is not None else None

    def recoverable_password(self, user: str) -> bytes | None:
        """The plaintext password of C{user} if stored recoverably (PLAIN), else C{None}."""
        rec = self.record(user)
        if rec is None or not rec.recoverable:
            return None
        _scheme, encoding, secret = split_scheme(rec.password)
        return _decode_plain(secret, encoding)

    # -- ISASLSecretSource -------------------------------------------------

    def _usable(self, user: str) -> PasswdRecord | None:
        rec = self.record(user)
        if rec is None or rec.scheme is None or "nologin" in rec.extra:
            return None
        return rec

    def sasl_password(self, user: str) -> bytes | None:
        """The plaintext password of C{user} (PLAIN scheme) if C{user} may log in."""
        return self.recoverable_password(user) if self._usable(user) is not None else None

    def scram_secret(self, user: str, mechanism: str = "SCRAM-SHA-256") -> SCRAMSecret | None:
        """
        SCRAM verification data C{(salt, stored_key, server_key, iterations)}
        of C{user} for C{mechanism} (C{SCRAM-SHA-1} or C{SCRAM-SHA-256}),
        from, in order: a password field of that scheme, the extra field
        C{scram_sha256=} / C{scram_sha1=} (same C{iter,salt,stored,server}
        format, an optional C{{SCHEME}} prefix allowed), or derived now from a
        PLAIN password (random salt).  C{None} for unknown users, C{nologin}
        users and users without a usable secret.
        """
        rec = self._usable(user)
        if rec is None or mechanism not in _SCRAM_HASHES:
            return None
        secret: str | None = None
        if rec.scheme == mechanism:
            secret = split_scheme(rec.password)[2]
        else:
            extra = rec.extra.get(SCRAM_EXTRA_FIELDS[mechanism])
            if extra:
                prefix = "{" + mechanism + "}"
                secret = extra[len(prefix):] if extra.upper().startswith(prefix) else extra
        if secret is not None:
            try:
                iterations, salt, stored_key, server_key = parse_scram_secret(secret)
            except ValueError:
                log.warn("passwd-file {path!r}:{lineno}: malformed {mechanism} secret",
                         path=self.path, lineno=rec.lineno, mechanism=mechanism)
                return None
            return salt, stored_key, server_key, iterations
        if rec.recoverable:
            password = self.recoverable_password(user)
            if password is not None:
                return scram_keys(password, mechanism)
        return None

    # -- ICredentialsChecker ----------------------------------------------

    def requestAvatarId(self, credentials: object) -> defer.Deferred[str]:  # type: ignore[override]
        creds = cast(Any, credentials)
        user = _user_name(getattr(creds, "username", None))
        rec = self.record(user) if user is not None else None
        if IUsernamePassword.providedBy(credentials):
            try:
                password = _to_bytes(creds.password)
            except (TypeError, AttributeError, UnicodeEncodeError):
                return defer.fail(UnauthorizedLogin())
            return self._check_password(rec, password)
        if IUsernameHashedPassword.providedBy(credentials):
            return self._check_hashed(rec, creds)
        return defer.fail(UnauthorizedLogin("unsupported credentials"))

    def _verify(self, hashed: str | None, password: bytes, genuine: bool) -> bool:
        """Runs in a thread: the slow part."""
        if hashed is None:
            hashed = _fallback_dummy_hash()
        try:
            ok = verify_password(password, hashed)
        except (UnknownSchemeError, PasswdFileError):
            return False
        return ok and genuine

    def _check_password(self, rec: PasswdRecord | None, password: bytes) -> defer.Deferred[str]:
        genuine = rec is not None and rec.scheme is not None and "nologin" not in rec.extra
        hashed = rec.password if rec is not None and rec.scheme is not None else self._dummy

        scheme = (rec.scheme if rec is not None and rec.scheme is not None
                  else split_scheme(hashed)[0] if hashed else None)
        if scheme in _CHEAP_SCHEMES:
            # Microseconds of work: a thread hop would cost more than it saves.
            d: defer.Deferred[bool] = defer.maybeDeferred(self._verify, hashed, password, genuine)
        else:
            d = self._run_in_thread(lambda: self._verify(hashed, password, genuine))

        def decide(ok: bool) -> str:
            if ok and rec is not None:
                return rec.user
            raise UnauthorizedLogin()

        return d.addCallback(decide)

    def _check_hashed(self, rec: PasswdRecord | None, creds: Any) -> defer.Deferred[str]:
        ok = False
        try:
            if rec is not None and rec.recoverable:
                _scheme, encoding, secret = split_scheme(rec.password)
                plain = _decode_plain(secret, encoding)
                ok = plain is not None and bool(creds.checkPassword(plain))
            elif (
                rec is not None and rec.scheme == "CRAM-MD5" and IHMACMD5ContextCredentials.providedBy(creds)
            ):
                _scheme, encoding, secret = split_scheme(rec.password)
                context = _decode(secret, encoding, "HEX", lambda n: n == CRAM_MD5_CONTEXT_LEN)
                ok = context is not None and bool(creds.checkHMACMD5Context(context))
            else:
                # Same work as a real check, then refuse.
                creds.checkPassword(_random_password())
        except Exception:
            log.failure("checking challenge-response credentials")
            ok = False
        if ok and rec is not None and "nologin" not in rec.extra:
            return defer.succeed(rec.user)
        return defer.fail(UnauthorizedLogin())


def _user_name(username: object) -> str | None:
    if isinstance(username, bytes):
        try:
            return username.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(username, str):
        return username
    return None


# ---------------------------------------------------------------------------
# strcred
# ---------------------------------------------------------------------------

_FACTORY_HELP = """
Authenticate against a Dovecot-style passwd-file
(user:password:uid:gid:gecos:home:shell:extra_fields).  Passwords may use
the schemes PLAIN, CRYPT, MD5-CRYPT, SHA256-CRYPT, SHA512-CRYPT, BLF-CRYPT,
ARGON2I, ARGON2ID, SSHA512, SSHA256, SSHA, SMD5, SHA512, SHA256, SHA,
PLAIN-MD5, LDAP-MD5, CRAM-MD5, PBKDF2, SCRAM-SHA-1, SCRAM-SHA-256.
The file is re-read when it changes.  APOP and CRAM-MD5 work only for users
with a PLAIN password (or, for CRAM-MD5, a {CRAM-MD5} one).
"""


@implementer(ICheckerFactory, IPlugin)
class PasswdFileCheckerFactory:
    """strcred factory: C{--auth passwd-file:/etc/popservice/users}."""

    authType = "passwd-file"
    authHelp = _FACTORY_HELP
    argStringFormat = "Path to a Dovecot-style passwd-file"
    credentialInterfaces = PasswdFileChecker.credentialInterfaces

    def generateChecker(self, argstring: str) -> PasswdFileChecker:
        """
        @raise InvalidAuthArgumentString: when no path is given or the file
            cannot be read.
        """
        path = argstring
        if not path.strip():
            raise InvalidAuthArgumentString(
                f"{self.authType!r} requires a path, e.g. {self.authType}:/etc/popservice/users"
            )
        if not os.path.isfile(path):
            raise InvalidAuthArgumentString(f"{self.authType}: {path!r} is not an existing file")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise InvalidAuthArgumentString(f"{self.authType}: cannot read {path!r}: {e.strerror or e}")
        return PasswdFileChecker(path)
