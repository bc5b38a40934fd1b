"""
How big the next piece of a message body may be: large chunks while the peer
keeps up, small ones once it does not.

What a peer has not read yet waits in the kernel's send queue (megabytes on
loopback), outside our memory; only what the kernel refuses stays in the
transport's buffer, in this process.  A peer that stops reading therefore
costs us whatever was written last when the kernel's queue filled up: a whole
large chunk, if chunks are always large.

L{BodyPacer} starts each body with a small chunk and a write buffer smaller
than one, so each chunk is handed to the kernel before the next is read.
Before each chunk it asks the kernel how many octets of the connection's send
queue have not even been sent (Linux C{SIOCOUTQNSD}: they wait for the peer's
window).  None, L{GROW_AFTER} times in a row (a peer's window may take a
small chunk or two without its reader doing anything), means the peer takes
all we write: large chunks and the configured write buffer from then on.
More than L{LAG_LIMIT} unsent means the peer is not reading as fast as we
write: small chunks again, before the kernel's cap (below) is reached.  A
peer that slows down thus holds one small chunk of ours (one that stops dead
right after a large chunk: that chunk); a fast one gets large chunks after
the first few.

Large chunks are large because each costs a turn of the reactor, a read, a
C{send} and a wake-up of the peer: 256 KiB chunks took about a third less server CPU
per octet than 64 KiB ones for a 50 MiB RETR on loopback (C{bench/} and the
shared yardstick's C{bigretr}).  The lag limit is apart from the chunk size: a
fast reader on loopback often leaves tens of KiB unsent for a moment, and a
limit of half a 64 KiB chunk took that for lag several times per message.

Where the kernel cannot say (another system, a UNIX socket) chunks are large.

Under TLS Twisted gathers small writes (up to 64,000 octets) until the
next reactor turn before encrypting them, so small chunks would pile up
there unseen by the write buffer.  Our connections have that turned off
(L{popservice.server.transport.write_tls_at_once}); where it could not be,
each chunk is pushed through TLS as soon as it is written while slow
(L{BodyPacer.written}).

The kernel's unsent queue is capped too (C{TCP_NOTSENT_LOWAT}, set when the
first body starts): without it a peer that never reads has the kernel take
megabytes (on loopback, three of them per connection), each chunk costing a
turn of ours; with it, the socket stops taking data at L{UNSENT_LIMIT}
octets unsent, a few small chunks in.  What is sent but unread (the peer's
window) is not limited, so a fast peer's throughput is not either.
"""

from __future__ import annotations

import array
import fcntl
import socket
import sys
from typing import Any

from popservice.server.transport import real_socket, set_write_buffer, tls_write_gatherer

#: Linux: octets in a TCP socket's send queue not yet sent (linux/sockios.h)
SIOCOUTQNSD = 0x894B

#: chunk sizes (what the store reads at a time): while the peer keeps up, and once it does not
LARGE_CHUNK = 256 * 1024
SMALL_CHUNK = 16 * 1024
#: octets unsent in the kernel that mean the peer lags (below UNSENT_LIMIT, which the kernel keeps)
LAG_LIMIT = 64 * 1024
#: small chunks all sent at once, in a row, before chunks are large
GROW_AFTER = 4
#: octets the kernel may hold unsent for a connection (TCP_NOTSENT_LOWAT)
UNSENT_LIMIT = 128 * 1024
#: Linux's TCP_NOTSENT_LOWAT (linux/tcp.h), where the socket module does not name it
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def limit_unsent(sock: socket.socket, limit: int) -> None:
    """Have the kernel stop taking data for C{sock} at C{limit} octets unsent (Linux, TCP)."""
    if sys.platform.startswith("linux"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, limit)
        except OSError:  # not TCP
            pass


def unsent_octets(sock: socket.socket) -> int | None:
    """Octets of C{sock}'s send queue the kernel has not sent yet; None where it cannot say."""
    if not sys.platform.startswith("linux"):
        return None
    out = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, out, True)
    except (OSError, ValueError):  # not TCP, or closed
        return None
    return out[0]


class BodyPacer:
    """
    The chunk size for one connection's body transfers, from the kernel's
    unsent queue before each chunk (see the module docstring).
    """

    __slots__ = ("transport", "write_buffer", "large", "small", "slow", "_clear", "_sock", "_probed",
                 "_tls")

    def __init__(self, transport: Any, write_buffer: int, large: int = LARGE_CHUNK,
                 small: int = SMALL_CHUNK) -> None:
        self.transport = transport
        #: the connection's write buffer while the peer keeps up (ServerConfig.write_buffer)
        self.write_buffer = write_buffer
        self.large = large
        self.small = small
        #: small chunks, small write buffer (None: before the first chunk)
        self.slow: bool | None = None
        #: small chunks in a row the kernel had sent all of
        self._clear = 0
        self._sock: socket.socket | None = None
        self._probed = False
        self._tls: Any = None

    def _unsent(self) -> int | None:
        if not self._probed:
            self._probed = True
            self._sock = real_socket(self.transport)
            if self._sock is not None:
                limit_unsent(self._sock, UNSENT_LIMIT)
                self._tls = tls_write_gatherer(self.transport)
        if self._sock is None:
            return None
        return unsent_octets(self._sock)

    def _set_slow(self, slow: bool) -> None:
        self.slow = slow
        self._clear = 0
        # Slow: below one small chunk, so each one pauses us until the kernel
        # has taken it, and at most one waits in our buffer.
        set_write_buffer(self.transport, self.small // 2 if slow else self.write_buffer)

    def chunk_size(self) -> int:
        """How many octets of the message to read next."""
        unsent = self._unsent()
        if unsent is None:
            return self.large
        if self.slow is None:
            # Nothing is known of the peer yet: a small chunk first.
            self._set_slow(True)
        elif self.slow:
            self._clear = self._clear + 1 if unsent == 0 else 0
            if self._clear >= GROW_AFTER:
                self._set_slow(False)
        elif not self.slow and unsent > LAG_LIMIT:
            self._set_slow(True)
        return self.small if self.slow else self.large

    def written(self) -> None:
        """A chunk was written: while slow, through TLS now, so the write buffer sees it."""
        if self.slow and self._tls is not None:
            self._tls.flush()

    def reset(self) -> None:
        """The transfer is over: the configured write buffer again for the answers that follow."""
        if self.slow:
            self._set_slow(False)
