"""
Security policy decisions, kept apart from the protocol: where plaintext
passwords are acceptable, how long to delay after a failed login, when to give up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_networks(text: str) -> list[Network]:
    """Parse C{"10.0.0.0/8, ::1/128"} into networks (ValueError on junk)."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


@dataclass
class Policy:
    #: accept USER/PASS, APOP and plaintext SASL without TLS from anywhere
    allow_plaintext_auth: bool = False
    #: treat loopback peers as trusted (turn off behind a local TLS proxy)
    trust_loopback: bool = True
    #: networks treated like loopback for the plaintext rule
    trusted_networks: Sequence[Network] = field(default_factory=list)
    #: seconds to wait before answering the first failed login; doubles per failure
    failure_delay: float = 1.0
    #: the delay never grows past this
    max_failure_delay: float = 15.0
    #: failed logins before the connection is closed
    max_failures: int = 5
    #: failed or illegal commands before the connection is closed
    max_bad_commands_before_login: int = 10
    max_bad_commands_after_login: int = 50

    def is_trusted(self, host: "str | None") -> bool:
        """Loopback and configured trusted networks."""
        if host is None:
            # UNIX sockets and other non-IP transports are local.
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        if address.is_loopback and self.trust_loopback:
            return True
        return any(address in net for net in self.trusted_networks)

    def plaintext_allowed(self, host: "str | None", tls: bool) -> bool:
        """
        RFC 2595 section 2.3 / Dovecot's disable_plaintext_auth: no password in
        the clear unless the link is encrypted or the peer is trusted.
        """
        return tls or self.allow_plaintext_auth or self.is_trusted(host)

    def delay_after(self, failures: int) -> float:
        """Seconds to wait before answering the C{failures}-th failed login."""
        if failures <= 0 or self.failure_delay <= 0:
            return 0.0
        return float(min(self.failure_delay * 2 ** (failures - 1), self.max_failure_delay))
