"""
Plumbing on the transport under a connection, whatever wraps it (TLS, the
PROXY protocol, or Twisted's STLS switch): TCP_NODELAY on the real socket, the
peer's TLS certificate, the size of the write buffer that pauses the
connection.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any

_MISSING = object()


def set_nodelay(transport: Any) -> None:
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


def write_buffer_owner(transport: Any) -> Any:
    """
    The transport whose buffer holds what a connection writes (a Twisted
    C{FileDescriptor}: the one with C{bufferSize} and C{dataBuffer} of its
    own), under any wrapper; None if there is none.
    """
    while transport is not None:
        if _owns(transport, "bufferSize") and _owns(transport, "dataBuffer"):
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
    if owner is not None:
        owner.bufferSize = size
