"""
Fuzz target: L{popservice.wire.parse_command} on any line.

Whatever the bytes, the answer is a L{Command} that fits the table in
L{popservice.states} (keyword known, argument count and kinds as the table
says, numbers in range, words printable and within the length limit), or a
L{CommandError} whose reason is one of the fixed texts (responses never echo
client bytes).  A parsed command written out again parses to the same command.
"""

from __future__ import annotations

from popservice.states import COMMANDS, ArgKind
from popservice.wire import Command, CommandError, parse_command

#: Every reason parse_command gives (fixed texts, never client bytes).
REASONS = frozenset({
    "invalid characters in command", "unknown command", "missing argument", "invalid argument syntax",
    "too many arguments", "invalid number", "no such message", "argument too long",
    "invalid characters in argument",
})


def _encode(arg: str | int) -> bytes:
    return str(arg).encode("utf-8", "surrogateescape")


def check_command(line: bytes, result: Command | CommandError) -> None:
    if isinstance(result, CommandError):
        assert result.reason in REASONS, result
        assert result.keyword is None or result.keyword in COMMANDS, result
        return
    assert isinstance(result, Command), result
    spec = COMMANDS[result.keyword]
    assert result.spec is spec
    assert spec.required <= len(result.args) <= len(spec.args), result
    for arg, kind in zip(result.args, spec.args, strict=False):
        if kind is ArgKind.MESSAGE:
            assert isinstance(arg, int) and 1 <= arg < 10 ** 10, result
        elif kind is ArgKind.COUNT:
            assert isinstance(arg, int) and 0 <= arg < 10 ** 10, result
        elif kind is ArgKind.WORD:
            assert isinstance(arg, str) and arg, result
            raw = _encode(arg)
            assert len(raw) <= spec.max_arg_length, result
            assert not any(b <= 0x20 or b == 0x7F for b in raw), result
        else:
            assert isinstance(arg, str) and arg, result
    # the same command, written out again (canonical form: upper case, plain numbers)
    again = parse_command(b" ".join([result.keyword.encode("ascii"), *map(_encode, result.args)]))
    assert again == result, (result, again)


def TestOneInput(data: bytes) -> None:
    check_command(data, parse_command(data))
    # the keyword case never matters
    head, sep, rest = data.partition(b" ")
    swapped = head.swapcase() + sep + rest
    a, b = parse_command(data), parse_command(swapped)
    assert type(a) is type(b) and a == b, (a, b)
