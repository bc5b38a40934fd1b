"""
The user database model every credentials source of popservice shares: user
records as in a Dovecot passwd-file (L{PasswdRecord}: a password field with
its scheme, a home, extra fields such as C{nologin}, C{login_delay=},
C{expire=}, C{scram_sha256=}), checked by L{RecordChecker} (every password
scheme, APOP and CRAM-MD5 for recoverable secrets, SCRAM secrets for SASL,
homes for C{~}).  A passwd-file and a PostgreSQL C{users} table are two
sources of the same records, so SASL and the login policy work the same over
either.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer  # type: ignore[import-untyped,unused-ignore]

from popservice.auth.credentials import (
    CRAM_MD5_CONTEXT_LEN,
    IHMACMD5ContextCredentials,
    IRecordsVersion,
    ISASLSecretSource,
    SCRAMSecret,
)
from popservice.auth.hashing import run_hashing
from popservice.auth.passwdfile_format import PasswdRecord
from popservice.auth.schemes import (
    CHEAP_SCHEMES,
    DEFAULT_SCHEME,
    PasswdFileError,
    UnknownSchemeError,
    hash_password,
    split_scheme,
    verify_password,
)
from popservice.auth.scram import SCRAM_EXTRA_FIELDS, SCRAM_HASHES, parse_scram_secret, scram_keys
from popservice.auth.secret_encoding import decode_digest, decode_plain, to_bytes
from popservice.interfaces import IUserDirectory

__all__ = ["RecordChecker"]

log = Logger(namespace="popservice.auth.passwdfile")


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


@implementer(ICredentialsChecker, IUserDirectory, ISASLSecretSource, IRecordsVersion)
class RecordChecker:
    """
    Check credentials against user records in the Dovecot passwd-file model
    (L{PasswdRecord}: a password with its C{{SCHEME}}, home, extra fields),
    wherever they come from: a passwd-file (L{popservice.auth.passwdfile}) or
    a database table (L{popservice.auth.pgusers}).  Subclasses keep
    C{self._records} up to date (L{_maybe_reload}).

    C{requestAvatarId} fires with the user name as C{str}.

      - L{IUsernamePassword}: the password is verified in a thread
        (C{run_in_thread}, default L{run_hashing}: a pool of its own, apart
        from the reactor's where the stores work), every scheme but the
        cheap ones (C{CHEAP_SCHEMES}, microseconds of work).
      - L{IUsernameHashedPassword} (APOP, CRAM-MD5): only for users with a
        recoverable (PLAIN) secret, or a CRAM-MD5 secret when the credentials
        provide L{IHMACMD5ContextCredentials}.

    Unknown users are checked against a real-looking hash so that timing does
    not tell them apart.  A record with the extra field C{nologin} never logs
    in.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    @property
    def source(self) -> str:
        """Where the records come from, for log lines."""
        return "user records"

    def __init__(
        self, *, run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] = run_hashing
    ) -> None:
        self._run_in_thread = run_in_thread
        self._records: dict[str, PasswdRecord] = {}
        self._dummy: str | None = None
        self._version = 0

    def set_records(self, records: dict[str, PasswdRecord]) -> None:
        """Replace every record at once (a reload)."""
        self._records = records
        self._dummy = _representative_hash(records)
        self._version += 1

    def records_version(self) -> int:
        """
        L{IRecordsVersion}: the version of the records, after looking whether
        they changed (L{_maybe_reload}); every reload makes a new one.
        """
        self._maybe_reload()
        return self._version

    def _maybe_reload(self) -> None:
        """Called before each lookup: re-read the records if they may have changed."""

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
                log.warn("{source}:{lineno}: malformed {mechanism} secret",
                         source=self.source, lineno=rec.lineno, mechanism=mechanism)
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


