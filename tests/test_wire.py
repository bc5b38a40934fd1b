"""The pure wire layer, tested exhaustively with hypothesis (no sockets, no reactor)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from popservice import wire
from popservice.states import COMMANDS, State, legal

# Bytes rich in the characters that matter: CR, LF, dots.
body_bytes = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\x00", b"\xff", b" "]),
                      max_size=60).map(b"".join) | st.binary(max_size=200)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def normalise(data: bytes) -> bytes:
    """The reference: bare LF -> CRLF, CRLF kept, lone CR kept, CRLF at the end."""
    out = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    if out.endswith(b"\r") and not out.endswith(b"\r\n"):
        out += b"\n"
    elif out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def encode(chunks: list[bytes]) -> bytes:
    enc = wire.BodyEncoder()
    return b"".join(enc.encode(c) for c in chunks) + enc.finish()


class ReferenceDecoder:
    """The obvious line-by-line decoder, to hold the fast one in wire.py to."""

    def __init__(self) -> None:
        self.buffer = b""
        self.done = False
        self.trailing = b""
        self.mid_line = False  # part of the current line was already handed out

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.trailing += data
            return b""
        self.buffer += data
        produced = b""
        while not self.done:
            nl = self.buffer.find(b"\n")
            if nl < 0:
                break
            line, self.buffer = self.buffer[:nl + 1], self.buffer[nl + 1:]
            if self.mid_line:
                produced += line
                self.mid_line = False
                continue
            if line in (b".\r\n", b".\n"):
                self.done = True
                self.trailing, self.buffer = self.buffer, b""
                break
            produced += line[1:] if line.startswith(b".") else line
        # A partial line can be handed out unless it may be the terminator.
        if not self.done and self.buffer and (self.mid_line or not self.buffer.startswith(b".")):
            produced += self.buffer
            self.buffer = b""
            self.mid_line = True
        return produced


class BodyRoundTrip(unittest.TestCase):
    @settings(max_examples=2000, deadline=None)
    @given(body_bytes, st.lists(st.integers(min_value=0, max_value=300), max_size=8),
           st.lists(st.integers(min_value=0, max_value=300), max_size=8))
    def test_decode_encode_is_normalised(self, data: bytes, cuts: list[int], cuts2: list[int]) -> None:
        encoded = encode(chunked(data, cuts))
        # The encoding is independent of chunking.
        self.assertEqual(encoded, encode([data]))
        self.assertTrue(encoded.endswith(b".\r\n"))
        dec = wire.BodyDecoder()
        decoded = b"".join(dec.feed(c) for c in chunked(encoded + b"+OK next\r\n", cuts2))
        self.assertTrue(dec.done)
        self.assertEqual(decoded, normalise(data))
        self.assertEqual(dec.trailing, b"+OK next\r\n")

    @settings(max_examples=1000, deadline=None)
    @given(body_bytes)
    def test_no_line_starts_with_unstuffed_dot(self, data: bytes) -> None:
        encoded = encode([data])
        lines = encoded[:-3].split(b"\r\n")
        for line in lines[:-1]:
            if line.startswith(b"."):
                self.assertTrue(line.startswith(b".."), encoded)
        # Every LF is preceded by CR.
        self.assertNotRegex(encoded, rb"(?<!\r)\n")

    @settings(max_examples=1000, deadline=None)
    @given(body_bytes, st.lists(st.integers(min_value=0, max_value=300), max_size=8))
    def test_transmitted_size_is_normalised_length(self, data: bytes, cuts: list[int]) -> None:
        size = wire.transmitted_size(chunked(data, cuts))
        reference = re.sub(rb"(?<!\r)\n", b"\r\n", data)
        if reference.endswith(b"\r"):
            reference += b"\n"
        self.assertEqual(size, len(reference))

    def test_known_twisted_bugs(self) -> None:
        # CRLF split across chunks must not become CR CR LF.
        self.assertEqual(encode([b"a\r", b"\nb\r\n"]), b"a\r\nb\r\n.\r\n")
        # A dot at a chunk edge after a line end is stuffed.
        self.assertEqual(encode([b"a\n", b".b\n"]), b"a\r\n..b\r\n.\r\n")
        self.assertEqual(encode([b"a\r\n", b".", b"\r\n"]), b"a\r\n..\r\n.\r\n")
        self.assertEqual(encode([b"a\r", b"\n", b".x"]), b"a\r\n..x\r\n.\r\n")
        self.assertEqual(encode([b""]), b".\r\n")
        self.assertEqual(encode([b"no newline"]), b"no newline\r\n.\r\n")

    @settings(max_examples=3000, deadline=None)
    @given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n", b".\r\n", b"\n.", b".."]),
                    max_size=16).map(b"".join),
           st.lists(st.integers(min_value=0, max_value=60), max_size=5))
    def test_decoder_matches_reference(self, data: bytes, cuts: list[int]) -> None:
        data += b"\r\n.\r\nNEXT"
        results = []
        for cls in (wire.BodyDecoder, ReferenceDecoder):
            dec = cls()
            out = b"".join(dec.feed(c) for c in chunked(data, cuts))
            results.append((out, dec.done, dec.trailing))
        self.assertEqual(results[0], results[1])

    @settings(max_examples=2000, deadline=None)
    @given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n", b".\r\n", b"\n.", b".."]),
                    max_size=16).map(b"".join),
           st.lists(st.integers(min_value=0, max_value=60), max_size=5), st.binary(max_size=6))
    def test_scan_in_place_matches_feed(self, data: bytes, cuts: list[int], before: bytes) -> None:
        """scan(buffer, start) is feed(buffer[start:]) and says where the next answer starts."""
        data += b"\r\n.\r\nNEXT"
        ref = wire.BodyDecoder()
        expected = b"".join(ref.feed(c) for c in chunked(data, cuts))
        dec = wire.BodyDecoder()
        out, rest = [], b""
        for c in chunked(data, cuts):
            if dec.done:
                rest += c
                continue
            buffer = before + c
            out.append(dec.scan(buffer, len(before)))
            if dec.done:
                rest = buffer[dec.end:]
        self.assertEqual((b"".join(out), dec.done, rest), (expected, ref.done, ref.trailing))

    @settings(max_examples=3000, deadline=None)
    @given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"\r\r", b"\n\r", b"."]),
                    max_size=24).map(b"".join))
    def test_crlf_to_lf_is_replace(self, data: bytes) -> None:
        self.assertEqual(wire.crlf_to_lf(data), data.replace(b"\r\n", b"\n"))

    def test_crlf_to_lf_keeps_lone_cr(self) -> None:
        self.assertEqual(wire.crlf_to_lf(b"a\rb\r\nc\r"), b"a\rb\nc\r")
        self.assertEqual(wire.crlf_to_lf(b"a\r\nb\r\n"), b"a\nb\n")

    def test_decoder_split_terminator(self) -> None:
        data = b"line\r\n..stuffed\r\n.\r\n"
        for i in range(len(data) + 1):
            for j in range(i, len(data) + 1):
                dec = wire.BodyDecoder()
                out = dec.feed(data[:i]) + dec.feed(data[i:j]) + dec.feed(data[j:])
                self.assertEqual(out, b"line\r\n.stuffed\r\n")
                self.assertTrue(dec.done)


class Top(unittest.TestCase):
    message = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"

    @settings(max_examples=500, deadline=None)
    @given(st.integers(min_value=0, max_value=5),
           st.lists(st.integers(min_value=0, max_value=40), max_size=6),
           st.booleans())
    def test_top_any_chunking(self, n: int, cuts: list[int], lf: bool) -> None:
        message = self.message.replace(b"\r\n", b"\n") if lf else self.message
        sep = b"\n" if lf else b"\r\n"
        lines = message.split(sep)
        header = sep.join(lines[:2]) + sep + sep
        body_lines = [line + sep for line in lines[3:-1]]
        expected = header + b"".join(body_lines[:n])
        f = wire.TopFilter(n)
        out = b""
        for chunk in chunked(message, cuts):
            out += f.feed(chunk)
        self.assertEqual(out, expected)

    def test_no_blank_line(self) -> None:
        f = wire.TopFilter(0)
        self.assertEqual(f.feed(b"A: 1\nB: 2\n"), b"A: 1\nB: 2\n")
        self.assertFalse(f.done)


class Commands(unittest.TestCase):
    def test_case_insensitive(self) -> None:
        self.assertEqual(wire.parse_command(b"rEtR 12"), wire.Command("RETR", (12,)))
        # Regression: keywords may contain digits (RFC 6856 UTF8).
        self.assertEqual(wire.parse_command(b"utf8"), wire.Command("UTF8", ()))

    def test_argument_grammar(self) -> None:
        bad = [b"RETR", b"RETR 0", b"RETR -1", b"RETR 1x", b"RETR 1 2", b"RETR +1", b"RETR  1",
               b"RETR 1 ", b"RETR 0x1", b"RETR \xd9\xa1", b"TOP 1", b"TOP 1 x", b"STAT 1", b"DELE",
               b"LIST 1 2", b"USER", b"USER a b", b"PASS", b"QUIT now", b"NOPE", b"RE", b"RETRY 1",
               b"\x00STAT", b"STAT\x00", b"USER " + b"a" * 300]
        for line in bad:
            self.assertIsInstance(wire.parse_command(line), wire.CommandError, line)
        self.assertEqual(wire.parse_command(b"TOP 3 0"), wire.Command("TOP", (3, 0)))
        self.assertEqual(wire.parse_command(b"PASS  two  spaces "), wire.Command("PASS", (" two  spaces ",)))
        self.assertEqual(wire.parse_command(b"LIST"), wire.Command("LIST", ()))

    @settings(max_examples=3000, deadline=None)
    @given(st.binary(max_size=80))
    def test_never_raises_never_echoes(self, line: bytes) -> None:
        result = wire.parse_command(line)
        if isinstance(result, wire.CommandError):
            response = wire.err(result.reason)
            self.assertLessEqual(len(response), wire.MAX_RESPONSE_LINE)
            self.assertRegex(response, rb"^-ERR [A-Za-z ]+\r\n$")
        else:
            self.assertIn(result.keyword, COMMANDS)

    def test_huge_number_is_no_such_message(self) -> None:
        result = wire.parse_command(b"RETR " + b"9" * 30)
        self.assertEqual(result, wire.CommandError("RETR", "no such message"))

    def test_table(self) -> None:
        self.assertTrue(legal(State.AUTHORIZATION, "USER"))
        self.assertFalse(legal(State.TRANSACTION, "USER"))
        self.assertFalse(legal(State.AUTHORIZATION, "RETR"))
        self.assertTrue(legal(State.TRANSACTION, "CAPA"))
        self.assertTrue(legal(State.AUTHORIZATION, "CAPA"))
        for keyword in COMMANDS:
            self.assertFalse(legal(State.UPDATE, keyword))


class Lines(unittest.TestCase):
    @settings(max_examples=1000, deadline=None)
    @given(st.lists(st.binary(max_size=600).filter(lambda b: b"\n" not in b), max_size=6),
           st.lists(st.integers(min_value=0, max_value=4000), max_size=10))
    def test_lines_any_chunking(self, lines: list[bytes], cuts: list[int]) -> None:
        stream = b"".join(line + b"\r\n" for line in lines)
        reader = wire.LineReader(255)
        got: list[object] = []
        for chunk in chunked(stream, cuts):
            reader.feed(chunk)
            while (item := reader.next_line()) is not None:
                got.append(item)
            self.assertLessEqual(reader.buffered, max(len(chunk), 256) + 256)
        expected = [line if len(line) + 2 <= 255 else wire.LineTooLong() for line in lines]
        self.assertEqual(got, expected)


class OverLongLines(unittest.TestCase):
    """Past its limit by more than overflow_margin, a line is reported fatal once."""

    def drain(self, reader: wire.LineReader) -> list[object]:
        out: list[object] = []
        while (item := reader.next_line()) is not None:
            out.append(item)
        return out

    def test_fatal_once_when_the_margin_is_passed_in_pieces(self) -> None:
        reader = wire.LineReader(255)
        got: list[object] = []
        for _ in range(10):
            reader.feed(b"x" * 2000)
            got += self.drain(reader)
            self.assertLessEqual(reader.buffered, 2000)
        reader.feed(b"end\r\nNOOP\r\n")
        got += self.drain(reader)
        self.assertEqual(got, [wire.LineTooLong(), wire.LineTooLong(fatal=True), b"NOOP"])

    def test_fatal_when_the_whole_line_is_there(self) -> None:
        reader = wire.LineReader(255)
        reader.feed(b"x" * (255 + reader.overflow_margin + 10) + b"\r\nNOOP\r\n")
        self.assertEqual(self.drain(reader), [wire.LineTooLong(), wire.LineTooLong(fatal=True), b"NOOP"])

    def test_within_the_margin_not_fatal(self) -> None:
        reader = wire.LineReader(255)
        reader.feed(b"x" * (255 + reader.overflow_margin - 10))
        reader.feed(b"\r\nNOOP\r\n")
        self.assertEqual(self.drain(reader), [wire.LineTooLong(), b"NOOP"])


class Responses(unittest.TestCase):
    def test_codes(self) -> None:
        self.assertEqual(wire.err("Locked", "IN-USE"), b"-ERR [IN-USE] Locked\r\n")
        self.assertEqual(wire.parse_response(b"-ERR [SYS/TEMP] later"),
                         wire.Response(False, "SYS/TEMP", "later"))
        self.assertEqual(wire.parse_response(b"+OK"), wire.Response(True, None, ""))
        self.assertIsNone(wire.parse_response(b"+OKAY"))
        self.assertEqual(len(wire.ok("x" * 1000)), 512)
        self.assertEqual(wire.ok("a\r\nb"), b"+OK a  b\r\n")
