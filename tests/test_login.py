"""
The AUTHORIZATION state object driven without a transport: a plain object
stands in for the connection shell (L{popservice.server.shell.Shell}), the
clock is a L{task.Clock}.  It shows that login is a unit of its own: it ends in
the portal's answer handed to the shell, and never opens a mailbox itself.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from popservice import wire
from popservice.sasl.server import mechanisms_from_option
from popservice.server.login import Authorization
from popservice.server.policy import Policy
from popservice.states import State
from popservice.stores.memory import MemoryStore
from tests.support import make_factory, memory_checker


class FakeShell:
    """Records what the login object asks of its connection."""

    def __init__(self, factory: Any, *, tls: bool = False, peer: str = "127.0.0.1") -> None:
        self.factory = factory
        self.peer_host = peer
        self.tls = tls
        self.utf8 = False
        self.language = "en"
        self.user: str | None = None
        self.state = State.AUTHORIZATION
        self.closed = False
        self.out: list[bytes] = []
        self.waiting = False
        self.closing: str | None = None
        self.events: list[tuple[str, dict[str, object]]] = []
        self.logins: list[tuple[Any, str]] = []
        self.tls_started = False

    def reply(self, response: bytes) -> None:
        self.out.append(response)

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def wait(self) -> None:
        self.waiting = True

    def proceed(self) -> None:
        self.waiting = False

    def bad_command(self, response: bytes) -> None:
        self.out.append(response)

    def close(self, reason: str) -> None:
        self.closing = reason

    def internal_error(self, failure: Any) -> None:
        raise AssertionError(failure)

    def event(self, name: str, **fields: object) -> None:
        self.events.append((name, fields))

    def touch(self) -> None:
        pass

    def start_tls(self) -> None:
        self.tls_started = True

    def peer_certificate(self) -> Any:
        return None

    def authenticated(self, result: tuple[Any, Any, Any], name: str) -> "defer.Deferred[None]":
        self.logins.append((result, name))
        return defer.succeed(None)

    def release_mailbox(self) -> "defer.Deferred[Any]":
        return defer.succeed(None)

    def idle_seconds(self) -> float:
        return 0.0

    def terminate(self, reason: str) -> "defer.Deferred[None]":
        raise AssertionError("no session to end before login")

    def send_body(self, transfer: Any) -> None:
        raise AssertionError("no body before login")


def command(line: bytes) -> wire.Command:
    parsed = wire.parse_command(line)
    assert isinstance(parsed, wire.Command), parsed
    return parsed


class AuthorizationUnit(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.store = MemoryStore({"alice": [b"Subject: x\n\nbody\n"]})
        self.factory = make_factory(self.store, [memory_checker(alice="secret")], clock=self.clock,
                                    policy=Policy(failure_delay=1.0),
                                    sasl=mechanisms_from_option("PLAIN"))
        self.shell = FakeShell(self.factory)
        self.login = Authorization(self.shell, "<1.2@test>")

    def run_command(self, line: bytes) -> bytes | None:
        keyword = command(line).keyword
        result: bytes | None = getattr(self.login, "do_" + keyword)(command(line))
        return result

    def test_greeting_carries_the_apop_timestamp(self) -> None:
        self.assertEqual(self.login.greeting("test"), b"+OK POP3 server ready <1.2@test>\r\n")

    def test_user_pass_hands_the_portal_answer_to_the_shell(self) -> None:
        self.assertEqual(self.run_command(b"USER alice"), b"+OK Send your password\r\n")
        self.assertIsNone(self.run_command(b"PASS secret"))
        (result, name), = self.shell.logins
        self.assertEqual(name, "alice")
        self.assertEqual(self.login.method, "USER")
        self.assertEqual(self.login.failures, 0)

    def test_wrong_password_is_answered_after_the_delay(self) -> None:
        self.run_command(b"USER alice")
        self.run_command(b"PASS wrong")
        self.assertEqual(self.shell.out, [])
        self.assertTrue(self.shell.waiting)
        self.clock.advance(1.0)
        self.assertEqual(self.shell.out[-1], b"-ERR [AUTH] Authentication failed\r\n")
        self.assertFalse(self.shell.waiting)
        self.assertEqual([n for n, _ in self.shell.events], ["login_failed"])
        self.assertEqual(self.shell.logins, [])

    def test_pass_without_user(self) -> None:
        self.assertEqual(self.run_command(b"PASS secret"), b"-ERR Send USER first\r\n")

    def test_plaintext_refused_from_untrusted_peer(self) -> None:
        self.shell.peer_host = "192.0.2.1"
        self.assertTrue(self.run_command(b"USER alice").startswith(b"-ERR [AUTH]"))
        self.shell.tls = True
        self.assertTrue(self.run_command(b"USER alice").startswith(b"+OK"))

    def test_sasl_plain_two_steps(self) -> None:
        self.assertIsNone(self.run_command(b"AUTH PLAIN"))
        self.assertEqual(self.shell.out, [b"+ \r\n"])
        self.assertTrue(self.login.sasl_pending)
        self.login.sasl_line(base64.b64encode(b"\x00alice\x00secret"))
        self.assertEqual([name for _, name in self.shell.logins], ["alice"])
        self.assertEqual(self.login.method, "PLAIN")

    def test_stls_asks_the_shell_and_forgets_user(self) -> None:
        self.factory.config.tls_context = object()
        self.run_command(b"USER alice")
        self.assertIsNone(self.run_command(b"STLS"))
        self.assertTrue(self.shell.tls_started)
        self.assertIsNone(self.login.user)
        self.shell.tls = True
        self.assertEqual(self.run_command(b"STLS"), b"-ERR Already using TLS\r\n")

    def test_quit_closes(self) -> None:
        self.assertIsNone(self.run_command(b"QUIT"))
        self.assertEqual((self.shell.out, self.shell.closing), ([b"+OK Bye\r\n"], "quit"))

    def test_capa_before_login(self) -> None:
        response = self.run_command(b"CAPA")
        assert response is not None
        self.assertIn(b"\r\nUSER\r\n", response)
        self.assertIn(b"\r\nSASL PLAIN\r\n", response)
        self.assertIn(b"\r\nUTF8 USER\r\n", response)
