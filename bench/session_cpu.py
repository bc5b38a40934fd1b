"""
Server CPU per POP3 session and RSS per idle logged-in connection, A/B.

Starts one real C{twistd -n pop3} per source tree given with C{--src
NAME=DIR} (each on its own copy of a fixture: C{make_fixture.py} of the
shared yardstick, users C{u0..} and C{i0..}), then alternates between them:

  - C{sessions}: C{-c} clients, each looping over popload's session (connect,
    USER/PASS, STAT, UIDL, RETR of every message, QUIT), plain or implicit
    TLS, for C{--duration} seconds; the server's CPU (utime+stime from
    /proc) divided by the sessions completed;
  - C{idle}: C{--idle-n} connections logged in and left idle; the server's
    RSS growth divided by their number.

Only ratios between the trees of one run mean anything on a shared machine;
each round measures every tree once, in turn, and the medians are printed.

    .venv/bin/python bench/session_cpu.py --fixture /tmp/fx \\
        --anchor ../shared/yardstick/bench/twisted_mail_anchor.py \\
        --src old=/tmp/old --src new=. --rounds 5 --scenarios sessions,tls,idle

With C{--anchor}, stock twisted.mail (the yardstick's anchor, TCP_NODELAY
on) is measured too, first, and the ratios are against it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from typing import Any

CLK = os.sysconf("SC_CLK_TCK")
TERM = b"\r\n.\r\n"


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Server:
    def __init__(self, name: str, src: str, fixture: str, port: int, work: str, python: str,
                 anchor: bool = False) -> None:
        self.name, self.src, self.port, self.tls_port = name, os.path.abspath(src), port, port + 1
        #: C{src} is the yardstick's twisted_mail_anchor.py (stock twisted.mail with TCP_NODELAY)
        self.anchor = anchor
        self.fx = os.path.join(work, name)
        shutil.rmtree(self.fx, ignore_errors=True)
        shutil.copytree(fixture, self.fx, symlinks=True)
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fx = self.fx
        code = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
        listen = ["--listen", "tcp:%d:interface=127.0.0.1" % self.port,
                  "--listen", "ssl:%d:privateKey=%s/tls/key.pem:certKey=%s/tls/cert.pem:interface=127.0.0.1"
                  % (self.tls_port, fx, fx)]
        if self.anchor:
            cmd = [self.python, self.src, "--maildirs", fx + "/mail", "--auth", "passwd-file:%s/passwd" % fx,
                   "--logfile", fx + "/anchor.log", "--nodelay", *listen]
            env, cwd = dict(os.environ), fx
        else:
            cmd = [self.python, "-c", code, "-n", "--pidfile=", "pop3", "--mail", "maildir:%s/mail/%%u" % fx,
                   "--auth", "passwd-file:%s/passwd" % fx, *listen]
            env, cwd = dict(os.environ, PYTHONPATH=self.src), self.src
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(fx + "/server.log", "ab"),
                                     stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                    if s.recv(100).startswith(b"+OK"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("%s did not start" % self.name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
            self.proc = None


class Client:
    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext | None) -> Client:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                             server_hostname="localhost" if ctx else None, limit=1 << 20)
        c = cls(r, w)
        await c.line()
        return c

    async def line(self) -> bytes:
        line = await self.r.readline()
        if not line.startswith(b"+OK"):
            raise RuntimeError(line[:80])
        return line

    async def cmd(self, c: bytes) -> bytes:
        self.w.write(c + b"\r\n")
        return await self.line()

    async def login(self, user: bytes, pw: bytes) -> None:
        await self.cmd(b"USER " + user)
        await self.cmd(b"PASS " + pw)


async def one_session(port: int, k: int, ctx: ssl.SSLContext | None) -> None:
    c = await Client.connect(port, ctx)
    await c.login(b"u%d" % k, b"pw-u%d" % k)
    n = int((await c.cmd(b"STAT")).split()[1])
    c.w.write(b"UIDL\r\n")
    await c.line()
    await c.r.readuntil(b"\r\n.\r\n")
    for i in range(1, n + 1):
        c.w.write(b"RETR %d\r\n" % i)
        await c.line()
        await c.r.readuntil(b"\r\n.\r\n")
    await c.cmd(b"QUIT")
    c.w.close()
    try:
        await c.w.wait_closed()
    except Exception:
        pass


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def sessions(server: Server, concurrency: int, duration: float, tls: bool) -> float:
    ctx = tls_context() if tls else None
    port = server.tls_port if tls else server.port
    done = 0
    deadline = 0.0

    async def client(k: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await one_session(port, k, ctx)
            done += 1

    # warm up (every mailbox once), then measure
    await asyncio.gather(*(one_session(port, k, ctx) for k in range(concurrency)))
    cpu0 = cpu_seconds(server.pid)
    deadline = time.monotonic() + duration
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return (cpu_seconds(server.pid) - cpu0) * 1e3 / done


async def idle(server: Server, n: int) -> float:
    sem = asyncio.Semaphore(50)
    conns: list[Client] = []

    async def one(k: int) -> None:
        async with sem:
            c = await Client.connect(server.port, None)
            await c.login(b"i%d" % k, b"pw-i%d" % k)
            conns.append(c)

    # a first batch, so one-off allocations (pools, caches) are not counted
    await asyncio.gather(*(one(k) for k in range(n, n + 50)))
    await asyncio.sleep(1.0)
    before = rss_kib(server.pid)
    await asyncio.gather(*(one(k) for k in range(n)))
    await asyncio.sleep(1.5)
    held = rss_kib(server.pid)
    for c in conns:
        c.w.write(b"QUIT\r\n")
        c.w.close()
    await asyncio.sleep(1.0)
    return (held - before) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", required=True, help="a make_fixture.py directory (copied per tree)")
    ap.add_argument("--src", action="append", required=True, help="NAME=DIR of a source tree")
    ap.add_argument("--anchor", help="also the yardstick's twisted_mail_anchor.py (with --nodelay), first")
    ap.add_argument("--work", default="/tmp/session-cpu")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("-c", "--concurrency", type=int, default=50)
    ap.add_argument("--tls-concurrency", type=int, default=10)
    ap.add_argument("--idle-n", type=int, default=1000)
    ap.add_argument("--scenarios", default="sessions,tls,idle")
    ap.add_argument("--port", type=int, default=26110)
    a = ap.parse_args()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    servers = []
    if a.anchor:
        servers.append(Server("anchor", a.anchor, a.fixture, a.port - 10, a.work, a.python, anchor=True))
    for i, spec in enumerate(a.src):
        name, _, src = spec.partition("=")
        servers.append(Server(name, src, a.fixture, a.port + 10 * i, a.work, a.python))
    scenarios = a.scenarios.split(",")
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for s in servers:
            s.start()
        for r in range(a.rounds):
            for scenario in scenarios:
                order = servers if r % 2 == 0 else servers[::-1]
                for s in order:
                    if scenario == "idle":
                        s.stop()
                        s.start()
                        value = asyncio.run(idle(s, a.idle_n))
                    else:
                        tls = scenario == "tls"
                        value = asyncio.run(sessions(s, a.tls_concurrency if tls else a.concurrency,
                                                     a.duration, tls))
                    results.setdefault((scenario, s.name), []).append(value)
                    print("round %d %-8s %-6s %.3f" % (r, scenario, s.name, value), flush=True)
    finally:
        for s in servers:
            s.stop()
    base = servers[0].name
    units: dict[str, Any] = {"sessions": "CPU-ms/session", "tls": "CPU-ms/session", "idle": "KiB/conn"}
    for scenario in scenarios:
        line = ["%-8s %-15s" % (scenario, units[scenario])]
        for s in servers:
            values = results[(scenario, s.name)]
            m = statistics.median(values)
            ratio = m / statistics.median(results[(scenario, base)])
            line.append("%s %.3f (%.2fx)" % (s.name, m, ratio))
        print("  ".join(line))


if __name__ == "__main__":
    main()
