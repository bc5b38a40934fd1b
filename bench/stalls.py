#!/usr/bin/env python3
"""
Reactor stalls of a live C{twistd pop3}, seen by another session: a probe
client logged in as C{probe} sends NOOPs back to back and records each one's
round trip while

  (a) C{bigbox} logs in for the first time ever: 10,000 messages in C{cur/}
      (named like the shared yardstick's, C{,S=} but no C{,W=}, so every
      file is read for its size), no index yet;
  (b) 50 clients log in at once as users whose passwords are C{{ARGON2ID}}
      hashes, and, right after their PASSes, C{small} (a cold 500-message
      Maildir, a C{{PLAIN}} password) logs in: its PASS time shows whether
      the store's thread work waits behind the password hashing.

Prints, per scenario, the NOOP latency p50 / p99 / max during the logins
(the longest a NOOP waited is the worst stall the reactor had), the PASS
times and the server's CPU time (utime+stime from /proc, so the noise of
the shared machine does not count).

    .venv/bin/python bench/stalls.py [--root /tmp/old-stalls] [--messages 10000] [--argon 50] [--runs 3]

C{--root} runs the server from another checkout of popservice (e.g. the last
commit: C{mkdir /tmp/old-stalls && git archive HEAD | tar -x -C /tmp/old-stalls}),
with this venv's Python and libraries.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = b"".join(b"Line %04d of a message body, padded to some length....\n" % i for i in range(18))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_maildir(path: str, count: int) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    for i in range(count):
        data = b"Subject: message %d\n\n" % i + BODY
        name = "%d.M%dP1.bench,S=%d:2," % (1700000000 + i, i, len(data))
        with open(os.path.join(path, "cur", name), "wb") as f:
            f.write(data)


def make_world(tmp: str, messages: int, argon: int) -> str:
    sys.path.insert(0, ROOT)
    from popservice.auth.schemes import hash_password

    mail = os.path.join(tmp, "mail")
    make_maildir(os.path.join(mail, "probe"), 3)
    make_maildir(os.path.join(mail, "bigbox"), messages)
    make_maildir(os.path.join(mail, "small"), 500)
    # one real ARGON2ID hash for every argon user (the cost is per verification)
    hashed = hash_password(b"pw-argon", "ARGON2ID")
    lines = ["probe:{PLAIN}pw-probe:::::", "bigbox:{PLAIN}pw-bigbox:::::", "small:{PLAIN}pw-small:::::"]
    for i in range(argon):
        make_maildir(os.path.join(mail, "argon%d" % i), 1)
        lines.append("argon%d:%s:::::" % (i, hashed))
    passwd = os.path.join(tmp, "passwd")
    with open(passwd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return passwd


class Server:
    def __init__(self, root: str, tmp: str, passwd: str) -> None:
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=root)
        twistd = os.path.join(ROOT, ".venv", "bin", "twistd")
        self.log = open(os.path.join(tmp, "server.log"), "wb")
        self.proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "pop3", "--mail", "maildir:%s/mail/%%u" % tmp,
             "--auth", "passwd-file:" + passwd, "--listen", "tcp:%d:interface=127.0.0.1" % self.port],
            cwd=tmp, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"+OK"):
                        return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("server did not start; see %s" % (self.log.name,))

    def cpu(self) -> float:
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")
        self.line()

    def line(self) -> bytes:
        return self.file.readline()

    def cmd(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        return self.line()

    def login(self, user: str, password: str) -> tuple[float, bytes]:
        self.cmd(b"USER " + user.encode())
        t0 = time.perf_counter()
        answer = self.cmd(b"PASS " + password.encode())
        return time.perf_counter() - t0, answer

    def close(self) -> None:
        try:
            self.cmd(b"QUIT")
        finally:
            self.sock.close()


class Probe(threading.Thread):
    """NOOPs back to back; C{samples} holds (start, latency) of each."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(port)
        elapsed, answer = self.client.login("probe", "pw-probe")
        assert answer.startswith(b"+OK"), answer
        self.samples: list[tuple[float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            t0 = time.perf_counter()
            answer = self.client.cmd(b"NOOP")
            self.samples.append((t0, time.perf_counter() - t0))
            assert answer.startswith(b"+OK"), answer
            time.sleep(0.0005)

    def during(self, start: float, end: float) -> list[float]:
        """Latencies (ms) of the NOOPs that were in flight at any time in [start, end]."""
        return [lat * 1000 for t0, lat in self.samples if t0 <= end and t0 + lat >= start]

    def finish(self) -> None:
        self.stopping.set()
        self.join()
        self.client.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def scenario_cold(server: Server, probe: Probe) -> dict[str, Any]:
    client = Client(server.port)
    cpu0 = server.cpu()
    start = time.perf_counter()
    elapsed, answer = client.login("bigbox", "pw-bigbox")
    end = time.perf_counter()
    cpu = server.cpu() - cpu0
    assert answer.startswith(b"+OK"), answer
    client.close()
    return {"pass_ms": elapsed * 1000, "server_cpu_ms": cpu * 1000, "noops": probe.during(start, end)}


def scenario_argon(server: Server, probe: Probe, count: int) -> dict[str, Any]:
    clients = [Client(server.port) for _ in range(count)]
    for i, c in enumerate(clients):
        c.cmd(b"USER argon%d" % i)
    small = Client(server.port)
    small.cmd(b"USER small")
    answers: list[bytes] = []
    start = time.perf_counter()
    for c in clients:
        c.sock.sendall(b"PASS pw-argon\r\n")
    t_small = time.perf_counter()
    small_answer = small.cmd(b"PASS pw-small")
    small_ms = (time.perf_counter() - t_small) * 1000
    for c in clients:
        answers.append(c.line())
    end = time.perf_counter()
    assert small_answer.startswith(b"+OK"), small_answer
    assert all(a.startswith(b"+OK") for a in answers), answers
    for c in clients + [small]:
        c.close()
    return {"all_ms": (end - start) * 1000, "small_pass_ms": small_ms, "noops": probe.during(start, end)}


def run_once(root: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="stalls-")
    try:
        passwd = make_world(tmp, args.messages, args.argon)
        server = Server(root, tmp, passwd)
        try:
            probe = Probe(server.port)
            probe.start()
            time.sleep(0.2)
            cold = scenario_cold(server, probe)
            time.sleep(0.2)
            argon = scenario_argon(server, probe, args.argon)
            probe.finish()
        finally:
            server.stop()
        return {"cold": cold, "argon": argon}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=ROOT, help="the popservice checkout to run the server from")
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--argon", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print("server from %s; %d runs" % (args.root, args.runs))
    cold_noops: list[float] = []
    argon_noops: list[float] = []
    rows: list[str] = []
    for run in range(args.runs):
        r = run_once(args.root, args)
        c, a = r["cold"], r["argon"]
        cold_noops += c["noops"]
        argon_noops += a["noops"]
        rows.append(
            "run %d: (a) cold %d-message PASS %.0f ms, server CPU %.0f ms, NOOP max %.1f ms (%d NOOPs); "
            "(b) %d ARGON2ID logins %.0f ms, 'small' PASS meanwhile %.0f ms, NOOP max %.1f ms (%d NOOPs)"
            % (run, args.messages, c["pass_ms"], c["server_cpu_ms"], max(c["noops"], default=0),
               len(c["noops"]), args.argon, a["all_ms"], a["small_pass_ms"], max(a["noops"], default=0),
               len(a["noops"])))
        print(rows[-1], flush=True)
    for name, noops in (("(a) cold login", cold_noops), ("(b) argon logins", argon_noops)):
        print("%-18s other session's NOOP ms: p50 %.2f  p99 %.2f  max %.2f  (n=%d)"
              % (name, statistics.median(noops) if noops else float("nan"), percentile(noops, 99),
                 max(noops, default=float("nan")), len(noops)))


if __name__ == "__main__":
    main()
