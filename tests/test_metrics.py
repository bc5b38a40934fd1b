"""
C{twistd pop3 --metrics}: real poplib sessions (a login, a failed one, STLS,
implicit TLS, AUTH PLAIN, an [IN-USE] refusal, a per-address refusal)
against the service built from options, then the figures scraped over HTTP
and read with prometheus_client's own parser.
"""

from __future__ import annotations

import base64
import os
import poplib
import socket
import ssl
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from popservice import tap
from popservice.server.events import Observers
from popservice.server.listeners import ListenerFactory, listener_name
from popservice.server.metrics import MetricsObserver
from popservice.server.policy import Policy
from popservice.stores.memory import MemoryStore
from popservice.tlsutil import make_self_signed
from tests.support import ServerMixin, make_factory, memory_checker, record_events, recv_line
from tests.test_tap import free_port, make_maildir

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode("utf-8"))


class ListenerNames(unittest.TestCase):
    def test_names(self) -> None:
        for description, name in [("tcp:110", "tcp:110"), ("tcp:1110:interface=127.0.0.1", "tcp:1110"),
                                  ("ssl:995:privateKey=k.pem:certKey=c.pem", "ssl:995"),
                                  ("tcp:port=110", "tcp:110"), ("TCP6:110", "tcp6:110"),
                                  ("unix:/run/pop\\:3.sock:mode=660", "unix:/run/pop:3.sock"),
                                  ("systemd:domain=INET:index=0", "systemd:0")]:
            self.assertEqual(listener_name(description), name)


class ListenerFactories(unittest.TestCase):
    """The wrapper in front of the shared factory is transparent but for the protocols' listener name."""

    def test_transparent(self) -> None:
        shared = make_factory(MemoryStore({}), [memory_checker(alice="secret")])
        a, b = ListenerFactory(shared, "tcp:110"), ListenerFactory(shared, "ssl:995")
        a.doStart()
        b.doStart()
        self.assertEqual(shared.numPorts, 2)
        protocol: Any = b.buildProtocol(None)  # type: ignore[arg-type]
        self.assertEqual((protocol.listener, protocol.factory), ("ssl:995", shared))
        self.assertIs(a.connections, shared.connections)
        observer = Observers([])
        a.observer = observer
        self.assertIs(shared.observer, observer)
        a.doStop()
        b.doStop()
        self.assertEqual(shared.numPorts, 0)


class ObserverLabels(unittest.TestCase):
    """Label values come from fixed sets, whatever the events carry."""

    def test_unknown_values_are_other(self) -> None:
        registry = CollectorRegistry()
        observer = MetricsObserver(registry, listeners=["tcp:110"])
        observer.event("command", None, command="XYZZY", seconds=0.001)
        observer.event("login_failed", None, method="alice@example.org", reason="who knows")
        observer.event("login", None, method="SCRAM-SHA-256")
        observer.event("refused", None, listener="tcp:110", limit="surprise")
        for i in range(100):
            observer.event("connect", None, listener="listener-%d" % i, tls=False)
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for m in registry.collect() for s in m.samples}
        self.assertEqual(values["pop3_commands_total", (("command", "other"),)], 1)
        self.assertEqual(values["pop3_logins_total", (("method", "other"), ("result", "internal"))], 1)
        self.assertEqual(values["pop3_logins_total", (("method", "SCRAM-SHA-256"), ("result", "ok"))], 1)
        refused = values["pop3_connections_refused_total", (("limit", "total"), ("listener", "tcp:110"))]
        self.assertEqual(refused, 1)
        listeners = {dict(labels)["listener"] for name, labels in values if name == "pop3_sessions_active"}
        self.assertLessEqual(len(listeners), 65)
        self.assertIn("other", listeners)


class ObserverRouting(unittest.TestCase):
    """L{Observers} sends an observer with C{events} only those; one failing stops no other."""

    def test_routes(self) -> None:
        seen: list[tuple[str, str]] = []

        class Some:
            events = frozenset({"login"})

            def event(self, name: str, session: object, **fields: Any) -> None:
                seen.append(("some", name))

        class All:
            def event(self, name: str, session: object, **fields: Any) -> None:
                seen.append(("all", name))

        class Broken:
            def event(self, name: str, session: object, **fields: Any) -> None:
                raise RuntimeError("observer bug")

        observers = Observers([Broken(), Some(), All()])
        observers.event("command", None, command="STAT")
        observers.event("login", None, method="USER")
        self.assertEqual(seen, [("all", "command"), ("some", "login"), ("all", "login")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class CommandLatency(ServerMixin, unittest.TestCase):
    """One C{command} event per command, once its answer is out, with the seconds it took (a fake clock)."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        factory = make_factory(MemoryStore({"alice": [b"Subject: x\n\nbody\n"]}),
                               [memory_checker(alice="secret")], policy=Policy(failure_delay=1.5),
                               clock=self.clock)
        self.events = record_events(factory)
        self.listen(factory)

    def commands(self) -> list[tuple[str, float]]:
        return [(f["command"], f["seconds"]) for name, f in self.events if name == "command"]

    @defer.inlineCallbacks
    def test_failure_delay_is_in_the_latency(self) -> Any:
        client = yield self.connect()
        yield client.command(b"USER alice")
        client.send(b"PASS wrong\r\n")
        answer = client.line()
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.commands(), [("USER", 0.0)])  # PASS is still waiting for its delay
        self.clock.advance(1.5)
        self.assertTrue((yield answer).startswith(b"-ERR [AUTH]"))
        yield client.command(b"USER alice")
        r = yield client.command(b"PASS secret")
        self.assertTrue(r.startswith(b"+OK"))
        self.clock.advance(0.25)
        yield client.command_multi(b"RETR 1")
        yield client.command(b"XYZZY")
        yield client.command(b"QUIT")
        yield client.lost
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.commands(), [("USER", 0.0), ("PASS", 1.5), ("USER", 0.0), ("PASS", 0.0),
                                           ("RETR", 0.0), ("QUIT", 0.0)])
        names = [name for name, _ in self.events]
        # the PASS that logged in is reported after its login; the unknown command as bad_command
        passes = [i for i, (n, f) in enumerate(self.events) if n == "command" and f["command"] == "PASS"]
        second_pass = passes[1]
        self.assertLess(names.index("login"), second_pass)
        self.assertEqual(names.count("bad_command"), 1)
        self.assertEqual(names[-1], "logout")
        self.assertEqual(len({f["session_id"] for _, f in self.events}), 1)

    @defer.inlineCallbacks
    def test_pending_command_reported_at_disconnect(self) -> Any:
        client = yield self.connect()
        yield client.command(b"USER alice")
        client.send(b"PASS wrong\r\n")
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.clock.advance(0.5)
        client.transport.abortConnection()
        yield client.lost
        for _ in range(50):
            if any(name == "logout" for name, _ in self.events):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.commands(), [("USER", 0.0), ("PASS", 0.5)])
        self.assertEqual([name for name, _ in self.events][-2:], ["command", "logout"])


class ScrapedMetrics(unittest.TestCase):
    """Sessions over real sockets against C{tap.makeService(... --metrics ...)}, then an HTTP scrape."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        make_maildir(os.path.join(self.root, "mail"), "alice",
                     [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n"])
        make_maildir(os.path.join(self.root, "mail"), "bob", [b"Subject: b\n\nbob's\n"])
        self.cert, self.key = make_self_signed(os.path.join(self.root, "tls"))
        self.context = ssl.create_default_context(cafile=self.cert)
        self.port, self.tls_port, self.metrics_port = free_port(), free_port(), free_port()
        options = tap.Options()
        options.parseOptions([
            "--mail", "maildir:%s/mail/%%u" % self.root, "--auth", "memory:alice:secret:bob:bobpw",
            "--listen", "tcp:%d:interface=127.0.0.1" % self.port,
            "--listen", "ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1" % (self.tls_port, self.key,
                                                                                self.cert),
            "--tls-certificate", self.cert, "--tls-key", self.key,
            "--metrics", "tcp:%d:interface=127.0.0.1" % self.metrics_port,
            # loopback counted like any address (the per-address cap), passwords still allowed in the clear
            "--untrusted-loopback", "--allow-plaintext-auth", "--max-connections-per-ip", "3",
            "--failure-delay", "0.1"])
        self.top = tap.makeService(options)
        self.top.startService()
        self.addCleanup(self.stop)
        self.listener, self.tls_listener = "tcp:%d" % self.port, "ssl:%d" % self.tls_port

    @defer.inlineCallbacks
    def stop(self) -> Any:
        factories = [s.factory for s in self.top if isinstance(getattr(s, "factory", None), ListenerFactory)]
        self.assertEqual(len(factories), 2)
        yield self.top.stopService()
        for _ in range(300):
            if not any(f.connections for f in factories):
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("connections left")

    @defer.inlineCallbacks
    def metrics(self, until: Callable[[Samples], bool] = lambda s: True) -> Any:
        """Scrape (over HTTP, in a thread) until C{until} holds (events of closing connections may lag)."""
        for _ in range(100):
            samples = parse((yield threads.deferToThread(scrape, self.metrics_port)))
            if until(samples):
                return samples
            yield task.deferLater(reactor, 0.05, lambda: None)
        return samples

    def value(self, samples: Samples, name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    def sessions(self) -> None:
        """Runs in a thread: the client side of every session."""
        # 1: login, STAT, RETR, TOP, DELE, QUIT
        c = poplib.POP3("127.0.0.1", self.port, timeout=10)
        c.user("alice")
        c.pass_("secret")
        c.stat()
        c.retr(1)
        c.top(1, 0)
        c.dele(2)
        c.quit()
        # 2: a wrong password (answered after the failure delay), an unknown command
        c = poplib.POP3("127.0.0.1", self.port, timeout=10)
        c.user("alice")
        with self_raises(poplib.error_proto, b"-ERR [AUTH]"):
            c.pass_("wrong")
        with self_raises(poplib.error_proto, b"-ERR"):
            c._shortcmd("XYZZY")
        c.quit()
        # 3: STLS (CAPA first, poplib checks it), then AUTH PLAIN
        c = poplib.POP3("127.0.0.1", self.port, timeout=10)
        c.stls(self.context)
        r = c._shortcmd("AUTH PLAIN " + base64.b64encode(b"\0bob\0bobpw").decode())
        assert r.startswith(b"+OK"), r
        c.quit()
        # 4: implicit TLS
        s = poplib.POP3_SSL("127.0.0.1", self.tls_port, context=self.context, timeout=10)
        s.user("bob")
        s.pass_("bobpw")
        s.quit()

    def in_use(self) -> tuple[poplib.POP3, bytes]:
        """Runs in a thread: alice logged in and kept; a second login of alice is refused."""
        holder = poplib.POP3("127.0.0.1", self.port, timeout=10)
        holder.user("alice")
        holder.pass_("secret")
        second = poplib.POP3("127.0.0.1", self.port, timeout=10)
        second.user("alice")
        try:
            second.pass_("secret")
            refusal = b""
        except poplib.error_proto as e:
            refusal = e.args[0]
        second.quit()
        return holder, refusal

    def per_address(self) -> bytes:
        """Runs in a thread: three connections held, the fourth from the same address refused."""
        held = [socket.create_connection(("127.0.0.1", self.port), timeout=10) for _ in range(3)]
        try:
            for s in held:
                assert recv_line(s).startswith(b"+OK")
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as fourth:
                return recv_line(fourth)
        finally:
            for s in held:
                s.close()

    @defer.inlineCallbacks
    def test_sessions_counted(self) -> Any:
        samples = yield self.metrics()
        # Every listener's series exist from the start.
        for listener in (self.listener, self.tls_listener):
            for tls in ("plaintext", "tls"):
                self.assertIn(("pop3_sessions_active", frozenset({("listener", listener), ("tls", tls)})),
                              samples)
        self.assertGreater(self.value(samples, "process_resident_memory_bytes"), 0)

        yield threads.deferToThread(self.sessions)
        holder, refusal = yield threads.deferToThread(self.in_use)
        self.assertTrue(refusal.startswith(b"-ERR [IN-USE]"), refusal)
        samples = yield self.metrics(lambda s: self.value(s, "pop3_sessions_active", listener=self.listener,
                                                          tls="plaintext") == 1)
        self.assertEqual(self.value(samples, "pop3_sessions_active", listener=self.listener, tls="plaintext"),
                         1)
        yield threads.deferToThread(holder.quit)
        samples = yield self.metrics(lambda s: self.value(s, "pop3_sessions_active", listener=self.listener,
                                                          tls="plaintext") == 0)
        refused = yield threads.deferToThread(self.per_address)
        self.assertTrue(refused.startswith(b"-ERR [SYS/TEMP]"), refused)

        def settled(s: Samples) -> bool:
            return self.value(s, "pop3_sessions_total", listener=self.listener, tls="plaintext") == 7

        samples = yield self.metrics(settled)
        v = self.value
        L, S = self.listener, self.tls_listener

        # sessions: ended, by TLS at the end (STLS counts as tls); none active any more
        self.assertEqual(v(samples, "pop3_sessions_total", listener=L, tls="plaintext"), 7)
        self.assertEqual(v(samples, "pop3_sessions_total", listener=L, tls="tls"), 1)
        self.assertEqual(v(samples, "pop3_sessions_total", listener=S, tls="tls"), 1)
        self.assertEqual(v(samples, "pop3_sessions_total", listener=S, tls="plaintext"), 0)
        for listener in (L, S):
            for tls in ("plaintext", "tls"):
                self.assertEqual(v(samples, "pop3_sessions_active", listener=listener, tls=tls), 0)
        self.assertEqual(v(samples, "pop3_session_duration_seconds_count", listener=L), 8)
        self.assertEqual(v(samples, "pop3_session_duration_seconds_count", listener=S), 1)
        self.assertEqual(v(samples, "pop3_connections_refused_total", listener=L, limit="per_address"), 1)
        self.assertEqual(v(samples, "pop3_connections_refused_total", listener=L, limit="total"), 0)

        # logins by method and result
        self.assertEqual(v(samples, "pop3_logins_total", method="USER", result="ok"), 3)
        self.assertEqual(v(samples, "pop3_logins_total", method="USER", result="auth"), 1)
        self.assertEqual(v(samples, "pop3_logins_total", method="USER", result="in_use"), 1)
        self.assertEqual(v(samples, "pop3_logins_total", method="PLAIN", result="ok"), 1)
        self.assertEqual(v(samples, "pop3_in_use_refusals_total"), 1)
        self.assertEqual(v(samples, "pop3_failure_delays_total"), 1)
        self.assertAlmostEqual(v(samples, "pop3_failure_delay_seconds_total"), 0.1)

        # commands: the table's keywords, anything else is "other"
        expected = {"USER": 5, "PASS": 5, "STAT": 1, "RETR": 1, "TOP": 1, "DELE": 1, "QUIT": 6, "CAPA": 1,
                    "STLS": 1, "AUTH": 1, "other": 1, "LIST": 0, "APOP": 0}
        for command, count in expected.items():
            self.assertEqual(v(samples, "pop3_commands_total", command=command), count, command)
            if command != "other":
                self.assertEqual(v(samples, "pop3_command_duration_seconds_count", command=command), count)
        # the failed PASS waited for its failure delay: its latency holds it
        self.assertGreaterEqual(v(samples, "pop3_command_duration_seconds_sum", command="PASS"), 0.1)
        # (the delayed one is never in a bucket below its delay; how fast the others were is not asserted)
        self.assertLessEqual(v(samples, "pop3_command_duration_seconds_bucket", command="PASS", le="0.05"), 4)
        self.assertEqual(v(samples, "pop3_command_duration_seconds_bucket", command="PASS", le="+Inf"), 5)
        self.assertNotIn(("pop3_command_duration_seconds_count", frozenset({("command", "XYZZY")})), samples)

        # messages and bytes
        self.assertEqual(v(samples, "pop3_messages_retrieved_total", command="RETR"), 1)
        self.assertEqual(v(samples, "pop3_messages_retrieved_total", command="TOP"), 1)
        retr_bytes = len(b"Subject: one\r\n\r\nfirst\r\n.\r\n")
        self.assertEqual(v(samples, "pop3_retrieved_bytes_total", command="RETR"), retr_bytes)
        self.assertEqual(v(samples, "pop3_messages_deleted_total"), 1)
        self.assertEqual(v(samples, "pop3_deleted_bytes_total"), len(b"Subject: two\r\n\r\nsecond\r\n"))
        self.assertGreater(v(samples, "pop3_sent_bytes_total", listener=L), 1000)
        self.assertGreater(v(samples, "pop3_sent_bytes_total", listener=S), 50)

        # never a user name or an address in a label
        text = yield threads.deferToThread(scrape, self.metrics_port, "/")
        for secret in ("alice", "bob", "127.0.0.1"):
            self.assertNotIn(secret, text)


class self_raises:
    """C{with self_raises(E, prefix)}: a context manager usable in a thread (no TestCase needed)."""

    def __init__(self, error: type[BaseException], prefix: bytes) -> None:
        self.error = error
        self.prefix = prefix

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        assert kind is not None and issubclass(kind, self.error), "no %s" % (self.error,)
        assert value.args[0].startswith(self.prefix), value.args
        return True
