"""
systemd's readiness protocol (C{sd_notify(3)}), without libsystemd: one
datagram of C{KEY=VALUE} lines to the C{AF_UNIX} socket named in
C{$NOTIFY_SOCKET}.  A name starting with C{@} is in the abstract namespace
(the C{@} stands for a leading NUL byte).  Without C{$NOTIFY_SOCKET} (not
started by systemd with C{Type=notify}) nothing is sent.

    notify("READY=1\\nSTATUS=Serving")     # once listening
    notify("STOPPING=1")                   # at shutdown

This module imports nothing of Twisted: it is a few lines over a socket.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify", "socket_address"]


def socket_address(environ: Mapping[str, str] | None = None) -> str | None:
    """
    The C{AF_UNIX} address from C{$NOTIFY_SOCKET} (an abstract name with its
    leading NUL), or None when unset or of a kind we do not speak (vsock).
    """
    value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{state} (newline-separated C{KEY=VALUE} assignments) to systemd.
    True when a datagram was sent; False without a notification socket.

    @raise OSError: the socket named in C{$NOTIFY_SOCKET} cannot be reached.
    """
    address = socket_address(environ)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode("utf-8"))
    return True
