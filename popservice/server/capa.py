"""
RFC 2449 section 5 CAPA: what the server lists, before and after login
(RFC 2449 section 6 tags; STLS from RFC 2595, SASL from RFC 5034, UTF8 and
LANG from RFC 6856).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from popservice import __version__, wire
from popservice.server.config import ServerHub, expire_days, login_delay


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


def capabilities(hub: ServerHub, user: str | None, logged_in: bool, *, plaintext: bool = False,
                 stls: bool = False, sasl: tuple[str, ...] = ()) -> Capabilities:
    """The capabilities of a connection; the LOGIN-DELAY and EXPIRE values are C{user}'s once known."""
    extra = []
    delay = login_delay(hub, user)
    if delay:
        extra.append("LOGIN-DELAY %d" % (delay,))
    expire = expire_days(hub, user)
    extra.append("EXPIRE %s" % ("NEVER" if expire is None else expire))
    if not logged_in:
        extra.append("UTF8 USER")
    extra.append("LANG")
    return Capabilities(user=plaintext, stls=stls, sasl=sasl, implementation=hub.config.implementation,
                        extra=extra)
