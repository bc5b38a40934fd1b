"""
Fuzz target: L{popservice.body.BodyDecoder}, the client's un-stuffing.

Input: a chunking byte, a mode byte, then the bytes that follow a multi-line
status line.  Cut into chunks, each handed over with C{feed} or with C{scan}
from an offset into a larger receive buffer (as the pipelining client does),
the decoder must agree with the line-by-line L{reference_decode}: the same
content, C{done} exactly when a terminator line came, C{end}/C{trailing}
pointing just past it; before the end, what it handed out is a prefix of the
reference's content.  It documents no exception, so it may raise none.
"""

from __future__ import annotations

import random

from fuzz._harness import Source, chunks, reference_decode
from popservice.body import BodyDecoder

_JUNK = (b"", b".", b"\r\n.\r\n", b".\r", b"\n", b"x" * 7)


def finished(decoder: BodyDecoder) -> bool:
    """C{decoder.done} (a call, so type checkers do not narrow it across feed and scan)."""
    return decoder.done


def decode(stream: bytes, seed: int, mode: int) -> tuple[bytes, bool, bytes]:
    """(content, done, what followed the terminator) from a decoder fed C{stream} in chunks."""
    rng = random.Random(mode)
    decoder = BodyDecoder()
    out: list[bytes] = []
    trailing: list[bytes] = []
    by_feed = True  # the terminator was found by feed(), which keeps C{trailing} itself
    for piece in chunks(stream, seed):
        if finished(decoder):
            trailing.append(piece)
            if by_feed:
                assert decoder.feed(piece) == b""
            continue
        if mode & 2 and rng.random() < 0.5:
            junk = rng.choice(_JUNK)
            buffer = junk + piece + rng.choice(_JUNK)
            result = decoder.scan(buffer[:len(junk) + len(piece)], len(junk))
            if finished(decoder):
                by_feed = False
                assert len(junk) < decoder.end <= len(junk) + len(piece), (decoder.end, junk, piece)
                trailing.append(buffer[decoder.end:len(junk) + len(piece)])
        else:
            result = decoder.feed(piece)
            if finished(decoder):
                trailing.append(decoder.trailing)
        assert isinstance(result, bytes)
        out.append(result)
    if decoder.done and by_feed:
        assert decoder.trailing == b"".join(trailing), (decoder.trailing, trailing)
    return b"".join(out), decoder.done, b"".join(trailing)


def TestOneInput(data: bytes) -> None:
    src = Source(data)
    seed = src.byte()
    mode = src.byte()
    stream = src.rest()
    expected, done, end = reference_decode(stream)
    content, got_done, trailing = decode(stream, seed, mode)
    assert got_done == done, (stream, got_done)
    if done:
        assert content == expected, (stream, content, expected)
        assert trailing == stream[end:], (stream, trailing, stream[end:])
        return
    assert expected.startswith(content), (stream, content, expected)
    # Finish it: whatever was held back comes out once a terminator follows.
    finished = stream + b"\r\n.\r\n"
    expected, done, end = reference_decode(finished)
    content, got_done, trailing = decode(finished, seed, mode)
    assert done and got_done and content == expected, (finished, content, expected)
    assert trailing == finished[end:], (finished, trailing)
