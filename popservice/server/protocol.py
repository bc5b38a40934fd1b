"""
The POP3 server protocol: a thin Twisted shell around L{popservice.wire}.

It feeds received bytes to a L{wire.LineReader}, checks each command against
the one table in L{popservice.states} and hands it to the object for the
current state: L{Authorization} before login (L{popservice.server.login}),
L{Transaction} after (L{popservice.server.transaction}).  It writes their
answers, streams message bodies (L{popservice.server.transfer}), and owns
the timers (L{popservice.server.timeouts}) and flow control:

  - the protocol is the transport's streaming producer: when the client stops
    reading and the transport's buffer fills, the protocol stops both sending
    and reading, so a pipelining client that never reads costs bounded memory;
  - at most C{commands_per_turn} commands are handled per turn; a connection
    with more buffered waits for its next turn in the server's fair queue
    (L{popservice.server.scheduler}), with a budget per reactor turn for all
    backlogged connections together, and a per-connection command rate, so a
    flood of pipelined commands cannot starve other connections;
  - the answers of one turn leave in one write;
  - a closing connection reads on (and discards) until it is gone, so TLS sees
    the peer's close_notify or EOF; after C{CLOSE_GRACE} it is aborted.
"""

from __future__ import annotations

import sys
from collections.abc import Container
from typing import Any, Union

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popservice import wire
from popservice.server.config import ServerHub
from popservice.server.events import new_session_id, session_summary
from popservice.server.i18n import localise
from popservice.server.login import SASL_LINE, Authorization, after_login, apop_timestamp
from popservice.server.scheduler import CommandRate
from popservice.server.session import MailboxSession
from popservice.server.timeouts import SessionTimers
from popservice.server.trace import SessionTrace
from popservice.server.transaction import Transaction, open_session
from popservice.server.transfer import MessageTransfer
from popservice.server.transport import (
    peer_certificate,
    set_nodelay,
    set_write_buffer,
    write_through,
    write_tls_at_once,
)
from popservice.states import State, legal

_LOGIN_COMMANDS = frozenset({"USER", "PASS", "APOP", "AUTH", "STLS"})


#: Once the server closes (QUIT, errors), the peer has this long to read the
#: last answer and close its side (a TLS peer: send its close_notify or EOF);
#: then the connection is aborted, so none lingers in CLOSE-WAIT.
CLOSE_GRACE = 10.0

#: The answer to every command, and to new connections, once a graceful stop
#: has begun (popservice.server.lifecycle); with C{[SYS/TEMP]}: retry later.
SHUTTING_DOWN = "server shutting down"


@implementer(IPushProducer, IHandshakeListener)
class POP3ServerProtocol(SessionTimers, Protocol):
    """One POP3 connection (RFC 1939, 2449, 2595); implements L{popservice.server.shell.Shell}."""

    # Slots, not a __dict__ per connection: an idle connection costs what it holds.
    __slots__ = (
        "factory", "transport", "connected", "state", "login", "transaction", "user", "end_reason", "reader",
        "peer_host", "tls", "_transfer", "_waiting", "_paused", "_reading", "_running", "_closed", "_closing",
        "_bad_commands", "_turn_call", "_scheduled", "_rate_limited", "_rate", "_rate_full", "_out",
        "_out_size", "_timer_slot", "_handshake_deadline", "_login_deadline", "_close_deadline",
        "_last_activity", "_rejected", "_registered", "_connected_at", "utf8", "language", "session_id",
        "listener", "bytes_out", "_command", "_command_at", "trace", "_events",
    )

    log = Logger()
    factory: ServerHub

    commands_per_turn = 8
    input_high_water = 4096
    #: answers of a turn are written together; bodies go out once this much is pending
    output_batch = 16384

    state: State
    user: str | None
    end_reason: str

    def __init__(self) -> None:
        self.factory = None  # type: ignore[assignment]
        self.transport = None
        self.connected = 0
        self.state = State.AUTHORIZATION
        #: the object answering the commands of the current state
        self.login = Authorization(self, None)
        self.transaction: Transaction | None = None
        self.user = None
        self.end_reason = "disconnected"
        # Before login AUTH lines may carry long initial responses (OAuth
        # tokens; mpop sends them there), so the reader allows SASL_LINE and
        # _handle_line holds every other command to RFC 2449's 255 octets.
        self.reader = wire.LineReader(SASL_LINE)
        self.peer_host: str | None = None
        self.tls = False
        self._transfer: MessageTransfer | None = None
        self._waiting = False
        self._paused = False
        self._reading = True
        self._running = False
        self._closed = False
        self._closing = False
        self._bad_commands = 0
        self._turn_call: IDelayedCall | None = None
        #: waiting in the fair queue (or for the command rate): buffer only
        self._scheduled = False
        self._rate_limited = False
        #: the server's command rate (shared) and when this connection's bucket is full again
        self._rate: CommandRate | None = None
        self._rate_full = 0.0
        #: the answers of the current turn, written together when it ends (made when needed)
        self._out: list[bytes] | None = None
        self._out_size = 0
        #: the deadlines (0.0: none), filed in the server's timer wheel (popservice.server.timeouts)
        self._timer_slot: int | None = None
        self._handshake_deadline = 0.0
        self._login_deadline = 0.0
        self._close_deadline = 0.0
        self._last_activity = 0.0
        self._rejected = False
        self._registered = False
        self._connected_at = 0.0
        #: RFC 6856: UTF8 mode and the language of response texts
        self.utf8 = False
        self.language = "en"
        #: for logs and metrics: this session's id (made at connect), the
        #: listener it came through (set by the listener's factory), bytes written
        self.session_id = ""
        self.listener = "default"
        self.bytes_out = 0
        #: the command whose answer is on its way, and when it arrived (its latency)
        self._command: str | None = None
        self._command_at = 0.0
        #: --trace-user: this session's trace while it may still be written (popservice.server.trace)
        self.trace: SessionTrace | None = None
        #: the event names the server's observer wants (None: all), set at connect
        self._events: Container[str] | None = None

    @property
    def session(self) -> MailboxSession | None:
        """The logged-in session (None before login and once it has ended)."""
        return self.transaction.session if self.transaction is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------
    # Connection life

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.session_id = new_session_id()
        self._events = getattr(self.factory.observer, "events", None)
        set_nodelay(transport)
        # answers leave at once, not a reactor turn later
        write_through(transport)
        # A peer that does not read holds at most this much in our write buffer.
        set_write_buffer(transport, self.factory.config.write_buffer)
        self._rate = self.factory.command_rate()
        peer = transport.getPeer()
        self.peer_host = getattr(peer, "host", None)
        self.tls = ISSLTransport.providedBy(transport)
        if self.tls:
            # (a turn's answers are one write already: not gathered for another turn)
            write_tls_at_once(transport)
        config = self.factory.config
        if self.factory.stopping:
            # A graceful stop is under way (popservice.server.lifecycle): come back later.
            self._rejected = True
            self._closing = True
            self.event("refused", why=SHUTTING_DOWN, limit="shutdown", listener=self.listener)
            transport.write(wire.err(SHUTTING_DOWN, "SYS/TEMP"))
            transport.loseConnection()
            return
        refusal = config.policy.admit(self.peer_host, self.factory.peers)
        if refusal is not None:
            # RFC 2449 section 8: a temporary condition; the client may retry.
            self._rejected = True
            self._closing = True
            limit = "total" if self.factory.peers.total >= config.policy.max_connections else "per_address"
            self.event("refused", why=refusal, limit=limit, listener=self.listener)
            transport.write(wire.err(refusal, "SYS/TEMP"))
            transport.loseConnection()
            return
        self.factory.peers.connected(self.peer_host or "")
        if self.tls:
            self._start_handshake_timer()
        if config.apop and self.login.plaintext_allowed():
            self.login.timestamp = apop_timestamp(config.hostname)
        transport.registerProducer(self, True)
        now = self._last_activity = self._connected_at = self.factory.clock.seconds()
        self._start_login_timer(now)
        self._file_timers()
        self.factory.connection_opened(self)
        if config.trace is not None:
            self.trace = config.trace.begin(self.factory.clock, self.peer_host)
        self.event("connect", tls=self.tls, listener=self.listener)
        self.write(self.login.greeting(config.hostname))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        if self._rejected:
            return
        self.factory.peers.disconnected(self.peer_host or "")
        self._cancel_timers()
        call = self._turn_call
        if call is not None and call.active():
            call.cancel()
        if self._transfer is not None:
            self._transfer.abandon()
            self._transfer = None
        session = self.session
        if session is not None and self.state is not State.UPDATE:
            # A dropped or timed-out connection never reaches UPDATE: nothing is deleted.
            self.release_mailbox()
        self._command_done()
        # One summary line per session, in the spirit of Dovecot's pop3_logout_format.
        self.event("logout", reason=self.end_reason, tls=self.tls, method=self.login.method,
                   seconds=round(self.factory.clock.seconds() - self._connected_at, 3),
                   listener=self.listener, bytes_out=self.bytes_out, **session_summary(session))
        self.factory.scheduler.discard(self)
        self.factory.trimmer.connection_closed(self.factory.peers.total)
        self.factory.connection_closed(self)

    def release_mailbox(self) -> "defer.Deferred[Any]":
        if self.user is not None and self._registered:
            self._registered = False
            self.factory.registry.unregister(self.user, self)
        if self.transaction is None:
            return defer.succeed(None)
        return self.transaction.release()

    def close(self, reason: str, grace: float = CLOSE_GRACE) -> None:
        """Close after what is written; read on (discarding) until the connection is gone."""
        self.end_reason = reason
        self._closing = True
        self._command_done()
        self._flush()
        self.factory.scheduler.discard(self)
        transport: Any = self.transport
        # TLS does not close while a producer is registered: unregister first
        # (what is already written is still flushed).
        transport.unregisterProducer()
        transport.loseConnection()
        # Keep reading (dataReceived discards) until the connection is gone:
        # TLS finishes closing only once it has read the peer's close_notify
        # or EOF, and a paused reader would leave the socket in CLOSE-WAIT.
        self._update_reading()
        self._start_close_timer(grace)

    def internal_error(self, failure: Failure) -> None:
        self.log.failure("internal error", failure)
        self._waiting = False
        self.reply(wire.err("Internal server error", "SYS/TEMP"))
        self.close("internal error")

    # SessionHandle, for the registry's takeover of idle sessions
    def idle_seconds(self) -> float:
        return self.factory.clock.seconds() - self._last_activity

    def terminate(self, reason: str, *, cross_process: bool = False,
                  by_pid: int | None = None) -> "defer.Deferred[None]":
        """
        End this session without UPDATE (taken over by a new login: in another
        process, C{by_pid}, when C{cross_process}).
        """
        self.end_reason = reason
        if by_pid is None:
            self.event("takeover", cross_process=cross_process)
        else:
            self.event("takeover", cross_process=cross_process, by_pid=by_pid)
        d = self.release_mailbox()
        self.transaction = None
        self._closing = True
        transport: Any = self.transport
        transport.abortConnection()
        return d.addCallback(lambda _: None)

    # ------------------------------------------------------------------
    # Login and TLS, for the state objects

    def authenticated(self, result: tuple[Any, Any, Any], name: str) -> "defer.Deferred[None]":
        """The portal accepted C{name}: open the session and enter TRANSACTION."""
        return open_session(self, result, name, method=self.login.method).addCallback(self._logged_in, name)

    def _logged_in(self, session: MailboxSession | None, name: str) -> None:
        if session is None:
            # Refused (LOGIN-DELAY, answered) or the client has gone.
            self._waiting = False
            if not self._closed:
                self._run()
            return
        self._waiting = False
        self.transaction = Transaction(self, session)
        self.user = sys.intern(name)  # (the store's lock holds the same name: one string)
        self.state = State.TRANSACTION
        self.reader.max_length = wire.MAX_COMMAND_LINE
        # of the AUTHORIZATION state only the login method is kept, in an object shared by
        # every connection that logged in so (the APOP timestamp and the rest are let go)
        self.login = after_login(self.login.method)
        self.factory.registry.register(name, self)
        self._registered = True
        self._stop_login_timer()
        self.touch()
        self.event("login", messages=len(session.listing), tls=self.tls, method=self.login.method)
        self.reply(wire.ok("Logged in, %d messages" % (len(session.listing),)))
        self._run()

    def start_tls(self) -> None:
        """RFC 2595 section 4: TLS now; anything pipelined after STLS was sent in the clear."""
        self._flush()  # the +OK goes out in the clear, before the handshake
        # Discard it (RFC 2595 section 4; the CVE-2011-0411 command injection).
        self.reader.clear()
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.startTLS(self.factory.config.tls_context)
        write_tls_at_once(transport)
        transport.registerProducer(self, True)
        self.tls = True
        self._start_handshake_timer()
        self.event("stls", listener=self.listener)

    def peer_certificate(self) -> Any:
        return peer_certificate(self.transport)

    def send_body(self, transfer: MessageTransfer) -> None:
        self._transfer = transfer

    # ------------------------------------------------------------------
    # Flow control (IPushProducer towards the transport)

    def pauseProducing(self) -> None:
        # Stop answering; reading stops once a little input has piled up
        # (_update_reading).  Not at once: TLS pauses its producer while the
        # handshake is still running, and the handshake needs reading.
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._last_activity = self.factory.clock.seconds()
        self._run()

    def stopProducing(self) -> None:
        self._paused = True

    def _update_reading(self) -> None:
        if self._closed:
            return
        high = max(self.input_high_water, self.reader.max_length + 2)
        # A closing connection reads on (discarding) until it is gone; one over
        # its command rate stops reading until it may go on.
        want = self._closing or (not self._rate_limited and self.reader.buffered < high)
        if want != self._reading:
            self._reading = want
            transport: Any = self.transport
            if want:
                transport.resumeProducing()
            else:
                transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.reader.feed(data)
        if self._scheduled or self._rate_limited:
            # Its turn comes from the fair queue or the rate timer: only buffer now.
            self._update_reading()
            return
        self._run()

    def run_turn(self) -> int:
        """FairScheduler: this connection's turn has come."""
        self._scheduled = False
        return self._run()

    def _rate_resume(self) -> None:
        self._rate_limited = False
        self._run()

    def wait(self) -> None:
        self._waiting = True

    def proceed(self) -> None:
        self._waiting = False
        if not self._closed:
            self._run()

    def _run(self) -> int:
        """Do bounded work: pump body chunks and answer buffered commands in order; how many."""
        if self._running or self._closed:
            return 0
        self._running = True
        handled = 0
        try:
            budget = self.commands_per_turn
            now = 0.0
            while not self._paused and not self._closing and not self._waiting:
                transfer = self._transfer
                if transfer is not None:
                    if transfer.finished:
                        self._transfer = None
                        self._command_done()
                    elif transfer.waiting:
                        break
                    else:
                        transfer.pump()
                    continue
                if self._command is not None:
                    # an answer that came later (login, SASL step, failure delay) is out
                    self._command_done()
                if budget <= 0:
                    if self.reader.buffered:
                        # More is buffered: wait for the next turn in the fair queue.
                        self._scheduled = True
                        self.factory.scheduler.enqueue(self)
                    break
                rate = self._rate
                if rate is not None and self.reader.buffered:
                    now = self.factory.clock.seconds()
                    wait = rate.wait(self._rate_full, now)
                    if wait > 0:
                        self._rate_limited = True
                        if self._turn_call is None or not self._turn_call.active():
                            self._turn_call = self.factory.clock.callLater(wait, self._rate_resume)
                        break
                line = self.reader.next_line()
                if line is None:
                    break
                if rate is not None:
                    # (now: read above, as something was buffered; a pending over-long line's report
                    # comes with nothing buffered)
                    self._rate_full = rate.consume(self._rate_full, now or self.factory.clock.seconds())
                budget -= 1
                handled += 1
                self._handle_line(line)
        finally:
            self._running = False
            self._flush()
        self._update_reading()
        return handled

    def reply(self, response: bytes) -> None:
        """Write a response, its status text in the session's language (RFC 6856 LANG)."""
        self.write(localise(response, self.language))

    def write(self, data: bytes) -> None:
        if not self._closed:
            self.bytes_out += len(data)
            if self.trace is not None:
                self.trace.server(data, self._transfer)
            if not self._running:
                self.transport.write(data)
                return
            # Within a turn: the answers leave together (one write per pipelined batch).
            out = self._out
            if out is None:
                self._out = [data]
            else:
                out.append(data)
            self._out_size += len(data)
            if self._out_size >= self.output_batch:
                self._flush()

    def _flush(self) -> None:
        out = self._out
        if out is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        self._out = None
        self._out_size = 0
        if not self._closed:
            self.transport.write(data)

    def event(self, name: str, **fields: object) -> None:
        if self.trace is not None:
            self.trace = self.trace.event(name, self.user, fields)
        elif self._events is not None and name not in self._events:
            return  # nobody listens for it (the log observer takes no per-command events)
        self.factory.observer.event(name, self, user=self.user, peer=self.peer_host,
                                    session_id=self.session_id, **fields)

    def _wants(self, name: str) -> bool:
        """Whether an event C{name} would reach anyone (so its fields are worth computing)."""
        return self.trace is not None or self._events is None or name in self._events

    # ------------------------------------------------------------------
    # Commands

    def _handle_line(self, line: Union[bytes, wire.LineTooLong]) -> None:
        if self.trace is not None:
            self.trace.client(line, self.login.sasl_pending)
        if self.factory.stopping:
            # A graceful stop (popservice.server.lifecycle): the command is not
            # run, the session ends without UPDATE, so nothing is deleted.
            self.reply(wire.err(SHUTTING_DOWN, "SYS/TEMP"))
            self.close("server shutdown")
            return
        self.touch()
        if isinstance(line, wire.LineTooLong) and line.fatal:
            # Far past any limit (its -ERR is out): no client does that; stop
            # reading it and close within a second.
            self.close("line too long", grace=1.0)
            return
        if self.login.sasl_pending:
            self.login.sasl_line(line)
            return
        if isinstance(line, wire.LineTooLong) or (
                len(line) + 2 > wire.MAX_COMMAND_LINE and line[:5].upper() != b"AUTH "):
            self.bad_command(wire.err("Command line too long"))
            return
        command = wire.parse_command(line)
        if isinstance(command, wire.CommandError):
            self.bad_command(wire.err(command.reason.capitalize()))
            return
        if not legal(self.state, command.keyword, command.spec):
            if self.state is State.TRANSACTION and command.keyword in _LOGIN_COMMANDS:
                self.bad_command(wire.err("Already logged in"))
            else:
                self.bad_command(wire.err("Command not valid in this state"))
            return
        # The command event is sent once its answer is written (L{_command_done}), with its latency.
        self._command = command.keyword
        self._command_at = self._last_activity
        handler: Any = self.transaction if self.state is State.TRANSACTION else self.login
        try:
            response = getattr(handler, "do_" + command.keyword)(command)
        except Exception:
            self.log.failure("command {command} failed", command=command.keyword)
            response = wire.err("Internal server error", "SYS/TEMP")
        if response is not None:
            self.reply(response)
        if not self._waiting and self._transfer is None:
            self._command_done()

    def _command_done(self) -> None:
        """
        The pending command's answer is written (RETR/TOP: the whole body): one
        C{command} event, with C{seconds} since the command was read.
        """
        keyword = self._command
        if keyword is not None:
            self._command = None
            if self._wants("command"):
                seconds = self.factory.clock.seconds() - self._command_at
                self.event("command", command=keyword, seconds=seconds)
            self._command_at = 0.0  # (an idle connection keeps no float for it)

    def bad_command(self, response: bytes) -> None:
        self._bad_commands += 1
        self.event("bad_command")
        policy = self.factory.config.policy
        limit = (policy.max_bad_commands_before_login if self.state is State.AUTHORIZATION
                 else policy.max_bad_commands_after_login)
        self.reply(response)
        if self._bad_commands >= limit:
            self.reply(wire.err("Too many invalid commands, closing connection"))
            self.close("too many bad commands")
