"""
Small pieces the server-side SASL mechanisms share: finding a secret source
or a password checker among the portal's checkers, and the state bookkeeping
that makes a finished exchange refuse further steps.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.cred.credentials import IUsernamePassword
from twisted.logger import Logger

from popservice.auth.credentials import ISASLSecretSource
from popservice.sasl.base import Authenticated, Failed, SASLContext, SASLStep

log = Logger(namespace="popservice.sasl")

_UNSAFE_HOST = re.compile(r"[^A-Za-z0-9.-]")


def safe_hostname(hostname: str) -> str:
    """C{hostname} reduced to C{[A-Za-z0-9.-]} (for msg-id style challenges)."""
    return _UNSAFE_HOST.sub("", hostname)[:64] or "localhost"


def secret_source(context: SASLContext) -> Any:
    """The first checker of the portal providing L{ISASLSecretSource}, or C{None}."""
    for checker in context.checkers:
        if ISASLSecretSource.providedBy(checker):
            return checker
    return None


def password_checker(context: SASLContext) -> Any:
    """The first checker of the portal that verifies L{IUsernamePassword}, or C{None}."""
    for checker in context.checkers:
        interfaces = getattr(checker, "credentialInterfaces", ())
        if any(IUsernamePassword.isOrExtends(i) for i in interfaces):
            return checker
    return None


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

    def fail(self, reason: str = "Authentication failed") -> Failed:
        self.finished = True
        return Failed(reason)

    def succeed(self, credentials: Any) -> Authenticated:
        self.finished = True
        return Authenticated(credentials)

    def wrong_state(self) -> SASLStep:
        return self.fail("Unexpected response")
