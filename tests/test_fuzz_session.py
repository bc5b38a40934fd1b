"""
The real server over a real loopback socket, driven by a hypothesis state
machine against a model of the mailbox (issue "Reliability", item 8).

The server is popservice's factory over L{MemoryStore} (small store chunks, so
bodies cross many chunk boundaries); the client is a blocking socket, so
hypothesis drives it synchronously: the whole state machine runs in a thread
(C{threads.deferToThread}) while trial's reactor serves the connections, and
the store is only ever touched from the reactor thread
(C{blockingCallFromThread}).

Rules: log in (USER/PASS, pipelined USER+PASS, APOP, AUTH PLAIN), any
TRANSACTION command (STAT, LIST [n], UIDL [n], RETR n, TOP n k, DELE n, RSET,
NOOP, out-of-range and malformed numbers, unknown and illegal commands,
garbage bytes, over-long lines), random cutting of what is sent into pieces
sent with tiny pauses, pipelining several commands in one write, QUIT (alone
or pipelined), and dropping the connection (FIN or RST, idle, in the middle
of a command line, with RETR or DELE unread), then logging in again.

Invariants, against the model: numbering is fixed at login for the whole
session; LIST/STAT sizes are the octets RETR sends after un-stuffing (less
the CRLF added to an unterminated last line, as L{transmitted_size}
documents), RETR and TOP bodies are the CRLF-normalised message and its
header plus n lines; deleted messages are absent from STAT/LIST/UIDL and
refused by LIST n/UIDL n/RETR/TOP/DELE; nothing is deleted without QUIT (a
dropped connection or one closed for too many bad commands keeps every
message, QUIT removes exactly the marked ones; checked in the store itself);
UIDLs are unique, well formed and the same in every session; every answer is
well formed (C{+OK} or C{-ERR}, CRLF, status lines at most 512 octets, no
bare LF, multi-line answers end in CRLF.CRLF).

C{POPSERVICE_FUZZ_EXAMPLES=500 trial tests.test_fuzz_session} runs longer.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import re
import socket
import struct
import time
import traceback
from typing import Any, ClassVar, cast

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from fuzz._harness import normalise, reference_top
from popservice.sasl.server import mechanisms_from_option
from popservice.server.policy import Policy
from popservice.stores.memory import MemoryStore
from tests.support import make_factory, memory_checker, shutdown

EXAMPLES = int(os.environ.get("POPSERVICE_FUZZ_EXAMPLES", "25"))
STEPS = 50
#: bad commands after login before the server closes (lower than the default 50, so it happens)
BAD_LIMIT = 12
#: seconds a blocking read waits before the test fails (the server must answer well within it)
READ_TIMEOUT = 5.0
PASSWORD = b"pw"

_users = itertools.count(1)


# --------------------------------------------------------------------------
# What is sent

_PIECES = st.sampled_from([b"", b".", b"..", b".\r", b"\r", b"Subject: hi", b"From: a@example.org",
                           b"x" * 300, b" ", b"\x00\xff", b".x", b"\r\r", b"."])
_LINE = st.one_of(_PIECES, st.binary(max_size=24).map(lambda b: b.replace(b"\n", b"")))
_EOL = st.sampled_from([b"\r\n", b"\n", b"\r\n", b"\r", b""])
MESSAGE = st.lists(st.tuples(_LINE, _EOL), max_size=12).map(lambda parts: b"".join(a + b for a, b in parts))
MESSAGES = st.lists(MESSAGE, max_size=6, unique=True)

NUMBER = st.integers(min_value=1, max_value=8)

#: lines the server must refuse as bad commands (parser or state table), by construction
BAD_LINE = st.one_of(
    st.sampled_from([
        b"", b"HELO x", b"EHLO", b"XYZ", b"FOO BAR", b"RETRX 1", b"LI", b"12345", b"QUITX",
        b"USER alice", b"PASS secret", b"APOP a b", b"STLS", b"UTF8", b"AUTH PLAIN",  # not after login
        b"RETR", b"RETR 0", b"RETR abc", b"RETR 1 2", b"RETR -1", b"RETR +1", b"RETR 99999999999",
        b"DELE", b"DELE 0", b"TOP 1", b"TOP 1 x", b"TOP 1 -1", b"LIST 1 2", b"LIST  1", b"LIST 0",
        b"UIDL x", b"STAT 1", b"NOOP x", b"RSET 1", b"QUIT now", b"RETR \xd9\xa1",
        b"NOOP " + b"x" * 300,  # over the 255-octet command line limit
    ]),
    st.binary(max_size=40).map(lambda b: b"\xff" + b.replace(b"\n", b"")),  # garbage
    st.binary(max_size=300).map(lambda b: b"\x00" + b.replace(b"\n", b"")),  # NUL, maybe too long too
)

COMMAND = st.one_of(
    st.just(("STAT",)),
    st.tuples(st.just("LIST"), st.none() | NUMBER),
    st.tuples(st.just("UIDL"), st.none() | NUMBER),
    st.tuples(st.just("RETR"), NUMBER),
    st.tuples(st.just("TOP"), NUMBER, st.integers(min_value=0, max_value=6)),
    st.tuples(st.just("DELE"), NUMBER),
    st.just(("RSET",)),
    st.just(("NOOP",)),
    st.tuples(st.just("BAD"), BAD_LINE),
)

#: how to cut what is sent: piece sizes used in turn (empty: in one write)
CUTS = st.lists(st.integers(min_value=1, max_value=12), max_size=4)
CASE = st.sampled_from([str.upper, str.lower, str.title])


def encode(command: tuple[Any, ...], case: Any = str.upper) -> bytes:
    if command[0] == "BAD":
        return bytes(command[1]) + b"\r\n"
    words = [case(command[0])] + [str(a) for a in command[1:] if a is not None]
    return " ".join(words).encode("ascii") + b"\r\n"


def size(content: bytes) -> int:
    """LIST/STAT size: the CRLF-normalised octets, less the CRLF added to an unterminated last line."""
    added = 2 if content and not content.endswith((b"\n", b"\r")) else 0
    return len(normalise(content)) - added


# --------------------------------------------------------------------------
# The blocking client

class Closed(Exception):
    """The server closed the connection."""


class Client:
    """A blocking POP3 client that checks that every answer is well formed."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, data: bytes, cuts: list[int]) -> None:
        try:
            self._send(data, cuts)
        except (BrokenPipeError, ConnectionResetError):
            # The server closed while the rest was still being sent (after too many bad
            # commands, a pipelined batch sent in pieces): what it answered is read next, and
            # the model checks that the close was due.
            pass

    def _send(self, data: bytes, cuts: list[int]) -> None:
        if not cuts:
            self.sock.sendall(data)
            return
        pos = 0
        for i in itertools.count():
            if pos >= len(data):
                break
            piece = data[pos:pos + cuts[i % len(cuts)]]
            self.sock.sendall(piece)
            pos += len(piece)
            if pos < len(data) and i < 6:
                time.sleep(0.001)

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            raise Closed(self.buffer[:200])
        self.buffer += data

    def _line(self) -> bytes:
        """One line, LF included."""
        while True:
            nl = self.buffer.find(b"\n")
            if nl >= 0:
                line, self.buffer = self.buffer[:nl + 1], self.buffer[nl + 1:]
                return line
            self._fill()

    def status(self) -> bytes:
        """A status line, checked, without its CRLF."""
        line = self._line()
        assert len(line) <= 512, ("status line over 512 octets", line[:100])
        assert line.endswith(b"\r\n"), ("status line without CRLF", line)
        assert b"\r" not in line[:-2], ("CR in a status line", line)
        assert re.match(rb"(\+OK|-ERR)( |\r\n)", line), ("not a status line", line)
        return line[:-2]

    def body(self) -> bytes:
        """A multi-line body after its status line: every line CRLF-terminated, un-stuffed."""
        out: list[bytes] = []
        while True:
            line = self._line()
            assert line.endswith(b"\r\n"), ("bare LF in a multi-line answer", line)
            if line == b".\r\n":
                return b"".join(out)
            out.append(line[1:] if line.startswith(b".") else line)

    def expect_closed(self) -> None:
        """The server closes: nothing more arrives, then EOF (or a reset)."""
        assert self.buffer == b"", ("data after the last answer", self.buffer[:200])
        try:
            self._fill()
        except Closed:
            self.close()
            return
        raise AssertionError("data after the server should have closed: %r" % (self.buffer[:200],))

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# --------------------------------------------------------------------------
# The machine

class Server:
    def __init__(self, port: int, store: MemoryStore, factory: Any, checker: Any) -> None:
        self.port = port
        self.store = store
        self.factory = factory
        self.checker = checker

    @staticmethod
    def call(f: Any, *args: Any) -> Any:
        """Run C{f} in the reactor thread and wait for it."""
        return threads.blockingCallFromThread(cast(Any, reactor), f, *args)

    def messages(self, user: str) -> list[bytes]:
        return list(self.call(lambda: list(self.store.messages[user])))

    def wait_idle(self, user: str) -> None:
        """Wait until the server has noticed every disconnect and released the mailbox."""
        deadline = time.monotonic() + READ_TIMEOUT
        while True:
            idle = self.call(lambda: not self.factory.connections and user not in self.store.locked)
            if idle:
                return
            assert time.monotonic() < deadline, "the server did not release the mailbox after a disconnect"
            time.sleep(0.001)


class SessionMachine(RuleBasedStateMachine):
    server: ClassVar[Server]

    def __init__(self) -> None:
        super().__init__()
        self.user = "u%d" % (next(_users),)
        self.client: Client | None = None
        #: the model: the messages in the store, oldest first
        self.mailbox: list[bytes] = []
        #: UIDL of each message once the server has named it
        self.uids: dict[bytes, bytes] = {}
        #: the session: the listing frozen at login (number - 1 -> message), the numbers marked
        self.listing: list[bytes] = []
        self.deleted: set[int] = set()
        self.bad = 0

    # -- model helpers

    def connected(self) -> bool:
        return self.client is not None

    def live(self) -> list[tuple[int, bytes]]:
        return [(n, m) for n, m in enumerate(self.listing, 1) if n not in self.deleted]

    def valid(self, number: int) -> bool:
        return 1 <= number <= len(self.listing) and number not in self.deleted

    def check_uid(self, number: int, uid: bytes) -> None:
        assert re.fullmatch(rb"[\x21-\x7e]{1,70}", uid), ("malformed UIDL", uid)
        content = self.listing[number - 1]
        known = self.uids.setdefault(content, uid)
        assert known == uid, ("UIDL changed", number, known, uid)
        others = [m for m, u in self.uids.items() if u == uid and m != content]
        assert not others, ("UIDL shared by two messages", uid)

    def check_store(self) -> None:
        """Nothing is deleted without QUIT: the store holds exactly the model's messages."""
        assert self.server.messages(self.user) == self.mailbox, "the store lost or kept the wrong messages"

    def gone(self) -> None:
        """The connection ended without UPDATE: nothing may have been deleted."""
        self.client = None
        self.server.wait_idle(self.user)
        self.check_store()

    # -- setup

    @initialize(messages=MESSAGES, chunk=st.sampled_from([1, 3, 16, 65536]))
    def setup(self, messages: list[bytes], chunk: int) -> None:
        self.mailbox = list(messages)
        server = self.server

        def add() -> None:
            server.store.messages[self.user] = list(messages)
            server.store.chunk = chunk
            server.checker.addUser(self.user.encode(), PASSWORD)

        server.call(add)

    def teardown(self) -> None:
        if self.client is not None:
            self.client.close(reset=True)
            self.client = None
        self.server.wait_idle(self.user)

    # -- rules

    @precondition(lambda self: self.client is None)
    @rule(method=st.sampled_from(["USER", "pipelined", "APOP", "AUTH"]), cuts=CUTS)
    def login(self, method: str, cuts: list[int]) -> None:
        self.server.wait_idle(self.user)
        client = self.client = Client(self.server.port)
        greeting = client.status()
        assert greeting.startswith(b"+OK"), greeting
        user = self.user.encode()
        if method == "USER":
            client.send(b"USER " + user + b"\r\n", cuts)
            assert client.status().startswith(b"+OK")
            client.send(b"PASS " + PASSWORD + b"\r\n", cuts)
        elif method == "pipelined":
            client.send(b"USER " + user + b"\r\nPASS " + PASSWORD + b"\r\n", cuts)
            assert client.status().startswith(b"+OK")
        elif method == "APOP":
            stamp = re.search(rb"<[^>]*>", greeting)
            assert stamp is not None, greeting
            digest = hashlib.md5(stamp.group(0) + PASSWORD).hexdigest().encode()
            client.send(b"APOP " + user + b" " + digest + b"\r\n", cuts)
        else:
            response = base64.b64encode(b"\x00" + user + b"\x00" + PASSWORD)
            client.send(b"AUTH PLAIN " + response + b"\r\n", cuts)
        answer = client.status()
        assert answer == b"+OK Logged in, %d messages" % (len(self.mailbox),), answer
        self.listing = list(self.mailbox)
        self.deleted = set()
        self.bad = 0

    @precondition(lambda self: self.client is not None)
    @rule(command=COMMAND, cuts=CUTS, case=CASE)
    def command(self, command: tuple[Any, ...], cuts: list[int], case: Any) -> None:
        assert self.client is not None
        self.client.send(encode(command, case), cuts)
        self.expect(command)

    @precondition(lambda self: self.client is not None)
    @rule(line=BAD_LINE, cuts=CUTS)
    def garbage(self, line: bytes, cuts: list[int]) -> None:
        self.command(("BAD", line), cuts, str.upper)

    @precondition(lambda self: self.client is not None)
    @rule(commands=st.lists(COMMAND, min_size=2, max_size=8), quit=st.booleans(), cuts=CUTS)
    def pipeline(self, commands: list[tuple[Any, ...]], quit: bool, cuts: list[int]) -> None:
        assert self.client is not None
        data = b"".join(encode(c) for c in commands) + (b"QUIT\r\n" if quit else b"")
        self.client.send(data, cuts)
        for command in commands:
            if not self.connected():
                return  # closed for too many bad commands: the rest was ignored
            self.expect(command)
        if quit and self.connected():
            self.expect_quit()

    @precondition(lambda self: self.client is not None)
    @rule(command=COMMAND, copies=st.integers(min_value=33, max_value=70))
    def flood(self, command: tuple[Any, ...], copies: int) -> None:
        """More pipelined commands than the server answers in one reactor turn (32)."""
        self.pipeline([command] * copies, False, [])

    @precondition(lambda self: self.client is not None)
    @rule(command=COMMAND, cuts=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=3))
    def dribble(self, command: tuple[Any, ...], cuts: list[int]) -> None:
        """A command sent a few octets at a time."""
        self.command(command, cuts, str.upper)

    @precondition(lambda self: self.client is not None)
    @rule(how=st.sampled_from(["quit", "fin", "rst", "partial", "retr-unread", "dele-unread"]), number=NUMBER,
          cuts=CUTS)
    def end_session(self, how: str, number: int, cuts: list[int]) -> None:
        """QUIT, or drop the connection (idle, mid-line, with RETR or DELEs unread; FIN or RST)."""
        client = self.client
        assert client is not None
        if how == "quit":
            client.send(b"QUIT\r\n", cuts)
            self.expect_quit()
            return
        if how == "partial":
            client.send(b"DELE %d\r\nQUI" % (number,), [])
        elif how == "retr-unread":
            client.send(b"RETR %d\r\n" % (number,), [])
        elif how == "dele-unread":
            client.send(b"".join(b"DELE %d\r\n" % (n,) for n in range(1, len(self.listing) + 1)), [])
        client.close(reset=how in ("rst", "retr-unread"))
        self.gone()

    # -- expected answers

    def expect_quit(self) -> None:
        assert self.client is not None
        answer = self.client.status()
        assert answer.startswith(b"+OK"), answer
        self.client.expect_closed()
        self.client = None
        self.mailbox = [m for n, m in enumerate(self.listing, 1) if n not in self.deleted]
        self.server.wait_idle(self.user)
        self.check_store()

    def expect(self, command: tuple[Any, ...]) -> None:
        client = self.client
        assert client is not None
        kind = command[0]
        answer = client.status()
        if kind == "BAD":
            assert answer.startswith(b"-ERR"), (command, answer)
            line = bytes(command[1])
            assert len(line) < 6 or line[1:] not in answer, ("error text echoes the client", line, answer)
            self.bad += 1
            if self.bad >= BAD_LIMIT:
                closing = client.status()
                assert closing.startswith(b"-ERR"), closing
                client.expect_closed()
                self.gone()
            return
        live = self.live()
        if kind in ("STAT", "RSET"):
            if kind == "RSET":
                self.deleted = set()
                live = self.live()
            assert answer == b"+OK %d %d" % (len(live), sum(size(m) for _, m in live)), (command, answer)
        elif kind == "NOOP":
            assert answer == b"+OK", answer
        elif kind in ("LIST", "UIDL") and command[1] is None:
            assert answer.startswith(b"+OK"), (command, answer)
            lines = client.body().split(b"\r\n")
            assert lines[-1] == b"", (command, lines)
            got = [line.split(b" ") for line in lines[:-1]]
            assert [int(n) for n, _ in got] == [n for n, _ in live], (command, got, live)
            for (n, value), (_, content) in zip(got, live, strict=True):
                if kind == "LIST":
                    assert int(value) == size(content), (command, n, value)
                else:
                    self.check_uid(int(n), value)
            m = re.fullmatch(rb"\+OK (\d+) messages \((\d+) octets\)", answer)
            if m:
                assert (int(m.group(1)), int(m.group(2))) == (len(live), sum(size(c) for _, c in live))
        elif not self.valid(command[1]):
            assert answer.startswith(b"-ERR"), (command, answer)
        elif kind == "LIST":
            assert answer == b"+OK %d %d" % (command[1], size(self.listing[command[1] - 1])), answer
        elif kind == "UIDL":
            m = re.fullmatch(rb"\+OK (\d+) (.*)", answer)
            assert m and int(m.group(1)) == command[1], answer
            self.check_uid(command[1], m.group(2))
        elif kind == "RETR":
            content = self.listing[command[1] - 1]
            assert answer == b"+OK %d octets" % (size(content),), answer
            body = client.body()
            assert body == normalise(content), (content, body)
            unterminated = bool(content) and not content.endswith((b"\n", b"\r"))
            assert size(content) == len(body) - (2 if unterminated else 0)
        elif kind == "TOP":
            assert answer.startswith(b"+OK"), answer
            content = self.listing[command[1] - 1]
            body = client.body()
            want = normalise(reference_top(content, command[2])[0])
            assert body == want, (content, command, body, want)
        elif kind == "DELE":
            assert answer.startswith(b"+OK"), answer
            self.deleted.add(command[1])
        else:
            raise AssertionError("no model for %r" % (command,))


SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                    report_multiple_bugs=False, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_machine(machine: type[SessionMachine]) -> None:
    """Run the machine; a failure comes back with hypothesis's steps to reproduce it in its text."""
    try:
        run_state_machine_as_test(machine, settings=SETTINGS)
    except Exception as e:
        raise AssertionError("".join(traceback.format_exception(e))) from None


class SessionAgainstModel(unittest.TestCase):
    """The state machine, run in a thread while the reactor serves it."""

    #: a passing run takes seconds; a failing one also shrinks (hypothesis stops that after 300 s)
    timeout = 420 + EXAMPLES * 2

    @defer.inlineCallbacks
    def test_session_matches_model(self) -> Any:
        store = MemoryStore()
        checker = memory_checker()
        factory = make_factory(store, [checker], sasl=mechanisms_from_option("PLAIN"),
                               policy=Policy(failure_delay=0, max_bad_commands_after_login=BAD_LIMIT))
        port = cast(Any, reactor).listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(shutdown, port, factory)
        machine = type("SessionMachine", (SessionMachine,),
                       {"server": Server(port.getHost().port, store, factory, checker)})
        yield threads.deferToThread(run_machine, machine)
