"""
The public server API: a L{POP3ServerFactory} wiring a cred portal, the
policy, TLS and observers; and L{makeServer} to build a portal-backed factory
from a store and checkers in one call, for composing popservice into a larger
Twisted application.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory

from popservice.auth.chain import CheckerChain, chain_checkers
from popservice.interfaces import IMailStore, ISessionObserver, IUserDirectory
from popservice.sasl.base import VerifiedChecker
from popservice.server.config import ServerConfig
from popservice.server.events import LogObserver
from popservice.server.handoff import ControlListener, HandoffClient
from popservice.server.policy import PeerTracker
from popservice.server.protocol import POP3ServerProtocol
from popservice.server.realm import MailRealm, SessionRegistry
from popservice.server.scheduler import CommandRate, FairScheduler, MemoryTrimmer
from popservice.server.wheel import TimerWheel


class POP3ServerFactory(ServerFactory):
    """Builds L{POP3ServerProtocol}s sharing one portal, config and registry."""

    protocol = POP3ServerProtocol  # type: ignore[assignment]

    def __init__(self, portal: Portal, config: ServerConfig | None = None,
                 observer: ISessionObserver | None = None,
                 registry: SessionRegistry | None = None,
                 clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.portal = portal
        self.config = config if config is not None else ServerConfig()
        self.observer: ISessionObserver = observer if observer is not None else LogObserver()
        realm_registry = getattr(portal.realm, "registry", None)
        self.registry: SessionRegistry = (
            registry if registry is not None
            else realm_registry if isinstance(realm_registry, SessionRegistry)
            else SessionRegistry()
        )
        self.clock: IReactorTime = clock
        self.connections: set[POP3ServerProtocol] = set()
        self.peers = PeerTracker()
        self.scheduler = FairScheduler(clock, self.config.turn_budget, self.config.turn_seconds)
        self.trimmer = MemoryTrimmer(clock)
        #: every connection's deadlines (handshake, login, idle, closing grace), one DelayedCall in all
        self.timers = TimerWheel(clock)
        #: user -> time of the last successful login (RFC 2449 LOGIN-DELAY)
        self.last_login: dict[str, float] = {}
        #: a graceful stop is under way (L{begin_shutdown}): new connections are
        #: refused, every session ends at its next command, UPDATE finishes
        self.stopping = False
        self._drain_waiters: list[defer.Deferred[None]] = []
        #: this process's control socket for take-over requests from other processes (L{makeServer}'s
        #: C{runtime_dir}), listening while a port serves this factory
        self.control: ControlListener | None = None
        self._command_rate: CommandRate | None = None

    def command_rate(self) -> CommandRate | None:
        """The configuration's command rate, one object for every connection (None: no cap)."""
        config = self.config
        if config.commands_per_second <= 0:
            return None
        rate = self._command_rate
        if rate is None or rate.rate != config.commands_per_second or rate.burst != config.command_burst:
            rate = self._command_rate = CommandRate(config.commands_per_second, config.command_burst)
        return rate

    def startFactory(self) -> None:
        """The first listening port started: take take-over requests from other processes."""
        if self.control is not None:
            self.control.start()

    def connection_opened(self, protocol: POP3ServerProtocol) -> None:
        self.connections.add(protocol)

    def connection_closed(self, protocol: POP3ServerProtocol) -> None:
        self.connections.discard(protocol)
        if not self.connections and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def begin_shutdown(self) -> None:
        """
        Start a graceful stop (L{popservice.server.lifecycle}): from now on a new
        connection gets C{-ERR [SYS/TEMP]} and is closed, and every session
        answers its next command so and is closed without UPDATE.  A session
        already in UPDATE completes it.  The last listener closing no longer
        aborts the sessions (L{stopFactory}): whoever called this ends them.
        """
        self.stopping = True

    def end_shutdown(self) -> None:
        """Serve normally again (the service is started anew)."""
        self.stopping = False

    def drained(self) -> "defer.Deferred[None]":
        """Fires once no connection is left (at once if none is)."""
        if not self.connections:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def abort_connections(self, reason: str) -> int:
        """Abort every connection now (a session not yet in UPDATE deletes nothing); how many there were."""
        connections = list(self.connections)
        for connection in connections:
            if connection.end_reason == "disconnected":  # the default: not closing for a reason of its own
                connection.end_reason = reason
            transport: Any = connection.transport
            if transport is not None:
                transport.abortConnection()
        return len(connections)

    def all_checkers(self) -> tuple[Any, ...]:
        """Every checker of the portal, chains unrolled (SASL mechanisms look for secrets here)."""
        out: list[Any] = []
        for checker in self.portal.checkers.values():
            for c in (checker.checkers if isinstance(checker, CheckerChain) else [checker]):
                if c not in out:
                    out.append(c)
        return tuple(out)

    def stopFactory(self) -> None:
        """
        The last listening port closed (service stop): end every session
        without UPDATE, so mailbox locks are released and nothing is deleted;
        unless a graceful stop is under way (L{begin_shutdown}), which lets
        sessions end in their own time, up to its grace period.
        """
        self.trimmer.stop()
        self.timers.stop()
        if self.control is not None:
            self.control.stop()
        if self.stopping:
            return
        self.abort_connections("server shutdown")


def makeServer(store: IMailStore, checkers: Iterable[ICredentialsChecker],
               config: ServerConfig | None = None, *, lock_grace: float = 60.0,
               exclusive: bool = True, max_sessions: int = 10, observer: ISessionObserver | None = None,
               clock: IReactorTime | None = None, runtime_dir: str | None = None) -> POP3ServerFactory:
    """
    A server factory for C{store}, authenticating with C{checkers}.  A checker
    that also provides L{IUserDirectory} supplies home directories for C{~}.

    With exclusive sessions, a login that finds its mailbox held by another
    process asks it to let an idle session go (L{popservice.server.handoff});
    with C{runtime_dir}, this process takes such requests on a control socket
    there.
    """
    checkers = list(checkers)
    directory = next((c for c in checkers if IUserDirectory.providedBy(c)), None)
    # Several --auth sources are tried in order (a Portal alone keeps only the last).
    portal_checkers = chain_checkers(checkers)
    if config is not None and config.sasl:
        # Mechanisms that verify proofs themselves (SCRAM, tokens) log in with these.
        portal_checkers.append(VerifiedChecker())
    registry = SessionRegistry(grace=lock_grace, enabled=exclusive, max_sessions=max_sessions)
    holders = HandoffClient() if exclusive else None
    portal = Portal(MailRealm(store, directory, registry, holders=holders, clock=clock), portal_checkers)
    factory = POP3ServerFactory(portal, config, observer=observer, registry=registry, clock=clock)
    if runtime_dir and exclusive:
        factory.control = ControlListener(runtime_dir, registry)
    return factory


__all__ = ["POP3ServerFactory", "ServerConfig", "makeServer"]
