"""
Fuzz target: the server's side of bodies and its round trip through the client's.

Input: two chunking bytes, a TOP line count, then a message.  Encoded in
chunks with L{BodyEncoder} (as RETR streams it), the message

  - becomes a well-formed body: CRLF line ends only, every line starting with
    a dot stuffed, and C{.CRLF} (after a CRLF) only at the very end;
  - decodes (L{BodyDecoder}, chunked differently) to the CRLF-normalised
    message (L{fuzz._harness.normalise}), with nothing after the terminator;
  - has the size LIST and STAT report (L{transmitted_size}): the normalised
    length less the CRLF added to an unterminated last line;

and L{TopFilter} cuts it, chunk by chunk, where L{reference_top} does.
L{crlf_to_lf} equals C{replace(CRLF, LF)} as its docstring promises.
"""

from __future__ import annotations

from fuzz._harness import Source, chunks, normalise, reference_top, split_lines, stuff
from popservice.body import BodyDecoder, BodyEncoder, TopFilter, crlf_to_lf, transmitted_size


def encode(pieces: list[bytes]) -> bytes:
    encoder = BodyEncoder()
    return b"".join([encoder.encode(p) for p in pieces] + [encoder.finish()])


def TestOneInput(data: bytes) -> None:
    src = Source(data)
    seed, seed2, top_lines = src.byte(), src.byte(), src.byte() % 6
    content = src.rest()
    pieces = chunks(content, seed)

    assert crlf_to_lf(content) == content.replace(b"\r\n", b"\n")

    body = encode(pieces)
    expected = normalise(content)
    assert body == stuff(expected) + b".\r\n", (content, body)
    assert body.count(b"\n") == body.count(b"\r\n"), body
    lines = split_lines(body)
    assert lines[-1] == b".\r\n" and all(line != b".\r\n" for line in lines[:-1]), body
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines[:-1]), body

    decoder = BodyDecoder()
    decoded = b"".join(decoder.feed(p) for p in chunks(body, seed2))
    assert decoder.done and decoded == expected and decoder.trailing == b"", (content, decoded, expected)

    added = 2 if content and not content.endswith((b"\n", b"\r")) else 0
    assert transmitted_size(pieces) == len(expected) - added, (content, transmitted_size(pieces))
    assert transmitted_size(iter(chunks(content, seed2))) == len(expected) - added

    # TOP: chunk by chunk, as the server's transfer feeds it, stopping once done
    top = TopFilter(top_lines)
    cut = []
    for piece in pieces:
        cut.append(top.feed(piece))
        if top.done:
            break
    want, done = reference_top(content, top_lines)
    assert top.done == done and b"".join(cut) == want, (content, top_lines, cut, want)
    assert top.feed(b"more\n") == b"" if top.done else True
    assert encode(cut) == stuff(normalise(want)) + b".\r\n"
