"""
Scale-out over PostgreSQL, beside the Maildir store, in one run:

  sessions   C clients (own users, no mailbox sharing) loop connect, USER/PASS,
             STAT, UIDL, RETR 1, QUIT for D seconds against 1, 2 and 4
             `twistd pop3 --mail postgresql://...` front ends (clients spread
             round robin over their ports), and against one Maildir front end;
             sessions/s, p50/p99, and CPU-ms per session of the front ends and
             of PostgreSQL (from /proc).
  bigbox     login..QUIT (PASS, STAT, UIDL, LIST) on a 100,000-message mailbox,
             both stores, warm, median of R.
  lmtp       deliveries/s through `--lmtp` (smtplib.LMTP, 4 KiB messages), both
             stores, when the server has the option.

Everything on 127.0.0.1: a private PostgreSQL (tests/pg.py), fixtures under a
temporary directory.  The machine is shared: compare ratios within one run.

    .venv/bin/python bench/scaleout.py [--clients 40] [--seconds 5] [--bigbox 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MESSAGE = b"From: bench@example.org\nSubject: bench\n\n" + b"x" * 70 + b"\n"


def message(size: int) -> bytes:
    return MESSAGE + (b"y" * 70 + b"\n") * max(0, (size - len(MESSAGE)) // 71)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / tick
        except OSError:
            pass
    return total


def postgres_pids(data_dir: str) -> list[int]:
    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        master = int(f.readline())
    out = [master]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == master:
                        out.append(int(entry))
            except OSError:
                pass
    return out


# -- fixtures ---------------------------------------------------------------------------------------

def build(root: str, url: str, users: int, bigbox: int) -> str:
    import psycopg

    from popservice.stores.postgres.store import _deliver, normalise

    passwd = os.path.join(root, "passwd")
    with open(passwd, "w") as f:
        for k in range(users):
            f.write("u%d:{PLAIN}pw-u%d:::::\n" % (k, k))
        f.write("bigbox:{PLAIN}pw-bigbox:::::\n")
    small = message(4096)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for k in range(users):
            box = os.path.join(root, "mail", "u%d" % k)
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(box, sub))
            chunks, size = normalise(small)
            for i in range(20):
                with open(os.path.join(box, "cur", "%d.M%d.bench:2," % (1700000000 + i, i)), "wb") as f:
                    f.write(small)
                _deliver(cur, "u%d" % k, chunks, size, None, None)
        conn.commit()
        box = os.path.join(root, "mail", "bigbox")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(box, sub))
        one = message(1024)
        chunks, size = normalise(one)
        cur.execute("INSERT INTO mailboxes (name) VALUES ('bigbox') RETURNING id")
        mailbox_id = cur.fetchone()[0]
        cur.execute("SELECT nextval('messages_id_seq') FROM generate_series(1, %s)", (bigbox,))
        ids = [row[0] for row in cur.fetchall()]
        with cur.copy("COPY messages (id, mailbox_id, uidl, size) FROM STDIN") as copy:
            for message_id in ids:
                copy.write_row((message_id, mailbox_id, "P%016x" % message_id, size))
        with cur.copy("COPY message_chunks (message_id, seq, data) FROM STDIN") as copy:
            for message_id in ids:
                copy.write_row((message_id, 0, chunks[0]))
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    for i in range(bigbox):
        with open(os.path.join(box, "cur", "%d.M%d.bench:2," % (1700000000 + i, i)), "wb") as f:
            f.write(one)
    return passwd


# -- servers ----------------------------------------------------------------------------------------

class FrontEnd:
    def __init__(self, root: str, mail: str, passwd: str, name: str, lmtp: bool = False) -> None:
        self.port = free_port()
        self.lmtp_port = free_port() if lmtp else None
        argv = [TWISTD, "-n", "--pidfile=", "-l", os.path.join(root, name + ".log"), "pop3",
                "--mail", mail, "--auth", "passwd-file:" + passwd,
                "--listen", "tcp:%d:interface=127.0.0.1" % self.port, "--failure-delay", "0"]
        if self.lmtp_port:
            argv += ["--lmtp", "tcp:%d:interface=127.0.0.1" % self.lmtp_port]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"+OK"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("front end %s did not start" % (name,))
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- load -------------------------------------------------------------------------------------------

async def session(port: int, user: str) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def line() -> bytes:
        return await reader.readline()

    async def multi() -> None:
        while (await reader.readline()) != b".\r\n":
            pass

    await line()
    writer.write(b"USER %s\r\nPASS pw-%s\r\nSTAT\r\nUIDL\r\n" % (user.encode(), user.encode()))
    await line()
    answer = await line()
    if not answer.startswith(b"+OK"):
        raise RuntimeError(answer)
    await line()
    await line()
    await multi()
    writer.write(b"RETR 1\r\nQUIT\r\n")
    await line()
    await multi()
    await line()
    writer.close()
    return time.perf_counter() - start


def load_worker(ports: list[int], users: list[str], seconds: float, out: list[float]) -> None:
    async def client(port: int, user: str, stop: float) -> None:
        while time.perf_counter() < stop:
            out.append(await session(port, user))

    async def main() -> None:
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(client(ports[i % len(ports)], u, stop) for i, u in enumerate(users)))

    asyncio.run(main())


def sessions(ports: list[int], clients: int, seconds: float, server_pids: list[int],
             pg_data: str | None) -> dict[str, float]:
    import resource

    users = ["u%d" % k for k in range(clients)]
    warm: list[float] = []
    load_worker(ports, users, 1.0, warm)
    latencies: list[float] = []
    # PostgreSQL's backends for the front ends' pools exist once they have warmed up
    pg_pids = postgres_pids(pg_data) if pg_data else []
    c0, p0 = tree_cpu(server_pids), tree_cpu(pg_pids)
    g0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    load_worker(ports, users, seconds, latencies)
    wall = time.perf_counter() - start
    g1 = resource.getrusage(resource.RUSAGE_SELF)
    c1, p1 = tree_cpu(server_pids), tree_cpu(pg_pids)
    latencies.sort()
    n = len(latencies)
    return {"sessions_s": n / wall, "p50_ms": 1000 * latencies[n // 2],
            "p99_ms": 1000 * latencies[int(n * .99)], "fe_cpu_ms": 1000 * (c1 - c0) / n,
            "pg_cpu_ms": 1000 * (p1 - p0) / n if pg_pids else 0.0,
            "loadgen": (g1.ru_utime + g1.ru_stime - g0.ru_utime - g0.ru_stime) / wall}


def bigbox(port: int, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"USER bigbox\r\nPASS pw-bigbox\r\nSTAT\r\nUIDL\r\nLIST\r\nQUIT\r\n")
            for _ in range(3):
                f.readline()
            for _ in range(2):
                f.readline()
                while f.readline() != b".\r\n":
                    pass
            f.readline()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def lmtp(port: int, count: int, threads: int) -> float:
    body = message(4096)
    done = []

    def worker(k: int) -> None:
        with smtplib.LMTP("127.0.0.1", port) as client:
            for i in range(count // threads):
                client.sendmail("bench@example.org", ["u%d" % ((k + i) % 40)],
                                body.replace(b"Subject: bench", b"Message-ID: <%d.%d@bench>" % (k, i)))
                done.append(1)

    start = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return len(done) / (time.perf_counter() - start)


def has_lmtp() -> bool:
    out = subprocess.run([TWISTD, "pop3", "--help"], capture_output=True, text=True).stdout
    return "--lmtp" in out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--bigbox", type=int, default=100000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frontends", default="1,2,4")
    parser.add_argument("--lmtp-messages", type=int, default=2000)
    args = parser.parse_args()
    from tests import pg

    root = tempfile.mkdtemp(prefix="popservice-scaleout-")
    try:
        url = pg.fresh_database()
        t0 = time.perf_counter()
        passwd = build(root, url, args.clients, args.bigbox)
        print("fixture: %d users x 20 x 4 KiB, bigbox %d x 1 KiB, both stores (%.0f s)"
              % (args.clients, args.bigbox, time.perf_counter() - t0), flush=True)
        pg_data = pg.server().data
        maildir = "maildir:%s/mail/%%u" % (root,)
        rows = []
        with_lmtp = has_lmtp()
        lmtp_maildir = lmtp_pg = 0.0
        fe = FrontEnd(root, maildir, passwd, "maildir", lmtp=with_lmtp)
        try:
            rows.append(("maildir, 1 front end", sessions([fe.port], args.clients, args.seconds,
                                                           [fe.process.pid], None)))
            bb_maildir = bigbox(fe.port, args.repeats)
            if fe.lmtp_port:
                lmtp_maildir = lmtp(fe.lmtp_port, args.lmtp_messages, 4)
        finally:
            fe.stop()
        for n in [int(x) for x in args.frontends.split(",")]:
            fes = [FrontEnd(root, url, passwd, "pg%d-%d" % (n, i), lmtp=with_lmtp and i == 0)
                   for i in range(n)]
            try:
                rows.append(("postgresql, %d front end%s" % (n, "s" if n > 1 else ""),
                             sessions([f.port for f in fes], args.clients, args.seconds,
                                      [f.process.pid for f in fes], pg_data)))
                if n == 1:
                    bb_pg = bigbox(fes[0].port, args.repeats)
                    if fes[0].lmtp_port:
                        lmtp_pg = lmtp(fes[0].lmtp_port, args.lmtp_messages, 4)
            finally:
                for f in fes:
                    f.stop()
        print("\nsessions (C=%d, %.0f s; CPU-ms per session: front ends / PostgreSQL; load generator "
              "CPU-s per s)" % (args.clients, args.seconds))
        for name, r in rows:
            print("  %-26s %7.1f sessions/s   p50 %6.1f ms  p99 %7.1f ms   CPU %5.2f / %5.2f ms   gen %.2f"
                  % (name, r["sessions_s"], r["p50_ms"], r["p99_ms"], r["fe_cpu_ms"], r["pg_cpu_ms"],
                     r["loadgen"]))
        print("\nbigbox (%d messages) login..QUIT, warm median of %d: maildir %.1f ms, postgresql %.1f ms"
              % (args.bigbox, args.repeats, 1000 * bb_maildir, 1000 * bb_pg))
        print("LMTP deliveries/s (4 threads, 4 KiB): maildir %.0f, postgresql %.0f" % (lmtp_maildir, lmtp_pg))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
