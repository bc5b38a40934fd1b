"""
C{twistd pop3 --log-format json}: one JSON object per line, from a real
C{twistd} process (to a C{--logfile} and to stdout), with the session's
events carrying one session id; and the text format as before.
"""

from __future__ import annotations

import io
import json
import os
import poplib
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from twisted.logger import FileLogObserver, LogBeginner, Logger, LogPublisher, textFileLogObserver
from twisted.trial import unittest

from popservice.server.events import SESSION_NAMESPACE, LogObserver, new_session_id
from popservice.server.logformat import (
    ClassicText,
    as_classic_text,
    event_as_json,
    use_classic_text_logs,
    use_json_logs,
)
from tests.test_tap import free_port, make_maildir

TWISTD = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")


class SessionIds(unittest.TestCase):
    def test_short_and_unique(self) -> None:
        ids = [new_session_id() for _ in range(1000)]
        self.assertEqual(len(set(ids)), 1000)
        self.assertTrue(all(len(i) == 12 and int(i, 16) >= 0 for i in ids))


class Formatter(unittest.TestCase):
    """L{event_as_json} on events as twisted.logger hands them to observers."""

    def events(self) -> list[dict[str, Any]]:
        publisher = LogPublisher()
        seen: list[dict[str, Any]] = []
        publisher.addObserver(seen.append)
        observer = LogObserver()
        observer.log = Logger(namespace=SESSION_NAMESPACE, observer=publisher)
        observer.event("login", None, user="alice", peer="192.0.2.1", session_id="abc123000001", tls=True,
                       method="PLAIN", messages=3)
        observer.event("command", None, user="alice", peer="192.0.2.1", session_id="abc123000001",
                       command="STAT", seconds=0.001)
        log = Logger(namespace="popservice.other", observer=publisher)
        log.warn("mailbox for {user} unavailable: {why}", user="bob", why="disk\nfull", thing=object())
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("it broke")
        return seen

    def test_session_event(self) -> None:
        login, *_ = self.events()
        line = event_as_json(login)
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        obj = json.loads(line)
        self.assertEqual(list(obj)[:8],
                         ["time", "level", "event", "session", "user", "peer", "tls", "method"])
        self.assertEqual(obj, {"time": obj["time"], "level": "info", "event": "login",
                               "session": "abc123000001", "user": "alice", "peer": "192.0.2.1", "tls": True,
                               "method": "PLAIN", "messages": 3})
        self.assertRegex(obj["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

    def test_commands_are_not_logged(self) -> None:
        self.assertEqual([e["log_namespace"] for e in self.events()],
                         [SESSION_NAMESPACE, "popservice.other", "popservice.other"])

    def test_other_events(self) -> None:
        _, warning, failure = self.events()
        obj = json.loads(event_as_json(warning))
        self.assertEqual((obj["event"], obj["level"], obj["message"]),
                         ("popservice.other", "warn", "mailbox for bob unavailable: disk\nfull"))
        self.assertEqual((obj["user"], obj["why"]), ("bob", "disk\nfull"))
        self.assertNotIn("thing", obj)
        self.assertEqual(event_as_json(warning).count("\n"), 1)
        obj = json.loads(event_as_json(failure))
        self.assertEqual((obj["level"], obj["message"]), ("critical", "it broke"))
        self.assertIn("ZeroDivisionError", obj["failure"])

    def test_non_ascii_and_surrogates(self) -> None:
        event = {"log_namespace": SESSION_NAMESPACE, "event": "login_failed", "log_time": 0.0,
                 "attempted": "j\u00fcrgen\udcff", "session": "x"}
        line = event_as_json(event)
        self.assertTrue(line.isascii())
        self.assertEqual(json.loads(line)["attempted"], "j\u00fcrgen\udcff")

    def test_use_json_logs_wraps_the_beginner_once(self) -> None:
        publisher = LogPublisher()
        out = io.StringIO()
        beginner = LogBeginner(publisher, io.StringIO(), sys, __import__("warnings"))
        use_json_logs(beginner)
        Logger(namespace="early", observer=publisher).info("before logging began")
        beginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
        self.assertNotIn("beginLoggingTo", vars(beginner))
        Logger(namespace="late", observer=publisher).info("after {x}", x=1)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([(e["event"], e["message"]) for e in lines],
                         [("early", "before logging began"), ("late", "after 1")])


class ClassicTextLines(unittest.TestCase):
    """L{ClassicText} writes what Twisted's C{textFileLogObserver} writes, character for character."""

    def events(self) -> list[dict[str, Any]]:
        events = Formatter.events(self)  # type: ignore[arg-type]
        log = Logger(namespace="legacy")
        events.append({"log_format": "{x}", "x": "system of its own", "log_system": "-",
                       "log_time": 1.5, "log_namespace": "n", "log_level": None, "log_logger": log})
        events.append({"log_format": "no time", "log_namespace": "n"})
        return events

    def test_same_characters_as_twisted(self) -> None:
        base = time.time()
        for time_format in (None, "%Y-%m-%dT%H:%M:%S%z", "%H:%M:%S.%f"):
            ours = ClassicText(*(() if time_format == "%Y-%m-%dT%H:%M:%S%z" else (time_format,)))
            twisted_text = textFileLogObserver(io.StringIO(), timeFormat=time_format).formatEvent
            # times within a second, across seconds, and one that rounds up to the next second
            for when in (base, base + 0.25, base + 1, int(base) + 0.9999997, int(base) + 0.1, int(base) + 2.5,
                         base - 86400):
                for event in self.events():
                    if "log_time" in event:
                        event["log_time"] = when
                    self.assertEqual(ours(event), twisted_text(event), (time_format, when, event))

    def test_session_line(self) -> None:
        login = Formatter.events(self)[0]  # type: ignore[arg-type]
        login["log_time"] = 1767225600.5
        line = ClassicText()(login)
        assert line is not None
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[popservice\.session#info\] "
                               r"pop3 login: messages=3 method=PLAIN peer=192\.0\.2\.1 session=abc123000001 "
                               r"tls=True user=alice\n$")

    def test_only_twisteds_own_text_observer_is_changed(self) -> None:
        twisted_text = textFileLogObserver(io.StringIO(), timeFormat="%H:%M")
        as_classic_text(twisted_text)
        self.assertIsInstance(twisted_text.formatEvent, ClassicText)
        self.assertEqual(twisted_text.formatEvent.time_format, "%H:%M")  # type: ignore[attr-defined]

        def own(event: dict[str, Any]) -> str:
            return "mine\n"

        custom = FileLogObserver(io.StringIO(), own)
        as_classic_text(custom)
        self.assertIs(custom.formatEvent, own)

    def test_use_classic_text_logs_wraps_the_beginner_once(self) -> None:
        publisher = LogPublisher()
        out = io.StringIO()
        beginner = LogBeginner(publisher, io.StringIO(), sys, __import__("warnings"))
        use_classic_text_logs(beginner)
        observer = textFileLogObserver(out)
        beginner.beginLoggingTo([observer], redirectStandardIO=False)
        self.assertNotIn("beginLoggingTo", vars(beginner))
        self.assertIsInstance(observer.formatEvent, ClassicText)
        Logger(namespace="late", observer=publisher).info("after {x}", x=1)
        self.assertTrue(out.getvalue().endswith(" [late#info] after 1\n"), out.getvalue())


def wait_port(port: int, process: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("twistd exited with %s" % (process.returncode,))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("port %d never opened" % (port,))


class TwistdLogs(unittest.TestCase):
    """A real C{twistd -n pop3} subprocess, a poplib session, its log read back."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        make_maildir(os.path.join(self.root, "mail"), "alice", [b"Subject: one\n\nfirst\n"])

    def run_twistd(self, *log_args: str, log_format: str = "json") -> tuple[str, str]:
        """Serve, run one ok and one failed session, stop; (log file text, stdout text)."""
        port = free_port()
        stdout_path = os.path.join(self.root, "stdout")
        argv = [TWISTD, "-n", "--pidfile=", *log_args, "pop3", "--log-format", log_format,
                "--mail", "maildir:%s/mail/%%u" % self.root, "--auth", "memory:alice:secret",
                "--listen", "tcp:%d:interface=127.0.0.1" % port, "--failure-delay", "0"]
        with open(stdout_path, "wb") as stdout:
            process = subprocess.Popen(argv, cwd=self.root, stdout=stdout, stderr=subprocess.STDOUT)
        try:
            wait_port(port, process)
            c = poplib.POP3("127.0.0.1", port, timeout=10)
            c.user("alice")
            c.pass_("secret")
            c.stat()
            c.retr(1)
            c.quit()
            c = poplib.POP3("127.0.0.1", port, timeout=10)
            c.user("alice")
            self.assertRaises(poplib.error_proto, c.pass_, "wrong")
            c.quit()
            time.sleep(0.3)  # the server's side of the last close
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        logfile = os.path.join(self.root, "twistd.log")
        log_text = open(logfile).read() if os.path.exists(logfile) else ""
        with open(stdout_path) as f:
            return log_text, f.read()

    def check_json(self, text: str) -> None:
        lines = text.splitlines()
        self.assertGreater(len(lines), 5, text)
        objects = [json.loads(line) for line in lines]  # every line is one JSON object
        for obj in objects:
            self.assertIsInstance(obj, dict)
            self.assertTrue({"time", "level", "event"} <= set(obj), obj)
        events = [o for o in objects if "session" in o]
        first = next(o for o in events if o["event"] == "login")
        session = [o for o in events if o["session"] == first["session"]]
        self.assertEqual([o["event"] for o in session], ["connect", "login", "logout"])
        connect, login, logout = session
        for obj in session:
            self.assertEqual((obj["peer"], obj["tls"], obj["level"]), ("127.0.0.1", False, "info"))
        self.assertIsNone(connect["user"])
        self.assertEqual((login["user"], login["method"], login["messages"]), ("alice", "USER", 1))
        self.assertEqual((logout["user"], logout["reason"], logout["retr"], logout["method"]),
                         ("alice", "quit", 1, "USER"))
        self.assertTrue(logout["listener"].startswith("tcp:"))
        self.assertGreater(logout["bytes_out"], logout["retr_bytes"])
        self.assertRegex(first["session"], r"^[0-9a-f]{12}$")
        # the failed session has an id of its own, carried by its login_failed and logout
        failed = next(o for o in events if o["event"] == "login_failed")
        self.assertNotEqual(failed["session"], first["session"])
        self.assertEqual((failed["attempted"], failed["reason"], failed["user"]), ("alice", "auth", None))
        self.assertEqual([o["event"] for o in events if o["session"] == failed["session"]],
                         ["connect", "login_failed", "logout"])
        # commands stay off the log; twistd's own lines are JSON too
        self.assertNotIn("command", [o["event"] for o in objects])
        self.assertIn("Server Shut Down.", [o.get("message") for o in objects])

    def test_json_to_logfile(self) -> None:
        log_text, stdout = self.run_twistd("-l", "twistd.log")
        self.check_json(log_text)
        self.assertEqual(stdout, "")

    def test_json_to_stdout(self) -> None:
        log_text, stdout = self.run_twistd()
        self.assertEqual(log_text, "")
        self.check_json(stdout)

    def test_text_is_the_default(self) -> None:
        _, stdout = self.run_twistd(log_format="text")
        login = [line for line in stdout.splitlines() if "pop3 login: " in line]
        self.assertEqual(len(login), 1, stdout)
        self.assertRegex(login[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
                                   r"\[popservice\.session#info\] pop3 login: ")
        self.assertRegex(login[0],
                         r"method=USER peer=127\.0\.0\.1 session=[0-9a-f]{12} tls=False user=alice$")
        self.assertRaises(ValueError, json.loads, login[0])

