"""
Plumbing on the transport under a connection, whatever wraps it (TLS, or
Twisted's STLS switch): TCP_NODELAY on the real socket, the peer's TLS
certificate.
"""

from __future__ import annotations

import socket
from typing import Any


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


def set_write_buffer(transport: Any, size: int) -> None:
    """
    How much the socket's write buffer may hold before the connection's
    producer is paused (Twisted's default is 64 KiB): under any TLS wrapper.
    """
    if size <= 0:
        return
    while transport is not None:
        if hasattr(transport, "bufferSize") and hasattr(transport, "dataBuffer"):
            transport.bufferSize = size
            return
        transport = getattr(transport, "transport", None)
