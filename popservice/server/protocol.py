"""
The POP3 server protocol: a thin Twisted shell around L{popservice.wire}.

It feeds received bytes to a L{wire.LineReader}, dispatches each command
through the one table in L{popservice.states}, streams message bodies from the
store with flow control, and owns timeouts and backpressure:

  - the protocol is the transport's streaming producer: when the client stops
    reading and the transport's buffer fills, the protocol stops both sending
    and reading, so a pipelining client that never reads costs bounded memory;
  - at most C{commands_per_turn} commands are handled per reactor turn, so a
    flood of pipelined commands cannot starve other connections.
"""

from __future__ import annotations

import base64
import binascii
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from scramp.utils import saslprep
from twisted.cred.credentials import ICredentials
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.mail import pop3 as twisted_pop3
from twisted.python.failure import Failure
from zope.interface import implementer

from popservice import wire
from popservice.interfaces import (
    IExpiringMailbox,
    IMailbox,
    IMessageStream,
    MailboxInUse,
    MailboxUnavailable,
    MessageGone,
)
from popservice.sasl.base import (
    Authenticated,
    Challenge,
    ISASLServerMechanism,
    MechanismFactory,
    SASLContext,
    SASLStep,
)
from popservice.server.i18n import LANGUAGES, choose, localise, translate
from popservice.server.login import Authorization, Capabilities, UnauthorizedLogin, apop_timestamp
from popservice.server.session import MailboxSession
from popservice.states import State, legal
from popservice.stores.twistedmail import TwistedMailboxAdapter

if TYPE_CHECKING:
    from popservice.server.factory import POP3ServerFactory

#: RFC 5034 section 4: SASL responses may be longer than commands (OAuth tokens).
SASL_LINE = 16384


def _decode_sasl(text: str) -> bytes | None:
    """Strict base64 of a SASL response; C{=} is the empty response (RFC 5034)."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


_LOGIN_COMMANDS = frozenset({"USER", "PASS", "APOP", "AUTH", "STLS"})

#: RFC 1939 section 3: the autologout timer is at least 10 minutes once logged in.
MIN_TRANSACTION_TIMEOUT = 600.0

#: Once the server closes (QUIT, errors), the peer has this long to read the
#: last answer and close its side (a TLS peer: send its close_notify or EOF);
#: then the connection is aborted, so none lingers in CLOSE-WAIT.
CLOSE_GRACE = 10.0


@dataclass
class _Body:
    """A multi-line message body being streamed (RETR or TOP)."""

    stream: IMessageStream
    encoder: wire.BodyEncoder
    top: wire.TopFilter | None
    index: int = 0
    waiting: bool = False
    sent: int = 0


Handler = Callable[["POP3ServerProtocol", wire.Command], bytes | None]


@implementer(IPushProducer, IHandshakeListener)
class POP3ServerProtocol(Protocol):
    """One POP3 connection (RFC 1939, 2449, 2595)."""

    log = Logger()
    factory: "POP3ServerFactory"

    commands_per_turn = 32
    input_high_water = 4096

    state: State
    session: MailboxSession | None
    user: str | None
    end_reason: str

    def __init__(self) -> None:
        # Every attribute is created here, in one order, so instances share
        # their dict keys (a few hundred bytes less per idle connection).
        self.factory = None  # type: ignore[assignment]
        self.transport = None
        self.state = State.AUTHORIZATION
        self.session = None
        self.user = None
        self.end_reason = "disconnected"
        # Before login AUTH lines may carry long initial responses (OAuth
        # tokens; mpop sends them there), so the reader allows SASL_LINE and
        # _handle_line holds every other command to RFC 2449's 255 octets.
        self.reader = wire.LineReader(SASL_LINE)
        self.auth = Authorization(None)
        self.peer_host: str | None = None
        self.tls = False
        self._body: _Body | None = None
        self._waiting = False
        self._paused = False
        self._reading = True
        self._running = False
        self._closed = False
        self._closing = False
        self._bad_commands = 0
        self._turn_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._login_call: IDelayedCall | None = None
        self._close_call: IDelayedCall | None = None
        self._last_activity = 0.0
        self._sasl: ISASLServerMechanism | None = None
        self._sasl_pending = False
        self._login_method = "USER"
        self._rejected = False
        self._registered = False
        self._connected_at = 0.0
        #: RFC 6856: UTF8 mode and the language of response texts
        self.utf8 = False
        self.language = "en"
        self._handshake_call: IDelayedCall | None = None

    # ------------------------------------------------------------------
    # Connection life

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self._set_nodelay(transport)
        peer = transport.getPeer()
        self.peer_host = getattr(peer, "host", None)
        self.tls = ISSLTransport.providedBy(transport)
        config = self.factory.config
        refusal = config.policy.admit(self.peer_host, self.factory.peers)
        if refusal is not None:
            # RFC 2449 section 8: a temporary condition; the client may retry.
            self._rejected = True
            self._closing = True
            self._event("refused", why=refusal)
            transport.write(wire.err(refusal, "SYS/TEMP"))
            transport.loseConnection()
            return
        self.factory.peers.connected(self.peer_host or "")
        if self.tls:
            self._start_handshake_timer()
        if config.apop and self._plaintext_allowed():
            self.auth = Authorization(apop_timestamp(config.hostname))
        transport.registerProducer(self, True)
        self._last_activity = self._connected_at = self.factory.clock.seconds()
        self._reset_idle_timer()
        if config.login_timeout > 0:
            self._login_call = self.factory.clock.callLater(config.login_timeout, self._login_timed_out)
        self.factory.connection_opened(self)
        self._event("connect", tls=self.tls)
        transport.write(self.auth.greeting(config.hostname))

    @staticmethod
    def _set_nodelay(transport: Any) -> None:
        """
        TCP_NODELAY on the real socket, under any TLS wrapper: without it the
        last line of each response waits for the peer's delayed ACK (~40 ms).
        """
        while transport is not None:
            setter = getattr(transport, "setTcpNoDelay", None)
            if setter is not None:
                try:
                    setter(True)
                except (OSError, AttributeError):
                    pass
                return
            get_handle = getattr(transport, "getHandle", None)
            if get_handle is not None:
                handle = get_handle()
                if isinstance(handle, socket.socket):
                    try:
                        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    except OSError:
                        pass
                    return
            transport = getattr(transport, "transport", None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        if self._rejected:
            return
        self.factory.peers.disconnected(self.peer_host or "")
        for call in (self._turn_call, self._idle_call, self._login_call, self._handshake_call,
                     self._close_call):
            if call is not None and call.active():
                call.cancel()
        if self._body is not None:
            self._body.stream.close()
            self._body = None
        if self.session is not None and self.state is not State.UPDATE:
            # A dropped or timed-out connection never reaches UPDATE: nothing is deleted.
            self._release_mailbox()
        stats = self.session.stats if self.session is not None else None
        # One summary line per session, in the spirit of Dovecot's pop3_logout_format.
        listing = self.session.listing if self.session is not None else ()
        self._event("logout", reason=self.end_reason, tls=self.tls, method=self._login_method,
                    seconds=round(self.factory.clock.seconds() - self._connected_at, 3),
                    messages=len(listing), size=sum(m.size for m in listing),
                    retr=stats.retr if stats else 0, retr_bytes=stats.retr_bytes if stats else 0,
                    top=stats.top if stats else 0, top_bytes=stats.top_bytes if stats else 0,
                    deleted=stats.deleted if stats else 0,
                    deleted_bytes=stats.deleted_bytes if stats else 0)
        self.factory.connection_closed(self)

    def _release_mailbox(self) -> "defer.Deferred[Any]":
        session = self.session
        if self.user is not None and self._registered:
            self._registered = False
            self.factory.registry.unregister(self.user, self)
        if session is None:
            return defer.succeed(None)
        d: defer.Deferred[Any] = defer.succeed(None)
        retrieved = sorted(session.retrieved - session.deleted if session.updated else session.retrieved)
        if retrieved and self._expire(self.user) and IExpiringMailbox.providedBy(session.mailbox):
            # RFC 2449 EXPIRE n counts from the first retrieval, finished session or not.
            mailbox: IExpiringMailbox = session.mailbox
            d.addCallback(lambda _: mailbox.record_retrieved(retrieved, self.factory.clock.seconds()))
        d.addCallback(lambda _: session.mailbox.close())
        d.addErrback(lambda f: self.log.failure("closing mailbox failed", f))
        return d

    def _close(self, reason: str, grace: float = CLOSE_GRACE) -> None:
        self.end_reason = reason
        self._closing = True
        transport: Any = self.transport
        # TLS does not close while a producer is registered: unregister first
        # (what is already written is still flushed).
        transport.unregisterProducer()
        transport.loseConnection()
        # Keep reading (dataReceived discards) until the connection is gone:
        # TLS finishes closing only once it has read the peer's close_notify
        # or EOF, and a paused reader would leave the socket in CLOSE-WAIT.
        self._update_reading()
        if self._close_call is None and not self._closed:
            self._close_call = self.factory.clock.callLater(grace, self._close_timed_out)

    def _close_timed_out(self) -> None:
        if not self._closed:
            transport: Any = self.transport
            transport.abortConnection()

    # SessionHandle, for the registry's takeover of idle sessions
    def idle_seconds(self) -> float:
        return self.factory.clock.seconds() - self._last_activity

    def terminate(self, reason: str) -> "defer.Deferred[None]":
        """End this session without UPDATE (taken over by a new login)."""
        self.end_reason = reason
        self._event("takeover")
        d = self._release_mailbox()
        self.session = None
        self._closing = True
        transport: Any = self.transport
        transport.abortConnection()
        return d.addCallback(lambda _: None)

    # ------------------------------------------------------------------
    # Timeouts

    def _start_handshake_timer(self) -> None:
        """A TLS handshake must finish within a few seconds; bytes do not extend it."""
        timeout = self.factory.config.policy.handshake_timeout
        if timeout > 0:
            self._handshake_call = self.factory.clock.callLater(timeout, self._handshake_timed_out)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done."""
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._event("tls_established")

    def _handshake_timed_out(self) -> None:
        self.end_reason = "TLS handshake timeout"
        transport: Any = self.transport
        transport.abortConnection()

    def _idle_timeout(self) -> float:
        timeout = float(self.factory.config.timeout)
        if self.state is State.TRANSACTION:
            return max(timeout, MIN_TRANSACTION_TIMEOUT)
        return timeout

    def _reset_idle_timer(self) -> None:
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
        self._reply(wire.err("Disconnected for inactivity", "SYS/TEMP"))
        self._abort_soon("idle timeout")

    def _login_timed_out(self) -> None:
        if self.state is State.AUTHORIZATION:
            self._reply(wire.err("Login took too long", "AUTH"))
            self._abort_soon("login timeout")

    def _abort_soon(self, reason: str) -> None:
        """Close; if the peer does not read the last words within 5 s, abort."""
        self._close(reason, grace=5.0)

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
        # A closing connection reads on (discarding) until it is gone.
        want = self._closing or self.reader.buffered < high
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
        self._run()

    def _run(self) -> None:
        """Do bounded work: pump body chunks and answer buffered commands in order."""
        if self._running or self._closed:
            return
        self._running = True
        try:
            budget = self.commands_per_turn
            while not self._paused and not self._closing and not self._waiting:
                if self._body is not None:
                    if self._body.waiting:
                        break
                    self._pump(self._body)
                    continue
                if budget <= 0:
                    if self._turn_call is None or not self._turn_call.active():
                        self._turn_call = self.factory.clock.callLater(0, self._run)
                    break
                line = self.reader.next_line()
                if line is None:
                    break
                budget -= 1
                self._handle_line(line)
        finally:
            self._running = False
        self._update_reading()

    def _reply(self, response: bytes) -> None:
        """Write a response, its status text in the session's language (RFC 6856 LANG)."""
        self._write(localise(response, self.language))

    def _write(self, data: bytes) -> None:
        if not self._closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def _event(self, name: str, **fields: object) -> None:
        self.factory.observer.event(name, self, user=self.user, peer=self.peer_host, **fields)

    # ------------------------------------------------------------------
    # Commands

    def _handle_line(self, line: Union[bytes, wire.LineTooLong]) -> None:
        self._reset_idle_timer()
        if self._sasl_pending:
            if isinstance(line, wire.LineTooLong):
                self._end_sasl()
                self._bad_command(wire.err("Authentication response too long", "AUTH"))
            else:
                self._sasl_line(line)
            return
        if isinstance(line, wire.LineTooLong) or (
                len(line) + 2 > wire.MAX_COMMAND_LINE and line[:5].upper() != b"AUTH "):
            self._bad_command(wire.err("Command line too long"))
            return
        command = wire.parse_command(line)
        if isinstance(command, wire.CommandError):
            self._bad_command(wire.err(command.reason.capitalize()))
            return
        if not legal(self.state, command.keyword):
            if self.state is State.TRANSACTION and command.keyword in _LOGIN_COMMANDS:
                self._bad_command(wire.err("Already logged in"))
            else:
                self._bad_command(wire.err("Command not valid in this state"))
            return
        self._event("command", command=command.keyword)
        try:
            response = HANDLERS[command.keyword](self, command)
        except Exception:
            self.log.failure("command {command} failed", command=command.keyword)
            response = wire.err("Internal server error", "SYS/TEMP")
        if response is not None:
            self._reply(response)

    def _bad_command(self, response: bytes) -> None:
        self._bad_commands += 1
        policy = self.factory.config.policy
        limit = (policy.max_bad_commands_before_login if self.state is State.AUTHORIZATION
                 else policy.max_bad_commands_after_login)
        self._reply(response)
        if self._bad_commands >= limit:
            self._reply(wire.err("Too many invalid commands, closing connection"))
            self._close("too many bad commands")

    def _plaintext_allowed(self) -> bool:
        return self.factory.config.policy.plaintext_allowed(self.peer_host, self.tls)

    def capabilities(self) -> Capabilities:
        config = self.factory.config
        extra = []
        delay = self._login_delay(self.user)
        if delay:
            extra.append("LOGIN-DELAY %d" % (delay,))
        expire = self._expire(self.user)
        extra.append("EXPIRE %s" % ("NEVER" if expire is None else expire))
        if self.state is State.AUTHORIZATION:
            extra.append("UTF8 USER")
        extra.append("LANG")
        return Capabilities(user=self._plaintext_allowed(),
                            stls=config.tls_context is not None and not self.tls,
                            sasl=tuple(self._mechanisms()),
                            implementation=config.implementation, extra=extra)

    # -- AUTHORIZATION (RFC 1939 section 4, 7; RFC 2449; RFC 2595)

    def do_CAPA(self, command: wire.Command) -> bytes:
        """RFC 2449 section 5: CAPA, legal in AUTHORIZATION and TRANSACTION."""
        return self.capabilities().response(self.state is State.TRANSACTION)

    def do_QUIT(self, command: wire.Command) -> bytes | None:
        """RFC 1939 section 4 and 6: QUIT; in TRANSACTION it enters UPDATE."""
        if self.state is State.AUTHORIZATION:
            self._reply(wire.ok("Bye"))
            self._close("quit")
            return None
        self._update()
        return None

    def do_USER(self, command: wire.Command) -> bytes:
        """RFC 1939 section 7: USER name."""
        if not self._plaintext_allowed():
            return wire.err("Plaintext authentication disallowed on non-secure connections, use STLS",
                            "AUTH")
        name = self._prepare(str(command.args[0]))
        if name is None:
            return wire.err("Invalid characters in argument")
        return self.auth.user_command(name)

    def do_PASS(self, command: wire.Command) -> bytes | None:
        """RFC 1939 section 7: PASS string."""
        if not self._plaintext_allowed():
            return wire.err("Plaintext authentication disallowed on non-secure connections, use STLS",
                            "AUTH")
        password = self._prepare(str(command.args[0]))
        if password is None:
            self.auth.user = None
            return wire.err("Invalid characters in argument")
        credentials = self.auth.pass_credentials(password)
        if isinstance(credentials, bytes):
            return credentials
        self._login(credentials, credentials.username)
        return None

    def do_APOP(self, command: wire.Command) -> bytes | None:
        """RFC 1939 section 7: APOP name digest."""
        credentials = self.auth.apop_credentials(str(command.args[0]), str(command.args[1]))
        if isinstance(credentials, bytes):
            return credentials
        self._login(credentials, credentials.username, via="APOP")
        return None

    def _mechanisms(self) -> dict[str, MechanismFactory]:
        """The SASL mechanisms usable on this connection (plaintext ones need TLS or trust)."""
        allowed = self._plaintext_allowed()
        return {name: factory for name, factory in self.factory.config.sasl.items()
                if allowed or not getattr(factory, "plaintext", False)}

    def do_AUTH(self, command: wire.Command) -> bytes | None:
        """RFC 5034 section 4: AUTH mechanism [initial-response]; bare AUTH lists mechanisms."""
        mechanisms = self._mechanisms()
        if not command.args:
            return wire.multiline(wire.ok("Mechanisms follow"), [m.encode("ascii") for m in mechanisms])
        name = str(command.args[0]).upper()
        factory = mechanisms.get(name)
        if factory is None:
            if name in self.factory.config.sasl:
                return wire.err("Plaintext authentication disallowed on non-secure connections, use STLS",
                                "AUTH")
            return wire.err("Unsupported authentication mechanism")
        initial: bytes | None = None
        if len(command.args) > 1:
            decoded = _decode_sasl(str(command.args[1]))
            if decoded is None:
                return wire.err("Invalid base64 data in initial response")
            initial = decoded
        self._sasl = factory(self._sasl_context())
        self._sasl_step(initial)
        return None

    def _sasl_context(self) -> SASLContext:
        transport: Any = self.transport
        certificate = None
        if self.tls:
            get_peer = getattr(transport, "getPeerCertificate", None)
            if get_peer is not None:
                try:
                    certificate = get_peer()
                except Exception:
                    certificate = None
        return SASLContext(hostname=self.factory.config.hostname, tls=self.tls, peer=self.peer_host,
                           peer_certificate=certificate,
                           checkers=self.factory.all_checkers(),
                           services=self.factory.config.sasl_services)

    def _sasl_line(self, line: bytes) -> None:
        """A client response inside an AUTH exchange (RFC 5034 section 4)."""
        if line == b"*":
            self._end_sasl()
            self._reply(wire.err("Authentication cancelled", "AUTH"))
            return
        decoded = _decode_sasl(line.decode("ascii", "replace"))
        if decoded is None:
            self._end_sasl()
            self._bad_command(wire.err("Invalid base64 data in response"))
            return
        self._sasl_step(decoded)

    def _end_sasl(self) -> None:
        self._sasl = None
        self._sasl_pending = False

    def _sasl_step(self, response: bytes | None) -> None:
        mechanism = self._sasl
        assert mechanism is not None
        self._waiting = True
        self._sasl_pending = False
        d: defer.Deferred[Any] = defer.maybeDeferred(mechanism.step, response)
        d.addCallbacks(self._sasl_result, self._sasl_error)

    def _sasl_result(self, result: SASLStep) -> None:
        if self._closed:
            return
        if isinstance(result, Challenge):
            self._waiting = False
            self._sasl_pending = True
            self._write(b"+ " + base64.b64encode(result.data) + wire.CRLF)
            self._run()
            return
        name = getattr(self._sasl, "name", "SASL")
        self._end_sasl()
        if isinstance(result, Authenticated):
            username = getattr(result.credentials, "username", b"")
            if isinstance(username, str):
                username = username.encode("utf-8")
            self._login(result.credentials, username, via=name)
            return
        self._login_failed(Failure(UnauthorizedLogin(result.reason)), result.user or "", via=name)

    def _sasl_error(self, failure: Failure) -> None:
        self.log.failure("SASL mechanism failed", failure)
        self._end_sasl()
        self._waiting = False
        self._reply(wire.err("Authentication failed", "SYS/TEMP"))
        self._run()

    def do_STLS(self, command: wire.Command) -> bytes | None:
        """RFC 2595 section 4: STLS, only once, only before login."""
        context = self.factory.config.tls_context
        if self.tls:
            return wire.err("Already using TLS")
        if context is None:
            return wire.err("TLS is not available")
        self._reply(wire.ok("Begin TLS negotiation now"))
        # Anything pipelined after STLS was sent in the clear: discard it
        # (RFC 2595 section 4; the CVE-2011-0411 command injection).
        self.reader.clear()
        self.auth.user = None
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.startTLS(context)
        transport.registerProducer(self, True)
        self.tls = True
        self._start_handshake_timer()
        self._event("stls")
        return None

    def do_UTF8(self, command: wire.Command) -> bytes:
        """RFC 6856 section 3: UTF-8 user names and passwords (SASLprep) from now on."""
        self.utf8 = True
        return wire.ok("UTF8 mode enabled")

    def do_LANG(self, command: wire.Command) -> bytes:
        """RFC 6856 section 4: list the languages, or choose one for response texts."""
        if not command.args:
            return wire.multiline(wire.ok("Language listing follows"),
                                  [("%s %s" % item).encode("utf-8") for item in LANGUAGES.items()])
        language = choose(str(command.args[0]))
        if language is None:
            return wire.err("Unknown language")
        self.language = language
        return wire.ok("%s %s" % (language, translate("Language changed", language)))

    def _prepare(self, text: str) -> str | None:
        """In UTF8 mode, user names and passwords are SASLprep-ed (RFC 6856 section 3, RFC 4013)."""
        if not self.utf8:
            return text
        try:
            return str(saslprep(text))
        except (ValueError, UnicodeError):
            return None

    def _login(self, credentials: ICredentials, username: bytes, via: str = "USER") -> None:
        """Hand credentials to the portal; on success open the mailbox (TRANSACTION)."""
        self._waiting = True
        self._login_method = via
        name = username.decode("utf-8", "replace")
        d: defer.Deferred[Any] = defer.maybeDeferred(
            self.factory.portal.login, credentials, None, IMailbox, twisted_pop3.IMailbox)
        d.addCallback(self._open_session, name)
        d.addCallbacks(self._login_succeeded, self._login_failed, callbackArgs=(name,),
                       errbackArgs=(name, via))
        d.addErrback(self._internal_error)

    def _open_session(self, result: tuple[Any, Any, Callable[[], None]], name: str
                      ) -> "defer.Deferred[MailboxSession]":
        interface, avatar, logout = result
        mailbox: IMailbox
        if interface is IMailbox:
            mailbox = avatar
        else:
            mailbox = TwistedMailboxAdapter(avatar, logout)
        d: defer.Deferred[Any] = defer.succeed(None)
        days = self._expire(name)
        if days and IExpiringMailbox.providedBy(mailbox):
            # RFC 2449 EXPIRE n: messages retrieved n days ago go before the listing is frozen.
            expiring: IExpiringMailbox = mailbox
            def expired(count: int) -> None:
                if count:
                    self._event("expired", attempted=name, count=count)

            d.addCallback(lambda _: expiring.expire(days, self.factory.clock.seconds()))
            d.addCallback(expired)
        d.addCallback(lambda _: mailbox.listing())

        def failed(f: Failure) -> Failure:
            defer.maybeDeferred(mailbox.close)
            return f

        d.addCallbacks(lambda listing: MailboxSession(mailbox, list(listing)), failed)
        return d

    def _login_succeeded(self, session: MailboxSession, name: str) -> None:
        self._waiting = False
        if self._closed:
            # The client went away while we opened the mailbox.
            defer.maybeDeferred(session.mailbox.close)
            return
        now = self.factory.clock.seconds()
        delay = self._login_delay(name)
        last = self.factory.last_login.get(name)
        if delay > 0 and last is not None and now - last < delay:
            # RFC 2449 section 8.1.1: checked after the credentials, enforced.
            defer.maybeDeferred(session.mailbox.close)
            self._event("login_delay", attempted=name, wait=int(delay - (now - last)))
            self._reply(wire.err("Minimum time between logins not reached", "LOGIN-DELAY"))
            self._run()
            return
        self.factory.last_login[name] = now
        self.session = session
        self.user = name
        self.state = State.TRANSACTION
        self.reader.max_length = wire.MAX_COMMAND_LINE
        self.factory.registry.register(name, self)
        self._registered = True
        if self._login_call is not None and self._login_call.active():
            self._login_call.cancel()
        self._reset_idle_timer()
        self._event("login", messages=len(session.listing), tls=self.tls, method=self._login_method)
        self._reply(wire.ok("Logged in, %d messages" % (len(session.listing),)))
        self._run()

    def _user_setting(self, user: str | None, key: str) -> str | None:
        """A per-user setting from a checker that knows user records (passwd-file extra fields)."""
        if user is None:
            return None
        for checker in self.factory.all_checkers():
            record = getattr(checker, "record", None)
            if record is None:
                continue
            found = record(user)
            value = getattr(found, "extra", {}).get(key) if found is not None else None
            if value is not None:
                return str(value)
        return None

    def _login_delay(self, user: str | None) -> int:
        value = self._user_setting(user, "login_delay")
        if value is not None and value.isdigit():
            return int(value)
        return self.factory.config.policy.login_delay

    def _expire(self, user: str | None) -> int | None:
        value = self._user_setting(user, "expire")
        expire = self.factory.config.policy.expire
        if value is not None:
            expire = int(value) if value.isdigit() else None
        return expire

    def _login_failed(self, failure: Failure, name: str, via: str = "USER") -> None:
        if failure.check(UnauthorizedLogin):
            self.auth.failures += 1
            ip_failures = self.factory.peers.failed(self.peer_host or "", self.factory.clock.seconds())
            self._event("login_failed", attempted=name, failures=self.auth.failures,
                        ip_failures=ip_failures, method=via)
            # The delay grows per failure on this connection and from this
            # address; a correct password is never delayed (no lock-out by others).
            delay = self.factory.config.policy.delay_after(max(self.auth.failures, ip_failures))
            if delay > 0:
                self.factory.clock.callLater(delay, self._answer_failed_login)
            else:
                self._answer_failed_login()
            return
        self._waiting = False
        if failure.check(MailboxInUse):
            self._reply(wire.err("Mailbox is locked by another session", "IN-USE"))
        elif failure.check(MailboxUnavailable):
            self.log.warn("mailbox for {user} unavailable: {why}", user=name, why=failure.getErrorMessage())
            self._reply(wire.err("Mailbox is unavailable", "SYS/TEMP"))
        else:
            self.log.failure("login of {user} failed", failure, user=name)
            self._reply(wire.err("Internal server error", "SYS/TEMP"))
        self._run()

    def _answer_failed_login(self) -> None:
        self._waiting = False
        if self._closed:
            return
        self._reply(wire.err("Authentication failed", "AUTH"))
        if self.auth.failures >= self.factory.config.policy.max_failures:
            self._reply(wire.err("Too many failed logins, closing connection"))
            self._close("too many failed logins")
            return
        self._run()

    def _internal_error(self, failure: Failure) -> None:
        self.log.failure("internal error", failure)
        self._waiting = False
        self._reply(wire.err("Internal server error", "SYS/TEMP"))
        self._close("internal error")

    # -- TRANSACTION (RFC 1939 section 5 and 7)

    def _session(self) -> MailboxSession:
        assert self.session is not None
        return self.session

    def do_STAT(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: STAT."""
        return self._session().stat()

    def do_LIST(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: LIST [msg]."""
        return self._session().list(int(command.args[0]) if command.args else None)

    def do_UIDL(self, command: wire.Command) -> bytes:
        """RFC 1939 section 7: UIDL [msg]."""
        return self._session().uidl(int(command.args[0]) if command.args else None)

    def do_DELE(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: DELE msg."""
        return self._session().dele(int(command.args[0]))

    def do_RSET(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: RSET."""
        return self._session().rset()

    def do_NOOP(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: NOOP."""
        return wire.ok()

    def do_RETR(self, command: wire.Command) -> bytes | None:
        """RFC 1939 section 5: RETR msg, streamed."""
        return self._send_message(int(command.args[0]), None)

    def do_TOP(self, command: wire.Command) -> bytes | None:
        """RFC 1939 section 7: TOP msg n."""
        return self._send_message(int(command.args[0]), int(command.args[1]))

    def _send_message(self, number: int, lines: int | None) -> bytes | None:
        session = self._session()
        index = session.message(number)
        if isinstance(index, bytes):
            return index
        self._waiting = True
        d: defer.Deferred[Any] = defer.maybeDeferred(session.mailbox.open, index)

        def opened(stream: IMessageStream) -> None:
            self._waiting = False
            if self._closed:
                stream.close()
                return
            size = session.listing[index].size
            if lines is None:
                session.stats.retr += 1
                self._reply(wire.ok("%d octets" % (size,)))
            else:
                session.stats.top += 1
                self._reply(wire.ok("Top of message follows"))
            top = wire.TopFilter(lines) if lines is not None else None
            self._body = _Body(stream, wire.BodyEncoder(), top, index)
            self._run()

        def failed(failure: Failure) -> None:
            self._waiting = False
            if failure.check(MessageGone):
                self.log.warn("message {n} of {user} is gone", n=number, user=self.user)
                self._reply(wire.err("Message is no longer available", "SYS/TEMP"))
            else:
                self.log.failure("opening message {n} of {user} failed", failure, n=number, user=self.user)
                self._reply(wire.err("Cannot read message", "SYS/TEMP"))
            self._run()

        d.addCallbacks(opened, failed)
        return None

    def _pump(self, body: _Body) -> None:
        """Read one chunk from the store and send it; continues from _run."""
        body.waiting = True
        synchronous = True

        def got(data: Union[bytes, Failure]) -> None:
            body.waiting = False
            self._body_chunk(body, data)
            if not synchronous:
                self._run()

        d: defer.Deferred[Any] = defer.maybeDeferred(body.stream.read)
        d.addBoth(got)
        synchronous = False

    def _body_chunk(self, body: _Body, data: Union[bytes, Failure]) -> None:
        if self._body is not body or self._closed:
            return
        if isinstance(data, Failure):
            self.log.failure("reading a message failed mid-transfer", data)
            body.stream.close()
            self._body = None
            # The +OK is out; the only honest signal left is closing.
            self._close("message read error")
            return
        session = self._session()
        finished = not data
        if data:
            if body.top is not None:
                data = body.top.feed(data)
                finished = body.top.done
            out = body.encoder.encode(data)
            body.sent += len(out)
            self._write(out)
        if finished:
            tail = body.encoder.finish()
            body.sent += len(tail)
            self._write(tail)
            body.stream.close()
            self._body = None
            if body.top is None:
                session.stats.retr_bytes += body.sent
                session.retrieved.add(body.index)
            else:
                session.stats.top_bytes += body.sent
            self._reset_idle_timer()

    def _update(self) -> None:
        """RFC 1939 section 6: UPDATE; the lock is released before the answer."""
        session = self._session()
        self.state = State.UPDATE
        self._waiting = True
        if self._expire(self.user) == 0:
            # RFC 2449 EXPIRE 0: a message may not be left on the server once retrieved.
            session.deleted |= session.retrieved

        def failed(failure: Failure) -> bytes:
            self.log.failure("UPDATE failed for {user}", failure, user=self.user)
            self._event("update_failed")
            return wire.err("Deleting messages failed", "SYS/TEMP")

        d = session.update().addErrback(failed)

        def answer(response: bytes) -> "defer.Deferred[None]":
            return self._release_mailbox().addCallback(lambda _: self._after_update(response))

        d.addCallback(answer)

    def _after_update(self, response: bytes) -> None:
        self._waiting = False
        self._reply(response)
        self._close("quit")


HANDLERS: dict[str, Handler] = {
    "CAPA": POP3ServerProtocol.do_CAPA,
    "QUIT": POP3ServerProtocol.do_QUIT,
    "USER": POP3ServerProtocol.do_USER,
    "PASS": POP3ServerProtocol.do_PASS,
    "APOP": POP3ServerProtocol.do_APOP,
    "AUTH": POP3ServerProtocol.do_AUTH,
    "STLS": POP3ServerProtocol.do_STLS,
    "UTF8": POP3ServerProtocol.do_UTF8,
    "LANG": POP3ServerProtocol.do_LANG,
    "STAT": POP3ServerProtocol.do_STAT,
    "LIST": POP3ServerProtocol.do_LIST,
    "UIDL": POP3ServerProtocol.do_UIDL,
    "DELE": POP3ServerProtocol.do_DELE,
    "RSET": POP3ServerProtocol.do_RSET,
    "NOOP": POP3ServerProtocol.do_NOOP,
    "RETR": POP3ServerProtocol.do_RETR,
    "TOP": POP3ServerProtocol.do_TOP,
}
