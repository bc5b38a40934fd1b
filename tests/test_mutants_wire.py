"""
Exact-value tests of the wire format (popservice.wire, popservice.body,
popservice.states), written against the mutants that survived
tests/test_wire.py (bench/mutation/run.py wire): limits at their boundaries,
the exact bytes of responses, the command table's grammar per keyword.
"""

from __future__ import annotations

from twisted.trial import unittest

from popservice import wire
from popservice.body import (
    BodyDecoder,
    BodyEncoder,
    LineEndNormaliser,
    TopFilter,
    crlf_to_lf,
    transmitted_size,
)
from popservice.states import COMMANDS, ArgKind, State, legal


def lines_of(reader: wire.LineReader) -> list[bytes | wire.LineTooLong]:
    out: list[bytes | wire.LineTooLong] = []
    while (line := reader.next_line()) is not None:
        out.append(line)
    return out


class LineTooLongValue(unittest.TestCase):
    def test_equality_hash_repr(self) -> None:
        self.assertEqual(wire.LineTooLong(), wire.LineTooLong(fatal=False))
        self.assertNotEqual(wire.LineTooLong(), wire.LineTooLong(fatal=True))
        self.assertNotEqual(wire.LineTooLong(), False)
        self.assertEqual(hash(wire.LineTooLong(True)), hash(wire.LineTooLong(fatal=True)))
        self.assertEqual(len({wire.LineTooLong(), wire.LineTooLong(True), wire.LineTooLong()}), 2)
        self.assertEqual(repr(wire.LineTooLong()), "LineTooLong()")
        self.assertEqual(repr(wire.LineTooLong(fatal=True)), "LineTooLong(fatal=True)")


class LineReaderLimits(unittest.TestCase):
    def test_longest_line_accepted_one_more_refused(self) -> None:
        """RFC 2449 section 4: 255 octets with CRLF: 253 + CRLF passes, 254 + CRLF does not."""
        reader = wire.LineReader()
        reader.feed(b"a" * 253 + b"\r\n" + b"b" * 254 + b"\r\n" + b"c" * 254 + b"\n")
        self.assertEqual(lines_of(reader), [b"a" * 253, wire.LineTooLong(), wire.LineTooLong()])

    def test_bare_lf_line_at_the_limit(self) -> None:
        """A bare-LF line counts as if it ended in CRLF."""
        reader = wire.LineReader(max_length=10)
        reader.feed(b"12345678\n123456789\n")
        self.assertEqual(lines_of(reader), [b"12345678", wire.LineTooLong()])

    def test_line_end_just_past_the_limit_is_found(self) -> None:
        """The line end may sit at index max_length (the limit counts it)."""
        reader = wire.LineReader(max_length=10)
        reader.feed(b"123456789\r\n" + b"x\n")
        self.assertEqual(lines_of(reader), [wire.LineTooLong(), b"x"])
        reader = wire.LineReader(max_length=10)
        reader.feed(b"12345678\r\n" + b"x\n")
        self.assertEqual(lines_of(reader), [b"12345678", b"x"])

    def test_exactly_the_limit_without_line_end_waits(self) -> None:
        reader = wire.LineReader(max_length=10)
        reader.feed(b"1234567890")
        self.assertIsNone(reader.next_line())
        self.assertEqual(reader.buffered, 10)
        reader.feed(b"1")
        self.assertEqual(reader.next_line(), wire.LineTooLong())
        self.assertEqual(reader.buffered, 0)
        reader.feed(b"rest\nok\n")
        self.assertEqual(lines_of(reader), [b"ok"])

    def test_overflow_margin_boundary_when_the_line_is_whole(self) -> None:
        reader = wire.LineReader(max_length=10)
        reader.overflow_margin = 5
        reader.feed(b"x" * 15 + b"\n" + b"y" * 16 + b"\n" + b"ok\n")
        self.assertEqual(lines_of(reader), [wire.LineTooLong(), wire.LineTooLong(),
                                            wire.LineTooLong(fatal=True), b"ok"])

    def test_overflow_margin_boundary_in_pieces(self) -> None:
        """Discarded bytes beyond the limit, its LF included: the margin is tolerated, one more is fatal."""
        for extra, fatal in ((4, False), (5, True)):
            reader = wire.LineReader(max_length=10)
            reader.overflow_margin = 5
            reader.feed(b"x" * 11)
            self.assertEqual(reader.next_line(), wire.LineTooLong())
            reader.feed(b"x" * (extra - 1))
            self.assertIsNone(reader.next_line())
            reader.feed(b"\nok\n")
            expected: list[bytes | wire.LineTooLong] = [wire.LineTooLong(fatal=True)] if fatal else []
            self.assertEqual(lines_of(reader), expected + [b"ok"], extra)

    def test_default_overflow_margin(self) -> None:
        """8192 octets past the limit are tolerated; one more and the line is fatal."""
        for extra, fatal in ((8192, False), (8193, True)):
            reader = wire.LineReader()
            reader.feed(b"x" * (255 + extra) + b"\nok\n")
            expected: list[bytes | wire.LineTooLong] = [wire.LineTooLong()]
            expected += [wire.LineTooLong(fatal=True)] if fatal else []
            self.assertEqual(lines_of(reader), expected + [b"ok"], extra)

    def test_fatal_reported_once_then_lines_again(self) -> None:
        reader = wire.LineReader(max_length=10)
        reader.overflow_margin = 5
        reader.feed(b"x" * 30)
        self.assertEqual(reader.next_line(), wire.LineTooLong())
        reader.feed(b"x" * 30)
        self.assertEqual(reader.next_line(), wire.LineTooLong(fatal=True))
        reader.feed(b"x" * 30)
        self.assertIsNone(reader.next_line())
        reader.feed(b"x\nnext\n")
        self.assertEqual(lines_of(reader), [b"next"])
        reader.feed(b"z" * 11)
        self.assertEqual(reader.next_line(), wire.LineTooLong())
        reader.feed(b"z" * 6)
        self.assertEqual(reader.next_line(), wire.LineTooLong(fatal=True))

    def test_clear_and_take_buffer(self) -> None:
        reader = wire.LineReader(max_length=10)
        reader.feed(b"x" * 11)
        self.assertEqual(reader.next_line(), wire.LineTooLong())
        reader.feed(b"still discarding")
        reader.clear()
        self.assertEqual(reader.buffered, 0)
        reader.feed(b"fresh\n")
        self.assertEqual(lines_of(reader), [b"fresh"])
        reader.feed(b"STLS\r\n\x16\x03\x01")
        self.assertEqual(reader.next_line(), b"STLS")
        self.assertEqual(reader.take_buffer(), b"\x16\x03\x01")
        self.assertEqual(reader.buffered, 0)
        self.assertIsNone(reader.next_line())

    def test_empty_lines(self) -> None:
        reader = wire.LineReader()
        reader.feed(b"\n")
        self.assertEqual(reader.next_line(), b"")
        reader.feed(b"\r\nx\n\n")
        self.assertEqual(lines_of(reader), [b"", b"x", b""])

    def test_cr_kept_inside_the_line(self) -> None:
        reader = wire.LineReader()
        reader.feed(b"a\rb\r\n\r\n")
        self.assertEqual(lines_of(reader), [b"a\rb", b""])


class CommandValues(unittest.TestCase):
    def test_equality_ignores_spec_hash_repr(self) -> None:
        a = wire.Command("LIST", (1,), COMMANDS["LIST"])
        b = wire.Command("LIST", (1,))
        self.assertEqual(a, b)
        self.assertEqual(hash(a), hash(b))
        self.assertNotEqual(a, wire.Command("LIST", (2,)))
        self.assertNotEqual(a, wire.Command("UIDL", (1,)))
        self.assertNotEqual(a, ("LIST", (1,)))
        self.assertEqual(repr(b), "Command(keyword='LIST', args=(1,))")
        self.assertEqual(wire.Command("NOOP").args, ())


class ParseCommand(unittest.TestCase):
    def assertError(self, line: bytes, keyword: str | None, reason: str) -> None:
        self.assertEqual(wire.parse_command(line), wire.CommandError(keyword, reason), line)

    def test_keyword_length(self) -> None:
        self.assertError(b"NO", None, "unknown command")
        self.assertError(b"NOOPS", None, "unknown command")
        self.assertEqual(wire.parse_command(b"TOP 1 0"), wire.Command("TOP", (1, 0)))
        self.assertEqual(wire.parse_command(b"noop"), wire.Command("NOOP"))
        self.assertError(b"NO-P", None, "unknown command")
        self.assertError(b"XYZW", None, "unknown command")

    def test_nul_anywhere(self) -> None:
        self.assertError(b"USER a\x00b", None, "invalid characters in command")
        self.assertError(b"\x00", None, "invalid characters in command")

    def test_message_numbers(self) -> None:
        self.assertEqual(wire.parse_command(b"RETR 9999999999"), wire.Command("RETR", (9999999999,)))
        self.assertError(b"RETR 10000000000", "RETR", "no such message")
        self.assertError(b"TOP 1 10000000000", "TOP", "invalid number")
        self.assertEqual(wire.parse_command(b"TOP 1 9999999999"), wire.Command("TOP", (1, 9999999999)))
        self.assertError(b"RETR 0", "RETR", "no such message")
        self.assertEqual(wire.parse_command(b"RETR 1"), wire.Command("RETR", (1,)))
        self.assertEqual(wire.parse_command(b"TOP 1 0"), wire.Command("TOP", (1, 0)))
        self.assertError(b"RETR -1", "RETR", "invalid number")
        self.assertError(b"RETR +1", "RETR", "invalid number")
        self.assertError(b"DELE 1a", "DELE", "invalid number")

    def test_argument_count(self) -> None:
        self.assertError(b"RETR", "RETR", "missing argument")
        self.assertError(b"TOP 1", "TOP", "missing argument")
        self.assertError(b"TOP 1 2 3", "TOP", "too many arguments")
        self.assertError(b"STAT 1", "STAT", "too many arguments")
        self.assertEqual(wire.parse_command(b"LIST"), wire.Command("LIST"))
        self.assertEqual(wire.parse_command(b"UIDL"), wire.Command("UIDL"))
        self.assertError(b"LIST 1 2", "LIST", "too many arguments")
        self.assertError(b"LIST ", "LIST", "invalid argument syntax")
        self.assertError(b"TOP 1  2", "TOP", "invalid argument syntax")
        self.assertEqual(wire.parse_command(b"AUTH"), wire.Command("AUTH"))
        self.assertEqual(wire.parse_command(b"AUTH PLAIN"), wire.Command("AUTH", ("PLAIN",)))
        self.assertEqual(wire.parse_command(b"AUTH PLAIN ="), wire.Command("AUTH", ("PLAIN", "=")))
        self.assertError(b"APOP alice", "APOP", "missing argument")
        self.assertEqual(wire.parse_command(b"LANG"), wire.Command("LANG"))

    def test_pass_keeps_the_rest(self) -> None:
        self.assertEqual(wire.parse_command(b"PASS  two  spaces "), wire.Command("PASS", (" two  spaces ",)))
        self.assertError(b"PASS", "PASS", "missing argument")
        self.assertError(b"PASS ", "PASS", "missing argument")
        self.assertEqual(wire.parse_command(b"PASS \xff"), wire.Command("PASS", ("\udcff",)))

    def test_argument_lengths_per_command(self) -> None:
        """RFC 1939's 40 octets, 255 for user names (RFC 6856 UTF-8 ones), 16384 for SASL."""
        for keyword, limit in (("USER", 255), ("LANG", 40), ("AUTH", 16384)):
            ok = wire.parse_command(b"%s %s" % (keyword.encode(), b"a" * limit))
            self.assertEqual(ok, wire.Command(keyword, ("a" * limit,)), keyword)
            self.assertError(b"%s %s" % (keyword.encode(), b"a" * (limit + 1)), keyword, "argument too long")
        self.assertEqual(wire.parse_command(b"APOP " + b"u" * 255 + b" " + b"d" * 255),
                         wire.Command("APOP", ("u" * 255, "d" * 255)))
        self.assertError(b"APOP u " + b"d" * 256, "APOP", "argument too long")

    def test_control_characters_in_words(self) -> None:
        for bad in (b"\x01", b"\x1f", b"\x7f", b"\t"):
            self.assertError(b"USER a" + bad, "USER", "invalid characters in argument")
        self.assertEqual(wire.parse_command(b"USER a~!"), wire.Command("USER", ("a~!",)))
        self.assertEqual(wire.parse_command(b"USER \xc3\xa9"), wire.Command("USER", ("\xe9",)))

    def test_spec_is_attached(self) -> None:
        command = wire.parse_command(b"top 1 2")
        assert isinstance(command, wire.Command)
        self.assertIs(command.spec, COMMANDS["TOP"])
        pass_ = wire.parse_command(b"PASS x")
        assert isinstance(pass_, wire.Command)
        self.assertIs(pass_.spec, COMMANDS["PASS"])


class FormatCommand(unittest.TestCase):
    def test_bytes(self) -> None:
        self.assertEqual(wire.format_command("TOP", 1, 0), b"TOP 1 0\r\n")
        self.assertEqual(wire.format_command("USER", "j\xfcrgen"), b"USER j\xc3\xbcrgen\r\n")
        self.assertEqual(wire.format_command("QUIT"), b"QUIT\r\n")

    def test_line_ends_refused(self) -> None:
        for bad in ("a\rb", "a\nb", "\r\n"):
            self.assertRaises(ValueError, wire.format_command, "PASS", bad)


class StatusLines(unittest.TestCase):
    def test_exact_bytes(self) -> None:
        self.assertEqual(wire.ok(), b"+OK\r\n")
        self.assertEqual(wire.ok("hi"), b"+OK hi\r\n")
        self.assertEqual(wire.err("no"), b"-ERR no\r\n")
        self.assertEqual(wire.err("busy", "IN-USE"), b"-ERR [IN-USE] busy\r\n")
        self.assertEqual(wire.err("", "SYS/TEMP"), b"-ERR [SYS/TEMP]\r\n")
        self.assertEqual(wire.ok("x", "A/B-1/C"), b"+OK [A/B-1/C] x\r\n")
        self.assertEqual(wire.err("a\r\nb"), b"-ERR a  b\r\n")

    def test_invalid_codes(self) -> None:
        for code in ("in-use", "", "A//B", "A/", "A B", "A]", "A\n"):
            self.assertRaises(ValueError, wire.err, "x", code)

    def test_length_cut_at_512(self) -> None:
        exact = wire.ok("a" * (512 - 6))
        self.assertEqual(len(exact), 512)
        self.assertEqual(exact, b"+OK " + b"a" * 506 + b"\r\n")
        longer = wire.ok("a" * 507)
        self.assertEqual(longer, b"+OK " + b"a" * 506 + b"\r\n")

    def test_cut_never_splits_a_character(self) -> None:
        # "+OK " is 4 octets, then two-octet characters: the cut at 510 falls inside one.
        line = wire.ok("\xe9" * 300)
        self.assertEqual(line, b"+OK " + "\xe9".encode() * 253 + b"\r\n")
        line = wire.ok("a" + "\xe9" * 300)
        self.assertEqual(line, b"+OK a" + "\xe9".encode() * 252 + b"\r\n")
        line = wire.ok("\u20ac" * 200)  # three octets each
        self.assertEqual(line, b"+OK " + "\u20ac".encode() * 168 + b"\r\n")

    def test_multiline(self) -> None:
        self.assertEqual(wire.multiline(wire.ok(), []), b"+OK\r\n.\r\n")
        self.assertEqual(wire.multiline(b"+OK\r\n", [b"1 2", b".x", b"", b".."]),
                         b"+OK\r\n1 2\r\n..x\r\n\r\n...\r\n.\r\n")


class ParseResponse(unittest.TestCase):
    def test_status_lines(self) -> None:
        self.assertEqual(wire.parse_response(b"+OK"), wire.Response(True, None, ""))
        self.assertEqual(wire.parse_response(b"-ERR"), wire.Response(False, None, ""))
        self.assertEqual(wire.parse_response(b"+OK 2 320"), wire.Response(True, None, "2 320"))
        self.assertEqual(wire.parse_response(b"-ERR [in-use] busy"), wire.Response(False, "IN-USE", "busy"))
        self.assertEqual(wire.parse_response(b"-ERR [SYS/TEMP]"), wire.Response(False, "SYS/TEMP", ""))
        self.assertEqual(wire.parse_response(b"-ERR [AUTH]  two"), wire.Response(False, "AUTH", " two"))
        self.assertEqual(wire.parse_response(b"+OK  x"), wire.Response(True, None, " x"))
        self.assertEqual(wire.parse_response(b"+OK \xff"), wire.Response(True, None, "\ufffd"))
        self.assertEqual(wire.parse_response(b"-ERR no [X] y"), wire.Response(False, None, "no [X] y"))

    def test_not_status_lines(self) -> None:
        for line in (b"", b"+OKAY", b"-ERROR", b"OK", b"+ok", b" +OK", b"+ ", b"-ERR\t"):
            self.assertIsNone(wire.parse_response(line), line)


class StateTable(unittest.TestCase):
    def test_where_each_command_is_legal(self) -> None:
        """RFC 1939 sections 4-7, RFC 2449, RFC 2595, RFC 5034, RFC 6856."""
        authorization = {"USER", "PASS", "APOP", "QUIT", "CAPA", "STLS", "AUTH", "UTF8", "LANG"}
        transaction = {"QUIT", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "CAPA", "LANG"}
        for keyword in COMMANDS:
            self.assertEqual(legal(State.AUTHORIZATION, keyword), keyword in authorization, keyword)
            self.assertEqual(legal(State.TRANSACTION, keyword), keyword in transaction, keyword)
            self.assertFalse(legal(State.UPDATE, keyword), keyword)
        self.assertEqual(set(COMMANDS), authorization | transaction)
        self.assertFalse(legal(State.TRANSACTION, "XTND"))

    def test_multiline_answers(self) -> None:
        multiline = {k for k, spec in COMMANDS.items() if spec.multiline}
        self.assertEqual(multiline, {"LIST", "RETR", "TOP", "UIDL", "CAPA"})

    def test_argument_shapes(self) -> None:
        shapes = {k: (spec.args, spec.required) for k, spec in COMMANDS.items()}
        M, C, W, R = ArgKind.MESSAGE, ArgKind.COUNT, ArgKind.WORD, ArgKind.REST
        self.assertEqual(shapes["TOP"], ((M, C), 2))
        self.assertEqual(shapes["LIST"], ((M,), 0))
        self.assertEqual(shapes["UIDL"], ((M,), 0))
        self.assertEqual(shapes["RETR"], ((M,), 1))
        self.assertEqual(shapes["DELE"], ((M,), 1))
        self.assertEqual(shapes["PASS"], ((R,), 1))
        self.assertEqual(shapes["APOP"], ((W, W), 2))
        self.assertEqual(shapes["AUTH"], ((W, W), 0))
        self.assertEqual(shapes["QUIT"], ((), 0))


class Normaliser(unittest.TestCase):
    def test_cr_held_across_chunks(self) -> None:
        norm = LineEndNormaliser()
        self.assertEqual(norm.feed(b"a\r"), b"a")
        self.assertFalse(norm.at_line_start)
        self.assertEqual(norm.feed(b"\nb"), b"\r\nb")
        self.assertEqual(norm.feed(b"\r"), b"")
        self.assertEqual(norm.feed(b"c"), b"\rc")
        self.assertEqual(norm.feed(b"\n"), b"\r\n")
        self.assertTrue(norm.at_line_start)
        self.assertEqual(norm.finish(), b"")
        self.assertEqual(norm.feed(b"\r"), b"")
        self.assertEqual(norm.finish(), b"\r\n")
        self.assertTrue(norm.at_line_start)
        self.assertEqual(norm.finish(), b"")

    def test_crlf_to_lf(self) -> None:
        self.assertEqual(crlf_to_lf(b"a\r\nb\r\n"), b"a\nb\n")
        self.assertEqual(crlf_to_lf(b"a\rb\r\n"), b"a\rb\n")
        self.assertEqual(crlf_to_lf(b"\r"), b"\r")
        self.assertEqual(crlf_to_lf(b""), b"")

    def test_transmitted_size(self) -> None:
        self.assertEqual(transmitted_size([b"a\nb"]), 4)
        self.assertEqual(transmitted_size([b"a\r", b"\nb\r"]), 6)
        self.assertEqual(transmitted_size(iter([b".\n", b""])), 3)
        self.assertEqual(transmitted_size([]), 0)


class Encoder(unittest.TestCase):
    def test_bytes(self) -> None:
        enc = BodyEncoder()
        self.assertEqual(enc.encode(b".a\n"), b"..a\r\n")
        self.assertEqual(enc.encode(b"."), b"..")
        self.assertEqual(enc.encode(b"b\n.c"), b"b\r\n..c")
        self.assertEqual(enc.encode(b""), b"")
        self.assertEqual(enc.finish(), b"\r\n.\r\n")
        enc = BodyEncoder()
        self.assertEqual(enc.encode(b"x\r\n"), b"x\r\n")
        self.assertEqual(enc.finish(), b".\r\n")
        enc = BodyEncoder()
        self.assertEqual(enc.encode(b"x.y"), b"x.y")
        self.assertEqual(enc.encode(b".z\r"), b".z")
        self.assertEqual(enc.finish(), b"\r\n.\r\n")


class Top(unittest.TestCase):
    def run_top(self, lines: int, chunks: list[bytes]) -> tuple[bytes, bool]:
        top = TopFilter(lines)
        out = b"".join(top.feed(c) for c in chunks)
        return out, top.done

    def test_counts(self) -> None:
        message = b"H: 1\r\nH: 2\r\n\r\nb1\r\nb2\r\nb3\r\n"
        self.assertEqual(self.run_top(0, [message]), (b"H: 1\r\nH: 2\r\n\r\n", True))
        self.assertEqual(self.run_top(1, [message]), (b"H: 1\r\nH: 2\r\n\r\nb1\r\n", True))
        self.assertEqual(self.run_top(2, [message]), (b"H: 1\r\nH: 2\r\n\r\nb1\r\nb2\r\n", True))
        self.assertEqual(self.run_top(5, [message]), (message, False))
        self.assertEqual(self.run_top(0, [b"H: 1\n\nbody\n"]), (b"H: 1\n\n", True))
        self.assertEqual(self.run_top(1, [b"H: 1\n", b"\n", b"bo", b"dy\n", b"more\n"]),
                         (b"H: 1\n\nbody\n", True))

    def test_blank_line_split_across_chunks(self) -> None:
        """The header's end is seen from the first bytes of a line, wherever the chunks cut."""
        self.assertEqual(self.run_top(0, [b"H: 1\r\n", b"\r", b"\nbody\r\n"]), (b"H: 1\r\n\r\n", True))
        self.assertEqual(self.run_top(0, [b"H: 1\r\n\r", b"\nbody\r\n"]), (b"H: 1\r\n\r\n", True))
        self.assertEqual(self.run_top(0, [b"H: 1\r\nX", b"\r\n\r\nbody\n"]), (b"H: 1\r\nX\r\n\r\n", True))
        self.assertEqual(self.run_top(0, [b"H", b": 1\r\n", b"\r\nb\n"]), (b"H: 1\r\n\r\n", True))
        # "\r" and "x" in two chunks: not a blank line
        self.assertEqual(self.run_top(0, [b"H: 1\r\n\r", b"x\r\n\r\nb\n"]), (b"H: 1\r\n\rx\r\n\r\n", True))
        self.assertEqual(self.run_top(0, [b"H: 1\r\n", b"", b"\r\nb\n"]), (b"H: 1\r\n\r\n", True))
        self.assertEqual(self.run_top(0, [b"H: 1\r\n\rx\r\n\r\nb\n"]), (b"H: 1\r\n\rx\r\n\r\n", True))
        # a line "\rx" cut after its second byte is no blank line either
        self.assertEqual(self.run_top(0, [b"H: 1\r\n\rx", b"\n\r\nb\n"]), (b"H: 1\r\n\rx\n\r\n", True))

    def test_done_swallows_the_rest(self) -> None:
        top = TopFilter(0)
        self.assertEqual(top.feed(b"\nrest"), b"\n")
        self.assertEqual(top.feed(b"more\n"), b"")


class Decoder(unittest.TestCase):
    def test_terminator_variants(self) -> None:
        dec = BodyDecoder()
        self.assertEqual(dec.feed(b"a\r\n..b\r\n.\r\nNEXT"), b"a\r\n.b\r\n")
        self.assertTrue(dec.done)
        self.assertEqual(dec.trailing, b"NEXT")
        self.assertEqual(dec.feed(b"+OK"), b"")
        self.assertEqual(dec.trailing, b"NEXT+OK")
        dec = BodyDecoder()
        self.assertEqual(dec.feed(b".\nX"), b"")
        self.assertEqual((dec.done, dec.end, dec.trailing), (True, 2, b"X"))

    def test_split_terminator_and_stuffing(self) -> None:
        dec = BodyDecoder()
        self.assertEqual(dec.feed(b"a\r\n."), b"a\r\n")
        self.assertFalse(dec.done)
        self.assertEqual((dec.trailing, dec.end), (b"", 0))
        self.assertEqual(dec.feed(b"\r"), b"")
        self.assertFalse(dec.done)
        self.assertEqual(dec.feed(b"\nT"), b"")
        self.assertTrue(dec.done)
        self.assertEqual(dec.trailing, b"T")
        dec = BodyDecoder()
        self.assertEqual(dec.feed(b"x\n."), b"x\n")
        self.assertEqual(dec.feed(b".y\n"), b".y\n")
        self.assertEqual(dec.feed(b".\n"), b"")
        self.assertTrue(dec.done)
        dec = BodyDecoder()
        self.assertEqual(dec.feed(b"x\n."), b"x\n")
        self.assertEqual(dec.feed(b"\rz\n.\r\n"), b"\rz\n")
        self.assertTrue(dec.done)

    def test_dot_first_in_a_chunk_after_a_line_end(self) -> None:
        dec = BodyDecoder()
        self.assertEqual(dec.feed(b"a\n"), b"a\n")
        self.assertEqual(dec.feed(b"..b\n"), b".b\n")
        self.assertEqual(dec.feed(b"c."), b"c.")
        self.assertEqual(dec.feed(b".\r\n"), b".\r\n")  # "c.." : no line start
        self.assertFalse(dec.done)
        self.assertEqual(dec.feed(b".\r\n"), b"")
        self.assertTrue(dec.done)

    def test_scan_in_place_indexes(self) -> None:
        data = b"+OK\r\nbody\r\n..x\r\n.\r\n+OK next"
        dec = BodyDecoder()
        self.assertEqual(dec.scan(data, 5), b"body\r\n.x\r\n")
        self.assertTrue(dec.done)
        self.assertEqual(data[dec.end:], b"+OK next")
        dec = BodyDecoder()
        self.assertEqual(dec.scan(b"zzzab\r\n.", 3), b"ab\r\n")
        self.assertEqual(dec.scan(b"yy\r\nrest", 2), b"")
        self.assertTrue(dec.done)
        self.assertEqual(dec.end, 4)
        dec = BodyDecoder()
        self.assertEqual(dec.scan(b"abc", 3), b"")
        self.assertFalse(dec.done)
        self.assertEqual(dec.scan(b"..", 1), b"")
        self.assertEqual(dec.scan(b"\n", 0), b"")
        self.assertTrue(dec.done)
        self.assertEqual(dec.end, 1)
