# -*- test-case-name: tests.test_auth_cache -*-
"""
The authentication cache, like Dovecot's C{auth_cache}: a login that
presents the same user name and password as one that succeeded less than
C{ttl} seconds ago is accepted without verifying the password hash again
(an C{{ARGON2ID}} verification costs ~0.1-0.3 s of CPU and 64 MiB), and,
with a C{negative_ttl}, one that presents the same wrong password as a
failure less than C{negative_ttl} ago is refused without it.

What is kept never contains a password: an entry is found by an HMAC-SHA256
of the user name and the password under a key made at random when the
process starts (so the kept values are worthless outside this process, and
even inside it a guess costs a keyed hash per try against one entry), and a
positive entry is compared with L{hmac.compare_digest}.  An entry is only
valid for the version of the user records it was made from
(L{IRecordsVersion}): a changed passwd-file (re-read when it changes) or a
refreshed users table that changed forgets every entry, so a new password
works and the old one stops working at once.  The positive and the negative
entries are two least-recently-used maps bounded by C{size} each, so a
password guesser filling the negative side cannot push the users' positive
entries out.

A cached failure is a failure like any other: the server's failure delays
(L{popservice.server.policy}) apply to it just the same; it saves only the
hash verification.  Only L{IUsernamePassword} credentials (USER/PASS, SASL
PLAIN and LOGIN) are cached: the challenge-response ones (APOP, CRAM-MD5,
DIGEST-MD5, SCRAM) carry a proof that differs with every challenge, so there
is nothing to find again, and they are cheap (an MD5 or a stored key) but
for SCRAM from a C{{PLAIN}} password (a PBKDF2 of 4096 rounds, ~1.5 ms).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped,unused-ignore]

from popservice.auth.chain import CheckerChain
from popservice.auth.credentials import IRecordsVersion
from popservice.auth.secret_encoding import to_bytes

__all__ = ["AuthCache", "CachingChecker", "install_auth_cache", "records_version"]

log = Logger(namespace="popservice.auth.cache")


class _Entry(NamedTuple):
    #: HMAC of the user name and the password (never the password)
    digest: bytes
    #: the avatar id the checker answered (a positive entry), else None
    avatar_id: Any
    #: the records' version it was made from
    version: object
    #: when it stops being used (the clock's seconds)
    expires: float


class _LRU:
    """At most C{size} entries; the least recently used leave first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class AuthCache:
    """
    The remembered answers: positive ones for C{ttl} seconds, negative ones
    for C{negative_ttl} seconds (0: not kept), C{size} of each at most.
    """

    def __init__(self, ttl: float, negative_ttl: float = 0.0, size: int = 10_000,
                 clock: IReactorTime | None = None) -> None:
        if not ttl > 0 or ttl == float("inf"):
            raise ValueError("the auth cache's TTL must be a positive number of seconds")
        if not 0 <= negative_ttl < float("inf"):
            raise ValueError("the auth cache's negative TTL must be 0 or a number of seconds")
        if size < 1:
            raise ValueError("the auth cache's size must be at least 1")
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.clock: IReactorTime = clock
        self._key = secrets.token_bytes(32)
        # positive entries by user name: the last password that worked
        self._positive = _LRU(size)
        # negative entries by digest (user name and password)
        self._negative = _LRU(size)

    def __len__(self) -> int:
        return len(self._positive) + len(self._negative)

    def digest(self, username: bytes, password: bytes) -> bytes:
        """The keyed HMAC an entry is found by (the user name's length first: no ambiguity)."""
        message = struct.pack(">I", len(username)) + username + password
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def lookup(self, username: bytes, digest: bytes, version: object) -> tuple[bool, Any] | None:
        """C{(True, avatar_id)} (a hit), C{(False, None)} (a cached failure) or C{None} (ask the checker)."""
        now = self.clock.seconds()
        entry = self._positive.get(username)
        if entry is not None:
            if entry.version != version or entry.expires <= now:
                self._positive.drop(username)
            elif hmac.compare_digest(entry.digest, digest):
                return True, entry.avatar_id
        entry = self._negative.get(digest)
        if entry is not None:
            if entry.version != version or entry.expires <= now:
                self._negative.drop(digest)
            elif hmac.compare_digest(entry.digest, digest):
                return False, None
        return None

    def remember(self, username: bytes, digest: bytes, version: object, avatar_id: Any) -> None:
        """The checker accepted: keep C{avatar_id} for C{ttl} seconds."""
        self._negative.drop(digest)
        self._positive.put(username, _Entry(digest, avatar_id, version, self.clock.seconds() + self.ttl))

    def remember_failure(self, digest: bytes, version: object) -> None:
        """The checker refused: keep that for C{negative_ttl} seconds (if above 0)."""
        if self.negative_ttl > 0:
            expires = self.clock.seconds() + self.negative_ttl
            self._negative.put(digest, _Entry(digest, None, version, expires))

    def clear(self) -> None:
        self._positive.clear()
        self._negative.clear()


def records_version(checkers: Sequence[object]) -> Callable[[], object]:
    """The version of all C{checkers}' records together (L{IRecordsVersion}; others never change)."""
    versioned = [c for c in checkers if IRecordsVersion.providedBy(c)]

    def version() -> object:
        return tuple(c.records_version() for c in versioned)

    return version


@implementer(ICredentialsChecker)
class CachingChecker(CheckerChain):
    """
    A L{CheckerChain} for L{IUsernamePassword} credentials that asks its
    checkers only when L{AuthCache} has no answer for these credentials and
    the records' present version.  Being a chain, the server still finds the
    checkers behind it (SASL secrets, reloads).
    """

    def __init__(self, checkers: Sequence[ICredentialsChecker], cache: AuthCache) -> None:
        flat: list[ICredentialsChecker] = []
        for checker in checkers:
            flat.extend(checker.checkers if isinstance(checker, CheckerChain) else [checker])
        super().__init__(flat)
        self.credentialInterfaces = (IUsernamePassword,)
        self.cache = cache
        self._version = records_version(flat)

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[Any]":
        try:
            username, password = to_bytes(credentials.username), to_bytes(credentials.password)
        except (TypeError, AttributeError, UnicodeEncodeError):
            return super().requestAvatarId(credentials)
        version = self._version()
        digest = self.cache.digest(username, password)
        found = self.cache.lookup(username, digest, version)
        if found is not None:
            hit, avatar_id = found
            log.debug("auth cache {outcome} for {user!r}", outcome="hit" if hit else "negative hit",
                      user=username)
            return defer.succeed(avatar_id) if hit else defer.fail(UnauthorizedLogin())
        d = super().requestAvatarId(credentials)

        def accepted(avatar_id: Any) -> Any:
            self.cache.remember(username, digest, version, avatar_id)
            return avatar_id

        def refused(failure: Failure) -> Failure:
            if failure.check(UnauthorizedLogin):
                self.cache.remember_failure(digest, version)
            return failure

        return d.addCallbacks(accepted, refused)


def install_auth_cache(portal: Any, cache: AuthCache) -> CachingChecker | None:
    """
    Put a L{CachingChecker} in front of the L{IUsernamePassword} checker(s)
    of a cred C{portal} (as L{popservice.server.factory.makeServer} made
    it); the others (APOP, CRAM-MD5, SASL proofs) are left alone.  Returns
    it, or C{None} when the portal has no such checker.
    """
    inner = portal.checkers.get(IUsernamePassword)
    if inner is None:
        return None
    caching = CachingChecker([inner], cache)
    portal.checkers[IUsernamePassword] = caching
    return caching
