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

Where the parts live: this module holds L{POP3Client}'s commands (CAPA, STLS,
the logins, the TRANSACTION commands, streaming RETR/TOP); the command FIFO,
pipelining and the reading of answers are its base class in
L{popservice.client.pipeline}; the values it answers with are in
L{popservice.client.answers}; consumers and CRLF conversion in
L{popservice.client.streaming}; errors and credentials in
L{popservice.client.common}; connecting and TLS verification in
L{popservice.client.connect}.  The names that used to be defined here are
re-exported.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from hashlib import md5
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, ITLSTransport
from twisted.python.failure import Failure

from popservice import wire
from popservice.client.answers import Capabilities, ListEntry, UidlEntry

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
    choose_login,
    parse_listing,
)
from popservice.client.pipeline import MAX_COLLECTED, MAX_STATUS_LINE, Command, CommandPipeline
from popservice.client.streaming import PLAIN_CALLABLES, Consumer, CRLFToLF, as_writer
from popservice.sasl.client import ClientMechanism

__all__ = [
    "AuthError", "Capabilities", "Credentials", "InUseError", "LoginDelayError",
    "NoMechanismError", "POP3Client", "POP3ClientError", "POP3Error", "POP3ProtocolError", "SysPermError",
    "SysTempError", "TLSRequiredError", "Consumer",
    # defined here before the split; still importable from here
    "CRLFToLF", "ListEntry", "MAX_COLLECTED", "MAX_STATUS_LINE", "UidlEntry",
]


def _none(_: object) -> None:
    return None


class POP3Client(CommandPipeline):
    """
    The protocol.  Everything public returns a Deferred.  A failure is a
    L{POP3Error} (server said C{-ERR}), a L{POP3ProtocolError}, or the reason
    the connection was lost.
    """

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

        cmd = Command("STLS", wire.format_command("STLS"), False, barrier=True)
        cmd.on_ok = upgrade
        yield self._command(cmd)
        self.capa_before_tls = self.capa
        self.capa = None
        caps = yield self.capabilities()
        return caps

    def enable_utf8(self) -> "defer.Deferred[wire.Response]":
        """RFC 6856 UTF8 (before login): UTF-8 user names and passwords, SASLprep-ed by the server."""
        def on(response: wire.Response) -> wire.Response:
            self.utf8 = True
            return response

        return self._simple("UTF8", barrier=True).addCallback(on)

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
        cmd = Command("AUTH", line, False, barrier=True, login=True)
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
        and again after login (it may change, RFC 2449 section 5).  When CAPA
        lists UTF8 (RFC 6856), C{UTF8} is sent first.
        """
        if self.capa is None:
            yield self.capabilities()
        caps = self.capa
        assert caps is not None
        how, mech = choose_login(credentials, caps.sasl, user=caps.user, capa=bool(caps.tags),
                                 stls=caps.stls, apop_timestamp=self.apop_timestamp, tls=self.tls)
        if caps.utf8 and not self.utf8:
            # RFC 6856: before USER/PASS, APOP or AUTH; a refusal leaves the session as it was
            try:
                yield self.enable_utf8()
            except POP3Error:
                pass
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
        if type(consumer) in PLAIN_CALLABLES:
            # the common case (a bound write/append): no interface lookups, no extra callback
            sink: Callable[[bytes], object] = consumer  # type: ignore[assignment]
            return self._multi(keyword, *args, sink=sink, to_lf=not crlf).addCallback(_none)
        registered = False
        if IConsumer.providedBy(consumer):
            cast(Any, consumer).registerProducer(_Producer(self), True)
            registered = True
        d = self._multi(keyword, *args, sink=as_writer(consumer), to_lf=not crlf)

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
        cmd = Command("QUIT", wire.format_command("QUIT"), False, barrier=True)
        d = self._command(cmd)

        def close(result: object) -> object:
            # fire only once the connection is gone: QUIT means "done" to callers
            self._quitting = True
            if self.transport is not None:
                self._t.loseConnection()
            return self.when_closed().addCallback(lambda _: result)

        return d.addBoth(close)


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
