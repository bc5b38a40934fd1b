"""
Plumbing on the transport under a connection, whatever wraps it (TLS, the
PROXY protocol, or Twisted's STLS switch): the real socket and TCP_NODELAY on
it, TLS's gatherer of small writes, the peer's TLS certificate, the size of
the write buffer that pauses the connection, and answers written through to
the kernel when nothing waits before them (L{write_through}).
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet import abstract, tcp
from twisted.protocols.tls import TLSMemoryBIOProtocol

_MISSING = object()

#: writes shorter than this may go to the kernel at once (L{write_through}); body chunks
#: (popservice.server.pacing: 16 KiB and more) take Twisted's buffered path, one per turn
WRITE_THROUGH_LIMIT = 16 * 1024

#: the log prefix of each chain of protocol classes (a protocol, what it wraps...): Twisted asks
#: each connection's protocol once, and the prefixes of Twisted's and our protocols are made from
#: their classes
_LOG_PREFIXES: dict[tuple[type, ...], str] = {}


class WriteThroughServer(tcp.Server):
    """
    A TCP server connection whose short writes go to the kernel at once when
    nothing is buffered before them.  Twisted's C{write} only buffers and
    registers the socket for writing: the answer leaves on the reactor's next
    turn, after two C{epoll_ctl} calls and a pass through the reactor, for
    every answer of a POP3 session.  Anything the kernel does not take, and
    every write while something is buffered or once the connection is
    closing, takes Twisted's path, so the order of the bytes, the producer's
    pausing and the error handling (a failed send reports through the
    reactor, as before) are Twisted's.  Under STLS the TLS layer writes
    through Twisted's own path.
    """

    # Twisted keeps a bound method, a repr string, a log prefix string and a list in each
    # connection (about 290 bytes); here the class makes them when asked (Twisted's assignments,
    # and its deletion of fileno, are taken and dropped).

    @property
    def fileno(self) -> Callable[[], int]:
        # (not through __dict__: asking for it would give each connection a dict)
        sock: socket.socket | None = getattr(self, "socket", None)
        if sock is None:  # closed: FileDescriptor's, which says -1
            return partial(abstract.FileDescriptor.fileno, self)
        return sock.fileno

    @fileno.setter
    def fileno(self, value: Callable[[], int]) -> None:
        pass

    @fileno.deleter
    def fileno(self) -> None:
        pass

    @property
    def repstr(self) -> str:
        server = self.server
        return "<{} #{} on {}>".format(self.protocol.__class__.__name__ if hasattr(self, "protocol")
                                      else None, self.sessionno,
                                      server._realPortNumber if server is not None else None)

    @repstr.setter
    def repstr(self, value: str) -> None:
        pass

    @property
    def logstr(self) -> str:
        # the prefix of the (legacy) log events of this connection, as Twisted's Server makes it;
        # asked for by Twisted's reactor per read or write event, so the prefix is cached
        protocol = getattr(self, "protocol", None)
        # (a wrapper's prefix is made from what it wraps: the key is the chain of classes)
        kinds: tuple[type, ...] = (type(protocol),)
        inner = getattr(protocol, "wrappedProtocol", None)
        while inner is not None and len(kinds) < 8:
            kinds += (type(inner),)
            inner = getattr(inner, "wrappedProtocol", None)
        prefix = _LOG_PREFIXES.get(kinds)
        if prefix is None:
            prefix = _LOG_PREFIXES[kinds] = self._getLogPrefix(protocol)
        return f"{prefix},{self.sessionno},{self.hostname}"

    @logstr.setter
    def logstr(self, value: str) -> None:
        pass

    #: what _tempDataBuffer holds (None: nothing); an attribute, not reached through __dict__,
    #: which would give each connection a dict object (64 bytes)
    _pending: list[bytes] | None = None

    @property
    def _tempDataBuffer(self) -> list[bytes]:
        # Twisted's list of writes not yet joined into its buffer: made when first asked for and
        # let go when Twisted empties it (an idle connection holds no list)
        pending = self._pending
        if pending is None:
            pending = self._pending = []
        return pending

    @_tempDataBuffer.setter
    def _tempDataBuffer(self, value: list[bytes]) -> None:
        self._pending = value or None

    def write(self, data: bytes) -> None:
        if (not self.TLS and self.connected and not self.disconnecting and not self._writeDisconnected
                and type(data) is bytes and 0 < len(data) < WRITE_THROUGH_LIMIT
                and not self._tempDataLen and self.offset == len(self.dataBuffer)):
            sent = self.writeSomeData(data)
            if type(sent) is int:
                if sent == len(data):
                    return
                data = data[sent:]
        tcp.Server.write(self, data)


def write_through(transport: Any) -> bool:
    """
    Make the TCP connection under C{transport} (and any TLS or PROXY wrapper)
    a L{WriteThroughServer}; False if it is not a plain Twisted TCP server
    connection (then nothing changes).
    """
    while transport is not None:
        if type(transport) is tcp.Server:
            port = getattr(transport, "server", None)
            if type(port) is tcp.Port and port.transport is tcp.Server:
                # the port's next connections are born so (a class change costs each one a dict)
                port.transport = WriteThroughServer
            made = transport.__dict__
            pending = made.pop("_tempDataBuffer", None)
            for name in ("fileno", "repstr", "logstr"):  # (the class answers for them now)
                made.pop(name, None)
            transport.__class__ = WriteThroughServer
            if pending:  # (what Twisted holds, under the class's name)
                transport._tempDataBuffer = pending
            return True
        if isinstance(transport, tcp.Server):
            return isinstance(transport, WriteThroughServer)
        transport = getattr(transport, "transport", None)
    return False


def real_socket(transport: Any) -> socket.socket | None:
    """The socket under a transport and any TLS wrappers over it (None: none, or not a socket)."""
    while transport is not None:
        # A TCP transport after STLS answers getHandle() with its TLS connection: its socket first.
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
        get_handle = getattr(transport, "getHandle", None)
        if get_handle is not None:
            try:
                handle = get_handle()
            except Exception:
                handle = None
            if isinstance(handle, socket.socket):
                return handle
        transport = getattr(transport, "transport", None)
    return None


def tls_layer(transport: Any) -> TLSMemoryBIOProtocol | None:
    """The TLS protocol under C{transport} (and any wrapper over it), or None: not TLS."""
    # Down the layers (a handshake-timeout or PROXY wrapper may sit above implicit TLS); after
    # STLS the TLS protocol is the TCP transport's protocol.
    while transport is not None:
        for candidate in (transport, getattr(transport, "protocol", None)):
            if isinstance(candidate, TLSMemoryBIOProtocol):
                return candidate
        transport = getattr(transport, "transport", None)
    return None


def tls_write_gatherer(transport: Any) -> Any:
    """
    Twisted's gatherer of small TLS writes over this connection (its
    C{flush()} encrypts and sends what it holds), or None: not TLS, or a
    Twisted without it.  Private to Twisted, hence looked up with care.
    """
    gatherer = getattr(tls_layer(transport), "_aggregator", None)
    return gatherer if gatherer is not None and callable(getattr(gatherer, "flush", None)) else None


def write_tls_at_once(transport: Any) -> bool:
    """
    Have the TLS layer under C{transport} encrypt and send each write when it
    is made, not on the reactor's next turn.  Twisted gathers small TLS writes
    until then (C{BufferingTLSTransport}: a C{callLater(0)} per answer and one
    more pass through the reactor) so that many small writes make one record;
    our connection already writes each turn's answers in one write (and body
    chunks one at a time), so the gathering only delays every answer by a
    turn.  Twisted's gatherer keeps the rest of its job: C{writeSequence},
    and the flush before C{loseConnection}, still go through it.

    False when there is no such layer, it holds writes already (then they
    must leave first: nothing changes), or Twisted's private layout differs.
    """
    layer = tls_layer(transport)
    gatherer = getattr(layer, "_aggregator", None)
    # (read as an attribute, not through __dict__: asking for that would give the connection a
    # dict object)
    if (layer is None or gatherer is None or getattr(layer.write, "__self__", None) is not gatherer
            or getattr(gatherer, "_buffer", None) != []):
        return False
    # The instance's write was the gatherer's (the class's write is no bound method of it):
    # without it, the class's, TLS at once.
    del layer.write
    return True


def set_nodelay(transport: Any) -> None:
    """
    TCP_NODELAY on the real socket, under any TLS wrapper: without it the
    last line of each response waits for the peer's delayed ACK (~40 ms).
    """
    sock = real_socket(transport)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a unix socket)
            pass


def peer_certificate(transport: Any) -> Any:
    """The client's TLS certificate (an OpenSSL X509), or None."""
    get_peer = getattr(transport, "getPeerCertificate", None)
    if get_peer is None:
        return None
    try:
        return get_peer()
    except Exception:
        return None


def _owns(obj: Any, name: str) -> bool:
    """
    Whether C{obj} has C{name} itself (on the instance or its class), not
    through a wrapper's C{__getattr__}: Twisted's C{ProtocolWrapper} (TLS,
    PROXY) answers for the transport under it, so C{hasattr} cannot tell.
    """
    return inspect.getattr_static(obj, name, _MISSING) is not _MISSING


#: transport class -> whether its instances hold their own write buffer (L{write_buffer_owner})
_BUFFER_OWNERS: dict[type, bool] = {}


def _owns_buffer(transport: Any) -> bool:
    cls = type(transport)
    owns = _BUFFER_OWNERS.get(cls)
    if owns is None:
        # by class: the walk is on every connection's path, getattr_static is slow
        owns = _owns(transport, "bufferSize") and _owns(transport, "dataBuffer")
        if len(_BUFFER_OWNERS) < 64:
            _BUFFER_OWNERS[cls] = owns
    return owns


def write_buffer_owner(transport: Any) -> Any:
    """
    The transport whose buffer holds what a connection writes (a Twisted
    C{FileDescriptor}: the one with C{bufferSize} and C{dataBuffer} of its
    own), under any wrapper; None if there is none.
    """
    while transport is not None:
        if _owns_buffer(transport):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def set_write_buffer(transport: Any, size: int) -> None:
    """
    How much the socket's write buffer may hold before the connection's
    producer is paused (Twisted's default is 64 KiB): under any TLS or PROXY
    wrapper.  Set on the wrapper, it would change nothing: the TCP transport
    under it decides when to pause (through TLS's producer membrane).
    """
    if size <= 0:
        return
    owner = write_buffer_owner(transport)
    if owner is not None and owner.bufferSize != size:
        owner.bufferSize = size
