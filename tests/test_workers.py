"""
C{twistd pop3 --workers N}: real C{twistd} subprocesses, a parent and its
workers, over loopback sockets (L{popservice.server.workers},
L{popservice.server.worker}).

Which worker accepts a connection is the kernel's choice; a test that needs
a given worker stops the others (SIGSTOP) while it connects, so the one
left running is the only one that can accept it.
"""

from __future__ import annotations

import json
import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.logger import LogLevel, formatEvent, formatEventAsClassicLogText
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from popservice import tap
from popservice.server.logformat import event_as_json
from popservice.server.worker import connection_share
from popservice.server.workerlog import (
    PIPE_BUF,
    RECORD_SEPARATOR,
    LineWriter,
    event_record,
    route,
    worker_log_observer,
)
from popservice.server.workers import WorkerProcess, relay_line
from tests.interop.world import RawPOP, World, client_context, free_port, simple_messages
from tests.test_privileges import _free_low_port, make_maildir
from tests.test_systemd import NO_SOCKET_ACTIVATE, SOCKET_ACTIVATE, NotifySocket, launch, unit_command

SHUTTING_DOWN = b"-ERR [SYS/TEMP] server shutting down"
#: twistd with the Python running the tests
TWISTD_HERE = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
_ACCEPTING = re.compile(r"worker (\d+) accepting: pid (\d+)")


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("%s not met within %s s" % (what, timeout))
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """The process is gone (or a zombie nobody reaped yet)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def children(pid: int) -> list[int]:
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(p) for p in f.read().split()]


class StdoutWorld(World):
    """A L{World} whose twistd logs to its stdout (C{-n} without C{--logfile}), as under systemd."""

    def __init__(self, name: str, extra_args: list[str]) -> None:
        super().__init__(name, extra_args)
        self.log = os.path.join(self.root, "twistd.out")

    def command_line(self) -> list[str]:
        argv = super().command_line()
        at = argv.index("-l")
        del argv[at:at + 2]
        return argv


class Workers:
    """A L{World} whose server runs C{--workers N}; the workers' pids from its log."""

    def __init__(self, case: unittest.TestCase, count: int = 2, *args: str,
                 world: type[World] = World) -> None:
        self.count = count
        self.world = world("workers", ["--workers", str(count), *args])
        self.world.add_user("carol", "carolpw", simple_messages("carol", 3))
        self.world.add_user("dave", "davepw", simple_messages("dave", 2))
        self.world.start()
        case.addCleanup(self.world.stop)
        if count > 1:
            self.wait_accepting()

    def pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest process (from its C{accepting} line)."""
        return {int(i): int(p) for i, p in _ACCEPTING.findall(self.world.log_text())}

    def wait_accepting(self, replacing: dict[int, int] | None = None) -> dict[int, int]:
        """Until every worker has said it accepts (with another pid than in C{replacing})."""
        old = replacing or {}

        def ready() -> bool:
            pids = self.pids()
            return all(i in pids and pids[i] != old.get(i) for i in range(1, self.count + 1))

        wait_for(ready, what="every worker accepting")
        return self.pids()

    @contextmanager
    def only(self, index: int) -> Iterator[int]:
        """While inside, every worker but C{index} is stopped: a new connection goes to C{index}."""
        pids = self.pids()
        others = [pid for i, pid in pids.items() if i != index]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield pids[index]
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    def logins(self, index: int) -> int:
        """Successful logins served by worker C{index}, from the parent's log."""
        tag = "[worker=%d popservice.session#info] pop3 login:" % index
        return self.world.log_text().count(tag)

    def poplib_session(self, user: str, *, tls: bool = False) -> int:
        """A whole poplib session (STAT, RETR 1, QUIT): the number of messages."""
        world = self.world
        client: poplib.POP3
        if tls:
            client = poplib.POP3_SSL("127.0.0.1", world.tls_port, timeout=20,
                                     context=client_context(world.cert))
        else:
            client = poplib.POP3("127.0.0.1", world.port, timeout=20)
        try:
            client.user(user)
            client.pass_(world.users[user].password)
            count, _ = client.stat()
            _, lines, _ = client.retr(1)
            if b"\n".join(lines) + b"\n" != world.users[user].messages[0].stored:
                raise AssertionError("RETR 1 did not give the stored message")
        finally:
            client.quit()
        return count


class ServingTests(unittest.TestCase):
    timeout = 120

    def test_both_workers_serve_plain_and_tls(self) -> None:
        """Sessions over both listeners are served by either worker; the log names the worker."""
        workers = Workers(self)
        for index in (1, 2):
            with workers.only(index):
                self.assertEqual(workers.poplib_session("carol"), 3)
                self.assertEqual(workers.poplib_session("dave", tls=True), 2)
        wait_for(lambda: workers.logins(1) >= 2 and workers.logins(2) >= 2, what="logins logged by both")
        # the parent runs exactly the workers it logged, as its children
        self.assertEqual(sorted(children(workers.world.pid)), sorted(workers.pids().values()))

    def test_in_use_across_workers(self) -> None:
        """A second session of one user, on the other worker, is refused with [IN-USE]."""
        workers = Workers(self)
        with workers.only(1):
            first = workers.world.session("carol")
        with workers.only(2):
            second = RawPOP(workers.world.port)
        self.assertTrue(second.greeting.startswith(b"+OK"))
        answer = second.login("carol", "carolpw")
        self.assertTrue(answer.startswith(b"-ERR [IN-USE]"), answer)
        self.assertTrue(first.command(b"STAT").startswith(b"+OK 3 "))
        self.assertTrue(first.quit().startswith(b"+OK"))
        # the mailbox is free again: the other worker now serves it
        with workers.only(2):
            third = workers.world.session("carol")
        self.assertTrue(third.quit().startswith(b"+OK"))
        wait_for(lambda: workers.logins(1) == 1 and workers.logins(2) == 1, what="one login on each")

    def test_takeover_across_workers(self) -> None:
        """A session idle past --lock-grace on one worker is taken over by a login on the other."""
        workers = Workers(self, 2, "--lock-grace", "1")
        with workers.only(1):
            idle = workers.world.session("carol")
        self.assertTrue(idle.command(b"DELE 1").startswith(b"+OK"))
        time.sleep(1.5)
        with workers.only(2):
            second = RawPOP(workers.world.port)
        # both run again: worker 2 asks worker 1, which ends its idle session
        answer = second.login("carol", "carolpw")
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertTrue(second.command(b"STAT").startswith(b"+OK 3 "))  # the DELE was not committed
        self.assertTrue(second.quit().startswith(b"+OK"))
        try:
            self.assertEqual(idle.sock.recv(100)[:4], b"-ERR")
        except ConnectionError:
            pass
        self.assertEqual(workers.world.present("carol"), [1, 2, 3])
        wait_for(lambda: "[worker=1 popservice.session#info] pop3 takeover:" in workers.world.log_text(),
                 what="worker 1 logging the take-over")


    def test_metrics_of_every_worker_from_the_parent(self) -> None:
        """--metrics: the parent's endpoint has each worker's samples, labelled with the worker."""
        port = free_port()
        workers = Workers(self, 2, "--metrics", "tcp:%d:interface=127.0.0.1" % port)
        for index in (1, 2):
            with workers.only(index):
                self.assertEqual(workers.poplib_session("carol"), 3)
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=20) as response:
            text = response.read().decode("utf-8")
        for index in (1, 2):
            self.assertIn('pop3_logins_total{method="USER",result="ok",worker="%d"} 1.0' % index, text)
        self.assertIn("popservice_workers_scraped 2.0", text)
        self.assertIn('process_cpu_seconds_total{worker="0"}', text)  # the parent's own
        self.assertEqual(text.count("# TYPE pop3_logins_total counter"), 1)


class SupervisionTests(unittest.TestCase):
    timeout = 120

    def test_killed_worker_is_replaced(self) -> None:
        workers = Workers(self)
        before = workers.pids()
        os.kill(before[1], signal.SIGKILL)
        # service goes on meanwhile (worker 2)
        self.assertEqual(workers.poplib_session("dave"), 2)
        after = workers.wait_accepting(replacing={1: before[1]})
        self.assertNotEqual(after[1], before[1])
        self.assertEqual(after[2], before[2])
        self.assertIn("worker 1 (pid %d) ended after" % before[1], workers.world.log_text())
        self.assertIn("signal SIGKILL", workers.world.log_text())
        with workers.only(1):
            self.assertEqual(workers.poplib_session("carol"), 3)
        wait_for(lambda: workers.logins(1) >= 1, what="a login served by the new worker 1")
        self.assertEqual(sorted(children(workers.world.pid)), sorted(after.values()))

    def test_sigterm_stops_every_worker_gracefully(self) -> None:
        workers = Workers(self, 2, "--shutdown-grace", "5")
        pids = workers.pids()
        with workers.only(2):
            active = workers.world.session("carol")
        os.kill(workers.world.pid, signal.SIGTERM)
        stopping = "[worker=2 popservice.lifecycle#info] stopping: 1 connections"
        wait_for(lambda: stopping in workers.world.log_text(), what="worker 2 stopping")
        # its session is told and closed at its next command, nothing deleted
        self.assertEqual(active.command(b"NOOP"), SHUTTING_DOWN)
        assert workers.world.process is not None
        workers.world.process.wait(15)
        for pid in pids.values():
            wait_for(lambda pid=pid: gone(pid), what="worker %d gone" % pid)  # type: ignore[misc]
        self.assertEqual(workers.world.present("carol"), [1, 2, 3])
        self.assertIn("stopped: every worker has ended", workers.world.log_text())
        # the shared sockets are closed after the workers are gone (closing shuts them down for all)
        self.assertNotIn("Traceback", workers.world.log_text())

    def test_sighup_is_forwarded(self) -> None:
        workers = Workers(self)
        os.kill(workers.world.pid, signal.SIGHUP)
        for index in (1, 2):
            wait_for(lambda index=index: "[worker=%d popservice.lifecycle#info] reload done" % index  # type: ignore[misc]
                     in workers.world.log_text(), what="worker %d reloading" % index)
        self.assertTrue(workers.world.session("carol").quit().startswith(b"+OK"))

    def test_workers_stop_when_the_parent_is_killed(self) -> None:
        workers = Workers(self)
        pids = workers.pids()
        os.kill(workers.world.pid, signal.SIGKILL)
        for pid in pids.values():
            wait_for(lambda pid=pid: gone(pid), what="worker %d gone" % pid)  # type: ignore[misc]

    def test_one_worker_is_this_process(self) -> None:
        """--workers 1 (the default) serves in the twistd process itself, as before."""
        workers = Workers(self, 1)
        self.assertEqual(workers.poplib_session("carol"), 3)
        self.assertEqual(children(workers.world.pid), [])
        self.assertNotIn("worker=", workers.world.log_text())


class OptionTests(unittest.TestCase):
    def parse(self, *argv: str) -> Any:
        options = tap.Options()
        options.parseOptions(["--auth", "memory:u:p", "--mail", "maildir:/tmp/%u", *argv])
        return options

    def test_workers_at_least_one(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--workers", "0")

    def test_listeners_must_be_sockets(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--workers", "2", "--listen", "stdio:")

    def test_arguments_are_kept_for_the_workers(self) -> None:
        self.assertEqual(self.parse("--workers", "2").arguments,
                         ["--auth", "memory:u:p", "--mail", "maildir:/tmp/%u", "--workers", "2"])

    def test_caps_shared_out(self) -> None:
        self.assertEqual(connection_share(50, 2), 25)
        self.assertEqual(connection_share(51, 2), 26)
        self.assertEqual(connection_share(1, 4), 1)
        self.assertEqual(connection_share(10000, 1), 10000)


class RelayTests(unittest.TestCase):
    def relay(self, fd: int, line: bytes) -> dict[str, Any]:
        published: list[dict[str, Any]] = []
        relay_line(3, fd, line, published.append)
        self.assertEqual(len(published), 1)
        return published[0]

    def test_record_is_the_event_with_its_worker(self) -> None:
        event = {"log_format": "pop3 {event}: peer={peer}", "event": "login", "peer": "192.0.2.1",
                 "log_level": LogLevel.warn, "log_namespace": "popservice.session", "log_time": 1.5,
                 "log_logger": object(), "opaque": object()}
        relayed = self.relay(1, event_record(event).encode())
        self.assertEqual(relayed["worker"], 3)
        self.assertEqual((relayed["event"], relayed["peer"]), ("login", "192.0.2.1"))
        self.assertNotIn("opaque", relayed)
        self.assertIs(relayed["log_level"], LogLevel.warn)
        self.assertEqual(relayed["log_time"], 1.5)
        self.assertEqual(relayed["log_system"], "worker=3 popservice.session#warn")
        self.assertEqual(formatEvent(relayed), "pop3 login: peer=192.0.2.1")
        self.assertIn("[worker=3 popservice.session#warn] pop3 login: peer=192.0.2.1",
                      formatEventAsClassicLogText(relayed))
        self.assertIn('"event":"login"', event_as_json(relayed))
        self.assertIn('"worker":3', event_as_json(relayed))

    def test_failure_travels_as_text(self) -> None:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            failure = Failure()
        event = {"log_format": "it failed", "log_failure": failure, "log_level": LogLevel.critical,
                 "log_namespace": "x", "log_time": 1.0, "log_system": "POP3ServerFactory,0"}
        relayed = self.relay(1, event_record(event).encode())
        self.assertIn("ZeroDivisionError", formatEvent(relayed))
        self.assertEqual(relayed["log_system"], "worker=3 POP3ServerFactory,0")

    def test_other_lines_name_the_worker(self) -> None:
        from twisted.logger import globalLogPublisher

        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        relay_line(2, 2, b"Traceback (most recent call last):", lambda e: self.fail("published"))
        relay_line(2, 1, RECORD_SEPARATOR.encode() + b"{broken", lambda e: self.fail("published"))
        lines = [e for e in seen if e.get("worker") == 2]
        self.assertEqual([e["line"] for e in lines], ["Traceback (most recent call last):", "{broken"])
        self.assertEqual([e["stream"] for e in lines], ["stderr", "stdout"])


class WorkerLogTests(unittest.TestCase):
    """Where the workers' log lines go (L{popservice.server.workerlog})."""

    timeout = 120

    def test_workers_write_to_the_parents_stdout_themselves(self) -> None:
        """
        Logging to stdout, each worker writes its lines there itself (on the
        parent's own descriptor): they arrive while the parent is stopped,
        whole, each with its worker.
        """
        workers = Workers(self, 2, world=StdoutWorld)
        parent = workers.world.pid
        out = os.path.realpath("/proc/%d/fd/1" % (parent,))
        for index, pid in workers.pids().items():
            # after its two sockets: the parent's stdout itself
            self.assertEqual(os.path.realpath("/proc/%d/fd/5" % (pid,)), out, "worker %d" % index)
        os.kill(parent, signal.SIGSTOP)
        try:
            for index in (1, 2):
                with workers.only(index):
                    self.assertEqual(workers.poplib_session("carol"), 3)
            wait_for(lambda: workers.logins(1) == 1 and workers.logins(2) == 1,
                     what="both logins logged while the parent is stopped")
        finally:
            os.kill(parent, signal.SIGCONT)
        for _ in range(10):
            self.assertEqual(workers.poplib_session("dave"), 2)
        wait_for(lambda: workers.world.log_text().count(" reason=quit ") == 12, what="every QUIT logged")
        stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")
        lines = workers.world.log_text().splitlines()
        self.assertEqual([line for line in lines if not stamp.match(line)], [])
        self.assertEqual(len([line for line in lines if "[worker=" in line and "pop3 login:" in line]), 12)

    def test_json_lines_with_their_worker(self) -> None:
        """--log-format json on stdout: the workers' objects, with a worker field, written by the workers."""
        workers = Workers(self, 2, "--log-format", "json", world=StdoutWorld)
        parent = workers.world.pid
        os.kill(parent, signal.SIGSTOP)
        try:
            with workers.only(2):
                self.assertEqual(workers.poplib_session("carol"), 3)

            def logins() -> list[dict[str, Any]]:
                objects = [json.loads(line) for line in workers.world.log_text().splitlines()]
                return [o for o in objects if o.get("event") == "login"]

            wait_for(lambda: len(logins()) == 1, what="the login logged while the parent is stopped")
        finally:
            os.kill(parent, signal.SIGCONT)
        self.assertEqual((logins()[0]["worker"], logins()[0]["user"]), (2, "carol"))

    def test_logfile_rotation_sees_every_worker_line(self) -> None:
        """
        --logfile PATH (twistd rotates it): the workers' lines go through the
        parent, so SIGUSR1 rotates them with the parent's, and none is lost.
        """
        workers = Workers(self)
        pids = workers.pids()
        with workers.only(1):
            self.assertEqual(workers.poplib_session("carol"), 3)
        wait_for(lambda: workers.logins(1) == 1, what="the first login")
        os.kill(workers.world.pid, signal.SIGUSR1)
        wait_for(lambda: os.path.exists(workers.world.log + ".1"), what="the log rotated")
        os.kill(pids[1], signal.SIGSTOP)
        try:
            self.assertEqual(workers.poplib_session("carol"), 3)  # worker 2's
        finally:
            os.kill(pids[1], signal.SIGCONT)
        wait_for(lambda: workers.logins(2) == 1, what="the second login, in the new file")
        with open(workers.world.log + ".1", errors="replace") as f:
            old = f.read()
        self.assertEqual(old.count("pop3 login:"), 1)
        self.assertIn("[worker=1 popservice.session#info] pop3 login:", old)
        self.assertEqual(workers.world.log_text().count("pop3 login:"), 1)

    def test_route_follows_twistds_log_options(self) -> None:
        self.assertEqual(route({"nodaemon": True, "logfile": None}, "text"), "text")
        self.assertEqual(route({"nodaemon": True, "logfile": "-"}, "json"), "json")
        self.assertEqual(route({"nodaemon": True, "logfile": "/var/log/pop3.log"}, "text"), "text-pass")
        self.assertEqual(route({"nodaemon": False, "logfile": None}, "json"), "json-pass")  # twistd.log
        self.assertEqual(route({"nodaemon": True, "syslog": True}, "text"), "records")
        self.assertEqual(route({"nodaemon": True, "logger": object()}, "text"), "records")


class LogDescriptorTests(unittest.TestCase):
    """The parent's end of a worker's log descriptor when it is a pipe (C{--logfile PATH}, C{--syslog})."""

    def test_lines_pass_through_whole(self) -> None:
        written: list[str] = []

        class LogFile:
            def write(self, text: str) -> None:
                written.append(text)

            def flush(self) -> None:
                pass

        worker = WorkerProcess(None, 2, lambda e: self.fail("published"), log_fd=5,  # type: ignore[arg-type]
                               log_file=LogFile())
        worker.childDataReceived(5, b"first [worker=2 x] one\nsecond [worker=2 x] tw")
        worker.childDataReceived(5, b"o\nthird")
        self.assertEqual(written, ["first [worker=2 x] one\n", "second [worker=2 x] two\n"])

    def test_records_are_published(self) -> None:
        published: list[dict[str, Any]] = []
        worker = WorkerProcess(None, 2, published.append, log_fd=5)  # type: ignore[arg-type]
        event = {"log_format": "pop3 {event}", "event": "login", "log_level": LogLevel.info,
                 "log_namespace": "popservice.session", "log_time": 1.5}
        worker.childDataReceived(5, event_record(event).encode())
        self.assertEqual([(e["worker"], e["log_system"], formatEvent(e)) for e in published],
                         [(2, "worker=2 popservice.session#info", "pop3 login")])


class LineWriterTests(unittest.TestCase):
    def test_lines_go_out_whole_in_pipe_sized_writes(self) -> None:
        """Never more than PIPE_BUF bytes a write (a longer line alone), always ending at a line's end."""
        writes: list[bytes] = []

        def write(fd: int, data: bytes) -> int:
            writes.append(bytes(data))
            return len(data)

        class Stopped:
            running = False

        writer = LineWriter(7, Stopped(), write)
        lines = ["%03d %s\n" % (i, "x" * (i * 37 % 900)) for i in range(40)] + ["y" * 5000 + "\n"]
        for line in lines:
            writer.write(line)
        writer.drain()
        self.assertEqual(b"".join(writes), "".join(lines).encode())
        self.assertTrue(all(w.endswith(b"\n") for w in writes))
        self.assertEqual([w for w in writes if len(w) > PIPE_BUF], [b"y" * 5000 + b"\n"])
        self.assertLess(len(writes), 20)

    def test_logging_while_writing_does_not_wait_for_itself(self) -> None:
        """
        A signal handler that logs while the writer's thread is inside a write (twistd's
        SIGTERM handler, during a write to a slow pipe) neither deadlocks nor cuts a line:
        its line follows, whole (a worker hung for good on this in a CI dry run).
        """
        writes: list[bytes] = []

        class Stopped:
            running = False

        def write(fd: int, data: bytes) -> int:
            if not writes:  # the "signal" arrives during the first write
                writer.write("Received SIGTERM, shutting down.\n")
                writer.flush()
            writes.append(bytes(data))
            return len(data)

        writer = LineWriter(7, Stopped(), write)
        writer.write("first\n")
        writer.write("second\n")
        done = threading.Event()
        thread = threading.Thread(target=lambda: (writer.drain(), done.set()), daemon=True)
        thread.start()
        self.assertTrue(done.wait(10), "the writer waited for itself")
        self.assertEqual(b"".join(writes), b"first\nsecond\nReceived SIGTERM, shutting down.\n")
        self.assertTrue(all(w.endswith(b"\n") for w in writes))

    def test_a_turn_of_the_reactor_is_one_write(self) -> None:
        """Within a turn of the running reactor, lines wait for its end; then one write."""
        from twisted.internet import reactor, task

        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        os.set_blocking(read_end, False)
        observer = worker_log_observer({"POPSERVICE_WORKER_LOG": "text:%d:4" % write_end})

        def log_in_a_turn() -> None:
            for n in range(3):
                observer({"log_format": "line {n}", "n": n, "log_level": LogLevel.info,
                          "log_namespace": "popservice.session", "log_time": 1.0})
            self.assertRaises(BlockingIOError, os.read, read_end, 65536)

        def written(_: object) -> None:
            text = os.read(read_end, 65536).decode()
            self.assertEqual([line.split("] ", 1)[1] for line in text.splitlines()],
                             ["line 0", "line 1", "line 2"])
            self.assertIn(" [worker=4 popservice.session#info] line 0\n", text)

        turn = task.deferLater(reactor, 0, log_in_a_turn)
        return turn.addCallback(lambda _: task.deferLater(reactor, 0.01, lambda: None)).addCallback(written)


class PrivilegedWorkers(unittest.TestCase):
    """
    C{twistd -n --uid nobody --pidfile PATH pop3 --workers 2} on a port below
    1024: the parent binds as root and drops, then spawns the workers, which
    never had root; the pidfile names the parent.
    """

    timeout = 120

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: binds a port below 1024, then switches to --uid/--gid")
        try:
            self.user = pwd.getpwnam("nobody")
        except KeyError:
            raise unittest.SkipTest("no user 'nobody' to switch to")
        found = _python_for(self.user)
        if found is None:
            # (a Python under /root and no system Python of this version): the workers, spawned
            # after the drop, could not start
            raise unittest.SkipTest("user nobody cannot run %s (nor a system Python %d.%d) with popservice"
                                    % (sys.executable, *sys.version_info[:2]))
        self.python, self.env = found
        port = _free_low_port()
        if port is None:
            raise unittest.SkipTest("no free port below 1024 on 127.0.0.1")
        self.port = port
        self.base = tempfile.mkdtemp(prefix="popservice-workers-privileges-")
        if not os.environ.get("POPSERVICE_INTEROP_KEEP"):
            self.addCleanup(shutil.rmtree, self.base, True)
        os.chmod(self.base, 0o755)
        uid, gid = self.user.pw_uid, self.user.pw_gid
        self.mail = os.path.join(self.base, "mail")
        make_maildir(os.path.join(self.mail, "alice"), [b"Subject: hello\n\nthe body\n"])
        for top, _dirs, files in os.walk(self.mail):
            os.chown(top, uid, gid)
            for name in files:
                os.chown(os.path.join(top, name), uid, gid)
        self.passwd = os.path.join(self.base, "passwd")
        with open(self.passwd, "w") as f:
            f.write("alice:{PLAIN}alicepw:%d:%d::::\n" % (uid, gid))
        os.chmod(self.passwd, 0o644)

    def test_parent_binds_then_everyone_runs_as_nobody(self) -> None:
        pidfile = os.path.join(self.base, "twistd.pid")
        log = os.path.join(self.base, "twistd.log")
        command = [self.python, *TWISTD_HERE[1:], "-n", "--pidfile", pidfile, "-l", log,
                   "--uid", str(self.user.pw_uid), "--gid", str(self.user.pw_gid),
                   "pop3", "--mail", "maildir:%s/%%u" % self.mail,
                   "--auth", "passwd-file:" + self.passwd,
                   "--listen", "tcp:%d:interface=127.0.0.1" % self.port, "--workers", "2"]
        process = subprocess.Popen(command, cwd=self.base, stdin=subprocess.DEVNULL, env=self.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def text() -> str:
            with open(log, errors="replace") as f:
                return f.read()

        try:
            wait_for(lambda: os.path.exists(log) and len(_ACCEPTING.findall(text())) == 2,
                     what="both workers accepting")
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            client.user("alice")
            client.pass_("alicepw")
            self.assertEqual(client.stat()[0], 1)
            client.quit()
            with open(pidfile) as f:
                self.assertEqual(int(f.read()), process.pid)
            workers = [int(pid) for _, pid in _ACCEPTING.findall(text())]
            self.assertEqual(sorted(children(process.pid)), sorted(workers))
            for pid in [process.pid, *workers]:
                self.assertEqual(_uids(pid), [self.user.pw_uid] * 4)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        self.assertNotIn("Traceback", text())


def _python_for(user: pwd.struct_passwd) -> tuple[str, dict[str, str]] | None:
    """
    A Python that C{user} can run with popservice importable, and its environment: this one,
    else (this one under /root, say, as pyenv puts it) the system's Python of the same version
    with this one's import path, which must then be readable by C{user}.
    """
    candidates = [(sys.executable, dict(os.environ))]
    system = "/usr/bin/python%d.%d" % sys.version_info[:2]
    if os.path.exists(system) and os.path.realpath(system) != os.path.realpath(sys.executable):
        # this Python's site-packages and the source tree, not its standard library
        base = os.path.realpath(sys.base_prefix) + os.sep
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)
                               and not os.path.realpath(p).startswith(base))
        candidates.append((system, {**os.environ, "PYTHONPATH": path}))
    for python, env in candidates:
        try:
            runs = subprocess.run([python, "-c", "import popservice.tap"], cwd="/", check=False, env=env,
                                  user=user.pw_uid, group=user.pw_gid, capture_output=True).returncode
        except PermissionError:
            continue
        if runs == 0:
            return python, env
    return None


def _uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of C{pid}, from /proc."""
    with open("/proc/%d/status" % (pid,)) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "Uid":
                return [int(v) for v in value.split()]
    raise AssertionError("no Uid line for %d" % (pid,))


class SharedSockets(unittest.TestCase):
    timeout = 120

    def test_socket_activated_workers(self) -> None:
        """systemd's sockets (systemd-socket-activate) pass through the parent to its workers."""
        if NO_SOCKET_ACTIVATE:
            raise unittest.SkipTest(NO_SOCKET_ACTIVATE)
        notify = NotifySocket(self, abstract=True)
        world = World("workers-socket-activation")
        world.add_user("carol", "carolpw", simple_messages("carol", 2))
        self.addCleanup(world.stop)
        port, tls_port = free_port(), free_port()
        argv = [SOCKET_ACTIVATE, "-l", "127.0.0.1:%d" % (port,), "-l", "127.0.0.1:%d" % (tls_port,),
                "--fdname=popservice:popservice", "-E", "NOTIFY_SOCKET=" + notify.env,
                *unit_command(world), "--workers", "2"]
        launch(world, argv, dict(os.environ))
        wait_for(lambda: world.log_tail().count("Listening on") >= 2, what="the sockets bound")
        client = poplib.POP3("127.0.0.1", port, timeout=30)  # starts the parent
        client.user("carol")
        client.pass_("carolpw")
        self.assertEqual(client.stat()[0], 2)
        client.quit()
        self.assertEqual(notify.wait_for("READY")["READY"], "1")
        context = client_context(world.cert)
        tls = poplib.POP3_SSL("127.0.0.1", tls_port, context=context, timeout=30)
        tls.user("carol")
        tls.pass_("carolpw")
        self.assertEqual(tls.stat()[0], 2)
        tls.quit()

        def out() -> str:
            with open(os.path.join(world.root, "twistd.out"), errors="replace") as f:
                return f.read()

        wait_for(lambda: len(_ACCEPTING.findall(out())) == 2, what="both workers accepting")
        assert world.process is not None
        accepting = sorted(int(pid) for _, pid in _ACCEPTING.findall(out()))
        self.assertEqual(sorted(children(world.process.pid)), accepting)
        world.process.send_signal(signal.SIGTERM)
        self.assertEqual(notify.wait_for("STOPPING")["STOPPING"], "1")
        world.process.wait(20)

    def test_unix_socket_outlives_a_worker(self) -> None:
        """A worker stopped alone leaves the sockets (a unix one's path too) to the others."""
        world = World("workers-unix", ["--workers", "2", "--listen", "unix:sock:lockfile=1"])
        path = os.path.join(world.root, "sock")
        world.add_user("carol", "carolpw", simple_messages("carol", 2))
        world.start()
        self.addCleanup(world.stop)
        wait_for(lambda: len(_ACCEPTING.findall(world.log_text())) == 2, what="both workers accepting")
        first = dict((int(i), int(p)) for i, p in _ACCEPTING.findall(world.log_text()))
        os.kill(first[1], signal.SIGTERM)
        wait_for(lambda: "worker 1 (pid %d) ended" % first[1] in world.log_text(), what="worker 1 ended")
        self.assertTrue(os.path.exists(path))
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(20)
        client.connect(path)
        self.assertTrue(client.recv(100).startswith(b"+OK"))
        client.close()
        for tls in (False, True):  # and the TCP sockets
            self.assertTrue(world.connect(tls=tls).greeting.startswith(b"+OK"))

    def test_lmtp_through_the_workers(self) -> None:
        """--lmtp is passed to the workers too: a delivery over it reaches the Maildir."""
        lmtp_port = free_port()
        workers = Workers(self, 2, "--lmtp", "tcp:%d:interface=127.0.0.1" % lmtp_port)
        for index in (1, 2):
            with workers.only(index):
                client = smtplib.LMTP("127.0.0.1", lmtp_port, timeout=20)
                try:
                    client.sendmail("sender@example.org", ["dave@example.org"],
                                    b"Subject: via worker %d\r\n\r\nhello\r\n" % index)
                finally:
                    client.quit()
        self.assertEqual(workers.poplib_session("dave"), 4)
