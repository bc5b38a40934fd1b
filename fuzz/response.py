"""
Fuzz target: status lines, both ways.

  - L{popservice.wire.parse_response} on any line: C{None} unless the line is
    C{+OK} or C{-ERR} alone or followed by a space, else a L{Response} with
    the right status; never raises.
  - L{popservice.wire.ok}/L{popservice.wire.err} with any text and a valid
    response code: one line of at most 512 octets (RFC 2449 section 4) ending
    in CRLF, with no other CR or LF, that parses back to the same status, code
    and text (when it was not cut at 512 octets); and the same holds for the
    line as the server writes it in German (L{popservice.server.i18n.localise}).

Input: one control byte (status, whether to use a code, language), a code
length, the code's bytes (mapped to the code alphabet), then the text.
"""

from __future__ import annotations

from fuzz._harness import Source
from popservice.server.i18n import localise
from popservice.wire import MAX_RESPONSE_LINE, Response, err, ok, parse_response

_CODE_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-/"


def _code(raw: bytes) -> str | None:
    """Map bytes onto the RFC 2449 code alphabet; None when the result is not a valid code."""
    text = bytes(_CODE_ALPHABET[b % len(_CODE_ALPHABET)] for b in raw).decode("ascii")
    parts = text.split("/")
    if not text or any(not p for p in parts):
        return None
    return text


def check_status_line(line: bytes, is_ok: bool) -> Response:
    assert len(line) <= MAX_RESPONSE_LINE, (len(line), line[:80])
    assert line.endswith(b"\r\n"), line[-10:]
    assert b"\r" not in line[:-2] and b"\n" not in line[:-2], line
    parsed = parse_response(line[:-2])
    assert isinstance(parsed, Response), line
    assert parsed.ok is is_ok, line
    return parsed


def TestOneInput(data: bytes) -> None:
    # 1. any bytes as a status line
    parsed = parse_response(data)
    is_status = (data.startswith(b"+OK") and data[3:4] in (b"", b" ")) or (
        data.startswith(b"-ERR") and data[4:5] in (b"", b" "))
    assert (parsed is not None) == is_status, (data, parsed)
    if parsed is not None:
        assert parsed.ok is data.startswith(b"+OK")
        assert isinstance(parsed.text, str) and (parsed.code is None or isinstance(parsed.code, str))

    # 2. status lines we make
    src = Source(data)
    control = src.byte()
    code = _code(src.take(src.byte() % 24)) if control & 2 else None
    text = src.rest().decode("utf-8", "replace")
    is_ok = bool(control & 1)
    line = (ok if is_ok else err)(text, code)
    parsed = check_status_line(line, is_ok)
    # Cut when the whole line would pass 512 octets (the cut may land a few
    # octets short of it: it never splits a UTF-8 character).
    full = (b"+OK" if is_ok else b"-ERR") + b" " + ("[%s] %s" % (code, text) if code is not None
                                                   else text).encode("utf-8")
    cut = len(full) + 2 > MAX_RESPONSE_LINE
    if not cut and not (code is None and text.startswith("[")):
        assert parsed.code == code, (parsed, code)
        assert parsed.text == text.replace("\r", " ").replace("\n", " "), (parsed, text)
    if SKIP_KNOWN_DEFECTS and not _utf8(line):
        return
    assert _utf8(line), line[-8:]
    if control & 4:
        check_status_line(localise(line, "de"), is_ok)


#: A defect found by this target (fuzz/crashes/response-status-line-cut-mid-utf8; regression
#: tests in tests/test_fuzz_slice.py StatusLineCut), fixed: wire._status_line cut a long line
#: inside a UTF-8 character.  True would skip lines left invalid by such a cut.
SKIP_KNOWN_DEFECTS = False


def _utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
