"""
The server's life under a service manager: a graceful stop, a reload on
SIGHUP, and systemd's notifications (L{popservice.sdnotify}).

L{ServerLifecycle} is a child of the application's C{MultiService}, beside
the listeners:

  - B{stop} (C{twistd} on SIGTERM stops the application): the listeners stop
    accepting; every session in UPDATE completes it (its deletions commit
    and it gets its answer); every other session answers its next command
    with C{-ERR [SYS/TEMP] server shutting down} and is closed without
    deleting anything (a RETR under way is finished first); C{stopService}
    returns a Deferred that fires once no connection is left, or when the
    grace period is over, after aborting what is left (nothing of theirs is
    deleted).  Twisted waits for it before the reactor stops.
  - B{reload} (SIGHUP, handler installed by C{startService} and restored by
    C{stopService}): passwd-files are re-read, a PostgreSQL users table
    refreshed, and every TLS context (STLS, C{--listen-tls}, the C{ssl:}
    listeners, each re-reading its own files) loaded again; a broken new
    certificate or key is refused with one log line and the old one stays.
    Connections stay up; new ones use what was loaded.
  - B{systemd}: C{READY=1} once the reactor runs (the listeners are bound
    by then), C{RELOADING=1} and C{READY=1} around a reload, C{STOPPING=1}
    at stop.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorCore
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from popservice import sdnotify
from popservice.auth.passwdfile import PasswdFileChecker
from popservice.auth.pgusers import PostgresUserChecker
from popservice.server.factory import POP3ServerFactory
from popservice.tlsutil import ReloadableServerTLS, ReloadingTLSReactor

__all__ = ["DEFAULT_GRACE", "ServerLifecycle", "reload_checker"]

log = Logger(namespace="popservice.lifecycle")

#: Seconds sessions get to end at a graceful stop (C{--shutdown-grace}).
DEFAULT_GRACE = 10.0

#: After the grace period, aborted connections are waited for this long at most.
_ABORT_WAIT = 1.0


def reload_checker(checker: object) -> list[defer.Deferred[None]]:
    """
    Re-read a checker's users now if it reads them from somewhere: a
    passwd-file (at once), a PostgreSQL users table (the Deferreds returned).
    Errors are logged; the last good copy stays.
    """
    if isinstance(checker, PasswdFileChecker):
        try:
            changed = checker.reload()
        except Exception:
            log.failure("reload: passwd-file {path!r} could not be re-read", path=checker.path)
            return []
        log.info("reload: passwd-file {path!r} {what}, {count} users", path=checker.path,
                 what="re-read" if changed else "not re-read (unchanged or unreadable)",
                 count=len(checker.records()))
        return []
    if isinstance(checker, PostgresUserChecker):
        pg: PostgresUserChecker = checker

        def refreshed(_: object) -> None:
            log.info("reload: users table, {count} users", count=len(pg.records()))

        return [pg.refresh().addCallback(refreshed)]
    return []


class ServerLifecycle(service.Service):
    """
    Graceful stop, SIGHUP reload and systemd notifications for the server
    C{factory}; add it to the application after the listeners, and make the
    listeners with L{listener} so their TLS is reloaded too.
    """

    def __init__(self, factory: POP3ServerFactory, *, grace: float = DEFAULT_GRACE, reactor: Any = None,
                 notify: Callable[[str], object] = sdnotify.notify, handle_signals: bool = True,
                 client_ca: str | None = None) -> None:
        """
        @param grace: seconds sessions get to end at stop (then they are aborted).
        @param notify: sends a systemd notification (L{sdnotify.notify}).
        @param handle_signals: install the SIGHUP handler (only possible in the main thread).
        """
        if reactor is None:
            from twisted.internet import reactor
        #: the server's factory (as a listening service's C{factory} is)
        self.factory = factory
        #: --tls-client-ca: ssl: listeners request client certificates too (EXTERNAL on implicit TLS)
        self.client_ca = client_ca
        self.grace = grace
        self.reactor: Any = reactor
        self.handle_signals = handle_signals
        self._notify = notify
        #: the TLS contexts a reload loads again
        self.tls: list[ReloadableServerTLS] = []
        if isinstance(factory.config.tls_context, ReloadableServerTLS):
            self.tls.append(factory.config.tls_context)
        self._previous_sighup: Any = None
        self._sighup_installed = False
        self._notify_failed = False

    # -- listeners ------------------------------------------------------------------

    def listener(self, description: str, factory: IProtocolFactory | None = None, *, reactor: Any = None,
                 implicit_tls: bool = False) -> StreamServerEndpointService:
        """
        C{strports.service(description, factory)} (C{factory}: the server's by
        default) whose C{ssl:} TLS re-reads the files named in C{description}
        at each reload.  With C{implicit_tls}, TLS (RFC 8314) on any endpoint
        (C{systemd:}, C{tcp:}) with the server's reloadable context
        (C{--tls-certificate}).  C{reactor}: what endpoints listen with (e.g.
        L{popservice.server.proxy.listening_reactor}).
        """
        served: IProtocolFactory = factory if factory is not None else self.factory
        if implicit_tls:
            context = self.factory.config.tls_context
            if context is None:
                raise ValueError("implicit TLS needs a certificate and key")
            served = TLSMemoryBIOFactory(context, False, served)
        base = reactor if reactor is not None else self.reactor
        wrapper = ReloadingTLSReactor(base, description, self._add_tls, client_ca=self.client_ca)
        return strports.service(description, served, reactor=cast(IReactorCore, wrapper))

    def _add_tls(self, context: ReloadableServerTLS) -> None:
        # A listener started again replaces its earlier context.
        self.tls = [c for c in self.tls if c.label != context.label] + [context]

    # -- start ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.factory.end_shutdown()
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            self._sighup_installed = True
        # The listeners (started before this service) are bound once the reactor runs.
        self.reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if self.running:
            self.send("READY=1\nSTATUS=Accepting connections")

    def send(self, state: str) -> None:
        """A systemd notification; a failure is logged once."""
        try:
            self._notify(state)
        except OSError as e:
            if not self._notify_failed:
                self._notify_failed = True
                log.warn("cannot notify systemd ($NOTIFY_SOCKET): {error}", error=str(e))

    # -- reload ---------------------------------------------------------------------

    def _sighup(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler: do the work in the reactor, between events.
        self.reactor.callFromThread(self._reload_on_signal)

    def _reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading users and TLS certificates")
        self.reload()

    def reload(self) -> "defer.Deferred[None]":
        """
        Re-read the users (passwd-files, a PostgreSQL users table) and every
        TLS context now; fires when done.  Connections are not touched.
        """
        self.send("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000,))
        pending: list[defer.Deferred[None]] = []
        for checker in self.factory.all_checkers():
            pending.extend(reload_checker(checker))
        loaded = refused = 0
        for context in list(self.tls):
            if context.reload():
                loaded += 1
            else:
                refused += 1

        def done(_: object) -> None:
            log.info("reload done: {loaded} TLS contexts loaded, {refused} refused (old ones kept)",
                     loaded=loaded, refused=refused)
            self.send("READY=1\nSTATUS=Accepting connections (reloaded)")

        # (refresh failures are logged by the checkers, which keep their last good copy)
        return defer.gatherResults(pending, consumeErrors=True).addBoth(done)

    # -- stop -----------------------------------------------------------------------

    def stopService(self) -> "defer.Deferred[None]":
        """
        Stop gracefully: fires once every connection is gone, at most
        C{grace} seconds (and a moment for the aborted ones) from now.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self._sighup_installed:
            self._sighup_installed = False
            previous = self._previous_sighup
            # (None: a handler Python did not install; the default is what is left to give back)
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)
            self._previous_sighup = None
        clock = self.factory.clock
        started = clock.seconds()
        count = len(self.factory.connections)
        log.info("stopping: {count} connections get up to {grace} s to end", count=count, grace=self.grace)
        self.send("STOPPING=1\nSTATUS=Stopping: %d connections, up to %g s\nEXTEND_TIMEOUT_USEC=%d"
                  % (count, self.grace, int((self.grace + 5) * 1e6)))
        self.factory.begin_shutdown()
        done: defer.Deferred[None] = defer.Deferred()
        calls: list[IDelayedCall] = []

        def finish(how: str) -> None:
            for call in calls:
                if call.active():
                    call.cancel()
            if not done.called:
                log.info("stopped: {how} after {seconds} s", how=how,
                         seconds=round(clock.seconds() - started, 3))
                done.callback(None)

        def expired() -> None:
            aborted = self.factory.abort_connections("server shutdown")
            log.info("stopping: grace period over, {count} connections aborted", count=aborted)
            calls.append(clock.callLater(_ABORT_WAIT, finish, "grace period over"))

        calls.append(clock.callLater(self.grace, expired))
        self.factory.drained().addCallback(lambda _: finish("all connections closed"))
        return done
