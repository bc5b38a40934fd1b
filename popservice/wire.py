"""
The POP3 wire format, without I/O: bytes in, events out; values in, bytes out.

Nothing here imports Twisted or touches a socket or a clock, so every rule can be
tested exhaustively (see tests/test_wire.py).  The server and client protocols
are thin shells that feed received bytes in and write what comes out.

RFC 1939 section 3 (commands, responses, byte-stuffing), RFC 2449 section 4
(255-octet command lines, 512-octet responses, response codes).
"""

from __future__ import annotations

import re

from popservice.body import CRLF as CRLF
from popservice.body import TERMINATOR as TERMINATOR

# Message bodies (RFC 1939 section 3) live in popservice.body; the wire API offers them too.
from popservice.body import BodyDecoder as BodyDecoder
from popservice.body import BodyEncoder as BodyEncoder
from popservice.body import LineEndNormaliser as LineEndNormaliser
from popservice.body import TopFilter as TopFilter
from popservice.body import crlf_to_lf as crlf_to_lf
from popservice.body import transmitted_size as transmitted_size
from popservice.value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from popservice.states import ArgKind, CommandSpec

#: RFC 2449 section 4: a command line is at most 255 octets including CRLF.
MAX_COMMAND_LINE = 255
#: RFC 2449 section 4: a response line is at most 512 octets including CRLF.
MAX_RESPONSE_LINE = 512
#: RFC 1939 section 3: an argument is at most 40 octets.
MAX_ARGUMENT = 40
#: A message number or line count longer than this cannot name anything real.
_MAX_DIGITS = 10


# --------------------------------------------------------------------------
# Reading lines

class LineTooLong:
    """
    A line longer than the reader's limit arrived; it was discarded.  C{fatal}:
    it went on past the limit by more than the reader's C{overflow_margin}
    (reported once more, then): no client has a reason to, so the caller
    should end the connection rather than keep reading and discarding.
    """

    __slots__ = ("fatal",)

    def __init__(self, fatal: bool = False) -> None:
        self.fatal = fatal

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LineTooLong) and other.fatal == self.fatal

    def __hash__(self) -> int:
        return hash((LineTooLong, self.fatal))

    def __repr__(self) -> str:
        return "LineTooLong(fatal=True)" if self.fatal else "LineTooLong()"


_EMPTY = b""


class LineReader:
    """
    Split a byte stream into lines ending in LF (CRLF or bare LF), with a hard
    limit on line length so a peer can never make us buffer without bound.

    ``feed`` only stores bytes; ``next_line`` hands out one line at a time so the
    caller decides how much work to do per read event (fairness, backpressure).
    """

    __slots__ = ("max_length", "overflow_margin", "_buffer", "_discarding", "_discarded", "_fatal_pending")

    def __init__(self, max_length: int = MAX_COMMAND_LINE) -> None:
        self.max_length = max_length
        #: bytes of one over-long line tolerated past C{max_length} before it is fatal
        self.overflow_margin = 8192
        #: what is buffered: a bytearray, or the shared empty bytes when nothing is (an idle
        #: connection holds no buffer object of its own)
        self._buffer: bytes | bytearray = _EMPTY
        self._discarding = False
        #: bytes of the current over-long line thrown away so far (-1: reported fatal)
        self._discarded = 0
        self._fatal_pending = False

    def feed(self, data: bytes) -> None:
        if self._buffer:
            self._buffer += data
        elif data:
            self._buffer = bytearray(data)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def clear(self) -> None:
        """Forget everything buffered (RFC 2595 section 4: after STLS)."""
        self._buffer = _EMPTY
        self._discarding = False
        self._discarded = 0
        self._fatal_pending = False

    def take_buffer(self) -> bytes:
        """Return and forget every buffered byte (hand over to a raw consumer)."""
        data = bytes(self._buffer)
        self.clear()
        return data

    def _drop(self, count: int) -> None:
        """Forget the first C{count} bytes buffered (all of them: the buffer object goes too)."""
        buffer = self._buffer
        if count >= len(buffer):
            self._buffer = _EMPTY
        elif isinstance(buffer, bytearray):  # (what is not empty is a bytearray)
            del buffer[:count]

    def next_line(self) -> bytes | LineTooLong | None:
        """
        The next complete line without its line end, L{LineTooLong} for an
        over-long line (reported once, when its end arrives, or at once when
        the limit is passed), or C{None} when more bytes are needed.
        """
        if self._fatal_pending:
            self._fatal_pending = False
            return LineTooLong(fatal=True)
        while True:
            if self._discarding:
                nl = self._buffer.find(b"\n")
                gone = len(self._buffer) if nl < 0 else nl + 1
                self._drop(gone)
                self._discarding = nl < 0
                if self._discarded >= 0:
                    self._discarded += gone
                    if self._discarded > self.overflow_margin:
                        # Reported once per line: -1 until its end arrives.
                        self._discarded = -1 if self._discarding else 0
                        return LineTooLong(fatal=True)
                if self._discarding:
                    return None
                self._discarded = 0
                continue
            nl = self._buffer.find(b"\n", 0, self.max_length + 1)
            if nl < 0:
                if len(self._buffer) > self.max_length:
                    # Too long: throw the line away (up to its end if it is
                    # here, else up to the end that is still to come).
                    nl = self._buffer.find(b"\n")
                    if nl >= 0:
                        self._drop(nl + 1)
                        self._fatal_pending = nl - self.max_length > self.overflow_margin
                    else:
                        self._discarded = len(self._buffer) - self.max_length
                        self._buffer = _EMPTY
                        self._discarding = True
                    return LineTooLong()
                return None
            line = bytes(self._buffer[:nl])
            self._drop(nl + 1)
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) + 2 > self.max_length:
                return LineTooLong()
            return line


# --------------------------------------------------------------------------
# Commands

class Command:
    """
    A syntactically valid command line: upper-case keyword and its arguments
    (and the table entry that parsed it, which takes no part in equality).
    """

    __slots__ = ("args", "keyword", "spec")

    def __init__(self, keyword: str, args: tuple[str | int, ...] = (),
                 spec: CommandSpec | None = None) -> None:
        self.keyword = keyword
        self.args = args
        self.spec = spec

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Command) and self.keyword == other.keyword
                and self.args == other.args)

    def __hash__(self) -> int:
        return hash((self.keyword, self.args))

    def __repr__(self) -> str:
        return f"Command(keyword={self.keyword!r}, args={self.args!r})"


class CommandError(Value):
    """
    A command line that cannot be executed.  C{reason} is a fixed text chosen
    here, never a copy of the client's bytes (responses must not echo input).
    """

    __slots__ = ("keyword", "reason")

    def __init__(self, keyword: str | None, reason: str) -> None:
        self.keyword: Final = keyword
        self.reason: Final = reason


_CONTROL = re.compile(rb"[\x00-\x20\x7f]")

#: the command table and the argument kinds of L{popservice.states}, loaded at the first parse
_table: tuple[dict[str, CommandSpec], type[ArgKind]] | None = None


def _load_table() -> tuple[dict[str, CommandSpec], type[ArgKind]]:
    # Imported here rather than with this module: clients use the framing in
    # this module but never parse commands, and the table's enums cost the
    # fetch client's start-up a few milliseconds.
    global _table
    from popservice.states import COMMANDS, ArgKind

    _table = (COMMANDS, ArgKind)
    return _table


def _parse_number(raw: bytes, message: bool) -> int | str:
    if not raw.isdigit():  # ASCII digits only, for bytes
        return "invalid number"
    if len(raw) > _MAX_DIGITS:
        return "no such message" if message else "invalid number"
    value = int(raw)
    if message and value < 1:
        return "no such message"
    return value


#: command lines already parsed whose arguments are all numbers, or none (C{STAT}, C{RETR 3}):
#: most of a session's lines; a line with words (C{USER}, C{PASS}, C{AUTH}...) is never kept
_parsed: dict[bytes, Command] = {}
#: at most this many kept; then the cache starts again
PARSED_CACHE_SIZE = 512


def parse_command(line: bytes) -> Command | CommandError:
    """
    Parse one command line (without its line end): L{_parse_command}, its
    result shared between equal lines of numbers only (a L{Command} is not
    changed by those who get it).
    """
    cached = _parsed.get(line)
    if cached is not None:
        return cached
    command = _parse_command(line)
    if isinstance(command, Command) and all(type(a) is int for a in command.args):
        if len(_parsed) >= PARSED_CACHE_SIZE:
            _parsed.clear()
        _parsed[line] = command
    return command


def _parse_command(line: bytes) -> Command | CommandError:
    """
    Parse one command line (without its line end).  RFC 1939 section 3:
    keyword of 3-4 letters, case-insensitive, arguments separated by single
    spaces, printable ASCII.  The argument grammar comes from the table in
    L{popservice.states}; PASS keeps the rest of the line as one argument
    because passwords may contain spaces.
    """
    COMMANDS, ArgKind = _table or _load_table()  # noqa: N806 (the module's names)
    if b"\x00" in line:
        return CommandError(None, "invalid characters in command")
    keyword_raw, sep, rest = line.partition(b" ")
    if not 3 <= len(keyword_raw) <= 4 or not keyword_raw.isalnum():  # ASCII letters, digits (UTF8)
        return CommandError(None, "unknown command")
    keyword = keyword_raw.decode("ascii").upper()
    spec = COMMANDS.get(keyword)
    if spec is None:
        return CommandError(None, "unknown command")
    kinds = spec.args
    if kinds and kinds[-1] is ArgKind.REST:
        if not sep or not rest:
            return CommandError(keyword, "missing argument")
        return Command(keyword, (rest.decode("utf-8", "surrogateescape"),), spec)
    raw_args = rest.split(b" ") if sep else []
    if sep and any(not a for a in raw_args):
        return CommandError(keyword, "invalid argument syntax")
    if len(raw_args) < spec.required:
        return CommandError(keyword, "missing argument")
    if len(raw_args) > len(kinds):
        return CommandError(keyword, "too many arguments")
    args: list[str | int] = []
    for raw, kind in zip(raw_args, kinds[:len(raw_args)], strict=True):
        if kind in (ArgKind.MESSAGE, ArgKind.COUNT):
            value = _parse_number(raw, kind is ArgKind.MESSAGE)
            if isinstance(value, str):
                return CommandError(keyword, value)
            args.append(value)
        else:
            if len(raw) > spec.max_arg_length:
                return CommandError(keyword, "argument too long")
            if _CONTROL.search(raw):
                return CommandError(keyword, "invalid characters in argument")
            args.append(raw.decode("utf-8", "surrogateescape"))
    return Command(keyword, tuple(args), spec)


def format_command(keyword: str, *args: str | int) -> bytes:
    """A command line for the client side, CRLF included."""
    parts = [keyword.encode("ascii")]
    for a in args:
        parts.append(str(a).encode("utf-8"))
    line = b" ".join(parts)
    if b"\r" in line or b"\n" in line:
        raise ValueError("line ends in command arguments")
    return line + CRLF


# --------------------------------------------------------------------------
# Responses

_CODE = re.compile(r"[A-Z0-9-]+(/[A-Z0-9-]+)*\Z")


def _status_line(status: bytes, text: str, code: str | None) -> bytes:
    if code is not None:
        if not _CODE.match(code):
            raise ValueError("invalid response code")
        text = "[%s] %s" % (code, text) if text else "[%s]" % (code,)
    body = text.encode("utf-8").replace(b"\r", b" ").replace(b"\n", b" ")
    line = status + (b" " + body if body else b"")
    if len(line) + 2 > MAX_RESPONSE_LINE:
        cut = MAX_RESPONSE_LINE - 2
        while cut > 0 and line[cut] & 0xC0 == 0x80:
            cut -= 1  # never inside a UTF-8 character
        line = line[:cut]
    return line + CRLF


def ok(text: str = "", code: str | None = None) -> bytes:
    """A C{+OK} status line (RFC 1939 section 3)."""
    return _status_line(b"+OK", text, code)


def err(text: str, code: str | None = None) -> bytes:
    """An C{-ERR} status line, with an RFC 2449 response code when given."""
    return _status_line(b"-ERR", text, code)


def multiline(first: bytes, lines: "list[bytes]") -> bytes:
    """A complete multi-line response: status line, stuffed lines, terminator."""
    out = [first]
    for line in lines:
        if line.startswith(b"."):
            out.append(b".")
        out.append(line)
        out.append(CRLF)
    out.append(TERMINATOR)
    return b"".join(out)


class Response(Value):
    """A status line as the client sees it."""

    __slots__ = ("ok", "code", "text")

    def __init__(self, ok: bool, code: str | None, text: str) -> None:
        self.ok: Final = ok
        self.code: Final = code
        self.text: Final = text


_RESPONSE_CODE = re.compile(r"\[([^\]]*)\]\s?")


def parse_response(line: bytes) -> Response | None:
    """Parse a status line (without line end); C{None} when it is not one."""
    if line.startswith(b"+OK"):
        ok_, rest = True, line[3:]
    elif line.startswith(b"-ERR"):
        ok_, rest = False, line[4:]
    else:
        return None
    if rest and not rest.startswith(b" "):
        return None
    text = rest[1:].decode("utf-8", "replace")
    code = None
    m = _RESPONSE_CODE.match(text)
    if m:
        code = m.group(1).upper()
        text = text[m.end():]
    return Response(ok_, code, text)

