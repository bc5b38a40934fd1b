"""
An asynchronous POP3 client protocol with a Deferred API.

Bytes go through L{popservice.wire}: status lines through a L{LineReader},
multi-line bodies through a L{BodyDecoder} fed raw chunks (no per-line
callback, no line length limit on content).  Commands wait in a FIFO, each
with its Deferred; when the server advertises PIPELINING (RFC 2449 section
6.6) in the TRANSACTION state, several commands are written before their
answers arrive, otherwise one at a time.

    greeting = yield client.greeting        # Response; client.apop_timestamp
    caps = yield client.capabilities()      # Capabilities
    yield client.starttls(contextFactory)   # RFC 2595, CAPA re-read
    yield client.login(credentials)         # strongest of SASL / APOP / USER+PASS
    count, size = yield client.stat()
    yield client.retrieve(1, consumer)      # streams; without consumer: bytes
    yield client.quit()
"""

from __future__ import annotations

import base64
import binascii
import types
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import md5
from typing import Any, Union, cast

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, ITLSTransport
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from popservice import wire

# Errors and credentials are shared with the Twisted-free engine; re-exported here.
from popservice.client.common import (
    AuthError,
    Credentials,
    InUseError,
    LoginDelayError,
    NoMechanismError,
    POP3ClientError,
    POP3Error,
    POP3ProtocolError,
    SysPermError,
    SysTempError,
    TLSRequiredError,
    apop_timestamp,
    choose_login,
    error_for,
    parse_listing,
)
from popservice.sasl.client import (
    ClientMechanism,
    SASLError,
)

__all__ = [
    "AuthError", "Capabilities", "Credentials", "InUseError", "LoginDelayError",
    "NoMechanismError", "POP3Client", "POP3ClientError", "POP3Error", "POP3ProtocolError", "SysPermError",
    "SysTempError", "TLSRequiredError", "Consumer",
]

#: A status line longer than this is a protocol error (RFC 2449 says 512).
MAX_STATUS_LINE = 64 * 1024
#: A multi-line answer collected in memory (LIST, UIDL, CAPA) is capped.
MAX_COLLECTED = 256 * 1024 * 1024


# --------------------------------------------------------------------------
# Values

@dataclass(frozen=True)
class Capabilities:
    """A parsed CAPA answer (RFC 2449 section 6)."""

    #: tag (upper case) -> its arguments, in server order
    tags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lines: tuple[str, ...] = ()

    @classmethod
    def parse(cls, lines: Sequence[bytes]) -> "Capabilities":
        tags: dict[str, tuple[str, ...]] = {}
        text = []
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            text.append(line)
            if line.upper().startswith("IMPLEMENTATION"):
                tags["IMPLEMENTATION"] = (line[len("IMPLEMENTATION"):].strip(),)
                continue
            words = line.split()
            tags[words[0].upper()] = tuple(words[1:])
        return cls(tags, tuple(text))

    def __contains__(self, tag: object) -> bool:
        return isinstance(tag, str) and tag.upper() in self.tags

    @property
    def sasl(self) -> tuple[str, ...]:
        return tuple(m.upper() for m in self.tags.get("SASL", ()))

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.tags

    @property
    def stls(self) -> bool:
        return "STLS" in self.tags

    @property
    def user(self) -> bool:
        return "USER" in self.tags

    @property
    def uidl(self) -> bool:
        return "UIDL" in self.tags

    @property
    def top(self) -> bool:
        return "TOP" in self.tags

    @property
    def resp_codes(self) -> bool:
        return "RESP-CODES" in self.tags

    @property
    def implementation(self) -> str | None:
        v = self.tags.get("IMPLEMENTATION")
        return v[0] if v else None

    def _seconds(self, tag: str) -> Union[int, str, None]:
        v = self.tags.get(tag)
        if not v:
            return None
        if v[0].upper() == "NEVER":
            return "NEVER"
        try:
            return int(v[0])
        except ValueError:
            return None

    @property
    def login_delay(self) -> int | None:
        """Seconds between logins (RFC 2449 6.5), C{None} when not announced."""
        v = self._seconds("LOGIN-DELAY")
        return v if isinstance(v, int) else None

    @property
    def expire(self) -> Union[int, str, None]:
        """Days messages are kept (RFC 2449 6.7): an int, C{"NEVER"} or C{None}."""
        return self._seconds("EXPIRE")


@dataclass(frozen=True)
class ListEntry:
    number: int
    size: int


@dataclass(frozen=True)
class UidlEntry:
    number: int
    uid: str


# --------------------------------------------------------------------------
# Consumers

#: A message sink: a callable taking chunks, or a Twisted IConsumer.
Consumer = Union[Callable[[bytes], object], IConsumer]


class CRLFToLF:
    """Convert CRLF to LF in a chunked stream (a CR split from its LF is held back)."""

    def __init__(self) -> None:
        self._held = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held:
            chunk = b"\r" + chunk
            self._held = False
        if chunk.endswith(b"\r"):
            self._held = True
            chunk = chunk[:-1]
        return wire.crlf_to_lf(chunk)

    def finish(self) -> bytes:
        if self._held:
            self._held = False
            return b"\r"
        return b""


#: sink types that are never IConsumers: plain functions and bound methods
_PLAIN_CALLABLES = (types.BuiltinMethodType, types.MethodType, types.FunctionType)


def _none(_: object) -> None:
    return None


def _as_writer(consumer: Consumer) -> Callable[[bytes], object]:
    if IConsumer.providedBy(consumer):
        c: Any = consumer
        return c.write  # type: ignore[no-any-return]
    assert callable(consumer)
    return consumer


# --------------------------------------------------------------------------
# The protocol

class _Command:
    """One command in the FIFO: its line, its Deferred and how to read its answer."""

    def __init__(self, keyword: str, line: bytes, multiline: bool,
                 sink: Callable[[bytes], object] | None = None,
                 barrier: bool = False, login: bool = False) -> None:
        self.keyword = keyword
        self.line = line
        self.multiline = multiline
        self.sink = sink
        self.barrier = barrier
        self.login = login
        self.deferred: defer.Deferred[Any] = defer.Deferred()
        self.response: wire.Response | None = None
        self.collected: list[bytes] = []
        self.collected_size = 0
        #: AUTH: called with each decoded challenge, returns the answer line
        self.on_challenge: Callable[[bytes], bytes] | None = None
        #: STLS: run on +OK before anything else is read
        self.on_ok: Callable[[], None] | None = None
        #: convert CRLF to LF when streaming to a sink
        self.to_lf: CRLFToLF | None = None

    def feed(self, data: bytes) -> None:
        if self.to_lf is not None:
            data = self.to_lf.feed(data)
        if not data:
            return
        if self.sink is not None:
            self.sink(data)
        else:
            self.collected_size += len(data)
            if self.collected_size > MAX_COLLECTED:
                raise POP3ProtocolError(f"{self.keyword} answer too large to collect")
            self.collected.append(data)

    def finish_body(self) -> None:
        if self.to_lf is not None:
            tail = self.to_lf.finish()
            self.to_lf = None
            if tail:
                self.feed(tail)

    def body(self) -> bytes:
        return b"".join(self.collected)


#: a LIST/UIDL body where every line is "<digits> <printable token>"


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)


class POP3Client(Protocol, TimeoutMixin):
    """
    The protocol.  Everything public returns a Deferred.  A failure is a
    L{POP3Error} (server said C{-ERR}), a L{POP3ProtocolError}, or the reason
    the connection was lost.
    """

    #: seconds without a byte from the server while commands wait (None: forever)
    timeout: float | None = None

    def __init__(self) -> None:
        self.greeting: defer.Deferred[wire.Response] = defer.Deferred()
        self.greeting_response: wire.Response | None = None
        self.apop_timestamp: bytes | None = None
        self.capa: Capabilities | None = None
        self.capa_before_tls: Capabilities | None = None
        self.tls = False
        self.logged_in = False
        self.mechanism_used: str | None = None
        self.pipelining_enabled = True
        self._reader = wire.LineReader(MAX_STATUS_LINE)
        self._decoder: wire.BodyDecoder | None = None
        self._queue: deque[_Command] = deque()
        self._inflight: deque[_Command] = deque()
        self._closed: Failure | None = None
        self._lost: defer.Deferred[None] = defer.Deferred()
        self._quitting = False

    @property
    def _t(self) -> Any:
        """The transport, untyped (zope interfaces defeat mypy here)."""
        return self.transport

    # -- connection events ---------------------------------------------------

    def connectionMade(self) -> None:
        if self.timeout is not None:
            self.setTimeout(self.timeout)  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        if self._closed is not None:
            return
        if self.timeout is not None:
            self.resetTimeout()  # type: ignore[no-untyped-call]
        try:
            if self._decoder is not None:
                self._body_data(data)
            else:
                self._reader.feed(data)
            self._process()
        except POP3ProtocolError as e:
            self._fail(_failure(e))
        except SASLError as e:
            self._fail(_failure(e))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        if reason is None:
            reason = _failure(ConnectionError("connection lost"))
        if self._closed is None:
            self._closed = reason
        self._fail_all(self._closed)
        if not self._lost.called:
            self._lost.callback(None)

    def timeoutConnection(self) -> None:
        if self._inflight or not self.greeting.called:
            self._fail(_failure(POP3ProtocolError("server timed out")))
        else:
            self.resetTimeout()  # type: ignore[no-untyped-call]

    def when_closed(self) -> "defer.Deferred[None]":
        """A Deferred fired once the connection is gone."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._lost.called:
            d.callback(None)
        else:
            def fire(result: object) -> object:
                d.callback(None)
                return result

            self._lost.addBoth(fire)
        return d

    def _fail(self, reason: Failure) -> None:
        if self._closed is None:
            self._closed = reason
        self._fail_all(reason)
        if self.transport is not None:
            self._t.abortConnection()

    def _fail_all(self, reason: Failure) -> None:
        if not self.greeting.called:
            self.greeting.errback(reason)
        pending = list(self._inflight) + list(self._queue)
        self._inflight.clear()
        self._queue.clear()
        self._decoder = None
        for cmd in pending:
            if not cmd.deferred.called:
                cmd.deferred.errback(reason)

    # -- reading -----------------------------------------------------------------

    def _process(self) -> None:
        while self._decoder is None and self._closed is None:
            line = self._reader.next_line()
            if line is None:
                return
            if isinstance(line, wire.LineTooLong):
                raise POP3ProtocolError(f"status line longer than {MAX_STATUS_LINE} octets")
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not self.greeting.called:
            self._greeting(line)
            return
        if not self._inflight:
            if self._quitting:
                return
            raise POP3ProtocolError(f"unexpected line from server: {line[:80]!r}")
        cmd = self._inflight[0]
        if cmd.on_challenge is not None and (line == b"+" or line.startswith(b"+ ")):
            self._challenge(cmd, line[2:])
            return
        response = wire.parse_response(line)
        if response is None:
            raise POP3ProtocolError(f"not a POP3 status line: {line[:80]!r}")
        cmd.response = response
        if response.ok and cmd.multiline:
            self._decoder = wire.BodyDecoder()
            rest = self._reader.take_buffer()
            if rest:
                self._body_data(rest)
            return
        self._inflight.popleft()
        if response.ok:
            if cmd.on_ok is not None:
                cmd.on_ok()
            cmd.deferred.callback(response)
        else:
            cmd.deferred.errback(error_for(response, cmd.keyword, cmd.login))
        self._pump()

    def _body_data(self, data: bytes) -> None:
        decoder = self._decoder
        assert decoder is not None
        cmd = self._inflight[0]
        out = decoder.feed(data)
        if out:
            cmd.feed(out)
        if decoder.done:
            self._decoder = None
            trailing = decoder.trailing
            self._inflight.popleft()
            cmd.finish_body()
            cmd.deferred.callback(cmd)
            if trailing:
                self._reader.feed(trailing)
            self._pump()

    def _greeting(self, line: bytes) -> None:
        response = wire.parse_response(line)
        if response is None:
            raise POP3ProtocolError(f"not a POP3 greeting: {line[:80]!r}")
        self.greeting_response = response
        if not response.ok:
            self.greeting.errback(error_for(response, "greeting"))
            if self.transport is not None:
                self._t.loseConnection()
            return
        self.apop_timestamp = apop_timestamp(line)
        self.greeting.callback(response)

    def _challenge(self, cmd: _Command, encoded: bytes) -> None:
        assert cmd.on_challenge is not None
        try:
            challenge = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            self._t.write(b"*\r\n")
            return
        try:
            answer = cmd.on_challenge(challenge)
        except SASLError:
            self._t.write(b"*\r\n")
            raise
        self._t.write(base64.b64encode(answer) + wire.CRLF)

    # -- sending -----------------------------------------------------------------

    def _can_pipeline(self) -> bool:
        return (self.pipelining_enabled and self.logged_in
                and self.capa is not None and self.capa.pipelining)

    def _pump(self) -> None:
        while self._queue and self._closed is None:
            cmd = self._queue[0]
            if self._inflight and (
                    cmd.barrier or self._inflight[-1].barrier or not self._can_pipeline()):
                return
            self._queue.popleft()
            self._inflight.append(cmd)
            self._t.write(cmd.line)

    def _command(self, cmd: _Command) -> "defer.Deferred[Any]":
        if self._closed is not None:
            return defer.fail(self._closed)
        self._queue.append(cmd)
        self._pump()
        return cmd.deferred

    def _simple(self, keyword: str, *args: Union[str, int], barrier: bool = False,
                login: bool = False) -> "defer.Deferred[wire.Response]":
        cmd = _Command(keyword, wire.format_command(keyword, *args), False,
                       barrier=barrier, login=login)
        return self._command(cmd)

    def _multi(self, keyword: str, *args: Union[str, int],
               sink: Callable[[bytes], object] | None = None,
               to_lf: bool = False) -> "defer.Deferred[_Command]":
        cmd = _Command(keyword, wire.format_command(keyword, *args), True, sink=sink)
        if to_lf:
            cmd.to_lf = CRLFToLF()
        return self._command(cmd)

    # -- AUTHORIZATION -------------------------------------------------------

    @defer.inlineCallbacks
    def capabilities(self) -> Any:
        """CAPA (RFC 2449): a L{Capabilities}; an empty one when CAPA fails."""
        try:
            cmd = yield self._multi("CAPA")
        except POP3Error:
            caps = Capabilities()
        else:
            caps = Capabilities.parse(cmd.body().split(b"\n"))
        self.capa = caps
        return caps

    @defer.inlineCallbacks
    def starttls(self, context_factory: object) -> Any:
        """
        STLS (RFC 2595 section 4), then re-read CAPA.  Bytes that arrived
        with the C{+OK} are discarded, never read as post-TLS responses.
        The Deferred fires with the new L{Capabilities}; a certificate
        that fails verification fails it with the TLS error.
        """
        if self.logged_in:
            raise POP3ProtocolError("STLS after login")
        if self.tls:
            raise POP3ProtocolError("TLS already active")
        transport = self.transport
        if not ITLSTransport.providedBy(transport):
            raise POP3ProtocolError("transport cannot start TLS")

        def upgrade() -> None:
            self._reader.clear()
            cast(Any, transport).startTLS(context_factory)
            self.tls = True

        cmd = _Command("STLS", wire.format_command("STLS"), False, barrier=True)
        cmd.on_ok = upgrade
        yield self._command(cmd)
        self.capa_before_tls = self.capa
        self.capa = None
        caps = yield self.capabilities()
        return caps

    def user(self, username: str) -> "defer.Deferred[wire.Response]":
        return self._simple("USER", username, barrier=True, login=True)

    def password(self, password: str) -> "defer.Deferred[wire.Response]":
        d = self._simple("PASS", password, barrier=True, login=True)
        return d.addCallback(self._logged_in, "USER")

    def apop(self, username: str, password: str) -> "defer.Deferred[wire.Response]":
        """APOP (RFC 1939 section 7) with the greeting's timestamp."""
        if self.apop_timestamp is None:
            return defer.fail(NoMechanismError("no APOP timestamp in the greeting"))
        digest = md5(self.apop_timestamp + password.encode("utf-8")).hexdigest()  # noqa: S324
        d = self._simple("APOP", username, digest, barrier=True, login=True)
        return d.addCallback(self._logged_in, "APOP")

    def authenticate(self, mechanism: ClientMechanism) -> "defer.Deferred[wire.Response]":
        """AUTH (RFC 5034) with a client mechanism from L{popservice.sasl.client}."""
        initial = mechanism.initial()
        args: list[str] = [mechanism.name]
        if initial is not None:
            args.append(base64.b64encode(initial).decode("ascii") if initial else "=")
        line = wire.format_command("AUTH", *args)
        if len(line) > wire.MAX_COMMAND_LINE and initial is not None:
            # too long for one line: send the initial response after an empty challenge
            line = wire.format_command("AUTH", mechanism.name)
            first = [True]

            def on_challenge(ch: bytes) -> bytes:
                if first[0]:
                    first[0] = False
                    return initial
                return mechanism.respond(ch)
        else:
            on_challenge = mechanism.respond  # type: ignore[assignment]
        cmd = _Command("AUTH", line, False, barrier=True, login=True)
        cmd.on_challenge = on_challenge
        return self._command(cmd).addCallback(self._logged_in, mechanism.name)

    def _logged_in(self, response: wire.Response, how: str) -> wire.Response:
        self.logged_in = True
        self.mechanism_used = how
        return response

    @defer.inlineCallbacks
    def login(self, credentials: Credentials) -> Any:
        """
        Log in by the strongest method both sides allow: a SASL mechanism
        (SCRAM-SHA-256, CRAM-MD5, then PLAIN/LOGIN, or OAUTHBEARER/XOAUTH2
        with a token), else APOP, else USER/PASS.  Plaintext methods need TLS
        or C{credentials.allow_plaintext}.  Reads CAPA first if not yet done,
        and again after login (it may change, RFC 2449 section 5).
        """
        if self.capa is None:
            yield self.capabilities()
        caps = self.capa
        assert caps is not None
        how, mech = choose_login(credentials, caps.sasl, user=caps.user, capa=bool(caps.tags),
                                 stls=caps.stls, apop_timestamp=self.apop_timestamp, tls=self.tls)
        if mech is not None:
            yield self.authenticate(mech)
        elif how == "APOP":
            assert credentials.password is not None
            yield self.apop(credentials.username, credentials.password)
        else:
            assert credentials.password is not None
            yield self.user(credentials.username)
            yield self.password(credentials.password)
        yield self.capabilities()
        return self.mechanism_used

    # -- TRANSACTION -----------------------------------------------------------

    @defer.inlineCallbacks
    def stat(self) -> Any:
        """STAT: C{(count, octets)}."""
        r = yield self._simple("STAT")
        try:
            count, size = r.text.split()[:2]
            return int(count), int(size)
        except ValueError:
            raise POP3ProtocolError(f"bad STAT answer: {r.text!r}")

    @defer.inlineCallbacks
    def list(self, number: int | None = None) -> Any:
        """LIST: a list of L{ListEntry}, or one L{ListEntry} for C{number}."""
        if number is not None:
            r = yield self._simple("LIST", number)
            try:
                n, size = r.text.split()[:2]
                return ListEntry(int(n), int(size))
            except ValueError:
                raise POP3ProtocolError(f"bad LIST answer: {r.text!r}")
        cmd = yield self._multi("LIST")
        try:
            return [ListEntry(n, int(s)) for n, s in parse_listing(cmd.body())]
        except ValueError:
            raise POP3ProtocolError("bad LIST size")

    @defer.inlineCallbacks
    def uidl(self, number: int | None = None) -> Any:
        """UIDL: a list of L{UidlEntry}, or one L{UidlEntry} for C{number}."""
        if number is not None:
            r = yield self._simple("UIDL", number)
            parts = r.text.split()
            if len(parts) < 2 or not parts[0].isdigit():
                raise POP3ProtocolError(f"bad UIDL answer: {r.text!r}")
            return UidlEntry(int(parts[0]), parts[1])
        cmd = yield self._multi("UIDL")
        return [UidlEntry(n, u) for n, u in parse_listing(cmd.body())]

    def _stream(self, keyword: str, args: tuple[int, ...], consumer: Consumer | None,
                crlf: bool) -> "defer.Deferred[Any]":
        if consumer is None:
            return self._multi(keyword, *args, to_lf=not crlf).addCallback(
                lambda cmd: cmd.body())
        if type(consumer) in _PLAIN_CALLABLES:
            # the common case (a bound write/append): no interface lookups, no extra callback
            sink: Callable[[bytes], object] = consumer  # type: ignore[assignment]
            return self._multi(keyword, *args, sink=sink, to_lf=not crlf).addCallback(_none)
        registered = False
        if IConsumer.providedBy(consumer):
            cast(Any, consumer).registerProducer(_Producer(self), True)
            registered = True
        d = self._multi(keyword, *args, sink=_as_writer(consumer), to_lf=not crlf)

        def done(result: object) -> object:
            if registered:
                cast(Any, consumer).unregisterProducer()
            return result if isinstance(result, Failure) else None

        return d.addBoth(done)

    def retrieve(self, number: int, consumer: Consumer | None = None,
                 crlf: bool = True) -> "defer.Deferred[Any]":
        """
        RETR: without C{consumer}, the message bytes (unstuffed); with one (a
        callable or an IConsumer), the content is delivered chunk by chunk
        as it arrives and the Deferred fires with C{None} at the end.
        C{crlf=False} converts CRLF line ends to LF on the way.
        """
        return self._stream("RETR", (number,), consumer, crlf)

    def top(self, number: int, lines: int = 0, consumer: Consumer | None = None,
            crlf: bool = True) -> "defer.Deferred[Any]":
        """TOP (RFC 1939 section 7): header plus C{lines} body lines; like L{retrieve}."""
        return self._stream("TOP", (number, lines), consumer, crlf)

    def delete(self, number: int) -> "defer.Deferred[wire.Response]":
        return self._simple("DELE", number)

    def reset(self) -> "defer.Deferred[wire.Response]":
        return self._simple("RSET")

    def noop(self) -> "defer.Deferred[wire.Response]":
        return self._simple("NOOP")

    def quit(self) -> "defer.Deferred[wire.Response]":
        """QUIT: C{-ERR} (e.g. C{[SYS/TEMP]}: not all deleted) fails the Deferred."""
        cmd = _Command("QUIT", wire.format_command("QUIT"), False, barrier=True)
        d = self._command(cmd)

        def close(result: object) -> object:
            # fire only once the connection is gone: QUIT means "done" to callers
            self._quitting = True
            if self.transport is not None:
                self._t.loseConnection()
            return self.when_closed().addCallback(lambda _: result)

        return d.addBoth(close)

    def abort(self) -> None:
        """Drop the connection without QUIT: nothing marked deleted is deleted."""
        if self.transport is not None:
            self._t.abortConnection()


class _Producer:
    """Pause/resume reading from the server for a streaming IConsumer."""

    def __init__(self, client: POP3Client) -> None:
        self.client = client

    def pauseProducing(self) -> None:
        self.client._t.pauseProducing()

    def resumeProducing(self) -> None:
        self.client._t.resumeProducing()

    def stopProducing(self) -> None:
        self.client.abort()
