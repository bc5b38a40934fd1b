"""
Security policy decisions, kept apart from the protocol: where plaintext
passwords are acceptable, how long to delay after a failed login, when to give up.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_networks(text: str) -> list[Network]:
    """Parse C{"10.0.0.0/8, ::1/128"} into networks (ValueError on junk)."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


@functools.lru_cache(maxsize=4096)
def _peer_address(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, bool]:
    """A peer's address (an IPv4-mapped one as IPv4; None: not an address), and whether loopback."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None, False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address, address.is_loopback


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
    #: concurrent connections in all (then -ERR [SYS/TEMP] and close)
    max_connections: int = 10000
    #: concurrent connections from one untrusted address
    max_connections_per_ip: int = 50
    #: seconds a TLS handshake may take (implicit TLS and STLS)
    handshake_timeout: float = 10.0
    #: seconds between two logins of a user (RFC 2449 LOGIN-DELAY); 0: none
    login_delay: int = 0
    #: days a retrieved message is kept (RFC 2449 EXPIRE); None: never
    expire: "int | None" = None

    def is_trusted(self, host: "str | None") -> bool:
        """Loopback and configured trusted networks."""
        if host is None:
            # UNIX sockets and other non-IP transports are local.
            return True
        address, loopback = _peer_address(host)
        if address is None:
            return False
        if loopback and self.trust_loopback:
            return True
        return any(address in net for net in self.trusted_networks)

    def plaintext_allowed(self, host: "str | None", tls: bool) -> bool:
        """
        RFC 2595 section 2.3 / Dovecot's disable_plaintext_auth: no password in
        the clear unless the link is encrypted or the peer is trusted.
        """
        return tls or self.allow_plaintext_auth or self.is_trusted(host)

    def admit(self, host: "str | None", tracker: "PeerTracker") -> "str | None":
        """Why a new connection must be refused, or None to accept it."""
        if tracker.total >= self.max_connections:
            return "Too many connections, try again later"
        if host is not None and not self.is_trusted(host) \
                and tracker.connections.get(host, 0) >= self.max_connections_per_ip:
            return "Too many connections from your address"
        return None

    def delay_after(self, failures: int) -> float:
        """Seconds to wait before answering the C{failures}-th failed login."""
        if failures <= 0 or self.failure_delay <= 0:
            return 0.0
        return float(min(self.failure_delay * 2 ** (failures - 1), self.max_failure_delay))


class PeerTracker:
    """
    Per-address state with bounded memory: concurrent connections and recent
    login failures.  Failures are forgotten C{window} seconds after the last one.
    """

    def __init__(self, window: float = 600.0, max_addresses: int = 100000) -> None:
        self.window = window
        self.max_addresses = max_addresses
        self.connections: dict[str, int] = {}
        self._failures: dict[str, tuple[int, float]] = {}
        self.total = 0

    def connected(self, host: str) -> None:
        self.connections[host] = self.connections.get(host, 0) + 1
        self.total += 1

    def disconnected(self, host: str) -> None:
        left = self.connections.get(host, 0) - 1
        if left > 0:
            self.connections[host] = left
        else:
            self.connections.pop(host, None)
        self.total -= 1

    def failures(self, host: str, now: float) -> int:
        count, last = self._failures.get(host, (0, 0.0))
        if count and now - last > self.window:
            del self._failures[host]
            return 0
        return count

    def failed(self, host: str, now: float) -> int:
        count = self.failures(host, now) + 1
        if host not in self._failures and len(self._failures) >= self.max_addresses:
            # Forget the oldest address (dicts keep insertion order).
            self._failures.pop(next(iter(self._failures)))
        self._failures.pop(host, None)
        self._failures[host] = (count, now)
        return count
