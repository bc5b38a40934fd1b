"""
Multi-line bodies on the wire (RFC 1939 section 3), without I/O: line ends
made CRLF across chunk boundaries, byte-stuffing and the terminating dot line
(L{BodyEncoder}), the octet count as transmitted (L{transmitted_size}, what
LIST and STAT report), the TOP cut after the header and n body lines
(L{TopFilter}, RFC 1939 section 7), and the client's side: un-stuffing and
finding the end (L{BodyDecoder}), CRLF to LF (L{crlf_to_lf}).

Like L{popservice.wire}, which re-exports all of it, this imports nothing of
Twisted and touches no socket or clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

CRLF = b"\r\n"
TERMINATOR = b".\r\n"

class LineEndNormaliser:
    """
    Incrementally convert line ends to CRLF: CRLF stays, a bare LF becomes
    CRLF, a lone CR (not followed by LF) passes unchanged, as Dovecot does.  A
    CR at the end of a chunk is held back until the next chunk shows whether an
    LF follows, so CRLF split across chunks never becomes CR CR LF.
    """

    def __init__(self) -> None:
        self._held_cr = False
        #: True when nothing has been emitted or the last byte emitted was LF.
        self.at_line_start = True

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            self._held_cr = True
            chunk = chunk[:-1]
        if not chunk:
            return b""
        out = crlf_to_lf(chunk).replace(b"\n", b"\r\n")
        self.at_line_start = out.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        """Flush a held CR: a CR at the very end of the message ends its last line."""
        if self._held_cr:
            self._held_cr = False
            self.at_line_start = True
            return b"\r\n"
        return b""


class BodyEncoder:
    """
    Turn message content, in chunks of any size, into the bytes of a
    multi-line response body: CRLF line ends, leading dots stuffed (RFC 1939
    section 3), a CRLF added when the message does not end in one, and the
    C{.CRLF} terminator from L{finish}.
    """

    def __init__(self) -> None:
        self._norm = LineEndNormaliser()

    def _stuff(self, data: bytes, at_line_start: bool) -> bytes:
        # memchr finds a dot at once in text; base64 (most of a big message)
        # has none, and then the two-byte search below is skipped.
        if b"." not in data:
            return data
        data = data.replace(b"\n.", b"\n..")
        if at_line_start and data.startswith(b"."):
            data = b"." + data
        return data

    def encode(self, chunk: bytes) -> bytes:
        was_at_start = self._norm.at_line_start
        return self._stuff(self._norm.feed(chunk), was_at_start)

    def finish(self) -> bytes:
        tail = self._norm.finish()
        if not self._norm.at_line_start:
            tail += CRLF
        return tail + TERMINATOR


def transmitted_size(chunks: "Iterator[bytes] | list[bytes]") -> int:
    """
    The size LIST and STAT report: octets with CRLF line ends, before
    byte-stuffing and without the CRLF added to an unterminated last line
    (what Dovecot's C{,W=} records).
    """
    norm = LineEndNormaliser()
    total = 0
    for chunk in chunks:
        total += len(norm.feed(chunk))
    return total + len(norm.finish())


class TopFilter:
    """
    Pass the header, the blank line after it and the first C{lines} body lines
    of a message (RFC 1939 section 7, TOP), chunk by chunk.  Lines are counted by
    LF; the header ends at the first empty line (LF or CRLF alone).
    """

    def __init__(self, lines: int) -> None:
        self._remaining = lines
        self._in_header = True
        self._head = b""  # first two bytes of the current, unfinished line
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        pos = 0
        while True:
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                self._head = (self._head + chunk[pos:pos + 2])[:2]
                return chunk
            head = (self._head + chunk[pos:min(nl, pos + 2)])[:2]
            self._head = b""
            pos = nl + 1
            if self._in_header:
                if head in (b"", b"\r"):
                    self._in_header = False
                    if self._remaining == 0:
                        self.done = True
                        return chunk[:pos]
            else:
                self._remaining -= 1
                if self._remaining == 0:
                    self.done = True
                    return chunk[:pos]


#: a line that starts with a dot (the match ends just past the dot)
_LINE_DOT = re.compile(rb"\n\.")
#: a CR not followed by LF
_LONE_CR = re.compile(rb"\r(?!\n)")


def crlf_to_lf(data: bytes) -> bytes:
    """
    Always equal to C{data.replace(b"\\r\\n", b"\\n")}, computed faster:
    when no CR stands alone (the usual case) every CR is deleted with a
    one-byte scan, which is several times quicker than the two-byte search;
    data without any CR (a Maildir's LF files) is returned after one
    C{memchr}.
    """
    if b"\r" not in data:
        return data
    if _LONE_CR.search(data) is None:
        return data.replace(b"\r", b"")
    return data.replace(b"\r\n", b"\n")


class BodyDecoder:
    """
    The client side of L{BodyEncoder}: feed the bytes that follow a multi-line
    status line, get back the unstuffed content, until the terminator is seen
    (then C{done}; bytes after it are in C{trailing}).  No line length limit
    applies and memory is bounded by the chunk size: it scans for C{LF .}
    with one compiled pattern instead of walking the body line by line, so a
    chunk costs a few C calls unless a line starts with a dot.  (The regular
    expression engine finds a two-byte needle about twice as fast as
    C{bytes.find}, whose short-needle search goes byte by byte.)
    """

    __slots__ = ("_line_start", "_pending", "done", "end", "trailing")

    def __init__(self) -> None:
        self._line_start = True
        self._pending = b""
        self.done = False
        #: after L{scan} finished: the index just past the terminator
        self.end = 0
        self.trailing = b""

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.trailing += data
            return b""
        out = self.scan(data, 0)
        if self.end:  # set (past a terminator, so never 0) once done
            self.trailing = data[self.end:]
        return out

    def scan(self, data: bytes, start: int) -> bytes:
        """
        L{feed} C{data[start:]} without copying it: a reader that keeps one
        receive buffer for several pipelined answers scans it in place and,
        once C{done}, goes on from C{end}.
        """
        pending = self._pending
        if pending:
            data = pending + data[start:]
            self._pending = b""
        pos = 0 if pending else start
        n = len(data)
        if pos >= n:
            return b""
        out: list[bytes] = []
        find = _LINE_DOT.search
        # data[pos:] is not yet handed out; a line that starts with a dot is
        # found by the pattern, or is the very first byte after a line end
        at_dot = self._line_start and data[pos] == 0x2E  # "."
        while True:
            if at_dot:
                dot, at_dot = pos, False
            else:
                m = find(data, pos)
                if m is None:
                    out.append(data[pos:])
                    self._line_start = data.endswith(b"\n")
                    return out[0] if len(out) == 1 else b"".join(out)
                dot = m.end() - 1
            rest = data[dot + 1:dot + 3]
            if rest == b"\r\n" or rest[:1] == b"\n":  # the terminator
                out.append(data[pos:dot])
                self.done = True
                end = dot + 1 + (2 if rest == b"\r\n" else 1)
                # an index into the caller's data (the held-back bytes came before it)
                self.end = end - len(pending) + start if pending else end
                return b"".join(out)
            if not rest or rest == b"\r":  # terminator or stuffing: the next bytes decide
                out.append(data[pos:dot])
                self._pending = data[dot:]
                self._line_start = True
                return b"".join(out)
            out.append(data[pos:dot])
            pos = dot + 1  # drop the stuffing dot
