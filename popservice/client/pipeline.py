"""
The machinery under the Twisted POP3 client: a command FIFO whose commands
are written one at a time, or several ahead of their answers when the
server advertises PIPELINING (RFC 2449 section 6.6) after login; status
lines read through a L{wire.LineReader} and multi-line bodies through a
L{wire.BodyDecoder}; the greeting, SASL challenges, timeouts and the loss of
the connection.  L{CommandPipeline} is the base of
L{popservice.client.protocol.POP3Client}, which adds the POP3 commands.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from collections.abc import Callable
from typing import Any, Union

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from popservice import wire
from popservice.client.answers import Capabilities
from popservice.client.common import POP3ProtocolError, apop_timestamp, error_for
from popservice.client.streaming import CRLFToLF
from popservice.sasl.client import SASLError

__all__ = ["MAX_COLLECTED", "MAX_STATUS_LINE", "Command", "CommandPipeline"]

#: A status line longer than this is a protocol error (RFC 2449 says 512).
MAX_STATUS_LINE = 64 * 1024
#: A multi-line answer collected in memory (LIST, UIDL, CAPA) is capped.
MAX_COLLECTED = 256 * 1024 * 1024


class Command:
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


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)


class CommandPipeline(Protocol, TimeoutMixin):
    """
    Connection events, the command FIFO and the reading of answers.  Each
    command's Deferred fires with its L{wire.Response} (single line) or its
    L{Command} (multi-line, body collected or streamed to a sink); C{-ERR}
    fails it with the L{POP3Error} for that answer.
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
        #: RFC 6856 UTF8 mode is on (the server accepted the UTF8 command)
        self.utf8 = False
        self.logged_in = False
        self.mechanism_used: str | None = None
        self.pipelining_enabled = True
        self._reader = wire.LineReader(MAX_STATUS_LINE)
        self._decoder: wire.BodyDecoder | None = None
        self._queue: deque[Command] = deque()
        self._inflight: deque[Command] = deque()
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
            # the exception the blocking engine's socket raises: one vocabulary for both
            self._fail(_failure(TimeoutError("timed out")))
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

    def _challenge(self, cmd: Command, encoded: bytes) -> None:
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

    def _command(self, cmd: Command) -> "defer.Deferred[Any]":
        if self._closed is not None:
            return defer.fail(self._closed)
        self._queue.append(cmd)
        self._pump()
        return cmd.deferred

    def _simple(self, keyword: str, *args: Union[str, int], barrier: bool = False,
                login: bool = False) -> "defer.Deferred[wire.Response]":
        cmd = Command(keyword, wire.format_command(keyword, *args), False,
                      barrier=barrier, login=login)
        return self._command(cmd)

    def _multi(self, keyword: str, *args: Union[str, int],
               sink: Callable[[bytes], object] | None = None,
               to_lf: bool = False) -> "defer.Deferred[Command]":
        cmd = Command(keyword, wire.format_command(keyword, *args), True, sink=sink)
        if to_lf:
            cmd.to_lf = CRLFToLF()
        return self._command(cmd)

    def abort(self) -> None:
        """Drop the connection without QUIT: nothing marked deleted is deleted."""
        if self.transport is not None:
            self._t.abortConnection()
