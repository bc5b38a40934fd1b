"""
AUTHORIZATION state (RFC 1939 section 4): the greeting and its APOP
timestamp, CAPA, USER/PASS and APOP.  Nothing here touches a mailbox: a
successful login hands credentials to the portal, which opens one.
"""

from __future__ import annotations

import hmac
import itertools
import os
import re
import secrets
from dataclasses import dataclass, field

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from zope.interface import implementer

from popservice import __version__, wire
from popservice.auth.credentials import APOPCredentials

_counter = itertools.count(1)
_UNSAFE_HOST = re.compile(r"[^A-Za-z0-9.-]")


def apop_timestamp(hostname: str) -> str:
    """
    A greeting timestamp unique to this connection (RFC 1939 section 7),
    made only of C{[A-Za-z0-9.@_+/-]} so strict clients (mpop) accept it.
    """
    host = _UNSAFE_HOST.sub("", hostname)[:64] or "localhost"
    return "<%d.%d.%s@%s>" % (os.getpid(), next(_counter), secrets.token_hex(6), host)


@implementer(IUsernamePassword)
@dataclass
class PlainCredentials:
    """USER/PASS credentials; the password is compared by the checker."""

    username: bytes
    password: bytes

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(self.password, password)


@dataclass
class Capabilities:
    """What CAPA lists (RFC 2449 section 6), decided per connection."""

    user: bool = True
    stls: bool = False
    sasl: tuple[str, ...] = ()
    implementation: str = "popservice " + __version__
    extra: list[str] = field(default_factory=list)

    def lines(self, logged_in: bool) -> list[bytes]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if not logged_in:
            if self.user:
                caps.append("USER")
            if self.sasl:
                caps.append("SASL " + " ".join(self.sasl))
            if self.stls:
                caps.append("STLS")
        caps.extend(self.extra)
        caps.append("IMPLEMENTATION " + self.implementation)
        return [c.encode("ascii") for c in caps]

    def response(self, logged_in: bool) -> bytes:
        return wire.multiline(wire.ok("Capability list follows"), self.lines(logged_in))


class Authorization:
    """The AUTHORIZATION-state bookkeeping of one connection."""

    def __init__(self, timestamp: str | None) -> None:
        self.timestamp = timestamp
        self.user: bytes | None = None
        self.failures = 0

    def greeting(self, hostname: str) -> bytes:
        text = "POP3 server ready"
        if self.timestamp:
            text += " " + self.timestamp
        return wire.ok(text)

    def user_command(self, name: str) -> bytes:
        """RFC 1939 section 7, USER: remember the name; the answer reveals nothing."""
        self.user = name.encode("utf-8", "surrogateescape")
        return wire.ok("Send your password")

    def pass_credentials(self, password: str) -> "PlainCredentials | bytes":
        """RFC 1939 section 7, PASS: only right after USER."""
        if self.user is None:
            return wire.err("Send USER first")
        user, self.user = self.user, None
        return PlainCredentials(user, password.encode("utf-8", "surrogateescape"))

    def apop_credentials(self, name: str, digest: str) -> "APOPCredentials | bytes":
        """RFC 1939 section 7, APOP name digest."""
        self.user = None
        if not self.timestamp:
            return wire.err("APOP is not available", "AUTH")
        if not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
            return wire.err("Authentication failed", "AUTH")
        return APOPCredentials(self.timestamp.encode("ascii"), name.encode("utf-8", "surrogateescape"),
                               digest.lower().encode("ascii"))


__all__ = ["Authorization", "Capabilities", "PlainCredentials", "UnauthorizedLogin", "apop_timestamp"]
