"""
Small pieces the server-side SASL mechanisms share: finding a secret source
or a password checker among the portal's checkers, and the state bookkeeping
that makes a finished exchange refuse further steps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, cast

from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from popservice.auth.credentials import ISASLSecretSource, SCRAMSecret
from popservice.sasl.base import Authenticated, Challenge, Failed, SASLContext, SASLStep

log = Logger(namespace="popservice.sasl")

_UNSAFE_HOST = re.compile(r"[^A-Za-z0-9.-]")


def safe_hostname(hostname: str) -> str:
    """C{hostname} reduced to C{[A-Za-z0-9.-]} (for msg-id style challenges)."""
    return _UNSAFE_HOST.sub("", hostname)[:64] or "localhost"


def secret_sources(context: SASLContext) -> list[Any]:
    """The checkers of the portal providing L{ISASLSecretSource}, in order."""
    return [c for c in context.checkers if ISASLSecretSource.providedBy(c)]


def scram_secret(context: SASLContext, user: str, mechanism: str) -> SCRAMSecret | None:
    """The first SCRAM secret of C{user} any secret source has."""
    for source in secret_sources(context):
        secret = source.scram_secret(user, mechanism)
        if secret is not None:
            return cast(SCRAMSecret, secret)
    return None


def sasl_password(context: SASLContext, user: str) -> bytes | None:
    """The first recoverable password of C{user} any secret source has."""
    for source in secret_sources(context):
        password = source.sasl_password(user)
        if password is not None:
            return bytes(password)
    return None


def password_checkers(checkers: Iterable[Any]) -> list[Any]:
    """The checkers among C{checkers} that verify L{IUsernamePassword}, in order."""
    return [c for c in checkers
            if any(IUsernamePassword.isOrExtends(i) for i in getattr(c, "credentialInterfaces", ()))]


def utf8(data: bytes) -> str | None:
    """C{data} as UTF-8 text, C{None} when invalid or containing NUL."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


class MechanismBase:
    """
    Bookkeeping for one exchange: once it has answered L{Authenticated} or
    L{Failed}, any further step fails ("wrong state").
    """

    name = ""
    plaintext = False

    def __init__(self, context: SASLContext) -> None:
        self.context = context
        self.finished = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def fail(self, reason: str = "Authentication failed", user: str | None = None) -> Failed:
        self.finished = True
        return Failed(reason, user=user)

    def succeed(self, credentials: Any) -> Authenticated:
        self.finished = True
        return Authenticated(credentials)

    def wrong_state(self) -> SASLStep:
        return self.fail("Unexpected response")


class ClientFirstMechanism(MechanismBase):
    """
    A mechanism whose client speaks first.  Without an initial response the
    first step asks for the client's message with an empty challenge (RFC 4422
    section 5); a missing response later, or any step once finished, fails.
    Subclasses read the client's messages in L{respond}.
    """

    def __init__(self, context: SASLContext) -> None:
        super().__init__(context)
        self._started = False

    def step(self, response: bytes | None) -> SASLStep | Deferred[SASLStep]:
        first, self._started = not self._started, True
        if self.finished or (response is None and not first):
            return self.wrong_state()
        if response is None:
            return Challenge(b"")
        return self.respond(response)

    def respond(self, response: bytes) -> SASLStep | Deferred[SASLStep]:
        raise NotImplementedError
