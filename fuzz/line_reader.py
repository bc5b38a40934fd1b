"""
Fuzz target: L{popservice.wire.LineReader} (feed/next_line).

Input: one byte for the line limit, one for the chunking, then the stream.
However the stream is cut into chunks, and whether lines are taken out after
every chunk or only now and then, the reader hands out exactly the lines of
L{fuzz._harness.reference_lines}; after being drained it buffers at most the
limit (a peer can never make it hold more).
"""

from __future__ import annotations

from fuzz._harness import Source, chunks, reference_lines
from popservice.wire import MAX_COMMAND_LINE, LineReader, LineTooLong

_LIMITS = (MAX_COMMAND_LINE, 16384)


def TestOneInput(data: bytes) -> None:
    src = Source(data)
    control = src.byte()
    # small limits (3..66) most of the time, so over-long lines are easy to make
    max_length = _LIMITS[control & 1] if control >= 0xF0 else 3 + control % 64
    seed = src.byte()
    stream = src.rest()
    reader = LineReader(max_length)
    got: list[bytes | LineTooLong] = []
    pieces = chunks(stream, seed)
    lazy = seed & 0x80  # drain only after every third chunk
    for i, piece in enumerate(pieces):
        reader.feed(piece)
        if lazy and i % 3 != 2 and i != len(pieces) - 1:
            continue
        while True:
            line = reader.next_line()
            if line is None:
                break
            assert isinstance(line, (bytes, LineTooLong)), line
            got.append(line)
        assert reader.buffered <= max_length, (reader.buffered, max_length)
    expected = reference_lines(stream, max_length)
    assert got == expected, (got, expected)
    for line in got:
        if isinstance(line, bytes):
            assert b"\n" not in line and len(line) + 2 <= max_length, line
