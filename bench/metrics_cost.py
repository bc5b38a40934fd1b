"""
The cost of C{--metrics}: two C{twistd pop3} processes on the same Maildirs,
one with C{--metrics}, one without; C clients (own users) loop connect,
USER/PASS, STAT, RETR 1, QUIT for D seconds against each in turn, R rounds,
alternating which goes first (ABBA), so drift on the shared machine hits both
alike; or, with C{--together}, both at once (C clients each).  Reports per
side the median sessions/s and server CPU-ms per session (from /proc), the
ratios, and the median of each round's on/off; then scrapes the metrics
once to check they counted every session.  On a busy shared machine those
figures move by more than the difference, so the script also times, in
process, what the server does more per session with metrics: the same
events (connect, 5 commands, login, logout) through the log observer alone
and through the log and metrics observers (CPU time, best of 15); and
C{--instructions N} counts the instructions per session of each server
under valgrind's callgrind, which no other load disturbs.

    .venv/bin/python bench/metrics_cost.py [--clients 10] [--seconds 4] [--rounds 6] [--together]
    .venv/bin/python bench/metrics_cost.py --instructions 300     # needs valgrind; a few minutes

Everything on 127.0.0.1, fixtures under a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MESSAGE = b"From: bench@example.org\nSubject: bench\n\n" + (b"y" * 70 + b"\n") * 57  # ~4 KiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def build(root: str, users: int) -> str:
    passwd = os.path.join(root, "passwd")
    with open(passwd, "w") as f:
        for k in range(users):
            f.write("u%d:{PLAIN}pw-u%d:::::\n" % (k, k))
            box = os.path.join(root, "mail", "u%d" % k)
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(box, sub))
            for i in range(5):
                with open(os.path.join(box, "cur", "%d.M%d.bench:2," % (1700000000 + i, i)), "wb") as m:
                    m.write(MESSAGE)
    return passwd


class Server:
    def __init__(self, root: str, passwd: str, name: str, metrics: bool, prefix: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, timeout: float = 30) -> None:
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        argv = [*prefix, TWISTD, "-n", "--pidfile=", "-l", os.path.join(root, name + ".log"), "pop3",
                "--mail", "maildir:%s/mail/%%u" % root, "--auth", "passwd-file:" + passwd,
                "--listen", "tcp:%d:interface=127.0.0.1" % self.port, "--failure-delay", "0"]
        if self.metrics_port:
            argv += ["--metrics", "tcp:%d:interface=127.0.0.1" % self.metrics_port]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"+OK"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("server %s did not start" % (name,))
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def session(port: int, user: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"USER %s\r\nPASS pw-%s\r\nSTAT\r\nRETR 1\r\nQUIT\r\n" % (user, user))
    for _ in range(2):
        await reader.readline()
    answer = await reader.readline()  # STAT
    if not answer.startswith(b"+OK"):
        raise RuntimeError(answer)
    await reader.readline()  # RETR's +OK
    while (await reader.readline()) != b".\r\n":
        pass
    await reader.readline()  # QUIT
    writer.close()
    await writer.wait_closed()


def drive(ports: list[int], clients: int, seconds: float) -> list[int]:
    """C clients per port, all at once, for D seconds: sessions completed per port."""
    done = [0] * len(ports)

    async def client(i: int, user: bytes, stop: float) -> None:
        while time.perf_counter() < stop:
            await session(ports[i], user)
            done[i] += 1

    async def run() -> None:
        stop = time.perf_counter() + seconds
        # each port its own users: two servers on the same Maildirs would answer [IN-USE]
        await asyncio.gather(*(client(i, b"u%d" % (i * clients + k), stop)
                               for i in range(len(ports)) for k in range(clients)))

    asyncio.run(run())
    return done


def measure(servers: list[Server], clients: int, seconds: float) -> list[tuple[float, float, int]]:
    """Per server driven (at the same time): (sessions/s, server CPU-ms per session, sessions)."""
    cpu0 = [process_cpu(s.process.pid) for s in servers]
    start = time.perf_counter()
    done = drive([s.port for s in servers], clients, seconds)
    wall = time.perf_counter() - start
    cpu1 = [process_cpu(s.process.pid) for s in servers]
    return [(n / wall, 1000 * (c1 - c0) / n, n) for n, c0, c1 in zip(done, cpu0, cpu1, strict=True)]


def observer_cost(n: int = 5000, repeats: int = 15) -> dict[str, float]:
    """Microseconds of CPU per session in the session observers: the log alone, log + metrics."""
    from prometheus_client import CollectorRegistry
    from twisted.logger import globalLogBeginner

    from popservice.server.events import LogObserver, Observers
    from popservice.server.metrics import MetricsObserver

    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    base = {"peer": "127.0.0.1", "session_id": "0123456789ab"}

    def one_session(observer: Any) -> None:
        event = observer.event
        event("connect", None, user=None, tls=False, listener="tcp:110", **base)
        for command in ("USER", "PASS", "STAT", "RETR", "QUIT"):
            event("command", None, user="u0", command=command, seconds=0.0001, **base)
        event("login", None, user="u0", messages=5, tls=False, method="USER", **base)
        event("logout", None, user="u0", reason="quit", tls=False, method="USER", seconds=0.01,
              listener="tcp:110", bytes_out=4300, messages=5, size=20500, retr=1, retr_bytes=4100, top=0,
              top_bytes=0, deleted=0, deleted_bytes=0, **base)

    cases = {"log": LogObserver(),
             "log+metrics": Observers([LogObserver(), MetricsObserver(CollectorRegistry(), ["tcp:110"])])}
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, observer in cases.items():
            start = time.process_time()
            for _ in range(n):
                one_session(observer)
            best[name] = min(best[name], (time.process_time() - start) / n)
    return {name: 1e6 * seconds for name, seconds in best.items()}


def instructions(root: str, passwd: str, metrics: bool, clients: int, sessions: int) -> float:
    """
    Instructions (user space) per session, counted by valgrind's callgrind in a
    server that runs under it: deterministic where CPU time on a shared machine
    is not.  Counting is switched on (callgrind_control) only around the sessions.
    """
    name = "callgrind-%s" % ("on" if metrics else "off")
    out = os.path.join(root, name)
    server = Server(root, passwd, name, metrics, timeout=600,
                    prefix=("valgrind", "--tool=callgrind", "--instr-atstart=no",
                            "--callgrind-out-file=%s.%%p" % out),
                    env=dict(os.environ, PYTHONHASHSEED="0"))
    try:
        drive([server.port], clients, 3.0)  # warm up, not counted
        pid = str(server.process.pid)
        subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True, check=True)
        done = 0
        while done < sessions:
            done += drive([server.port], clients, 2.0)[0]
        subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=True)
    finally:
        server.stop(120)
    total = 0
    for entry in os.listdir(root):
        if entry.startswith(name + "."):
            with open(os.path.join(root, entry)) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
    return total / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--together", action="store_true",
                        help="drive both servers at the same time (C clients each) instead of in turn")
    parser.add_argument("--instructions", type=int, metavar="N", default=0,
                        help="instead: instructions per session over N sessions, each server under valgrind")
    args = parser.parse_args()
    if args.instructions:
        root = tempfile.mkdtemp(prefix="popservice-metrics-cost-")
        try:
            passwd = build(root, args.clients)
            counts = {name: instructions(root, passwd, name == "on", args.clients, args.instructions)
                      for name in ("off", "on")}
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print("instructions per session (user space, callgrind): off %.0f  on %.0f  on/off %.3f"
              % (counts["off"], counts["on"], counts["on"] / counts["off"]))
        return
    root = tempfile.mkdtemp(prefix="popservice-metrics-cost-")
    try:
        passwd = build(root, 2 * args.clients)
        off = Server(root, passwd, "off", metrics=False)
        on = Server(root, passwd, "on", metrics=True)
        try:
            drive([off.port, on.port], args.clients, 1.0)  # warm up (imports, first logins)
            results: dict[str, list[tuple[float, float, int]]] = {"off": [], "on": []}
            for r in range(args.rounds):
                if args.together:
                    turns = [[("off", off), ("on", on)]]
                elif r % 2 == 0:
                    turns = [[("off", off)], [("on", on)]]
                else:
                    turns = [[("on", on)], [("off", off)]]
                for turn in turns:
                    measured = measure([server for _, server in turn], args.clients, args.seconds)
                    for (name, _), result in zip(turn, measured, strict=True):
                        results[name].append(result)
                        print("round %d %-3s %7.1f sessions/s  %.2f CPU-ms/session"
                              % (r + 1, name, *result[:2]), flush=True)
            total_on = sum(n for _, _, n in results["on"])
            assert on.metrics_port is not None
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % on.metrics_port) as response:
                text = response.read().decode()
        finally:
            off.stop()
            on.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    from prometheus_client.parser import text_string_to_metric_families

    counted = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == "pop3_sessions_total")
    rate = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    # each round's on/off: a round's two runs are next to each other in time (or at the same time)
    pairs = list(zip(results["off"], results["on"], strict=True))
    rate_ratio = statistics.median(b[0] / a[0] for a, b in pairs)
    cpu_ratio = statistics.median(b[1] / a[1] for a, b in pairs)
    print()
    print("C=%d%s, %d rounds of %.0f s, medians:" % (args.clients, " per server, together" if args.together
                                                     else ", in turn (ABBA)", args.rounds, args.seconds))
    print("  sessions/s     off %7.1f  on %7.1f  on/off %.3f  (median of the rounds' on/off %.3f)"
          % (rate["off"], rate["on"], rate["on"] / rate["off"], rate_ratio))
    print("  CPU-ms/session off %7.3f  on %7.3f  on/off %.3f  (median of the rounds' on/off %.3f)"
          % (cpu["off"], cpu["on"], cpu["on"] / cpu["off"], cpu_ratio))
    print("  the metrics counted %d sessions (measured %d, plus the warm-up's)" % (counted, total_on))
    cost = observer_cost()
    extra = cost["log+metrics"] - cost["log"]
    print("in process, session observers: log %.1f us/session, log+metrics %.1f us/session: +%.1f us, "
          "%.1f%% of the measured %.3f CPU-ms/session" % (cost["log"], cost["log+metrics"], extra,
                                                          100 * extra / (1000 * cpu["off"]), cpu["off"]))


if __name__ == "__main__":
    main()
