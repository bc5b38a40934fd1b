"""
What every connection of one server shares: the L{ServerConfig}, and
L{ServerHub}, the server factory as its connections see it.  The connection
shell and the AUTHORIZATION and TRANSACTION state objects are typed against
L{ServerHub}, so none of them imports the factory that builds them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IReactorTime

from popservice import __version__
from popservice.interfaces import ISessionObserver
from popservice.sasl.base import MechanismFactory
from popservice.server.policy import PeerTracker, Policy
from popservice.server.realm import SessionRegistry
from popservice.server.scheduler import CommandRate, FairScheduler, MemoryTrimmer
from popservice.server.trace import Tracer
from popservice.server.wheel import TimerWheel


@dataclass
class ServerConfig:
    #: the name in the greeting's APOP timestamp
    hostname: str = field(default_factory=socket.gethostname)
    #: idle timeout in seconds (at least 600 once logged in, RFC 1939 section 3)
    timeout: float = 600.0
    #: a login must complete within this many seconds of connecting (0: no limit)
    login_timeout: float = 60.0
    #: context factory for STLS (e.g. twisted.internet.ssl.CertificateOptions); None: no STLS
    tls_context: Any = None
    #: offer APOP (a timestamp in the greeting) where plaintext logins are allowed
    apop: bool = True
    policy: Policy = field(default_factory=Policy)
    implementation: str = "popservice " + __version__
    #: SASL mechanisms offered by AUTH, by name, in order of preference
    sasl: dict[str, MechanismFactory] = field(default_factory=dict)
    #: services SASL mechanisms may use (token validators, master-user rules)
    sasl_services: dict[str, Any] = field(default_factory=dict)
    #: --trace-user: whose sessions are written to trace files (None: nobody's)
    trace: Tracer | None = None
    #: --client-quirks: opt-in workarounds by name (popservice.server.quirks)
    client_quirks: frozenset[str] = frozenset()
    #: commands one connection may send per second (a token bucket; 0: no limit) and its burst
    commands_per_second: float = 2000.0
    command_burst: float = 4000.0
    #: commands per reactor turn for all connections with a backlog together (fairness)
    turn_budget: int = 256
    #: and the most seconds one reactor turn gives them (0: the budget alone)
    turn_seconds: float = 0.002
    #: write-buffer bytes before a connection's producer is paused (Twisted's default is 64 KiB)
    write_buffer: int = 32768


class ServerHub(Protocol):
    """The shared state of a server (its factory), as one connection uses it."""

    portal: Portal
    config: ServerConfig
    observer: ISessionObserver
    registry: SessionRegistry
    clock: IReactorTime
    peers: PeerTracker
    #: user -> time of the last successful login (RFC 2449 LOGIN-DELAY)
    last_login: dict[str, float]
    #: the fair queue of backlogged connections, and the heap trimmer (popservice.server.scheduler)
    scheduler: FairScheduler
    trimmer: MemoryTrimmer
    #: the deadlines of every connection (popservice.server.wheel)
    timers: TimerWheel
    #: a graceful stop is under way: refuse new connections, end sessions at their next command
    stopping: bool

    def all_checkers(self) -> tuple[Any, ...]:
        """Every checker of the portal, chains unrolled."""
        ...

    def command_rate(self) -> CommandRate | None:
        """The per-connection command rate of the configuration (shared), or None (no cap)."""
        ...

    def connection_opened(self, protocol: Any) -> None: ...

    def connection_closed(self, protocol: Any) -> None: ...


def user_setting(hub: ServerHub, user: str | None, key: str) -> str | None:
    """A per-user setting from a checker that knows user records (passwd-file extra fields)."""
    if user is None:
        return None
    for checker in hub.all_checkers():
        record = getattr(checker, "record", None)
        if record is None:
            continue
        found = record(user)
        value = getattr(found, "extra", {}).get(key) if found is not None else None
        if value is not None:
            return str(value)
    return None


def login_delay(hub: ServerHub, user: str | None) -> int:
    """RFC 2449 LOGIN-DELAY for C{user}: the extra field C{login_delay=}, else the server's."""
    value = user_setting(hub, user, "login_delay")
    if value is not None and value.isdigit():
        return int(value)
    return hub.config.policy.login_delay


def expire_days(hub: ServerHub, user: str | None) -> int | None:
    """RFC 2449 EXPIRE for C{user}: the extra field C{expire=}, else the server's (None: never)."""
    value = user_setting(hub, user, "expire")
    expire = hub.config.policy.expire
    if value is not None:
        expire = int(value) if value.isdigit() else None
    return expire
