# -*- test-case-name: tests.test_passwdfile -*-
"""
Dovecot-style passwd-file authentication: L{PasswdFileChecker}, an
L{ICredentialsChecker} and L{IUserDirectory} over a passwd-file that is
re-read when it changes (L{popservice.auth.reloading}), and
L{PasswdFileCheckerFactory}, the C{passwd-file} strcred plugin factory.

The file format is in L{popservice.auth.passwdfile_format}, the password
schemes in L{popservice.auth.schemes}, L{popservice.auth.crypt_schemes} and
L{popservice.auth.scram}; their public names are re-exported here.  The cost
parameters live in the modules that use them (C{crypt_schemes.BCRYPT_ROUNDS},
C{scram.SCRAM_ITERATIONS} ...).
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, cast

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
)
from popservice.auth.passwdfile_format import PasswdRecord, parse_passwd_file, parse_passwd_line
from popservice.auth.reloading import ReloadingFile
from popservice.auth.schemes import (
    CHEAP_SCHEMES,
    DEFAULT_SCHEME,
    HASH_SCHEMES,
    SUPPORTED_SCHEMES,
    PasswdFileError,
    UnknownSchemeError,
    hash_password,
    split_scheme,
    verify_password,
)
from popservice.auth.schemes import RECOVERABLE_SCHEMES as RECOVERABLE_SCHEMES
from popservice.auth.scram import SCRAM_EXTRA_FIELDS as SCRAM_EXTRA_FIELDS
from popservice.auth.scram import (
    SCRAM_HASHES,
    parse_scram_secret,
    scram_extra_fields,
    scram_keys,
)
from popservice.auth.secret_encoding import decode_digest, decode_plain, to_bytes
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
        self._file = ReloadingFile(path, clock, reload_interval)
        self._run_in_thread = run_in_thread
        self._records: dict[str, PasswdRecord] = {}
        self._dummy: str | None = None
        self.reload()

    @property
    def path(self) -> str:
        """The passwd-file."""
        return self._file.path

    @path.setter
    def path(self, path: str) -> None:
        self._file.path = path

    def __repr__(self) -> str:
        return f"<PasswdFileChecker {self.path!r}: {len(self._records)} users>"

    # -- loading ----------------------------------------------------------

    def reload(self) -> bool:
        """
        Re-read the file now if it changed since the last read; returns
        C{True} when it was (re)parsed.  Errors are logged, the last good copy
        is kept.
        """
        changed = self._file.read_if_changed(kept=len(self._records))
        if changed is None:
            return False
        data, key = changed
        self._records = parse_passwd_file(data, self.path)
        self._dummy = _representative_hash(self._records)
        self._file.loaded(key)
        log.info("passwd-file {path!r}: {count} users", path=self.path, count=len(self._records))
        return True

    def _maybe_reload(self) -> None:
        if self._file.due():
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
        return decode_plain(secret, encoding)

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
        if rec is None or mechanism not in SCRAM_HASHES:
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
                password = to_bytes(creds.password)
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
        if scheme in CHEAP_SCHEMES:
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
                plain = decode_plain(secret, encoding)
                ok = plain is not None and bool(creds.checkPassword(plain))
            elif (
                rec is not None and rec.scheme == "CRAM-MD5" and IHMACMD5ContextCredentials.providedBy(creds)
            ):
                _scheme, encoding, secret = split_scheme(rec.password)
                context = decode_digest(secret, encoding, "HEX", lambda n: n == CRAM_MD5_CONTEXT_LEN)
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
