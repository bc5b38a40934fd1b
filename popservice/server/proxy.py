"""
The PROXY protocol (HAProxy's C{send-proxy} and C{send-proxy-v2}), accepted
only from trusted proxies, as Dovecot's C{haproxy_trusted_networks}.

A connection from an address in the trusted proxy networks must begin with a
PROXY header (v1 or v2) within the deadline, else it is closed; once the
header is read, the connection is handed to the server, whose transport then
reports the header's source as C{getPeer()} (and its destination as
C{getHost()}), so logs, failure delays, the per-address caps and the
plaintext policy see the real client.  A LOCAL command (v1: C{PROXY
UNKNOWN}), the proxy's health check, is closed quietly.  A connection from
any other address is served at once as a direct client with its own address:
a PROXY header it sends is just an unknown command.

Twisted's own wrapper (C{twisted.protocols.haproxy}) trusts every peer and
connects the wrapped protocol before the header has arrived, so a protocol
that reads C{getPeer()} in C{connectionMade} sees the proxy; hence this one.

The header precedes TLS on the wire, so this layer sits below TLS:

  - C{tcp:} (and STLS later on it): TCP -> L{ProxyProtocolWrapper} -> POP3.
    STLS calls C{startTLS} on the TCP transport (through the wrapper), which
    slides TLS in between TCP and the wrapper: the header is long gone by then;
  - C{ssl:}: TCP -> L{ProxyProtocolWrapper} -> TLS -> POP3.  L{listening_reactor}
    lets Twisted parse the endpoint string as usual (every C{ssl:} option
    keeps working) and turns its C{listenSSL} into C{listenTCP} with Twisted's
    C{TLSMemoryBIOFactory} (what the reactor's C{listenSSL} does itself) put
    inside this layer.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union, cast

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorTime,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from popservice.server.policy import Network

TCPAddress = Union[IPv4Address, IPv6Address]

#: The 12 bytes opening a version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
#: A version 1 header is at most 107 bytes, CRLF included.
V1_MAX_LENGTH = 107

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_V2_UNSPEC, _V2_TCP4, _V2_TCP6, _V2_UNIX_STREAM = 0x00, 0x11, 0x21, 0x31

log = Logger(namespace="popservice.proxy")


class InvalidProxyHeader(ValueError):
    """The bytes are not a PROXY protocol header we accept."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY header."""

    version: int
    #: LOCAL (v2), UNKNOWN (v1) or an unspecified family: the proxy's own
    #: connection (a health check), no client behind it
    local: bool
    #: the client's address and the address it connected to (None when the
    #: header carries no IP addresses)
    source: TCPAddress | None = None
    destination: TCPAddress | None = None


def _address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> TCPAddress:
    """A Twisted address; IPv4-mapped IPv6 as IPv4, so one client has one key in the per-address state."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            return IPv6Address("TCP", str(ip), port)
        ip = ip.ipv4_mapped
    return IPv4Address("TCP", str(ip), port)


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise InvalidProxyHeader("bad port in PROXY v1 header")
    port = int(text)
    if port > 0xFFFF:
        raise InvalidProxyHeader("bad port in PROXY v1 header")
    return port


def parse_v1(line: bytes) -> ProxyHeader:
    """A version 1 header line, without its CRLF: C{PROXY TCP4 src dst sport dport}."""
    fields = line.split(b" ")
    if len(fields) < 2 or fields[0] != b"PROXY":
        raise InvalidProxyHeader("not a PROXY v1 header")
    if fields[1] == b"UNKNOWN":
        return ProxyHeader(1, local=True)
    if fields[1] not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise InvalidProxyHeader("malformed PROXY v1 header")
    family: Any = ipaddress.IPv4Address if fields[1] == b"TCP4" else ipaddress.IPv6Address
    try:
        source, destination = family(fields[2].decode("ascii")), family(fields[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidProxyHeader("bad address in PROXY v1 header")
    return ProxyHeader(1, local=False, source=_address(source, _v1_port(fields[4])),
                       destination=_address(destination, _v1_port(fields[5])))


def parse_v2(header: bytes) -> ProxyHeader:
    """A complete version 2 header: signature, version/command, family, length, addresses (TLVs ignored)."""
    version_command, family, length = header[12], header[13], struct.unpack("!H", header[14:16])[0]
    if version_command >> 4 != 2:
        raise InvalidProxyHeader("unsupported PROXY v2 version")
    command = version_command & 0x0F
    block = header[16:16 + length]
    if command == _V2_LOCAL:
        return ProxyHeader(2, local=True)
    if command != _V2_PROXY:
        raise InvalidProxyHeader("unknown PROXY v2 command")
    if family == _V2_UNSPEC:
        return ProxyHeader(2, local=True)
    if family == _V2_TCP4 and len(block) >= 12:
        sport, dport = struct.unpack("!HH", block[8:12])
        return ProxyHeader(2, local=False,
                           source=_address(ipaddress.IPv4Address(block[0:4]), sport),
                           destination=_address(ipaddress.IPv4Address(block[4:8]), dport))
    if family == _V2_TCP6 and len(block) >= 36:
        sport, dport = struct.unpack("!HH", block[32:36])
        return ProxyHeader(2, local=False,
                           source=_address(ipaddress.IPv6Address(block[0:16]), sport),
                           destination=_address(ipaddress.IPv6Address(block[16:32]), dport))
    if family == _V2_UNIX_STREAM and len(block) >= 216:
        # A proxied UNIX socket: no client address to go by.
        return ProxyHeader(2, local=False)
    raise InvalidProxyHeader("unsupported or truncated PROXY v2 address block")


class HeaderReader:
    """
    Reads one PROXY header, v1 or v2, from chunks cut anywhere; no I/O.
    L{feed} returns the header once complete (the bytes after it are then in
    C{remaining}), None while more is needed, and raises L{InvalidProxyHeader}
    as soon as the bytes cannot begin a header.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.remaining = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        buffer = self._buffer = self._buffer + data
        if V2_SIGNATURE.startswith(buffer[:12]):
            if len(buffer) < 16:
                return None
            size = 16 + struct.unpack("!H", buffer[14:16])[0]
            if buffer[12] >> 4 != 2:
                raise InvalidProxyHeader("unsupported PROXY v2 version")
            if len(buffer) < size:
                return None
            self.remaining, self._buffer = buffer[size:], b""
            return parse_v2(buffer[:size])
        if _V1_PREFIX.startswith(buffer[:len(_V1_PREFIX)]):
            end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
            if end < 0:
                if len(buffer) >= V1_MAX_LENGTH:
                    raise InvalidProxyHeader("PROXY v1 header too long")
                return None
            self.remaining, self._buffer = buffer[end + 2:], b""
            return parse_v1(buffer[:end])
        raise InvalidProxyHeader("no PROXY header")


def in_networks(address: IAddress, networks: Sequence[Network]) -> bool:
    """Whether an IP address (IPv4-mapped IPv6 as IPv4) lies in one of C{networks}; False for non-IP."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


@implementer(IHandshakeListener)
class ProxyProtocolWrapper(ProtocolWrapper):
    """
    One connection: from a trusted proxy, reads the PROXY header before the
    wrapped protocol (the server, or TLS over it) is connected; from anyone
    else, connects it at once.  Everything else passes through, including
    STLS's C{startTLS} and the producer calls; C{handshakeCompleted} (TLS
    started under this layer by STLS) is passed up.
    """

    factory: ProxyWrappingFactory

    def __init__(self, factory: ProxyWrappingFactory, wrappedProtocol: Protocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._reader: HeaderReader | None = None
        self._deadline: IDelayedCall | None = None
        #: the wrapped protocol has been connected (and so must hear of connectionLost)
        self._open = False
        #: refused before the wrapped protocol was connected: ignore any further bytes
        self._refused = False
        self._source: TCPAddress | None = None
        self._destination: TCPAddress | None = None

    def makeConnection(self, transport: ITransport) -> None:
        # ProtocolWrapper.makeConnection would connect the wrapped protocol now.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self._factory().registerProtocol(self)
        if not self.factory.trusts(transport.getPeer()):
            self._connect_wrapped()
            return
        self._reader = HeaderReader()
        timeout = self.factory.timeout
        if timeout > 0:
            self._deadline = self.factory.clock.callLater(timeout, self._timed_out)

    def _connect_wrapped(self) -> None:
        self._open = True
        self.wrappedProtocol.makeConnection(cast(ITransport, self))

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            if self._open:
                self.wrappedProtocol.dataReceived(data)
            return
        try:
            header = reader.feed(data)
        except InvalidProxyHeader as e:
            self._refuse(str(e))
            return
        if header is None:
            return
        self._reader = None
        self._cancel_deadline()
        if header.source is None:
            if not header.local:
                self._refuse("PROXY header without a client address")
            else:
                # The proxy's health check: nothing to serve, nothing to log.
                self._refused = True
                self._transport().loseConnection()
            return
        self._source, self._destination = header.source, header.destination
        self._connect_wrapped()
        if reader.remaining:
            self.wrappedProtocol.dataReceived(reader.remaining)

    def _refuse(self, why: str) -> None:
        self._reader = None
        self._refused = True
        self._cancel_deadline()
        log.info("PROXY protocol from {proxy}: {why}; closing", proxy=_host(self._transport().getPeer()),
                 why=why)
        self._transport().loseConnection()

    def _timed_out(self) -> None:
        self._deadline = None
        if self._reader is not None:
            self._reader = None
            self._refused = True
            log.info("PROXY protocol from {proxy}: no header in time; closing",
                     proxy=_host(self._transport().getPeer()))
            self._transport().abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_deadline()
        self._reader = None
        self._factory().unregisterProtocol(self)
        if self._open:
            self._open = False
            self.wrappedProtocol.connectionLost(reason)  # type: ignore[arg-type]

    def handshakeCompleted(self) -> None:
        """TLS under this layer (STLS) finished its handshake: tell the protocol above."""
        if self._open and IHandshakeListener.providedBy(self.wrappedProtocol):
            cast(IHandshakeListener, self.wrappedProtocol).handshakeCompleted()

    # The transport, as the wrapped protocol sees it

    def _transport(self) -> Any:
        return self.transport

    def _factory(self) -> Any:
        # WrappingFactory's bookkeeping is untyped.
        return self.factory

    def getPeer(self) -> IAddress:
        if self._source is not None:
            return self._source
        peer: IAddress = self._transport().getPeer()
        return peer

    def getHost(self) -> IAddress:
        if self._destination is not None:
            return self._destination
        host: IAddress = self._transport().getHost()
        return host

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        """STLS: TLS goes in below this layer, above TCP (the PROXY header has been read)."""
        self._transport().startTLS(contextFactory, normal)

    def pauseProducing(self) -> None:
        self._transport().pauseProducing()

    def resumeProducing(self) -> None:
        self._transport().resumeProducing()

    def stopProducing(self) -> None:
        self._transport().stopProducing()

    def abortConnection(self) -> None:
        self._transport().abortConnection()


def _host(address: IAddress) -> str:
    return str(getattr(address, "host", address))


class ProxyWrappingFactory(WrappingFactory[ProxyProtocolWrapper]):
    """
    Wraps a server factory (or Twisted's TLS factory over it): connections
    from C{trusted} networks must open with a PROXY header within C{timeout}
    seconds (0: no limit).
    """

    protocol = ProxyProtocolWrapper

    def __init__(self, wrappedFactory: IProtocolFactory, trusted: Sequence[Network], timeout: float,
                 clock: IReactorTime | None = None) -> None:
        super().__init__(wrappedFactory)  # type: ignore[no-untyped-call]
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.trusted = list(trusted)
        self.timeout = timeout
        self.clock = clock

    def trusts(self, peer: IAddress) -> bool:
        """Whether C{peer} is a trusted proxy (whose connections must carry a PROXY header)."""
        return in_networks(peer, self.trusted)

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedFactory, "logPrefix", None)
        name = prefix() if callable(prefix) else self.wrappedFactory.__class__.__name__
        return "%s (PROXY)" % (name,)

    def stopFactory(self) -> None:
        """The listener stopped: drop connections still waiting for their header."""
        for connection in list(self.protocols):
            if not connection._open and connection.transport is not None:
                connection.abortConnection()


class _ListeningReactor:
    """
    The reactor as endpoints parsed from strings see it: every TCP listener
    (C{tcp:}, C{ssl:}, adopted C{systemd:} sockets) gets the PROXY layer at
    the bottom; for C{ssl:} Twisted's TLS goes inside it.  Everything else is
    the real reactor's.
    """

    def __init__(self, reactor: Any, wrap: Callable[[IProtocolFactory], IProtocolFactory]) -> None:
        self._reactor = reactor
        self._wrap = wrap

    def listenTCP(self, port: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        listening: IListeningPort = self._reactor.listenTCP(port, self._wrap(factory), backlog, interface)
        return listening

    def listenSSL(self, port: int, factory: IProtocolFactory, contextFactory: Any, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        tls = TLSMemoryBIOFactory(contextFactory, False, factory)
        return self.listenTCP(port, tls, backlog, interface)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: Any,
                        factory: IProtocolFactory) -> IListeningPort:
        listening: IListeningPort = self._reactor.adoptStreamPort(fileDescriptor, addressFamily,
                                                                  self._wrap(factory))
        return listening

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def listening_reactor(trusted: Sequence[Network], timeout: float, reactor: Any = None,
                      clock: IReactorTime | None = None) -> IReactorCore:
    """A reactor for C{serverFromString} whose TCP and TLS listeners accept PROXY headers from C{trusted}."""
    if reactor is None:
        from twisted.internet import reactor

    def wrap(factory: IProtocolFactory) -> IProtocolFactory:
        return ProxyWrappingFactory(factory, trusted, timeout, clock=clock if clock is not None else reactor)

    return cast(IReactorCore, _ListeningReactor(reactor, wrap))


def proxy_endpoint(description: str, trusted: Sequence[Network], timeout: float, reactor: Any = None,
                   clock: IReactorTime | None = None) -> IStreamServerEndpoint:
    """C{serverFromString(description)}, accepting PROXY headers from C{trusted} (see the module doc)."""
    endpoint: IStreamServerEndpoint = endpoints.serverFromString(
        listening_reactor(trusted, timeout, reactor, clock), description)
    return endpoint


def proxy_service(description: str, factory: IProtocolFactory, trusted: Sequence[Network], timeout: float,
                  reactor: Any = None, clock: IReactorTime | None = None) -> StreamServerEndpointService:
    """C{strports.service(description, factory)}, accepting PROXY headers from C{trusted}."""
    return strports.service(description, factory, reactor=listening_reactor(trusted, timeout, reactor, clock))


__all__ = ["HeaderReader", "InvalidProxyHeader", "ProxyHeader", "ProxyProtocolWrapper",
           "ProxyWrappingFactory", "in_networks", "listening_reactor", "parse_v1", "parse_v2",
           "proxy_endpoint", "proxy_service"]
