"""
Several credential checkers for the same kind of credentials, tried in order.

A cred Portal keeps one checker per credentials interface: a second
C{--auth} for the same interface would silently replace the first.  A
L{CheckerChain} asks each checker in turn until one accepts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(ICredentialsChecker)
class CheckerChain:
    def __init__(self, checkers: Sequence[ICredentialsChecker]) -> None:
        self.checkers = list(checkers)
        interfaces: list[Any] = []
        for checker in self.checkers:
            for interface in checker.credentialInterfaces:
                if interface not in interfaces:
                    interfaces.append(interface)
        self.credentialInterfaces = tuple(interfaces)

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[Any]":
        candidates = [c for c in self.checkers
                      if any(i.providedBy(credentials) for i in c.credentialInterfaces)]

        def attempt(index: int) -> "defer.Deferred[Any]":
            if index >= len(candidates):
                return defer.fail(UnauthorizedLogin())
            d: defer.Deferred[Any] = defer.maybeDeferred(candidates[index].requestAvatarId, credentials)

            def next_one(failure: Failure) -> Any:
                failure.trap(UnauthorizedLogin, UnhandledCredentials)
                return attempt(index + 1)

            return d.addErrback(next_one)

        return attempt(0)


def chain_checkers(checkers: Iterable[ICredentialsChecker]) -> list[ICredentialsChecker]:
    """One checker if there is one, else a chain over all of them."""
    checkers = list(checkers)
    if len(checkers) <= 1:
        return checkers
    return [CheckerChain(checkers)]
