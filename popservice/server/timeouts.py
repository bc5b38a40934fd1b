"""
The timers of a connection: the TLS handshake deadline, the login deadline
(bytes do not extend them), and the autologout timer (RFC 1939 section 3: at
least 10 minutes once logged in), moved only when it fires early so that a
command costs a float store, not a reschedule.  A mixin of the shell
(L{popservice.server.protocol.POP3ServerProtocol}), as Twisted's own
C{TimeoutMixin} is for its protocols.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall

from popservice import wire
from popservice.states import State

if TYPE_CHECKING:
    from popservice.server.config import ServerHub

#: RFC 1939 section 3: the autologout timer is at least 10 minutes once logged in.
MIN_TRANSACTION_TIMEOUT = 600.0


class SessionTimers:
    """Handshake, login and idle timers; the shell provides the attributes below and C{close}."""

    factory: ServerHub
    transport: Any
    state: State
    end_reason: str
    _handshake_call: IDelayedCall | None
    _idle_call: IDelayedCall | None
    _last_activity: float

    def event(self, name: str, **fields: object) -> None:
        raise NotImplementedError

    def reply(self, response: bytes) -> None:
        raise NotImplementedError

    def close(self, reason: str, grace: float = 10.0) -> None:
        raise NotImplementedError

    def _start_handshake_timer(self) -> None:
        """A TLS handshake must finish within a few seconds; bytes do not extend it."""
        timeout = self.factory.config.policy.handshake_timeout
        if timeout > 0:
            self._handshake_call = self.factory.clock.callLater(timeout, self._handshake_timed_out)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done."""
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self.event("tls_established")

    def _handshake_timed_out(self) -> None:
        self.end_reason = "TLS handshake timeout"
        transport: Any = self.transport
        transport.abortConnection()

    def _idle_timeout(self) -> float:
        timeout = float(self.factory.config.timeout)
        if self.state is State.TRANSACTION:
            return max(timeout, MIN_TRANSACTION_TIMEOUT)
        return timeout

    def touch(self) -> None:
        """
        Note activity.  The timer itself is only moved when it fires early
        (see L{_idle_check}): a float store per command, not a reschedule.
        """
        self._last_activity = self.factory.clock.seconds()
        if self._idle_call is None or not self._idle_call.active():
            self._idle_call = self.factory.clock.callLater(self._idle_timeout(), self._idle_check)

    def _idle_check(self) -> None:
        remaining = self._last_activity + self._idle_timeout() - self.factory.clock.seconds()
        if remaining > 0:
            self._idle_call = self.factory.clock.callLater(remaining, self._idle_check)
        else:
            self._timed_out()

    def _timed_out(self) -> None:
        self.reply(wire.err("Disconnected for inactivity", "SYS/TEMP"))
        self._abort_soon("idle timeout")

    def _login_timed_out(self) -> None:
        if self.state is State.AUTHORIZATION:
            self.reply(wire.err("Login took too long", "AUTH"))
            self._abort_soon("login timeout")

    def _abort_soon(self, reason: str) -> None:
        """Close; if the peer does not read the last words within 5 s, abort."""
        self.close(reason, grace=5.0)

