"""
Robustness of a real C{twistd pop3}, driven over raw sockets: a 50 MiB RETR
byte-exact with bounded server memory (RSS sampled from /proc every 20 ms),
a client vanishing mid-RETR, floods of connections and of pipelined commands
that are never read, hostile user names, and malformed input (unknown
commands, NUL bytes, 10 KB lines, bare LF line ends, one byte per packet).

Measured figures are printed and written to C{rss-*.txt} in the test's
temporary directory.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import time

from twisted.trial import unittest

from tests.interop.world import (
    TIMEOUT,
    RawPOP,
    RssSampler,
    World,
    expected_retr,
    huge_message,
    shared_world,
    simple_messages,
)

MIB = 1024 * 1024
HUGE_SIZE = 50 * MIB
#: allowed server RSS growth while it streams the 50 MiB message
RETR_RSS_LIMIT_KIB = 20 * 1024
#: allowed server RSS growth under the 10,000 pipelined commands
PIPELINE_RSS_LIMIT_KIB = 20 * 1024

_huge: dict[str, object] = {}


def huge() -> tuple[bytes, str, int]:
    """(stored bytes, sha256 of the expected RETR body, its length), computed once."""
    if not _huge:
        stored = huge_message("huge", HUGE_SIZE)
        retr = expected_retr(stored)
        _huge.update(stored=stored, sha=hashlib.sha256(retr).hexdigest(), length=len(retr))
    return _huge["stored"], _huge["sha"], _huge["length"]  # type: ignore[return-value]


def build(world: World) -> None:
    world.add_standard_users()
    stored, _, _ = huge()
    small = simple_messages("huge", 1)[0]
    world.add_user("huge", "hugepw", [("50mib", stored), small])
    world.add_user("vanish", "vanishpw", [("50mib", stored), small])
    world.add_user("pipeline", "pipelinepw", simple_messages("pipeline", 2))
    # accounts whose names would escape mail/%u if substituted into the path
    os.makedirs(os.path.join(world.root, "evil", "new"))
    os.makedirs(os.path.join(world.root, "evil", "cur"))
    os.makedirs(os.path.join(world.root, "evil", "tmp"))
    with open(os.path.join(world.root, "evil", "new", "1700000000.M1P1Q1.evil"), "wb") as f:
        f.write(b"Subject: you should not see this\r\n\r\nsecret\r\n")
    world.add_passwd_line("../evil:{PLAIN}evilpw:::::")
    world.add_passwd_line("alice/../../evil:{PLAIN}evilpw:::::")
    world.add_passwd_line("%s:{PLAIN}longpw:::::" % ("L" * 1000))


def read_multiline_hashed(c: RawPOP) -> tuple[str, int]:
    """Read a multi-line body off C{c} (status line already read): (sha256, length) with stuffing undone."""
    h = hashlib.sha256()
    length = 0
    pending = c.buf  # bytes not yet hashed; always starts at a line start
    c.buf = b""
    while True:
        end = pending.find(b"\r\n.\r\n")
        if pending.startswith(b".\r\n"):
            c.buf = pending[3:]
            return h.hexdigest(), length
        if end >= 0:
            body, c.buf = pending[: end + 2], pending[end + 5 :]
            data = (b"\r\n" + body).replace(b"\r\n..", b"\r\n.")[2:]
            h.update(data)
            length += len(data)
            return h.hexdigest(), length
        # hash everything up to the last complete line that cannot be part of the terminator
        cut = pending.rfind(b"\r\n", 0, len(pending) - 4)
        if cut > 0:
            chunk, pending = pending[: cut + 2], pending[cut + 2 :]
            data = (b"\r\n" + chunk).replace(b"\r\n..", b"\r\n.")[2:]
            h.update(data)
            length += len(data)
        data = c.sock.recv(1 << 18)
        if not data:
            raise ConnectionError("closed mid-body after %d bytes" % length)
        pending += data


def open_many(port: int, n: int, batch: int = 40, timeout: float = 15.0) -> list[socket.socket]:
    """
    C{n} non-blocking connections, each greeted by the server (the greeting is
    left unread).  They are opened in parallel batches smaller than the
    listen backlog, so that no SYN is dropped: that effect is measured on its
    own by C{test_connection_burst_not_dropped}.
    """
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            group = []
            for _ in range(min(batch, n - len(socks))):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                group.append(s)
            socks.extend(group)
            waiting = set(group)
            deadline = time.monotonic() + timeout
            while waiting and time.monotonic() < deadline:
                readable, _, _ = select.select(list(waiting), [], [], 0.2)
                waiting.difference_update(readable)
            if waiting:
                raise TimeoutError(
                    "%d of %d connections not greeted within %s s" % (len(waiting), n, timeout)
                )
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


class RobustnessTests(unittest.TestCase):
    def setUp(self) -> None:
        self.world = shared_world(__name__, build)
        self.assertTrue(self.world.alive(), "server died earlier:\n" + self.world.log_tail())

    def record(self, name: str, text: str) -> None:
        """Print a measured figure and keep it in the test's temporary directory."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(text + "\n")
        print("\n[measured] %s  (%s)" % (text, path))

    def assert_serving(self, within: float = 5.0) -> None:
        """A complete, well-behaved session for someone else still works, within C{within} s."""
        start = time.monotonic()
        c = self.world.session("carol")
        try:
            m = self.world.users["carol"].messages[0]
            status, body = c.multi(b"RETR 1")
            self.assertTrue(status.startswith(b"+OK"), status)
            self.assertEqual(body, m.retr)
            self.assertTrue(c.command(b"QUIT").startswith(b"+OK"))
        finally:
            c.close()
        elapsed = time.monotonic() - start
        self.assertLess(elapsed, within, "a normal session took %.2f s" % elapsed)
        self.assertTrue(self.world.alive())

    # -- big message ------------------------------------------------------------------------------

    def test_retr_50mib_bounded_memory(self) -> None:
        _, sha, length = huge()
        m = self.world.users["huge"].messages[0]
        c = self.world.session("huge")
        self.addCleanup(c.close)
        self.assertEqual(c.command(b"LIST 1"), b"+OK 1 %d" % m.size)
        with RssSampler(self.world, 0.02) as rss:
            started = time.monotonic()
            c.send(b"RETR 1\r\n")
            # do not read for a while: the server must stop producing, not buffer 50 MiB
            time.sleep(1.5)
            status = c.line()
            self.assertTrue(status.startswith(b"+OK"), status)
            got_sha, got_len = read_multiline_hashed(c)
            elapsed = time.monotonic() - started
        self.assertEqual(got_len, length)
        self.assertEqual(got_sha, sha, "50 MiB message differs")
        self.assertTrue(c.command(b"NOOP").startswith(b"+OK"))
        c.quit()
        self.record(
            "rss-retr-50mib.txt",
            "RETR of a %.1f MiB message: server RSS baseline %.1f MiB, peak %.1f MiB, growth %.1f MiB "
            "(%d samples, %.2f s incl. 1.5 s not reading)"
            % (
                length / MIB,
                rss.baseline / 1024,
                rss.peak / 1024,
                rss.growth_kib / 1024,
                len(rss.samples),
                elapsed,
            ),
        )
        self.assertLess(
            rss.growth_kib, RETR_RSS_LIMIT_KIB, "server RSS grew by %d KiB streaming 50 MiB" % rss.growth_kib
        )

    def test_vanish_mid_retr(self) -> None:
        c = self.world.session("vanish")
        self.assertTrue(c.command(b"DELE 2").startswith(b"+OK"))
        c.send(b"RETR 1\r\n")
        got = 0
        while got < 2 * MIB:
            data = c.sock.recv(1 << 16)
            self.assertTrue(data)
            got += len(data)
        # vanish: RST instead of a FIN, mid-transfer
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        self.assertTrue(self.world.alive())
        self.assert_serving()
        # nothing deleted, the lock released, the message intact
        self.assertEqual(self.world.present("vanish"), [1, 2])
        again = self.world.session("vanish")
        self.addCleanup(again.close)
        self.assertEqual(again.command(b"STAT").split()[:2], [b"+OK", b"2"])
        again.send(b"RETR 1\r\n")
        self.assertTrue(again.line().startswith(b"+OK"))
        _, sha, length = huge()
        self.assertEqual(read_multiline_hashed(again), (sha, length))
        again.quit()

    # -- floods -----------------------------------------------------------------------------------

    def test_junk_flood_does_not_block_others(self) -> None:
        junk = b"".join(b"JUNK %06d " % i + b"z" * 30 + b"\r\n" for i in range(2000))  # ~90 KB
        flooders: list[socket.socket] = []

        def close_all() -> None:
            for s in flooders:
                s.close()

        self.addCleanup(close_all)
        rss = RssSampler(self.world, 0.02).__enter__()
        self.addCleanup(rss.__exit__)
        flooders.extend(open_many(self.world.port, 200))
        sent = 0
        pending = {s: junk for s in flooders}
        while pending:
            # until every flooder has sent it all or the server stopped reading from the rest
            _, writable, _ = select.select([], list(pending), [], 0.5)
            if not writable:
                break
            for s in writable:
                try:
                    n = s.send(pending[s])
                except BlockingIOError:
                    continue
                sent += n
                pending[s] = pending[s][n:]
                if not pending[s]:
                    del pending[s]
        start = time.monotonic()
        try:
            self.assert_serving(within=2.0)
        finally:
            elapsed = time.monotonic() - start
            rss.__exit__()
        self.record(
            "flood-junk.txt",
            "200 junk-pipelining connections (%.1f MiB sent, none read): a normal session took %.3f s; "
            "server RSS baseline %.1f MiB, peak %.1f MiB, growth %.1f MiB"
            % (sent / MIB, elapsed, rss.baseline / 1024, rss.peak / 1024, rss.growth_kib / 1024),
        )
        close_all()
        self.assertTrue(self.world.alive())

    def test_pipelined_10000_commands_never_read(self) -> None:
        c = self.world.session("alice", wait_in_use=10)
        self.addCleanup(c.close)
        commands = b"".join(b"RETR 5\r\n" if i % 2 else b"LIST\r\n" for i in range(10000))
        c.sock.setblocking(False)
        with RssSampler(self.world, 0.02) as rss:
            view = memoryview(commands)
            deadline = time.monotonic() + 5
            while view and time.monotonic() < deadline:
                select.select([], [c.sock], [], 0.2)
                try:
                    n = c.sock.send(view)
                except BlockingIOError:
                    continue
                view = view[n:]
            accepted = len(commands) - len(view)
            time.sleep(2.0)  # let the server do whatever it will with them
            self.assert_serving(within=2.0)
        self.record(
            "rss-pipeline-10000.txt",
            "10,000 pipelined LIST/RETR-1MiB commands (%d of %d bytes accepted), never read: server RSS "
            "baseline %.1f MiB, peak %.1f MiB, growth %.1f MiB"
            % (accepted, len(commands), rss.baseline / 1024, rss.peak / 1024, rss.growth_kib / 1024),
        )
        self.assertLess(rss.growth_kib, PIPELINE_RSS_LIMIT_KIB)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        self.assertTrue(self.world.alive())

    def test_connection_burst_not_dropped(self) -> None:
        """
        300 clients connecting one right after the other must all be accepted
        promptly.  With a small listen backlog (Twisted's default is 50) the
        kernel drops SYNs while the server is busy greeting, and those clients
        wait 1 s, then 3 s, ... for the retransmission.
        """
        socks = []
        delayed = []
        start = time.monotonic()
        try:
            for i in range(300):
                t = time.monotonic()
                socks.append(socket.create_connection(("127.0.0.1", self.world.port), timeout=TIMEOUT))
                if time.monotonic() - t > 0.5:
                    delayed.append((i, round(time.monotonic() - t, 2)))
            total = time.monotonic() - start
        finally:
            for sock in socks:
                sock.close()
        self.record(
            "connect-burst.txt",
            "300 back-to-back connects took %.2f s; %d were delayed by a dropped "
            "SYN (index, seconds): %s" % (total, len(delayed), delayed),
        )
        self.assertEqual(delayed, [], "connections delayed by dropped SYNs (listen backlog too small?)")

    def test_many_idle_connections(self) -> None:
        socks = open_many(self.world.port, 300)
        try:
            self.assert_serving(within=2.0)
        finally:
            for s in socks:
                s.close()

    # -- hostile user names -----------------------------------------------------------------------

    def assert_login_refused(self, user: bytes, password: bytes = b"evilpw") -> None:
        c = self.world.connect()
        try:
            r = c.command(b"USER " + user)
            if r.startswith(b"+OK"):
                r = c.command(b"PASS " + password)
            self.assertTrue(r.startswith(b"-ERR"), "login as %r: %r" % (user[:60], r))
            # still talking
            self.assertTrue(c.command(b"CAPA").startswith(b"+OK"))
            c.multi_body()
            r = c.command(b"APOP " + user + b" " + b"0" * 32)
            self.assertTrue(r.startswith(b"-ERR"), "APOP as %r: %r" % (user[:60], r))
        except ConnectionError:
            pass  # closing on garbage is acceptable
        finally:
            c.close()
        self.assertTrue(self.world.alive())

    def test_hostile_user_names(self) -> None:
        for name in (
            b"../x",
            b"a/b",
            b"",
            b"x" * 1000,
            b"a\x00b",
            b"\x00",
            b"..",
            b".",
            b"~root",
            b"%u",
            b"alice\x00",
            b"../evil",
            b"alice/../../evil",
            b"L" * 1000,
            b"a\\b",
            b"\xff\xfe",
            b"alice ../x",
        ):
            self.assert_login_refused(name)
        # nothing outside mail/ was touched or created
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.world.root, "evil", "new"))), ["1700000000.M1P1Q1.evil"]
        )
        self.assertFalse(os.path.exists(os.path.join(self.world.root, "x")))
        self.assertFalse(os.path.exists(os.path.join(self.world.mail, "a")))
        self.assert_serving()

    def test_user_command_without_space(self) -> None:
        c = self.world.connect()
        self.addCleanup(c.close)
        self.assertTrue(c.command(b"USER").startswith(b"-ERR"))
        self.assertTrue(c.command(b"PASS").startswith(b"-ERR"))
        self.assertTrue(c.command(b"USER alice").startswith(b"+OK"))
        self.assertTrue(c.command(b"PASS alicepw").startswith(b"+OK"))
        c.quit()

    # -- malformed input --------------------------------------------------------------------------

    def test_unknown_commands(self) -> None:
        c = self.world.connect()
        self.addCleanup(c.close)
        for cmd in (b"FOO", b"XYZZY bar", b"RETR 1", b"STAT", b"HELO x", b"GET / HTTP/1.0", b"\x16\x03\x01"):
            self.assertTrue(c.command(cmd).startswith(b"-ERR"), cmd)
        self.assertTrue(c.login("alice", "alicepw").startswith(b"+OK"))
        for cmd in (
            b"FOO",
            b"USER alice",
            b"PASS x",
            b"STLS",
            b"APOP a b",
            b"RETR",
            b"RETR -1",
            b"RETR 99999999999999999999",
            b"TOP 1",
            b"TOP 1 -1",
            b"DELE 0",
        ):
            self.assertTrue(c.command(cmd).startswith(b"-ERR"), cmd)
        self.assertTrue(c.command(b"STAT").startswith(b"+OK 11 "))
        c.quit()

    def test_nul_bytes(self) -> None:
        c = self.world.connect()
        self.addCleanup(c.close)
        for cmd in (b"\x00", b"US\x00ER alice", b"NOOP\x00", b"USER al\x00ice", b"\x00\x00\x00\x00"):
            try:
                r = c.command(cmd)
            except ConnectionError:
                break
            if cmd.startswith(b"USER") and r.startswith(b"+OK"):
                r = c.command(b"PASS alicepw")
            self.assertTrue(r.startswith(b"-ERR"), (cmd, r))
        self.assertTrue(self.world.alive())
        self.assert_serving()

    def test_long_lines(self) -> None:
        c = self.world.connect()
        self.addCleanup(c.close)
        for line in (b"A" * 10000, b"USER " + b"a" * 10000, b"NOOP " + b"x" * 300):
            try:
                r = c.command(line)
            except ConnectionError:
                c = self.world.connect()  # closing after an over-long line is acceptable
                continue
            self.assertTrue(r.startswith(b"-ERR"), r)
        # the line after the over-long ones is parsed on its own
        try:
            self.assertTrue(c.login("alice", "alicepw").startswith(b"+OK"))
            c.quit()
        except ConnectionError:
            pass
        self.assertTrue(self.world.alive())
        self.assert_serving()

    def test_huge_line_without_newline(self) -> None:
        """1 MiB with no line end at all: the server must not buffer it all (nor die)."""
        s = socket.create_connection(("127.0.0.1", self.world.port), timeout=TIMEOUT)
        self.addCleanup(s.close)
        s.recv(512)
        s.setblocking(False)
        data = memoryview(b"B" * MIB)
        deadline = time.monotonic() + 3
        while data and time.monotonic() < deadline:
            select.select([], [s], [], 0.2)
            try:
                data = data[s.send(data) :]
            except BlockingIOError:
                continue
            except ConnectionError:
                break  # the server may hang up on such a client
        self.assertTrue(self.world.alive())
        self.assert_serving()

    def test_bare_lf_line_ends(self) -> None:
        c = self.world.connect()
        self.addCleanup(c.close)
        c.send(b"USER alice\nPASS alicepw\nSTAT\n")
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertTrue(c.line().startswith(b"+OK 11 "))
        for m in self.world.users["alice"].messages:
            c.send(b"RETR %d\n" % m.number)
            self.assertTrue(c.line().startswith(b"+OK"))
            self.assertEqual(c.multi_body(), m.retr, m.tag)
        c.send(b"QUIT\n")
        self.assertTrue(c.line().startswith(b"+OK"))

    def test_lower_case_and_one_byte_per_packet(self) -> None:
        c = self.world.connect()
        self.addCleanup(c.close)
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in b"user alice\r\npass alicepw\r\n":
            c.send(bytes([b]))
            time.sleep(0.001)
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertTrue(c.line().startswith(b"+OK"))
        status, body = c.multi(b"retr 2")
        self.assertEqual(body, self.world.users["alice"].messages[1].retr)
        c.quit()

    def test_pipelined_session_in_one_packet(self) -> None:
        c = self.world.connect()
        self.addCleanup(c.close)
        msgs = self.world.users["alice"].messages
        c.send(
            b"CAPA\r\nUSER alice\r\nPASS alicepw\r\nSTAT\r\nRETR 2\r\nTOP 1 2\r\nUIDL 3\r\nNOOP\r\nQUIT\r\n"
        )
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertIn(b"PIPELINING", c.multi_body())
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertEqual(c.line(), b"+OK %d %d" % (len(msgs), sum(m.size for m in msgs)))
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertEqual(c.multi_body(), msgs[1].retr)
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertEqual(c.multi_body(), msgs[0].top(2))
        self.assertTrue(c.line().startswith(b"+OK 3 "))
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertTrue(c.line().startswith(b"+OK"))

    def test_connect_and_drop(self) -> None:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", self.world.port), timeout=TIMEOUT)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", self.world.tls_port), timeout=TIMEOUT)
            s.sendall(b"\x16\x03\x01\x00\x05hello")  # a broken TLS record
            s.close()
        self.assertTrue(self.world.alive())
        self.assert_serving()
