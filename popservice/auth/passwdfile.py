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
import time
from collections.abc import Callable

from twisted.cred.strcred import ICheckerFactory, InvalidAuthArgumentString
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped,unused-ignore]

from popservice.auth.hashing import run_hashing
from popservice.auth.passwdfile_format import PasswdRecord, parse_passwd_file, parse_passwd_line
from popservice.auth.reloading import ReloadingFile, StatKey
from popservice.auth.schemes import (
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
    parse_scram_secret,
    scram_extra_fields,
    scram_keys,
)
from popservice.auth.userdb import RecordChecker

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

#: A changed passwd-file up to this size is parsed on the spot (~0.02 ms a
#: user, so a few ms); a bigger one in a thread, off the reactor.
INLINE_PARSE_BYTES = 32 * 1024


# ---------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------


class PasswdFileChecker(RecordChecker):
    """
    A L{RecordChecker} over a Dovecot passwd-file, re-read when it changes
    (checked with C{os.stat} at most once per C{reload_interval} seconds of
    C{clock}).  If the file becomes unreadable the last good copy is kept.
    """

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        reload_interval: float = 1.0,
        run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] = run_hashing,
    ) -> None:
        super().__init__(run_in_thread=run_in_thread)
        self._file = ReloadingFile(path, clock, reload_interval)
        #: while a changed file is parsed in a thread: who waits for it
        self._parsing: list[defer.Deferred[None]] | None = None
        # at start-up, before the reactor serves anyone: at once, whatever the size
        self._load_now()

    @property
    def path(self) -> str:
        """The passwd-file."""
        return self._file.path

    @path.setter
    def path(self, path: str) -> None:
        self._file.path = path

    def __repr__(self) -> str:
        return f"<PasswdFileChecker {self.path!r}: {len(self._records)} users>"

    @property
    def source(self) -> str:
        return "passwd-file %r" % (self.path,)

    # -- loading ----------------------------------------------------------

    def reload(self) -> bool:
        """
        Re-read the file now if it changed since the last read; returns
        C{True} when it was (re)parsed, or is being parsed: a small file is
        parsed at once, a big one (over L{INLINE_PARSE_BYTES}: some hundred
        users) in the reactor's thread pool, the records in use staying until
        it is done (parsing 100,000 users takes seconds).  Errors are logged,
        the last good copy is kept.
        """
        if self._parsing is not None:
            return True
        changed = self._file.read_if_changed(kept=len(self._records))
        if changed is None:
            return False
        data, key = changed
        if len(data) <= INLINE_PARSE_BYTES:
            self._loaded(parse_passwd_file(data, self.path), key)
            return True
        waiters: list[defer.Deferred[None]] = []
        self._parsing = waiters

        def parsed(records: dict[str, PasswdRecord]) -> None:
            self._loaded(records, key)

        def failed(failure: Failure) -> None:
            log.failure("passwd-file {path!r} could not be parsed; keeping {count} users", failure,
                        path=self.path, count=len(self._records))

        def done(_: object) -> None:
            self._parsing = None
            for waiter in waiters:
                waiter.callback(None)

        deferToThread(parse_passwd_file, data, self.path).addCallbacks(parsed, failed).addBoth(done)
        return True

    def _load_now(self) -> None:
        changed = self._file.read_if_changed(kept=0)
        if changed is not None:
            self._loaded(parse_passwd_file(changed[0], self.path), changed[1])

    def _loaded(self, records: dict[str, PasswdRecord], key: StatKey) -> None:
        self.set_records(records)
        self._file.loaded(key)
        log.info("passwd-file {path!r}: {count} users", path=self.path, count=len(self._records))

    def _maybe_reload(self) -> None:
        if self._file.due():
            self.reload()

    def records_version(self) -> int:
        """The records' version; while a new copy is being parsed, one that no other answer has."""
        version = super().records_version()
        return version if self._parsing is None else -1 - version

    def requestAvatarId(self, credentials: object) -> "defer.Deferred[str]":
        """As L{RecordChecker.requestAvatarId}, after a new copy of the file being parsed is in use."""
        self._maybe_reload()
        if self._parsing is None:
            return super().requestAvatarId(credentials)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._parsing.append(waiter)
        return waiter.addCallback(lambda _: super(PasswdFileChecker, self).requestAvatarId(credentials))



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
