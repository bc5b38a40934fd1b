"""
Brute force against a live `twistd pop3`, bounded in attempts and time.

An attacker on 127.0.0.1 sends wrong passwords over parallel connections; the
owner of the attacked account logs in from the same address, and another user
from 127.0.0.2, once a second.  Shows the failure delay growing per connection
and per address, the per-connection failure cap and the per-address connection
cap, and that correct logins stay prompt.

    .venv/bin/python bench/bruteforce.py [--attempts 200] [--parallel 40] [--seconds 90]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_world(root: str) -> str:
    for user in ("alice", "bob"):
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(root, "mail", user, sub))
    passwd = os.path.join(root, "passwd")
    with open(passwd, "w") as f:
        f.write("alice:{PLAIN}alicepw:::::\nbob:{PLAIN}bobpw:::::\n")
    return passwd


async def session(source: str, port: int, user: str, password: str) -> tuple[float, bytes]:
    """One login; returns (seconds from PASS to its answer, answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        greeting = await reader.readline()
        if not greeting.startswith(b"+OK"):
            return 0.0, greeting.strip()
        writer.write(b"USER %s\r\n" % user.encode())
        await reader.readline()
        start = time.monotonic()
        writer.write(b"PASS %s\r\n" % password.encode())
        answer = await reader.readline()
        elapsed = time.monotonic() - start
        writer.write(b"QUIT\r\n")
        return elapsed, answer.strip()
    finally:
        writer.close()


async def attacker(port: int, budget: list[int], delays: list[tuple[int, float]], stats: dict[str, int],
                   deadline: float) -> None:
    while budget[0] > 0 and time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["connect_errors"] += 1
            await asyncio.sleep(0.1)
            continue
        greeting = await reader.readline()
        if not greeting.startswith(b"+OK"):
            stats["refused_by_cap"] += 1
            writer.close()
            await asyncio.sleep(0.2)
            continue
        stats["connections"] += 1
        while budget[0] > 0 and time.monotonic() < deadline:
            budget[0] -= 1
            writer.write(b"USER alice\r\n")
            await reader.readline()
            start = time.monotonic()
            writer.write(b"PASS wrong%d\r\n" % budget[0])
            answer = await reader.readline()
            if not answer:
                stats["closed_by_failure_cap"] += 1
                break
            delays.append((len(delays) + 1, time.monotonic() - start))
            if b"Too many failed" in answer or not answer.startswith(b"-ERR [AUTH]"):
                rest = await reader.readline()
                if not rest or b"Too many" in answer + rest:
                    stats["closed_by_failure_cap"] += 1
                    break
        writer.close()


async def legit(source: str, port: int, user: str, password: str, out: list[float], deadline: float) -> None:
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            elapsed, answer = await asyncio.wait_for(session(source, port, user, password), 30)
            out.append(elapsed if answer.startswith(b"+OK") else float("inf"))
        except (TimeoutError, OSError):
            out.append(float("inf"))
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


async def run(port: int, attempts: int, parallel: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    budget = [attempts]
    delays: list[tuple[int, float]] = []
    stats = {"connections": 0, "refused_by_cap": 0, "closed_by_failure_cap": 0, "connect_errors": 0}
    owner: list[float] = []
    other: list[float] = []
    started = time.monotonic()
    attack = asyncio.gather(*(attacker(port, budget, delays, stats, deadline) for _ in range(parallel)))
    observers = asyncio.gather(legit("127.0.0.1", port, "alice", "alicepw", owner, deadline),
                               legit("127.0.0.2", port, "bob", "bobpw", other, deadline))
    await attack
    wall = time.monotonic() - started
    await asyncio.sleep(0)
    observers.cancel()
    try:
        await observers
    except asyncio.CancelledError:
        pass
    print("attempts made: %d in %.1f s over %d connections (parallel %d)"
          % (len(delays), wall, stats["connections"], parallel))
    print("connections refused by the per-address cap: %d; closed after max failures: %d"
          % (stats["refused_by_cap"], stats["closed_by_failure_cap"]))
    print("failure delay by attempt (seconds):")
    for lo, hi in ((1, 5), (6, 20), (21, 50), (51, 100), (101, 200), (201, 10**9)):
        chunk = [d for i, d in delays if lo <= i <= hi]
        if chunk:
            label = "%4d-%-4s" % (lo, hi if hi < 10**9 else "")
            print("  attempts %s  median %.2f  max %.2f" % (label, statistics.median(chunk), max(chunk)))
    for name, values in (("owner alice, same address, right password", owner),
                         ("bob from 127.0.0.2, right password", other)):
        ok = [v for v in values if v != float("inf")]
        print("%s: %d logins, %d failed, PASS->+OK median %.1f ms, max %.1f ms"
              % (name, len(values), len(values) - len(ok), 1000 * statistics.median(ok) if ok else -1,
                 1000 * max(ok) if ok else -1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attempts", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--failure-delay", default="1")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="popservice-bruteforce-")
    passwd = make_world(root)
    port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    server = subprocess.Popen([
        twistd, "-n", "--pidfile=", "-l", os.path.join(root, "twistd.log"), "pop3",
        "--mail", "maildir:%s/mail/%%u" % root, "--auth", "passwd-file:" + passwd,
        "--listen", "tcp:%d:interface=127.0.0.1" % port, "--untrusted-loopback", "--allow-plaintext-auth",
        "--failure-delay", args.failure_delay, "--max-failures", "5"])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        asyncio.run(run(port, args.attempts, args.parallel, args.seconds))
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
