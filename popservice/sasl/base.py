"""
The server side of SASL (RFC 4422) as POP3's AUTH command uses it (RFC 5034):
what a mechanism is given, and what each step of it answers.

A mechanism never writes to the wire and never opens a mailbox.  Each step
returns a L{Challenge} (sent as C{+ base64}), L{Authenticated} (credentials
the protocol hands to C{portal.login}, so any cred checker composes) or
L{Failed} (sent as C{-ERR [AUTH]}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, implementer

from popservice.interfaces import Authenticated, Challenge, Failed, ISASLServerMechanism, SASLStep

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


@dataclass
class SASLContext:
    """What a mechanism may know about the connection it runs on."""

    hostname: str
    tls: bool
    peer: str | None = None
    #: the client's TLS certificate (an OpenSSL X509), for EXTERNAL
    peer_certificate: Any = None
    #: the credentials checkers of the portal (a mechanism may look for one
    #: that can give it secrets, e.g. SCRAM keys)
    checkers: tuple[Any, ...] = ()
    #: extra services by name (token validators, master-user rules ...)
    services: dict[str, Any] = field(default_factory=dict)


#: A mechanism factory: context -> a new mechanism object.
MechanismFactory = Callable[[SASLContext], ISASLServerMechanism]


class ISASLVerified(ICredentials):
    """
    Credentials whose proof a mechanism has already verified itself (SCRAM,
    OAUTHBEARER, EXTERNAL); a L{VerifiedChecker} in the portal accepts them.
    """

    username = Attribute("The authenticated user name (str).")
    mechanism = Attribute("The mechanism that verified it.")


@implementer(ISASLVerified)
@dataclass(frozen=True)
class Verified:
    username: str
    mechanism: str


__all__ = ["Authenticated", "Challenge", "Failed", "ISASLServerMechanism", "ISASLVerified",
           "MechanismFactory", "SASLContext", "SASLStep", "Verified", "VerifiedChecker"]


@implementer(ICredentialsChecker)
class VerifiedChecker:
    """Accepts credentials a SASL mechanism has verified itself (L{ISASLVerified})."""

    credentialInterfaces = (ISASLVerified,)

    def requestAvatarId(self, credentials: Any) -> "Deferred[str]":  # type: ignore[override]
        from twisted.internet import defer

        return defer.succeed(str(credentials.username))
