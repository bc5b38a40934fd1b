"""
The blocking fetch engine: C{popservice fetch} on the standard library only.

A one-shot fetch spends much of its life starting up; this engine imports no
Twisted, no pyOpenSSL/cryptography/service_identity (TLS is the C{ssl}
module: C{ssl.create_default_context} verifies the chain and the name, DNS
names and IP SANs, per RFC 6125) and does its own blocking socket I/O.  The
wire format is L{popservice.wire} (status lines through L{wire.parse_response},
bodies through L{wire.BodyDecoder}, commands from L{wire.format_command});
logins through L{popservice.sasl.client}; and everything that touches local
state (journal, targets, batches, what to fetch and when a DELE is allowed)
is L{popservice.client.delivery}, shared with the Twisted engine, so the
crash-safety rule is the same code: a message is DELE'd only after its copy
and its journal record are durable.

RETRs are pipelined when the server says PIPELINING (RFC 2449): a window of
commands is kept in flight; each answer is read whole, converted to LF
line ends once, and stored; DELEs of a committed batch join the same stream.
A failure drops the connection without QUIT, so the server deletes nothing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence

from popservice import wire
from popservice.client.common import (
    AuthError,
    Credentials,
    NoMechanismError,
    NoUIDLError,
    POP3ClientError,
    POP3Error,
    POP3ProtocolError,
    TLSError,
    TLSRequiredError,
    apop_timestamp,
    certificate_error,
    choose_login,
    error_for,
    handshake_error,
    parse_listing,
)
from popservice.client.delivery import (
    DeliverySession,
    FetchOptions,
    FetchResult,
    Journal,
    MaildirTarget,
    Progress,
    Target,
)
from popservice.client.url import POP3URL
from popservice.sasl.client import (
    ClientMechanism,
    SASLError,
)

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "AuthError", "BlockingClient", "Credentials", "NoMechanismError", "NoUIDLError",
    "POP3ClientError", "POP3Error", "POP3ProtocolError", "TLSError", "TLSRequiredError",
    "connect", "fetch", "run_fetch",
]

#: A status line longer than this is a protocol error (RFC 2449 says 512).
MAX_STATUS_LINE = 64 * 1024
#: A multi-line answer collected in memory (LIST, UIDL, CAPA) is capped.
MAX_COLLECTED = 256 * 1024 * 1024
RECV_SIZE = 256 * 1024




def parse_capabilities(body: bytes) -> dict[str, tuple[str, ...]]:
    """A CAPA body -> tag (upper case) -> arguments."""
    tags: dict[str, tuple[str, ...]] = {}
    for raw in body.split(b"\n"):
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        if line.upper().startswith("IMPLEMENTATION"):
            tags["IMPLEMENTATION"] = (line[len("IMPLEMENTATION"):].strip(),)
            continue
        words = line.split()
        tags[words[0].upper()] = tuple(words[1:])
    return tags


# --------------------------------------------------------------------------
# The connection

class BlockingClient:
    """A POP3 session over a blocking socket (plain or C{ssl.SSLSocket})."""

    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock = sock
        self.host = host
        self._buf = b""
        self._pos = 0
        #: every read lands here first: a fresh RECV_SIZE bytes object per read
        #: would be mapped and unmapped by malloc each time (TLS reads one
        #: 16 KiB record at a time), costing more than the copy out
        self._landing = memoryview(bytearray(RECV_SIZE))
        self.greeting: wire.Response | None = None
        self.apop_timestamp: bytes | None = None
        self.capa: dict[str, tuple[str, ...]] | None = None
        self.tls = False
        #: RFC 6856 UTF8 mode is on (the server accepted the UTF8 command)
        self.utf8 = False
        self.logged_in = False
        self.mechanism_used: str | None = None

    @property
    def pipelining(self) -> bool:
        return self.capa is not None and "PIPELINING" in self.capa

    # -- bytes ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> bytes:
        n = self.sock.recv_into(self._landing)
        if not n:
            raise ConnectionError("connection closed by the server")
        return self._landing[:n].tobytes()

    def read_line(self) -> bytes:
        """The next line, without its line end."""
        while True:
            nl = self._buf.find(b"\n", self._pos)
            if nl >= 0:
                line = self._buf[self._pos:nl]
                self._pos = nl + 1
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) - self._pos > MAX_STATUS_LINE:
                raise POP3ProtocolError(f"status line longer than {MAX_STATUS_LINE} octets")
            self._buf = self._buf[self._pos:] + self._recv()
            self._pos = 0

    def read_response(self, command: str, login: bool = False) -> wire.Response:
        line = self.read_line()
        response = wire.parse_response(line)
        if response is None:
            raise POP3ProtocolError(f"not a POP3 status line: {line[:80]!r}")
        if not response.ok:
            raise error_for(response, command, login)
        return response

    def read_body(self, sink: Callable[[bytes], object]) -> None:
        """The body of a multi-line answer (after its +OK line), unstuffed, to C{sink}."""
        decoder = wire.BodyDecoder()
        data, pos = self._buf, self._pos  # scanned in place: pipelined answers share a buffer
        self._buf, self._pos = b"", 0
        while True:
            out = decoder.scan(data, pos)
            if out:
                sink(out)
            if decoder.done:
                self._buf, self._pos = data, decoder.end
                return
            data, pos = self._recv(), 0

    def collect(self, command: str) -> bytes:
        """Read a whole multi-line answer to C{command} (status line included) into memory."""
        self.read_response(command)
        chunks: list[bytes] = []
        size = 0

        def sink(b: bytes) -> None:
            nonlocal size
            size += len(b)
            if size > MAX_COLLECTED:
                raise POP3ProtocolError(f"{command} answer too large to collect")
            chunks.append(b)

        self.read_body(sink)
        return b"".join(chunks)

    def command(self, keyword: str, *args: str | int, login: bool = False) -> wire.Response:
        self.send(wire.format_command(keyword, *args))
        return self.read_response(keyword, login)

    # -- AUTHORIZATION -----------------------------------------------------------

    def read_greeting(self) -> wire.Response:
        line = self.read_line()
        response = wire.parse_response(line)
        if response is None:
            raise POP3ProtocolError(f"not a POP3 greeting: {line[:80]!r}")
        if not response.ok:
            raise POP3Error(response, "greeting")
        self.greeting = response
        self.apop_timestamp = apop_timestamp(line)
        return response

    def capabilities(self) -> dict[str, tuple[str, ...]]:
        """CAPA (RFC 2449); an empty dict when CAPA fails."""
        self.send(wire.format_command("CAPA"))
        try:
            body = self.collect("CAPA")
        except POP3Error:
            self.capa = {}
        else:
            self.capa = parse_capabilities(body)
        return self.capa

    def starttls(self, context: Any) -> None:
        """STLS (RFC 2595): bytes that came with the +OK are discarded; CAPA is re-read."""
        self.command("STLS")
        self._buf, self._pos = b"", 0
        self.sock = _handshake(context, self.sock, self.host)
        self.tls = True
        self.capabilities()

    def _authenticate(self, mech: ClientMechanism) -> None:
        initial = mech.initial()
        args: list[str] = [mech.name]
        if initial is not None:
            args.append(base64.b64encode(initial).decode("ascii") if initial else "=")
        line = wire.format_command("AUTH", *args)
        pending_initial = None
        if len(line) > wire.MAX_COMMAND_LINE and initial is not None:
            line = wire.format_command("AUTH", mech.name)
            pending_initial = initial
        self.send(line)
        while True:
            raw = self.read_line()
            if raw == b"+" or raw.startswith(b"+ "):
                try:
                    challenge = base64.b64decode(raw[2:].strip(), validate=True)
                except (binascii.Error, ValueError):
                    self.send(b"*\r\n")
                    continue
                if pending_initial is not None:
                    answer, pending_initial = pending_initial, None
                else:
                    try:
                        answer = mech.respond(challenge)
                    except SASLError:
                        self.send(b"*\r\n")
                        raise
                self.send(base64.b64encode(answer) + wire.CRLF)
                continue
            response = wire.parse_response(raw)
            if response is None:
                raise POP3ProtocolError(f"not a POP3 status line: {raw[:80]!r}")
            if not response.ok:
                raise error_for(response, "AUTH", True)
            return

    def login(self, credentials: Credentials) -> str:
        """
        The strongest method both sides allow, by the rules of
        L{popservice.client.protocol.POP3Client.login} (C{UTF8} first when
        CAPA lists it, RFC 6856); CAPA is re-read after.
        """
        caps = self.capa if self.capa is not None else self.capabilities()
        how, mech = choose_login(credentials, tuple(m.upper() for m in caps.get("SASL", ())),
                                 user="USER" in caps, capa=bool(caps), stls="STLS" in caps,
                                 apop_timestamp=self.apop_timestamp, tls=self.tls)
        if "UTF8" in caps and not self.utf8:
            # RFC 6856: before USER/PASS, APOP or AUTH; a refusal leaves the session as it was
            try:
                self.command("UTF8")
                self.utf8 = True
            except POP3Error:
                pass
        if mech is not None:
            self._authenticate(mech)
        elif how == "APOP":
            assert credentials.password is not None and self.apop_timestamp is not None
            from hashlib import md5  # here: only APOP needs it, and it costs OpenSSL's start-up

            digest = md5(self.apop_timestamp + credentials.password.encode("utf-8")).hexdigest()  # noqa: S324
            self.command("APOP", credentials.username, digest, login=True)
        else:
            assert credentials.password is not None
            self.command("USER", credentials.username, login=True)
            self.command("PASS", credentials.password, login=True)
        self.logged_in = True
        self.mechanism_used = how
        self.capabilities()
        return how

    def quit(self) -> None:
        try:
            self.command("QUIT")
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def tls_context(ca_file: str | None = None, insecure: bool = False) -> Any:
    """Verified against the platform's trust store, or only C{ca_file}; C{insecure}: no checks."""
    import ssl

    ctx = ssl.create_default_context(cafile=ca_file)
    # RFC 6125 (and service_identity, which the Twisted engine uses): the
    # subjectAltNames name the host; a CN without them is not looked at
    ctx.hostname_checks_common_name = False
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _handshake(context: Any, sock: socket.socket, host: str) -> socket.socket:
    import ssl

    try:
        wrapped: socket.socket = context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise certificate_error(host, e.verify_code, e.verify_message) from e
    except ssl.SSLError as e:
        sock.close()
        reason = e.reason.lower().replace("_", " ") if e.reason else str(e)
        raise handshake_error(host, reason) from e
    return wrapped


def connect(url: POP3URL, credentials: Credentials | None = None, *, starttls: str = "required",
            ca_file: str | None = None, insecure: bool = False,
            timeout: float = 60.0) -> BlockingClient:
    """Connect, secure (implicit TLS or STLS per C{starttls}), read CAPA and log in."""
    if starttls not in ("required", "optional", "none"):
        raise ValueError(f"starttls must be required, optional or none, not {starttls!r}")
    host = url.host
    sock = socket.create_connection((host, url.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    context = None
    try:
        if url.implicit_tls or starttls != "none":
            context = tls_context(ca_file, insecure)
        if url.implicit_tls:
            sock = _handshake(context, sock, host)
        client = BlockingClient(sock, host)
        client.tls = url.implicit_tls
        client.read_greeting()
        caps = client.capabilities()
        if not url.implicit_tls and starttls != "none":
            if "STLS" in caps:
                client.starttls(context)
            elif starttls == "required":
                raise TLSRequiredError(
                    f"{host} does not offer STLS (use pop3s://, or allow plaintext explicitly)")
        if credentials is not None:
            if not credentials.username and url.user:
                credentials = Credentials(url.user, credentials.password, credentials.token,
                                          credentials.authzid, credentials.mechanisms,
                                          credentials.allow_plaintext)
            if credentials.mechanisms is None and url.mechanisms is not None:
                credentials = Credentials(credentials.username, credentials.password,
                                          credentials.token, credentials.authzid, url.mechanisms,
                                          credentials.allow_plaintext)
            client.login(credentials)
    except BaseException:
        sock.close()
        raise
    return client


# --------------------------------------------------------------------------
# The fetch

_RETR, _DELE = 0, 1


class _Preparer:
    """
    A batch made durable (L{Target.prepare}) in a thread while the next one
    downloads; L{wait} hands it back for the commit, or raises what failed.
    """

    def __init__(self, target: Target, batch: tuple[list[str], list[Any], int]) -> None:
        import threading

        self.batch = batch
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), name="popservice-sync",
                                        daemon=True)
        self._thread.start()

    def _run(self, target: Target) -> None:
        try:
            target.prepare(self.batch[1])
        except BaseException as e:  # handed to the fetching thread by wait()
            self.error = e

    def wait(self) -> tuple[list[str], list[Any], int]:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.batch


def _download(client: BlockingClient, session: DeliverySession,
              todo: Sequence[tuple[int, str, int]], delete: list[int]) -> None:
    """Pipelined RETRs (and DELEs once allowed); returns when all are answered."""
    target: Target = session.target
    maildir = isinstance(target, MaildirTarget)
    to_lf = not target.crlf
    window = max(1, session.options.window) if client.pipelining else 1
    queue = deque(todo)
    deletes: deque[int] = deque(delete)
    inflight: deque[tuple[int, Any]] = deque()
    retrs = 0  # RETRs in flight
    result = session.result
    read_line, read_body, parse, crlf_to_lf = (client.read_line, client.read_body, wire.parse_response,
                                               wire.crlf_to_lf)

    refill = max(1, window // 2)  # top the window up in groups: one send wakes the server once

    def pump() -> None:
        nonlocal retrs
        if len(inflight) > window - refill:
            return
        lines = []
        while len(inflight) < window and (deletes or queue):
            if deletes:
                n = deletes.popleft()
                inflight.append((_DELE, n))
                lines.append(b"DELE %d\r\n" % n)
            else:
                number, uid, _size = queue.popleft()
                inflight.append((_RETR, uid))
                retrs += 1
                lines.append(b"RETR %d\r\n" % number)
        if lines:
            client.send(b"".join(lines))

    # With a threadable target a full batch is made durable in a thread while
    # the next one downloads; it is committed (journal, publish, DELE) only
    # once that is done, so the crash-safety order is the same.
    background = session.options.threaded_sync and target.threadable
    preparing: _Preparer | None = None
    try:
        pump()
        while inflight:
            kind, arg = inflight.popleft()
            line = read_line()
            if not line.startswith(b"+OK ") and line != b"+OK":  # else parse only to report it
                response = parse(line)
                if response is None:
                    raise POP3ProtocolError(f"not a POP3 status line: {line[:80]!r}")
                if not response.ok:
                    raise error_for(response, "RETR" if kind == _RETR else "DELE", False)
            if kind == _DELE:
                result.deleted += 1
                pump()
                continue
            retrs -= 1
            chunks: list[bytes] = []
            read_body(chunks.append)
            if to_lf:
                data = crlf_to_lf(b"".join(chunks))
                chunks = [data] if data else []
            if maildir:
                full = session.store(arg, chunks)
            else:
                writer = target.open(arg, 0)
                try:
                    for c in chunks:
                        writer.write(c)
                except BaseException:
                    session.abort([writer])
                    raise
                full = session.finished(arg, writer)
            more = bool(queue or retrs)
            if full or not more:
                if preparing is not None:
                    batch = preparing.wait()
                    preparing = None
                    deletes.extend(session.commit(*batch))
                if background and more:
                    preparing = _Preparer(target, session.take_batch())
                else:
                    deletes.extend(session.flush())
            pump()
    except BaseException:
        if preparing is not None:  # its files are not ours to drop while the thread holds them
            with contextlib.suppress(BaseException):
                preparing.wait()
            session.abort(preparing.batch[1])
        raise

def fetch(client: BlockingClient, target: Target, state_dir: str,
          options: FetchOptions | None = None, progress: Progress | None = None,
          quit: bool = True) -> FetchResult:
    """One fetch over a logged-in C{client}: the blocking twin of L{popservice.client.fetch.fetch}."""
    started = time.monotonic()
    journal = Journal(state_dir)
    try:
        session = DeliverySession(target, journal, options, progress)
        if client.pipelining:
            client.send(b"UIDL\r\nLIST\r\n")
        else:
            client.send(b"UIDL\r\n")
        try:
            uidl_body = client.collect("UIDL")
        except POP3Error as err:
            raise NoUIDLError(
                f"the server does not support UIDL ({err}): popservice fetch needs it to "
                "deliver every message exactly once; nothing was fetched or deleted") from err
        if not client.pipelining:
            client.send(b"LIST\r\n")
        sizes = dict(parse_listing(client.collect("LIST")))
        uidls = parse_listing(uidl_body)
        try:
            size_of = {n: int(s) for n, s in sizes.items()}
        except ValueError:
            raise POP3ProtocolError("bad LIST size") from None
        todo, delete = session.plan(uidls, size_of)
        try:
            _download(client, session, todo, delete)
        except BaseException:
            session.abort()
            raise
        finally:
            session.progress.done()
        target.close()
        result = session.result
        if quit:
            try:
                client.quit()
            except POP3Error as e:
                result.warnings.append(f"QUIT failed ({e}): deletions may be incomplete; "
                                       "the next run deletes what is left")
        result.seconds = time.monotonic() - started
        return result
    finally:
        journal.close()


def run_fetch(url: POP3URL, credentials: Credentials, target: Target, state_dir: str,
              options: FetchOptions | None = None, progress: Progress | None = None,
              **connect_options: Any) -> FetchResult:
    """Connect, log in, fetch, QUIT; the connection is dropped (no QUIT) on any failure."""
    client = connect(url, credentials, **connect_options)
    try:
        return fetch(client, target, state_dir, options, progress)
    finally:
        client.close()
