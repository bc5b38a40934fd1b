"""
What the fuzz targets share: reading control values off the front of an input,
cutting a byte string into chunks as a network would, and small reference
implementations written line by line (slow and obvious) that the fast code in
L{popservice.wire} and L{popservice.body} must agree with.

Nothing here imports atheris: the CI slice runs the targets without it.
"""

from __future__ import annotations

import random

from popservice.wire import LineTooLong

__all__ = ["Source", "chunks", "normalise", "reference_decode", "reference_lines", "reference_top",
           "split_lines", "stuff"]


class Source:
    """Control values read off the front of a fuzz input (zeros once it is used up), then the rest."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        value = self.data[self.pos]
        self.pos += 1
        return value

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


def chunks(data: bytes, seed: int) -> list[bytes]:
    """
    C{data} cut into non-empty pieces, deterministically from C{seed}: whole
    (seed % 4 == 0), byte by byte (1), or pieces of random sizes up to a bound
    that grows with the seed (2, 3), as TCP might deliver them.
    """
    if not data:
        return []
    mode = seed % 4
    if mode == 0:
        return [data]
    if mode == 1:
        return [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    bound = 1 + (seed >> 2) % 16
    out = []
    pos = 0
    while pos < len(data):
        size = rng.randint(1, bound)
        out.append(data[pos:pos + size])
        pos += size
    return out


def split_lines(data: bytes) -> list[bytes]:
    """C{data} split after every LF (the last piece may lack one; no empty last piece)."""
    out = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        out.append(data[pos:end])
        pos = end
    return out


# --------------------------------------------------------------------------
# LineReader

def reference_lines(stream: bytes, max_length: int) -> list[bytes | LineTooLong]:
    """
    What L{popservice.wire.LineReader} must hand out for C{stream}, however it
    is chunked: each LF-terminated line without its line end (one CR before
    the LF dropped), L{LineTooLong} when that plus CRLF exceeds C{max_length};
    and L{LineTooLong} for an unterminated tail already longer than the limit.
    """
    out: list[bytes | LineTooLong] = []
    parts = stream.split(b"\n")
    for part in parts[:-1]:
        line = part[:-1] if part.endswith(b"\r") else part
        out.append(LineTooLong() if len(line) + 2 > max_length else line)
    if len(parts[-1]) > max_length:
        out.append(LineTooLong())
    return out


# --------------------------------------------------------------------------
# Bodies (RFC 1939 section 3)

def normalise(content: bytes) -> bytes:
    """
    The body a client must receive (before stuffing) for message C{content}:
    every LF made CRLF (a CRLF stays one), a lone CR left alone except at the
    very end, where it ends the last line, and a CRLF added to an
    unterminated last line.
    """
    if content.endswith(b"\r"):
        content += b"\n"
    out = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\n"):
        out += b"\r\n"
    return out


def stuff(body: bytes) -> bytes:
    """Byte-stuffing, line by line: a line starting with a dot gets one more."""
    return b"".join(b"." + line if line.startswith(b".") else line for line in split_lines(body))


def reference_decode(stream: bytes) -> tuple[bytes, bool, int]:
    """
    Un-stuff a multi-line body line by line: (content, whether the terminator
    line was found, the index just past it).  The terminator is a line that
    is a dot alone (CRLF or LF); a dot starting any other line is dropped,
    an unfinished last line included.
    """
    out: list[bytes] = []
    pos = 0
    for line in split_lines(stream):
        if line in (b".\r\n", b".\n"):
            return b"".join(out), True, pos + len(line)
        out.append(line[1:] if line.startswith(b".") else line)
        pos += len(line)
    return b"".join(out), False, len(stream)


def reference_top(content: bytes, lines: int) -> tuple[bytes, bool]:
    """
    RFC 1939 section 7 TOP on raw C{content}: the header, the empty line after
    it (LF or CRLF alone) and C{lines} body lines, counted by LF; and whether
    the cut was made (False: everything passes).
    """
    out: list[bytes] = []
    in_header = True
    remaining = lines
    for line in split_lines(content):
        out.append(line)
        if not line.endswith(b"\n"):
            break
        if in_header:
            if line[:-1] in (b"", b"\r"):
                in_header = False
                if remaining == 0:
                    return b"".join(out), True
        else:
            remaining -= 1
            if remaining == 0:
                return b"".join(out), True
    return b"".join(out), False
