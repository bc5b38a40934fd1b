"""
Hostile clients against popservice and Dovecot, same run, loopback only.

Scenarios (``--scenarios``, comma-separated; default all):

  retr-flood         N logged-in clients (own users, one 1 MiB message each, hard-linked)
                     pipeline ``RETR 1`` x1000 with a 4 KiB SO_RCVBUF and never read;
                     held ``--seconds``, then they disconnect
  noop-flood         N logged-in clients stream ``NOOP`` in 64 KiB writes, reading 1 KiB
                     every 0.5 s; held ``--seconds``
  long-line          ``--long-clients`` (50) clients each send one 10 MB line without a
                     newline before login: closed or not, how fast, the server's first answer
  utf8-user          ``UTF8`` then USER/PASS as ``utf8-müller-日本``: the answer to PASS
  cyrus-scram        Cyrus SASL ``pop3test -m SCRAM-SHA-256`` over STLS and implicit TLS,
                     with and without ``-u``
  external-implicit  AUTH EXTERNAL with a client certificate on the implicit-TLS port
                     (a second server instance configured for it)

Throughout every scenario the server's memory is sampled from /proc every 100 ms
(VmRSS summed over the process tree; PSS from smaps_rollup every 10th sample) and
a well-behaved client runs login, STAT, RETR 1 (small), QUIT every 0.5 s from
its own process.  The load runs from ``--workers`` asyncio worker processes.

    .venv/bin/python bench/hostile.py [--servers popservice,dovecot] [--scenarios ...]
                                      [--clients 200] [--seconds 10]

Needs root for Dovecot (tests/dovecot_fixture.py).  Every step has a timeout;
servers are stopped and temporary directories removed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HOST = "127.0.0.1"
TWISTD = os.path.join(ROOT, ".venv", "bin", "twistd")
POP3TEST = "/usr/lib/cyrus/bin/pop3test"
MIB = 1 << 20
SCENARIOS = ("retr-flood", "noop-flood", "long-line", "utf8-user", "cyrus-scram", "external-implicit")
LOAD_SCENARIOS = ("retr-flood", "noop-flood", "long-line")
UTF8_USER = "utf8-m\u00fcller-\u65e5\u672c"
PROBE_USER, PROBE_PW = "probe", "probepw"
CAROL, CAROL_PW = "carol", "carolpw"
SAMPLE_INTERVAL = 0.1
PSS_EVERY = 10
PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 10.0


def flood_user(i: int) -> tuple[str, str]:
    return "u%03d" % i, "pw-u%03d" % i


# -- messages and certificates ---------------------------------------------------------------------


def big_message(size: int = MIB) -> bytes:
    head = (b"From: Flood <flood@example.org>\nTo: someone@example.org\nSubject: one mebibyte\n"
            b"Date: Tue, 14 Nov 2023 22:13:20 +0000\nMessage-ID: <big@hostile.bench>\n\n")
    out = [head]
    total = len(head)
    n = 0
    while total < size:
        n += 1
        line = b"%07d the quick brown fox jumps over the lazy dog 0123456789 abcdefghij\n" % n
        out.append(line)
        total += len(line)
    data = b"".join(out)[: size - 1]
    return data + b"\n"


def small_message(user: str, i: int = 1) -> bytes:
    return (b"From: Sender <sender@example.org>\nTo: " + user.encode() + b"@example.org\n"
            b"Subject: small %d\nMessage-ID: <small.%d@hostile.bench>\n\n" % (i, i) +
            b"Hello, line one.\nLine two.\n")


def make_client_pki(directory: str, cn: str) -> tuple[str, str]:
    """A CA (CA.pem) and a client certificate+key for CN=cn signed by it (client.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(s: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, s)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("hostile bench CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    ca_pem = os.path.join(directory, "CA.pem")
    client_pem = os.path.join(directory, "client.pem")
    with open(ca_pem, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(client_pem, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(ca_pem, 0o644)
    return ca_pem, client_pem


# -- the user set, the same for every server ------------------------------------------------------


class Mailboxes:
    """Who exists and what they hold: flood users share one hard-linked 1 MiB file."""

    def __init__(self, flood_users: int) -> None:
        self.flood = [flood_user(i) for i in range(flood_users)]
        self.big = big_message()
        self.small: dict[str, tuple[str, list[bytes]]] = {
            PROBE_USER: (PROBE_PW, [small_message(PROBE_USER)]),
            CAROL: (CAROL_PW, [small_message(CAROL, i) for i in (1, 2, 3)]),
            UTF8_USER: ("utf8pw", [small_message("utf8", 1)]),
        }

    def passwd_lines(self) -> list[str]:
        lines = ["%s:{PLAIN}%s:::::" % (u, pw) for u, (pw, _m) in self.small.items()]
        lines += ["%s:{PLAIN}%s:::::" % (u, pw) for u, pw in self.flood]
        return lines

    def build(self, mail_root: str, passwd: str, owner: tuple[int, int] | None = None) -> None:
        master = os.path.join(os.path.dirname(mail_root.rstrip("/")), "big-1mib.eml")
        with open(master, "wb") as f:
            f.write(self.big)
        os.chmod(master, 0o644)
        if owner:
            os.chown(master, *owner)
        base = 1700000000

        def maildir(user: str) -> str:
            d = os.path.join(mail_root, user)
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(d, sub), exist_ok=True)
            return d

        for user, (_pw, msgs) in self.small.items():
            d = maildir(user)
            for i, content in enumerate(msgs, start=1):
                p = os.path.join(d, "cur", "%d.M%06dP1.hostile:2,S" % (base + i, i))
                with open(p, "wb") as f:
                    f.write(content)
                os.utime(p, (base + i, base + i))
        for user, _pw in self.flood:
            d = maildir(user)
            os.link(master, os.path.join(d, "cur", "%d.M000001P1.hostile:2,S" % (base + 1)))
        if owner:
            for dp, _dns, fns in os.walk(mail_root):
                os.chown(dp, *owner)
                for fn in fns:
                    os.chown(os.path.join(dp, fn), *owner)
        tmp = passwd + ".tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            out.writelines(line + "\n" for line in self.passwd_lines())
        os.chmod(tmp, 0o644)
        os.rename(tmp, passwd)


# -- process trees and memory ----------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (Dovecot's master forks every service)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        try:
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (ValueError, IndexError):
            continue
        children[ppid].append(int(entry))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def proc_field_kib(path: str, key: bytes) -> int:
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MemSampler(threading.Thread):
    """VmRSS summed over the server's process tree every 100 ms, PSS every 10th sample."""

    def __init__(self, root_pid: Callable[[], int | None]) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.samples: list[tuple[float, int, int | None, int]] = []  # (t, rss KiB, pss KiB, processes)
        self._stop_evt = threading.Event()
        self.guard_kib = 0
        self.guard_tripped: Callable[[], None] | None = None

    def measure(self, with_pss: bool) -> tuple[int, int | None, int] | None:
        pid = self.root_pid()
        if pid is None:
            return None
        pids = tree_pids(pid)
        rss = sum(proc_field_kib("/proc/%d/status" % p, b"VmRSS:") for p in pids)
        pss = sum(proc_field_kib("/proc/%d/smaps_rollup" % p, b"Pss:") for p in pids) if with_pss else None
        return rss, pss, len(pids)

    def run(self) -> None:
        i = 0
        while not self._stop_evt.is_set():
            m = self.measure(i % PSS_EVERY == 0)
            if m is not None:
                self.samples.append((time.monotonic(), *m))
                if self.guard_kib and m[0] > self.guard_kib and self.guard_tripped:
                    cb, self.guard_tripped = self.guard_tripped, None
                    cb()
            i += 1
            self._stop_evt.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(5)

    def window(self, t0: float, t1: float) -> list[tuple[float, int, int | None, int]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


# -- the servers -----------------------------------------------------------------------------------


class Server:
    name = ""
    port = 0
    tls_port = 0

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def cleanup(self) -> None: ...
    def root_pid(self) -> int | None: ...
    def log_problems(self) -> list[str]: return []

    def alive(self) -> bool:
        return self.root_pid() is not None

    def restart(self) -> None:
        self.stop()
        self.start()


class PopserviceServer(Server):
    """twistd -n pop3 over its own Maildirs, passwd-file and self-signed cert (tests/interop/world.py)."""

    name = "popservice"

    def __init__(self, boxes: Mailboxes, extra_args: Sequence[str] = (), tag: str = "hostile") -> None:
        from tests.interop import world as W

        W.TWISTD = TWISTD
        self.world = W.World(tag, list(extra_args))
        boxes.build(self.world.mail, self.world.passwd)

    @property
    def port(self) -> int:  # type: ignore[override]
        return self.world.port

    @property
    def tls_port(self) -> int:  # type: ignore[override]
        return self.world.tls_port

    @property
    def cert(self) -> str:
        return self.world.cert

    def start(self) -> None:
        self.world.start()

    def stop(self) -> None:
        self.world.stop_process()

    def cleanup(self) -> None:
        self.stop()
        if not os.environ.get("HOSTILE_KEEP"):
            shutil.rmtree(self.world.root, ignore_errors=True)

    def root_pid(self) -> int | None:
        p = self.world.process
        return p.pid if p is not None and p.poll() is None else None

    def log_problems(self) -> list[str]:
        out = []
        for fn in ("twistd.log", "twistd.out"):
            p = os.path.join(self.world.root, fn)
            try:
                with open(p, errors="replace") as f:
                    out += [ln.rstrip() for ln in f if "Traceback" in ln or "Unhandled" in ln
                            or "CRITICAL" in ln or "MemoryError" in ln]
            except OSError:
                pass
        return out


EXTERNAL_PASSDB = """\
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd-external
  mechanisms = external
  override_fields = nopassword
}}
"""

EXTERNAL_SETTINGS = """
ssl_ca = <{ca}
ssl_verify_client_cert = yes
ssl_require_crl = no
auth_ssl_username_from_cert = yes
ssl_cert_username_field = commonName
auth_mechanisms = plain scram-sha-256 external
auth_verbose = yes
"""


class DovecotServer(Server):
    """The private Dovecot of tests/dovecot_fixture.py with the same users and messages."""

    name = "dovecot"

    def __init__(self, boxes: Mailboxes, client_ca: str | None = None, extra_conf: str = "") -> None:
        from tests import dovecot_fixture as fx

        self.root = tempfile.mkdtemp(prefix="hostile-dovecot-")
        self.fx = fx.Dovecot(self.root)
        self.port, self.tls_port = self.fx.port, self.fx.tls_port
        self.cert = self.fx.cert
        with open(self.fx.conf) as f:
            conf = f.read()
        if client_ca:
            # EXTERNAL verifies the empty password: a passdb of its own, for it alone, says "no password"
            conf = conf.replace("passdb {", EXTERNAL_PASSDB.format(root=self.root) + "passdb {", 1)
            conf += EXTERNAL_SETTINGS.format(ca=client_ca)
        conf += extra_conf
        with open(self.fx.conf, "w") as f:
            f.write(conf)
        boxes.build(os.path.join(self.root, "mail"), os.path.join(self.root, "passwd"),
                    owner=(self.fx.uid, self.fx.gid))
        if client_ca:
            # nopassword needs an empty password field: the same users, without passwords
            path = os.path.join(self.root, "passwd-external")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(line.split(":", 1)[0] + "::::::\n" for line in boxes.passwd_lines())
            os.chmod(path, 0o644)

    def start(self) -> None:
        self.fx.start()
        deadline = time.monotonic() + 5
        while self.root_pid() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.fx.stop()

    def cleanup(self) -> None:
        self.stop()
        if not os.environ.get("HOSTILE_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)

    def root_pid(self) -> int | None:
        if not self.fx.process_started:
            return None
        try:
            with open(os.path.join(self.root, "run", "master.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def log_problems(self) -> list[str]:
        try:
            with open(os.path.join(self.root, "dovecot.log"), errors="replace") as f:
                return [ln.rstrip() for ln in f if "Panic" in ln or "Fatal" in ln or "Error:" in ln
                        or "process_limit" in ln or "client_limit" in ln]
        except OSError:
            return []


# -- a blocking POP3 client (probe, functional scenarios) ------------------------------------------


class Blocking:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""

    def _fill(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("session deadline")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("EOF from server; buffer=%r" % (self.buf[:100],))
        self.buf += data

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self._fill()

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.line()

    def ok(self, line: bytes) -> bytes:
        r = self.cmd(line)
        if not r.startswith(b"+OK"):
            raise RuntimeError("%s -> %r" % (line.split(b" ")[0].decode(), r[:100]))
        return r

    def multi_end(self) -> None:
        while True:
            if self.buf.startswith(b".\r\n"):
                self.buf = self.buf[3:]
                return
            i = self.buf.find(b"\r\n.\r\n")
            if i >= 0:
                self.buf = self.buf[i + 5:]
                return
            self._fill()


def probe_session(port: int, timeout: float = PROBE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Blocking(s, deadline)
        g = c.line()
        if not g.startswith(b"+OK"):
            raise RuntimeError("greeting %r" % (g[:100],))
        c.ok(b"USER " + PROBE_USER.encode())
        c.ok(b"PASS " + PROBE_PW.encode())
        c.ok(b"STAT")
        c.ok(b"RETR 1")
        c.multi_end()
        c.ok(b"QUIT")


def probe_main(port: int, stop_evt: Any, conn: Any) -> None:
    """Worker process: a full session every PROBE_INTERVAL until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    results: list[tuple[float, float, str | None]] = []
    t0 = time.monotonic()
    next_t = t0
    while not stop_evt.is_set():
        now = time.monotonic()
        if now < next_t:
            stop_evt.wait(next_t - now)
            continue
        start = time.monotonic()
        err = None
        try:
            probe_session(port)
        except Exception as e:  # noqa: BLE001 - every failure is a figure
            err = "%s: %s" % (type(e).__name__, str(e)[:100])
        results.append((start, time.monotonic() - start, err))  # CLOCK_MONOTONIC is system-wide
        next_t += PROBE_INTERVAL
        while next_t < time.monotonic():
            next_t += PROBE_INTERVAL
    conn.send(results)
    conn.close()


class Probe:
    def __init__(self, ctx: Any, port: int) -> None:
        self.stop_evt = ctx.Event()
        self.parent, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=probe_main, args=(port, self.stop_evt, child), daemon=True)
        self.proc.start()
        child.close()

    def stop(self) -> list[tuple[float, float, str | None]]:
        self.stop_evt.set()
        results: list[tuple[float, float, str | None]] = []
        if self.parent.poll(PROBE_TIMEOUT + 5):
            try:
                results = self.parent.recv()
            except EOFError:
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        return results


# -- load workers (asyncio over raw non-blocking sockets) ------------------------------------------


class AConn:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, user: str = "") -> None:
        self.loop = loop
        self.sock = sock
        self.user = user
        self.buf = b""

    async def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            data = await self.loop.sock_recv(self.sock, 4096)
            if not data:
                raise ConnectionError("EOF")
            self.buf += data

    async def cmd(self, line: bytes) -> bytes:
        await self.loop.sock_sendall(self.sock, line + b"\r\n")
        return await self.line()

    def tcp_state(self) -> int:
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return -1


async def open_conn(loop: asyncio.AbstractEventLoop, port: int, rcvbuf: int | None, user: str = "") -> AConn:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    try:
        await loop.sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    c = AConn(loop, sock, user)
    g = await c.line()
    if not g.startswith(b"+OK"):
        sock.close()
        raise RuntimeError("greeting %r" % (g[:60],))
    return c


async def login(loop: asyncio.AbstractEventLoop, port: int, user: str, pw: str, rcvbuf: int | None,
                sem: asyncio.Semaphore) -> AConn | str:
    last = ""
    for _attempt in range(3):
        async with sem:
            c = None
            try:
                c = await asyncio.wait_for(open_conn(loop, port, rcvbuf, user), 30)
                r = await asyncio.wait_for(c.cmd(b"USER " + user.encode()), 30)
                if r.startswith(b"+OK"):
                    r = await asyncio.wait_for(c.cmd(b"PASS " + pw.encode()), 30)
                if r.startswith(b"+OK"):
                    return c
                last = r[:60].decode("utf-8", "replace")
            except Exception as e:  # noqa: BLE001
                last = "%s %s" % (type(e).__name__, str(e)[:60])
            if c is not None:
                c.sock.close()
        await asyncio.sleep(0.5)
    return last


async def retr_phase(conns: list[AConn], hold: float) -> dict[str, Any]:
    payload = b"RETR 1\r\n" * 1000
    until = time.monotonic() + hold
    sent = errors = 0

    async def one(c: AConn) -> None:
        nonlocal sent, errors
        try:
            await asyncio.wait_for(c.loop.sock_sendall(c.sock, payload), max(0.1, until - time.monotonic()))
            sent += 1
        except Exception:  # noqa: BLE001
            errors += 1

    await asyncio.gather(*(one(c) for c in conns))
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    states = collections.Counter(c.tcp_state() for c in conns)
    return {"pipelined_ok": sent, "send_errors": errors,
            "closed_by_server": sum(v for k, v in states.items() if k != 1)}


async def noop_phase(conns: list[AConn], hold: float) -> dict[str, Any]:
    chunk = b"NOOP\r\n" * 10922
    until = time.monotonic() + hold
    totals = {"bytes_sent": 0, "bytes_read": 0, "closed_by_server": 0}

    async def writer(c: AConn) -> None:
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(c.loop.sock_sendall(c.sock, chunk), left)
            except TimeoutError:
                return
            except OSError:
                return
            totals["bytes_sent"] += len(chunk)

    async def reader(c: AConn) -> bool:
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.5, left))
            try:
                data = await asyncio.wait_for(c.loop.sock_recv(c.sock, 1024), 0.25)
            except TimeoutError:
                continue
            except OSError:
                return True
            if not data:
                return True
            totals["bytes_read"] += len(data)

    async def one(c: AConn) -> None:
        w = asyncio.ensure_future(writer(c))
        closed = await reader(c)
        if closed:
            totals["closed_by_server"] += 1
        w.cancel()
        try:
            await w
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass

    await asyncio.gather(*(one(c) for c in conns))
    return totals


async def long_line_phase(conns: list[AConn], total: int, give_up: float) -> dict[str, Any]:
    chunk_size = 256 * 1024
    out: list[dict[str, Any]] = []

    async def one(c: AConn) -> None:
        loop = c.loop
        t0 = time.monotonic()
        rec: dict[str, Any] = {"closed": False, "how": None, "t": None, "first": None, "sent": 0}

        async def reader() -> None:
            buf = c.buf
            while True:
                try:
                    data = await loop.sock_recv(c.sock, 65536)
                except ConnectionResetError:
                    rec.update(closed=True, how="RST", t=time.monotonic() - t0)
                    break
                except OSError as e:
                    rec.update(closed=True, how=type(e).__name__, t=time.monotonic() - t0)
                    break
                if not data:
                    rec.update(closed=True, how="EOF", t=time.monotonic() - t0)
                    break
                buf += data
                if rec["first"] is None and b"\r\n" in buf:
                    rec["first"] = buf.split(b"\r\n", 1)[0][:100].decode("utf-8", "replace")
            if rec["first"] is None and buf:
                rec["first"] = buf[:100].decode("utf-8", "replace")

        async def sender() -> None:
            left = total
            first = True
            while left > 0:
                n = min(chunk_size, left)
                data = (b"USER " + b"x" * (n - 5)) if first else b"x" * n
                first = False
                try:
                    await loop.sock_sendall(c.sock, data)
                except OSError as e:
                    rec["send_error"] = type(e).__name__
                    rec.setdefault("send_error_t", time.monotonic() - t0)
                    return
                rec["sent"] += n
                left -= n

        r = asyncio.ensure_future(reader())
        s = asyncio.ensure_future(sender())
        await asyncio.wait({r}, timeout=give_up)
        for t in (r, s):
            t.cancel()
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if not rec["closed"] and "send_error_t" in rec:
            rec.update(closed=True, how="send " + rec["send_error"], t=rec["send_error_t"])
        out.append(rec)

    await asyncio.gather(*(one(c) for c in conns))
    return {"records": out}


def worker_main(kind: str, port: int, users: list[tuple[str, str]], params: dict[str, Any],
                conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(params.get("login_concurrency", 25))
        if kind == "long-line":
            async def greet() -> AConn | str:
                async with sem:
                    try:
                        return await asyncio.wait_for(open_conn(loop, port, None), 30)
                    except Exception as e:  # noqa: BLE001
                        return "%s %s" % (type(e).__name__, str(e)[:60])
            results = await asyncio.gather(*(greet() for _ in users))
        else:
            rcvbuf = params.get("rcvbuf")
            results = await asyncio.gather(*(login(loop, port, u, p, rcvbuf, sem) for u, p in users))
        conns = [r for r in results if isinstance(r, AConn)]
        errors = collections.Counter(r for r in results if isinstance(r, str))
        conn.send(("ready", len(conns), dict(errors)))
        go = await loop.run_in_executor(None, lambda: conn.recv() if conn.poll(300) else ("stop",))
        stats: dict[str, Any] = {}
        if go[0] == "go":
            hold = params["hold"]
            if kind == "retr-flood":
                stats = await retr_phase(conns, hold)
            elif kind == "noop-flood":
                stats = await noop_phase(conns, hold)
            else:
                stats = await long_line_phase(conns, params["line_bytes"], params["give_up"])
        for c in conns:
            c.sock.close()
        conn.send(("done", stats))

    try:
        asyncio.run(main())
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()[-800:]))
    conn.close()


# -- scenarios -------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(p / 100.0 * len(v)) - 1))
    return v[k]


def mib(kib: float) -> str:
    return "%.1f" % (kib / 1024.0)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = mp.get_context("spawn")
        self.table: dict[str, dict[str, dict[str, str]]] = collections.OrderedDict()
        self.notes: list[str] = []

    def put(self, scenario: str, server: str, label: str, value: Any) -> None:
        self.table.setdefault(scenario, collections.OrderedDict()).setdefault(label, {})[server] = str(value)

    def say(self, *parts: Any, sep: str = " ") -> None:
        print(*parts, sep=sep, flush=True)

    # the measured frame around any scenario

    def measured(self, server: Server, scenario: str, body: Callable[[MemSampler], dict[str, Any]],
                 memory: bool) -> None:
        sampler = MemSampler(server.root_pid)
        sampler.start()
        probe = Probe(self.ctx, server.port)
        load_before = os.getloadavg()[0]
        try:
            t_start = time.monotonic()
            time.sleep(2.0 if memory else 0.5)
            base = sampler.measure(True)
            t_base = time.monotonic()
            info = body(sampler)
            if memory:
                t_left = info["t_left"]
                wait = t_left + self.args.after - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                after = sampler.measure(True)
        finally:
            probe_results = probe.stop()
            sampler.stop()
        tag = scenario
        name = server.name
        # The machine is shared (2 CPUs, other work): every figure stands beside the load it met.
        self.put(tag, name, "load average (1 min) at start / end",
                 "%.1f / %.1f" % (load_before, os.getloadavg()[0]))
        ok = [lat for _t, lat, err in probe_results if err is None]
        failed = [(t, err) for t, _lat, err in probe_results if err is not None]
        if ok:
            self.put(tag, name, "probe session ms p50/p99/max",
                     "%.1f / %.1f / %.1f" % (1000 * statistics.median(ok), 1000 * pct(ok, 99),
                                             1000 * max(ok)))
        else:
            self.put(tag, name, "probe session ms p50/p99/max", "no successful session")
        self.put(tag, name, "probe sessions failed/total", "%d/%d" % (len(failed), len(probe_results)))
        if failed:
            kinds = collections.Counter(err[:70] for _t, err in failed)
            self.say("    probe failures:", dict(kinds.most_common(4)),
                     "first at t=%.1fs" % (failed[0][0] - t_start))
        if not memory:
            return
        # the same sessions split by phase: before the load, login ramp, hold, after the clients left
        phases = (("before", t_start, info["t_load"]), ("ramp", info["t_load"], info["t_ready"]),
                  ("hold", info["t_ready"], info["t_left"]), ("after", info["t_left"], float("inf")))
        parts = []
        for label, a, b in phases:
            lat = [lat for t, lat, err in probe_results if a <= t < b and err is None]
            bad = sum(1 for t, _lat, err in probe_results if a <= t < b and err is not None)
            failed_note = " (%d failed)" % bad if bad else ""
            if lat:
                med, top = 1000 * statistics.median(lat), 1000 * max(lat)
                parts.append("%s n=%d p50 %.1f max %.1f ms%s" % (label, len(lat), med, top, failed_note))
            if label == "hold":
                self.put(tag, name, "probe during hold ms p50/p99/max (n)",
                         "%.1f / %.1f / %.1f (%d)%s" % (med, 1000 * pct(lat, 99), top, len(lat), failed_note)
                         if lat else "none" + failed_note)
        slow = ["%.1fs@t=%.1f" % (lat, t - t_start) for t, lat, err in probe_results if lat > 1.0]
        self.say("    probe by phase: " + "; ".join(parts))
        self.say("    phases: ramp t=%.1f..%.1f, hold ..%.1f; slow sessions (>1 s): %s"
                 % (info["t_load"] - t_start, info["t_ready"] - t_start, info["t_left"] - t_start,
                    ", ".join(slow) or "none"))
        pre = [s[1] for s in sampler.window(t_start, t_base)] or [base[0] if base else 0]
        rss_base = statistics.median(pre)
        load = sampler.window(info["t_load"], info["t_left"] + 1.0)
        peak = max((s[1] for s in load), default=rss_base)
        pss_load = [s[2] for s in load if s[2] is not None]
        pss_base = base[1] if base else 0
        pss_peak = max(pss_load, default=pss_base)
        n = max(1, info["clients"])
        procs = max((s[3] for s in load), default=0)
        self.put(tag, name, "RSS baseline MiB", mib(rss_base))
        self.put(tag, name, "RSS peak growth MiB (KiB/client)",
                 "%s (%.0f)" % (mib(peak - rss_base), (peak - rss_base) / n))
        self.put(tag, name, "RSS %ds after clients left MiB" % self.args.after,
                 mib(after[0]) if after else "server gone")
        self.put(tag, name, "PSS baseline / peak / after MiB",
                 "%s / %s / %s" % (mib(pss_base or 0), mib(pss_peak or 0),
                                   mib(after[1] or 0) if after else "-"))
        self.put(tag, name, "PSS peak growth KiB/client", "%.0f" % (((pss_peak or 0) - (pss_base or 0)) / n))
        self.put(tag, name, "server processes (peak)", procs)
        self.say("    memory: RSS base %s MiB, peak %s MiB, after %s MiB; PSS base %s, peak %s, after %s MiB;"
                 " %d samples, peak processes %d"
                 % (mib(rss_base), mib(peak), mib(after[0]) if after else "-", mib(pss_base or 0),
                    mib(pss_peak or 0), mib(after[1] or 0) if after else "-", len(sampler.samples), procs))

    # load scenarios

    def load(self, server: Server, scenario: str) -> None:
        args = self.args
        if scenario == "long-line":
            nclients = args.long_clients
            users = [("", "")] * nclients
            params = {"line_bytes": args.long_bytes, "give_up": args.give_up, "hold": 0}
        else:
            nclients = args.clients
            users = [flood_user(i) for i in range(nclients)]
            params = {"hold": args.seconds, "rcvbuf": 4096 if scenario == "retr-flood" else None}
        nworkers = max(1, min(args.workers, nclients))
        chunks = [users[i::nworkers] for i in range(nworkers)]

        def body(sampler: MemSampler) -> dict[str, Any]:
            procs: list[Any] = []
            pipes: list[Any] = []
            aborted: list[str] = []

            def guard() -> None:
                aborted.append("RSS above %d MiB: workers killed" % (args.max_rss_mib,))
                for p in procs:
                    if p.is_alive():
                        p.kill()

            t_load = time.monotonic()
            try:
                for chunk in chunks:
                    parent, child = self.ctx.Pipe()
                    p = self.ctx.Process(target=worker_main, daemon=True,
                                         args=(scenario, server.port, chunk, params, child))
                    p.start()
                    child.close()
                    procs.append(p)
                    pipes.append(parent)
                sampler.guard_kib = args.max_rss_mib * 1024
                sampler.guard_tripped = guard
                ready, errors = 0, collections.Counter[str]()
                for pipe in pipes:
                    msg: tuple[Any, ...] = pipe.recv() if pipe.poll(120) else ("timeout",)
                    if msg[0] == "ready":
                        ready += msg[1]
                        errors.update(msg[2])
                    else:
                        aborted.append("worker not ready: %s" % (str(msg)[:200],))
                t_ready = time.monotonic()
                for pipe in pipes:
                    try:
                        pipe.send(("go",))
                    except OSError:
                        pass
                stats: list[dict[str, Any]] = []
                deadline = time.monotonic() + params["hold"] + args.give_up + 60
                for pipe in pipes:
                    left = max(0.0, deadline - time.monotonic())
                    reply: Any
                    try:
                        reply = pipe.recv() if pipe.poll(left) else ("timeout",)
                    except EOFError:
                        reply = ("worker died",)
                    if reply[0] == "done":
                        stats.append(reply[1])
                    else:
                        aborted.append("worker: %s" % (str(reply)[:300],))
                t_left = time.monotonic()
            finally:
                sampler.guard_tripped = None
                for p in procs:
                    p.join(10)
                    if p.is_alive():
                        p.kill()
                        p.join(5)
            return {"t_load": t_load, "t_ready": t_ready, "t_left": t_left, "clients": ready,
                    "errors": errors, "stats": stats, "aborted": aborted}

        result: dict[str, Any] = {}

        def wrapped(sampler: MemSampler) -> dict[str, Any]:
            result.update(body(sampler))
            return result

        self.measured(server, scenario, wrapped, memory=True)
        name = server.name
        label = "clients logged in" if scenario != "long-line" else "clients connected"
        self.put(scenario, name, label, "%d/%d (in %.1f s)" % (result["clients"], nclients,
                                                              result["t_ready"] - result["t_load"]))
        if result["errors"]:
            self.say("    login/connect errors:", dict(collections.Counter(result["errors"]).most_common(4)))
        for a in result["aborted"]:
            self.say("    ABORTED:", a)
            self.put(scenario, name, "aborted", a[:60])
        stats = result["stats"]
        if scenario == "retr-flood":
            self.put(scenario, name, "RETR x1000 pipelined / closed by server during hold",
                     "%d / %d" % (sum(s["pipelined_ok"] for s in stats),
                                  sum(s["closed_by_server"] for s in stats)))
        elif scenario == "noop-flood":
            sent = sum(s["bytes_sent"] for s in stats)
            read = sum(s["bytes_read"] for s in stats)
            self.put(scenario, name, "NOOPs sent /s (client total) / closed by server",
                     "%.0f / %d" % (sent / 6 / args.seconds, sum(s["closed_by_server"] for s in stats)))
            self.say("    noop: %.1f MB written by clients, %.1f KB of answers read"
                     % (sent / 1e6, read / 1e3))
        else:
            recs = [r for s in stats for r in s["records"]]
            closed = [r for r in recs if r["closed"]]
            times = [r["t"] for r in closed]
            self.put(scenario, name, "closed by server within %gs" % args.give_up,
                     "%d/%d" % (len(closed), len(recs)))
            self.put(scenario, name, "time to close ms median/max",
                     "%.0f / %.0f" % (1000 * statistics.median(times), 1000 * max(times)) if times else "-")
            hows = collections.Counter(r["how"] for r in closed)
            firsts = collections.Counter(r["first"] or "(nothing)" for r in recs)
            sent = [r["sent"] for r in recs]
            self.put(scenario, name, "how closed",
                     ", ".join("%s %d" % kv for kv in hows.most_common()) or "-")
            self.put(scenario, name, "first answer", "; ".join("%r x%d" % kv for kv in firsts.most_common(2)))
            self.put(scenario, name, "bytes into the socket before close/give-up (median)",
                     "%.2f MB" % (statistics.median(sent) / 1e6) if sent else "-")

    # functional scenarios

    def utf8(self, server: Server) -> None:
        answers: dict[str, str] = {}

        def body(_s: MemSampler) -> dict[str, Any]:
            try:
                answers.update(utf8_check(server.port))
            except Exception as e:  # noqa: BLE001
                answers["error"] = "%s: %s" % (type(e).__name__, e)
            return {}

        self.measured(server, "utf8-user", body, memory=False)
        for k in ("UTF8", "USER", "PASS", "STAT", "error"):
            if k in answers:
                label = "answer to " + k if k != "error" else "error"
                self.put("utf8-user", server.name, label, answers[k][:70])
        if isinstance(server, DovecotServer) and not answers.get("PASS", "").startswith("+OK"):
            # Why: Dovecot's default auth_username_chars has no bytes >= 0x80.  Same check with it emptied.
            variant = DovecotServer(Mailboxes(0), extra_conf="auth_username_chars =\n")
            try:
                variant.start()
                a = utf8_check(variant.port)
                self.put("utf8-user", server.name, "PASS with auth_username_chars= (empty)", a["PASS"][:70])
            except Exception as e:  # noqa: BLE001
                self.put("utf8-user", server.name, "PASS with auth_username_chars= (empty)",
                         "%s: %s" % (type(e).__name__, str(e)[:50]))
            finally:
                variant.cleanup()

    def cyrus(self, server: Server) -> None:
        out: dict[str, str] = {}

        def body(_s: MemSampler) -> dict[str, Any]:
            modes = (("STLS", server.port, ["-t", ""]), ("implicit TLS", server.tls_port, ["-s"]))
            for mode, port, flags in modes:
                for with_u in (True, False):
                    authz = ["-u", CAROL] if with_u else []
                    argv = [POP3TEST, "-m", "SCRAM-SHA-256", "-a", CAROL, *authz, "-w", CAROL_PW,
                            "-p", str(port), *flags, "localhost"]
                    label = "%s %s" % (mode, "with -u" if with_u else "without -u")
                    out[label] = cyrus_run(argv)
                    self.say("    %s: %s" % (" ".join(repr(a) if a == "" else a for a in argv), out[label]))
            return {}

        if not os.path.exists(POP3TEST):
            self.put("cyrus-scram", server.name, "pop3test", "not installed")
            return
        self.measured(server, "cyrus-scram", body, memory=False)
        for label, v in out.items():
            self.put("cyrus-scram", server.name, label, v)

    def external(self, server_name: str, boxes: Mailboxes, pki: tuple[str, str]) -> None:
        ca, client_pem = pki
        srv: Server | None = None
        try:
            if server_name == "popservice":
                srv = PopserviceServer(boxes, ["--tls-client-ca", ca, "--sasl",
                                               "EXTERNAL,SCRAM-SHA-256,PLAIN"], tag="hostile-external")
            else:
                srv = DovecotServer(boxes, client_ca=ca)
            try:
                srv.start()
            except Exception as e:  # noqa: BLE001
                self.put("external-implicit", server_name, "answer to AUTH EXTERNAL =",
                         "not measured: server did not start (%s)" % (str(e).splitlines()[0][:60],))
                self.say("    external: server did not start:", str(e)[:1500])
                return
            answers: dict[str, str] = {}

            def body(_s: MemSampler) -> dict[str, Any]:
                assert srv is not None
                for port_name, port, stls in (("implicit", srv.tls_port, False), ("stls", srv.port, True)):
                    try:
                        a = external_check(port, client_pem, stls)
                    except Exception as e:  # noqa: BLE001
                        a = {"AUTH": "%s: %s" % (type(e).__name__, str(e)[:80])}
                    for k, v in a.items():
                        answers["%s %s" % (port_name, k)] = v
                return {}

            self.measured(srv, "external-implicit", body, memory=False)
            row = "external-implicit"
            self.put(row, server_name, "CAPA SASL (implicit port)", answers.get("implicit SASL", "-")[:70])
            self.put(row, server_name, "answer to AUTH EXTERNAL =", answers.get("implicit AUTH", "-")[:70])
            if "implicit STAT" in answers:
                self.put(row, server_name, "then STAT", answers["implicit STAT"][:70])
            self.say("    external (for comparison, over STLS on the plain port): AUTH -> %s"
                     % (answers.get("stls AUTH", "-"),))
            self.put(row, server_name, "(reference: same over STLS)", answers.get("stls AUTH", "-")[:70])
            problems = srv.log_problems()
            if problems:
                self.say("    external instance log:", *problems[-5:], sep="\n      ")
        finally:
            if srv is not None:
                srv.cleanup()


def utf8_check(port: int) -> dict[str, str]:
    out: dict[str, str] = {}
    deadline = time.monotonic() + 15
    with socket.create_connection((HOST, port), timeout=15) as s:
        c = Blocking(s, deadline)
        c.line()
        out["UTF8"] = c.cmd(b"UTF8").decode("utf-8", "replace")
        out["USER"] = c.cmd(b"USER " + UTF8_USER.encode()).decode("utf-8", "replace")
        out["PASS"] = c.cmd(b"PASS utf8pw").decode("utf-8", "replace")
        if out["PASS"].startswith("+OK"):
            out["STAT"] = c.cmd(b"STAT").decode("utf-8", "replace")
        try:
            c.cmd(b"QUIT")
        except (OSError, ConnectionError):
            pass
    return out


def cyrus_run(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, input=b"STAT\r\nQUIT\r\n", capture_output=True, timeout=20)
        text = (p.stdout + p.stderr).decode("utf-8", "replace")
        rc: int | str = p.returncode
    except subprocess.TimeoutExpired as e:
        text = ((e.stdout or b"") + (e.stderr or b"")).decode("utf-8", "replace")
        rc = "timeout"
    auth = "Authenticated." in text
    after = text.split("Authenticated.", 1)[1] if auth else ""
    ok_after = "+OK" in after
    detail = ""
    if not auth:
        bad = [ln.strip() for ln in text.splitlines() if ln.strip() and ("-ERR" in ln or "fail" in ln.lower()
                                                                          or "error" in ln.lower())]
        detail = " [%s]" % (bad[-1][:60],) if bad else " [rc=%s, %r]" % (rc, text.strip()[-60:])
    yes = {True: "yes", False: "no"}
    return "Authenticated.=%s, +OK after=%s%s" % (yes[auth], yes[ok_after], detail)


def external_check(port: int, client_pem: str, stls: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.post_handshake_auth = True
    ctx.load_cert_chain(client_pem)
    deadline = time.monotonic() + 15
    raw = socket.create_connection((HOST, port), timeout=15)
    try:
        if stls:
            c = Blocking(raw, deadline)
            c.line()
            r = c.cmd(b"STLS")
            if not r.startswith(b"+OK"):
                return {"AUTH": "STLS -> " + r.decode("utf-8", "replace")}
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
            c = Blocking(sock, deadline)
        else:
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
            c = Blocking(sock, deadline)
            c.line()
        r = c.cmd(b"CAPA")
        sasl = "-"
        if r.startswith(b"+OK"):
            while True:
                ln = c.line()
                if ln == b".":
                    break
                if ln.upper().startswith(b"SASL"):
                    sasl = ln.decode("utf-8", "replace")
        out["SASL"] = sasl
        out["AUTH"] = c.cmd(b"AUTH EXTERNAL =").decode("utf-8", "replace")
        if out["AUTH"].startswith("+OK"):
            out["STAT"] = c.cmd(b"STAT").decode("utf-8", "replace")
        try:
            c.cmd(b"QUIT")
        except (OSError, ConnectionError):
            pass
    finally:
        raw.close()
    return out


# -- main ------------------------------------------------------------------------------------------


def print_table(run: Run, servers: list[str]) -> None:
    rows: list[list[str]] = [["scenario", "figure", *servers]]
    for scenario, labels in run.table.items():
        first = True
        for label, values in labels.items():
            rows.append([scenario if first else "", label, *[values.get(s, "-") for s in servers]])
            first = False
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    sep = "-+-".join("-" * w for w in widths)
    for i, r in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print(sep)
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="popservice,dovecot")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--clients", type=int, default=200, help="clients in retr-flood and noop-flood")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the floods are held")
    parser.add_argument("--after", type=int, default=10, help="seconds after the clients left to read RSS")
    parser.add_argument("--long-clients", type=int, default=50)
    parser.add_argument("--long-bytes", type=int, default=10_000_000)
    parser.add_argument("--give-up", type=float, default=10.0, help="long-line: seconds from the first byte")
    parser.add_argument("--workers", type=int, default=2, help="load worker processes")
    parser.add_argument("--max-rss-mib", type=int, default=8192,
                        help="kill the load if the server grows past this")
    args = parser.parse_args()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in servers:
        if s not in ("popservice", "dovecot"):
            parser.error("unknown server %r" % (s,))
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error("unknown scenario %r (known: %s)" % (s, ", ".join(SCENARIOS)))
    if "dovecot" in servers:
        from tests import dovecot_fixture as fx

        why = fx.skip_reason()
        if why:
            parser.error("dovecot: " + why)

    run = Run(args)
    boxes = Mailboxes(max(args.clients, 1))
    scratch = tempfile.mkdtemp(prefix="hostile-pki-")
    live: dict[str, Server] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_signal)
    t_run = time.monotonic()
    load_start = os.getloadavg()[0]
    print("hostile.py: servers=%s scenarios=%s clients=%d hold=%gs, %d workers, %d CPUs, %s"
          % (",".join(servers), ",".join(scenarios), args.clients, args.seconds, args.workers,
             os.cpu_count() or 0, time.strftime("%Y-%m-%d %H:%M:%S")), flush=True)
    try:
        pki = make_client_pki(scratch, CAROL)
        for name in servers:
            t0 = time.monotonic()
            srv: Server = PopserviceServer(boxes) if name == "popservice" else DovecotServer(boxes)
            live[name] = srv
            srv.start()
            print("  %s up on %d (TLS %d), root pid %s, %.1f s to build and start"
                  % (name, srv.port, srv.tls_port, srv.root_pid(), time.monotonic() - t0), flush=True)
        for scenario in scenarios:
            for name in servers:
                srv = live[name]
                print("== %s / %s" % (scenario, name), flush=True)
                if scenario != "external-implicit" and not srv.alive():
                    print("    server was not running: restarting", flush=True)
                    run.notes.append("%s was dead before %s and was restarted" % (name, scenario))
                    srv.restart()
                t0 = time.monotonic()
                try:
                    if scenario in LOAD_SCENARIOS:
                        run.load(srv, scenario)
                    elif scenario == "utf8-user":
                        run.utf8(srv)
                    elif scenario == "cyrus-scram":
                        run.cyrus(srv)
                    else:
                        run.external(name, boxes, pki)
                except Exception:  # noqa: BLE001 - one broken scenario must not lose the others
                    tb = traceback.format_exc()
                    print(tb, flush=True)
                    run.put(scenario, name, "bench error", tb.strip().splitlines()[-1][:70])
                if scenario != "external-implicit" and not srv.alive():
                    run.notes.append("%s DIED during %s" % (name, scenario))
                    run.put(scenario, name, "server survived", "NO (died)")
                    print("    SERVER DIED", flush=True)
                print("    (%.1f s)" % (time.monotonic() - t0), flush=True)
        for name, srv in live.items():
            problems = srv.log_problems()
            if problems:
                counts = collections.Counter(p.split(":", 3)[-1].strip()[:90] for p in problems)
                common = "; ".join("%s (x%d)" % kv for kv in counts.most_common(3))
                run.notes.append("%s log: %d problem lines; most common: %s" % (name, len(problems), common))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        for srv in live.values():
            try:
                srv.cleanup()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print("Results (%.0f s in all; loopback, %d CPUs shared by servers and load; load average at start %.1f,"
          " at end %.1f)" % (time.monotonic() - t_run, os.cpu_count() or 0, load_start, os.getloadavg()[0]))
    print_table(run, servers)
    if run.notes:
        print()
        for n in run.notes:
            print("note:", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
