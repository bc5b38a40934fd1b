"""
The POP3 session states and the one table of which command is legal where.

RFC 1939 section 3: AUTHORIZATION, then TRANSACTION after a successful login,
then UPDATE after QUIT.  Extensions add commands to the first two states:
CAPA and UTF8/LANG (RFC 2449, RFC 6856), STLS (RFC 2595), AUTH (RFC 5034).
Server and client both read this table; nothing else decides legality.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


class ArgKind(enum.Enum):
    #: a message number: digits only, 1..n
    MESSAGE = "message"
    #: a non-negative line count (TOP)
    COUNT = "count"
    #: one printable word
    WORD = "word"
    #: the rest of the line, spaces included (PASS)
    REST = "rest"


class CommandSpec(NamedTuple):
    keyword: str
    states: frozenset[State]
    args: tuple[ArgKind, ...] = ()
    #: how many of C{args} must be present
    required: int = 0
    #: RFC 1939 allows 40 octets an argument; SASL responses need more.
    max_arg_length: int = 40
    #: answered with a multi-line response when it succeeds
    multiline: bool = False


_A = frozenset({State.AUTHORIZATION})
_T = frozenset({State.TRANSACTION})
_AT = _A | _T


def _spec(keyword: str, states: frozenset[State], *args: ArgKind, required: int = -1,
          max_arg_length: int = 40, multiline: bool = False) -> CommandSpec:
    return CommandSpec(keyword, states, tuple(args), len(args) if required < 0 else required,
                       max_arg_length, multiline)


#: The table.  Keyword -> where it is legal and the shape of its arguments.
COMMANDS: dict[str, CommandSpec] = {
    s.keyword: s
    for s in (
        # RFC 1939 section 4 (AUTHORIZATION) and section 7 (optional commands)
        _spec("USER", _A, ArgKind.WORD, max_arg_length=255),
        _spec("PASS", _A, ArgKind.REST),
        _spec("APOP", _A, ArgKind.WORD, ArgKind.WORD, max_arg_length=255),
        _spec("QUIT", _AT),
        # RFC 1939 section 5 (TRANSACTION)
        _spec("STAT", _T),
        _spec("LIST", _T, ArgKind.MESSAGE, required=0, multiline=True),
        _spec("RETR", _T, ArgKind.MESSAGE, multiline=True),
        _spec("DELE", _T, ArgKind.MESSAGE),
        _spec("NOOP", _T),
        _spec("RSET", _T),
        _spec("TOP", _T, ArgKind.MESSAGE, ArgKind.COUNT, multiline=True),
        _spec("UIDL", _T, ArgKind.MESSAGE, required=0, multiline=True),
        # RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 AUTH, RFC 6856 UTF8/LANG
        _spec("CAPA", _AT, multiline=True),
        _spec("STLS", _A),
        _spec("AUTH", _A, ArgKind.WORD, ArgKind.WORD, required=0, max_arg_length=16384),
        _spec("UTF8", _A),
        _spec("LANG", _AT, ArgKind.WORD, required=0),
    )
}


def legal(state: State, keyword: str, spec: CommandSpec | None = None) -> bool:
    """
    Whether C{keyword} may be used in C{state}.  C{spec}: its entry in the
    table, when the caller has it already (a parsed command's), sparing the
    lookup.
    """
    if spec is None:
        spec = COMMANDS.get(keyword)
    return spec is not None and state in spec.states
