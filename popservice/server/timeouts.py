"""
The timers of a connection: the TLS handshake deadline, the login deadline
(bytes do not extend them), the autologout timer (RFC 1939 section 3: at
least 10 minutes once logged in) and the grace a closing connection has to
go.  They are deadlines (floats) on the connection, filed in the server's one
L{TimerWheel} under the earliest, so a command costs a float store and a
connection no C{DelayedCall}.  A mixin of the shell
(L{popservice.server.protocol.POP3ServerProtocol}), as Twisted's own
C{TimeoutMixin} is for its protocols.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from popservice import wire
from popservice.states import State

if TYPE_CHECKING:
    from popservice.server.config import ServerHub

#: RFC 1939 section 3: the autologout timer is at least 10 minutes once logged in.
MIN_TRANSACTION_TIMEOUT = 600.0

#: no deadline of this kind
_NONE = 0.0


class SessionTimers:
    """
    Handshake, login, idle and closing deadlines; the shell provides the
    attributes below and C{close}, and sets C{_closing} and C{_closed}.
    """

    factory: ServerHub
    transport: Any
    state: State
    end_reason: str
    _closing: bool
    _closed: bool
    _last_activity: float
    #: the wheel slot the connection is filed under (None: not filed)
    _timer_slot: int | None
    _handshake_deadline: float
    _login_deadline: float
    _close_deadline: float

    def event(self, name: str, **fields: object) -> None:
        raise NotImplementedError

    def reply(self, response: bytes) -> None:
        raise NotImplementedError

    def close(self, reason: str, grace: float = 10.0) -> None:
        raise NotImplementedError

    # -- the deadlines

    def _start_handshake_timer(self) -> None:
        """A TLS handshake must finish within a few seconds; bytes do not extend it."""
        timeout = self.factory.config.policy.handshake_timeout
        if timeout > 0:
            self._handshake_deadline = self.factory.clock.seconds() + timeout
            self._file_timers()

    def _start_login_timer(self, now: float) -> None:
        """A login must complete within C{login_timeout} of connecting."""
        timeout = self.factory.config.login_timeout
        if timeout > 0:
            self._login_deadline = now + timeout

    def _stop_login_timer(self) -> None:
        self._login_deadline = _NONE

    def _start_close_timer(self, grace: float) -> None:
        """Closing: abort if the connection is not gone after C{grace} seconds."""
        if self._close_deadline == _NONE and not self._closed:
            self._close_deadline = self.factory.clock.seconds() + grace
            self._file_timers()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done."""
        self._handshake_deadline = _NONE
        self.event("tls_established")

    def _idle_timeout(self) -> float:
        timeout = float(self.factory.config.timeout)
        if self.state is State.TRANSACTION:
            return max(timeout, MIN_TRANSACTION_TIMEOUT)
        return timeout

    def touch(self) -> None:
        """Note activity: a float store; the wheel looks at it when the slot comes."""
        self._last_activity = self.factory.clock.seconds()

    def _next_deadline(self) -> float:
        """The earliest deadline still ahead (_NONE: none)."""
        if self._closed:
            return _NONE
        candidates: tuple[float, ...]
        if self._closing:
            # Only the grace and the handshake are left.
            candidates = (self._close_deadline, self._handshake_deadline)
        else:
            candidates = (self._handshake_deadline, self._login_deadline,
                          self._last_activity + self._idle_timeout())
        return min((d for d in candidates if d != _NONE), default=_NONE)

    def _file_timers(self) -> None:
        """File the connection under its earliest deadline (again, if that moved earlier)."""
        when = self._next_deadline()
        wheel = self.factory.timers
        slot = self._timer_slot
        if when == _NONE:
            self._cancel_timers()
            return
        if slot is not None:
            if slot == wheel.slot(when):
                return
            wheel.cancel(self, slot)
        self._timer_slot = wheel.schedule(self, when)

    def _cancel_timers(self) -> None:
        if self._timer_slot is not None:
            self.factory.timers.cancel(self, self._timer_slot)
            self._timer_slot = None

    def deadline_reached(self, now: float) -> None:
        """L{TimerWheel}: the slot came; act on what is due and file the rest."""
        self._timer_slot = None
        if self._closed:
            return
        if self._close_deadline != _NONE and now >= self._close_deadline:
            self._close_deadline = _NONE
            self._close_timed_out()
            return
        if self._handshake_deadline != _NONE and now >= self._handshake_deadline:
            self._handshake_deadline = _NONE
            self._handshake_timed_out()
            return
        if not self._closing:
            if self._login_deadline != _NONE and now >= self._login_deadline:
                self._login_deadline = _NONE
                self._login_timed_out()
            elif now >= self._last_activity + self._idle_timeout():
                self._timed_out()
        if not self._closed:
            self._file_timers()

    # -- what happens when they pass

    def _close_timed_out(self) -> None:
        transport: Any = self.transport
        transport.abortConnection()

    def _handshake_timed_out(self) -> None:
        self.end_reason = "TLS handshake timeout"
        transport: Any = self.transport
        transport.abortConnection()

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
