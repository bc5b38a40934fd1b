"""
Slow pre-login clients (slowloris) against popservice and Dovecot, same run.

N clients connect and then trickle one byte a second of a USER line that
never ends; meanwhile a well-behaved client runs a full session (connect,
USER, PASS, STAT, QUIT) every 0.5 s.  Reports the well-behaved sessions'
latency (and outages), how many slow clients the server cut off at its login
deadline, and server memory per slow connection.

    .venv/bin/python bench/prelogin.py [--clients 500] [--seconds 20] [--peers popservice,dovecot]

Dovecot needs root (see tests/dovecot_fixture.py); bounded in time, loopback only.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MESSAGE = b"Subject: probe\n\nhello\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss_kb(pid: int) -> int:
    """VmRSS summed over a process and its children (Dovecot forks per login)."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Peer:
    name = ""
    port = 0
    pid = 0

    def stop(self) -> None: ...


class Popservice(Peer):
    name = "popservice"

    def __init__(self, login_timeout: int) -> None:
        self.root = tempfile.mkdtemp(prefix="popservice-prelogin-")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.root, "mail", "alice", sub))
        with open(os.path.join(self.root, "mail", "alice", "cur", "1700000000.M1P1.x:2,"), "wb") as f:
            f.write(MESSAGE)
        with open(os.path.join(self.root, "passwd"), "w") as f:
            f.write("alice:{PLAIN}alice pw:::::\n")
        self.port = free_port()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.process = subprocess.Popen([
            twistd, "-n", "--pidfile=", "-l", os.path.join(self.root, "twistd.log"), "pop3",
            "--mail", "maildir:%s/mail/%%u" % self.root, "--auth", "passwd-file:%s/passwd" % self.root,
            "--listen", "tcp:%d:interface=127.0.0.1" % self.port, "--login-timeout", str(login_timeout)])
        self.pid = self.process.pid
        wait_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


class Dovecot(Peer):
    name = "dovecot"

    def __init__(self) -> None:
        from tests import dovecot_fixture as fx

        self.root = tempfile.mkdtemp(prefix="popservice-prelogin-dovecot-")
        self.server = fx.Dovecot(self.root)
        self.server.set_mailbox("alice", "alice pw", [MESSAGE])
        self.server.start()
        self.port = self.server.port
        out = subprocess.run(["pgrep", "-f", "dovecot -c " + self.server.conf],
                             capture_output=True, text=True)
        self.pid = int(out.stdout.split()[0])

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


async def slow_client(port: int, until: float, stats: dict[str, int]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats["connect_failed"] += 1
        return
    stats["connected"] += 1
    line = b"USER " + b"a" * 200
    i = 0
    try:
        while time.monotonic() < until:
            writer.write(line[i % len(line):i % len(line) + 1])
            i += 1
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(1024), 1.0)
                if data == b"" :
                    stats["cut_off"] += 1
                    return
            except TimeoutError:
                pass
    except (ConnectionError, OSError):
        stats["cut_off"] += 1
    finally:
        writer.close()


async def probe(port: int) -> float:
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        writer.write(b"USER alice\r\nPASS alice pw\r\nSTAT\r\nQUIT\r\n")
        answers = [await reader.readline() for _ in range(4)]
        if not answers[2].startswith(b"+OK"):
            raise RuntimeError(answers)
    finally:
        writer.close()
    return time.monotonic() - start


async def run(peer: Peer, clients: int, seconds: float) -> dict[str, object]:
    rss_before = tree_rss_kb(peer.pid)
    until = time.monotonic() + seconds
    stats = {"connected": 0, "connect_failed": 0, "cut_off": 0}
    slow = [asyncio.ensure_future(slow_client(peer.port, until, stats)) for _ in range(clients)]
    await asyncio.sleep(1.0)
    rss_held = tree_rss_kb(peer.pid)
    latencies: list[float] = []
    failures = 0
    while time.monotonic() < until:
        try:
            latencies.append(await asyncio.wait_for(probe(peer.port), 30))
        except (TimeoutError, OSError, RuntimeError):
            failures += 1
        await asyncio.sleep(0.5)
    await asyncio.gather(*slow)
    return {
        "peer": peer.name, "slow_clients": clients, **stats,
        "rss_per_slow_conn_kb": round((rss_held - rss_before) / max(1, stats["connected"]), 1),
        "probe_sessions": len(latencies), "probe_failures": failures,
        "probe_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "probe_max_ms": round(1000 * max(latencies), 1) if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--login-timeout", type=int, default=10)
    parser.add_argument("--peers", default="popservice,dovecot")
    args = parser.parse_args()
    for name in args.peers.split(","):
        peer: Peer = Popservice(args.login_timeout) if name == "popservice" else Dovecot()
        try:
            print(asyncio.run(run(peer, args.clients, args.seconds)), flush=True)
        finally:
            peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
