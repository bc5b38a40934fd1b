#!/usr/bin/env python3
"""
A POP3 load generator for popservice or any POP3 server: standard library
only (asyncio, and uvloop when it is installed), so any Python 3.11 runs it.

Scenarios (subcommands; every one bounded in time and count):

  sessions       C clients, each looping: connect, USER/PASS, STAT, UIDL,
                 RETR 1..K, QUIT, for D seconds; sessions/s and the session's
                 p50/p99 (connect..QUIT answer).  Client k logs in as user k
                 (--user u%d), so no two share a mailbox.  --pipeline sends
                 USER+PASS as one write and STAT..QUIT as another (RFC 2449
                 PIPELINING), when the server's CAPA lists PIPELINING.
  tls            the same over implicit TLS (--tls-port) and/or STLS
                 (--mode); certificates are not verified unless --cafile.
  login          C clients looping connect, USER, PASS, QUIT: logins/s with
                 whatever password scheme the server's user database holds.
  bigretr        one client: USER/PASS as --big-user, RETR 1 counted as it
                 streams (never held whole), QUIT; R times; MB/s of the body.
  idle           N authenticated idle connections (--idle-user i%d); with
                 --server-pid, the server's RSS and PSS (summed over its
                 process tree) before and after, per connection; a fresh
                 session's latency while they are held.
  latency-under  one well-behaved client (a session every --interval seconds)
                 first alone, then while a background load runs:
                 --background logins:50 (alias argon2-logins:50: 50 clients
                 looping logins), sessions:N, cold-maildir:USER (that user's
                 mailbox opened again and again; --recool-cmd runs a command
                 before each open to make it cold again).  Reports the
                 session's p50/p99 alone and under the load (sessions that
                 overlapped a background operation).

The load runs in --procs worker processes (so the generator is not the
bottleneck); each reports its CPU time, and "gen busiest" is the busiest
worker's CPU-seconds per wall-second (near 1.0: the generator, not the server,
was the limit).  Errors are counted by kind and always printed; the exit
status is 1 when any happened.  --server-pid adds the server's CPU time (utime
+ stime of the process tree, reaped children included) and memory from /proc.

    python3 bench/load.py sessions --port 1110 -c 10 -d 5 [--pipeline] [--json]
    python3 bench/load.py latency-under --port 1110 --background argon2-logins:50
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import multiprocessing
import os
import resource
import shlex
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

TERMINATOR = b"\r\n.\r\n"
MAX_LINE = 65536
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- The client: one asyncio protocol, answers matched to commands in order --------------------


class POP3Error(Exception):
    """A C{-ERR} answer (or a malformed one) where C{+OK} was needed."""


class Reply(NamedTuple):
    status: bytes
    #: the multi-line body (dot-stuffed, as on the wire) when kept, else b""
    body: bytes
    #: bytes of the body on the wire
    size: int


class _Expected:
    """One answer the client waits for: a status line, and a body when multi-line."""

    __slots__ = ("future", "keep", "multi", "scanned", "size", "status")

    def __init__(self, future: asyncio.Future[Reply], multi: bool, keep: bool) -> None:
        self.future = future
        self.multi = multi
        self.keep = keep
        self.status: bytes | None = None
        self.scanned = 0
        self.size = 0


class POP3Client(asyncio.Protocol):
    """
    A POP3 client connection.  Commands are written at once and their answers
    matched in order, so any number may be pipelined.  A body that is not
    kept is counted and dropped as it arrives (a 50 MiB RETR costs a few
    bytes of buffer).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buffer = bytearray()
        self.pending: deque[_Expected] = deque()
        self.transport: asyncio.Transport | None = None
        self.greeting = self._expect(multi=False, keep=True)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            self._deliver()
        except POP3Error as e:
            self._fail(e)
            self.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed by the server"))

    # commands

    def _expect(self, multi: bool, keep: bool) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = self.loop.create_future()
        self.pending.append(_Expected(future, multi, keep))
        return future

    def send(self, commands: Sequence[tuple[bytes, bool]], keep: bool = True) -> list[asyncio.Future[Reply]]:
        """Write C{(line, multi-line?)} commands in one write; their answers' futures."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("not connected")
        futures = [self._expect(multi, keep) for _, multi in commands]
        self.transport.write(b"".join(line + b"\r\n" for line, _ in commands))
        return futures

    async def batch(self, commands: Sequence[tuple[bytes, bool]], keep: bool = True) -> list[Reply]:
        """Pipelined commands; every answer must be C{+OK}."""
        replies = [await f for f in self.send(commands, keep)]
        for (line, _), reply in zip(commands, replies, strict=True):
            _check(line, reply)
        return replies

    async def command(self, line: bytes, multi: bool = False, keep: bool = True) -> Reply:
        (reply,) = await self.batch([(line, multi)], keep)
        return reply

    async def start_tls(self, context: ssl.SSLContext, server_name: str | None) -> None:
        """STLS (RFC 2595), then the handshake on this connection."""
        await self.command(b"STLS")
        assert self.transport is not None
        transport = await self.loop.start_tls(self.transport, self, context, server_hostname=server_name)
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # answers

    def _deliver(self) -> None:
        buf = self.buffer
        while self.pending:
            e = self.pending[0]
            if e.status is None:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_LINE:
                        raise POP3Error("status line longer than %d bytes" % MAX_LINE)
                    return
                e.status = bytes(buf[:end])
                if not e.multi or not e.status.startswith(b"+OK"):
                    del buf[:end + 2]
                    self._done(Reply(e.status, b"", 0))
                    continue
                # Keep the status line's CRLF: an empty body is then the whole
                # terminator, CRLF "." CRLF.
                del buf[:end]
            at = buf.find(TERMINATOR, e.scanned)
            if at < 0:
                if e.keep:
                    e.scanned = max(0, len(buf) - 4)
                elif len(buf) > 4:
                    e.size += len(buf) - 4
                    del buf[:-4]
                return
            e.size += at
            self._done(Reply(e.status, bytes(buf[2:at + 2]) if e.keep else b"", e.size))
            del buf[:at + 5]

    def _done(self, reply: Reply) -> None:
        future = self.pending.popleft().future
        if not future.done():
            future.set_result(reply)

    def _fail(self, exc: BaseException) -> None:
        while self.pending:
            future = self.pending.popleft().future
            if not future.done():
                future.set_exception(exc)
                future.exception()  # whoever awaits it still gets it; nobody else is told


def _check(line: bytes, reply: Reply) -> None:
    if not reply.status.startswith(b"+OK"):
        verb = line.split(b" ", 1)[0].decode("ascii", "replace")
        text = reply.status[:60].decode("utf-8", "replace")
        raise POP3Error("%s: %s" % (verb, text))


# -- Where and how to connect ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls_port: int
    cafile: str | None = None
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        if self.cafile:
            return ssl.create_default_context(cafile=self.cafile)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context


#: How a connection is secured: "plain", "implicit" (TLS from the start) or "stls".
TLS_MODES = ("plain", "implicit", "stls")


async def connect(target: Target, tls: str = "plain", context: ssl.SSLContext | None = None) -> POP3Client:
    """A connected client past the greeting (and STLS when asked)."""
    loop = asyncio.get_running_loop()
    implicit = tls == "implicit"
    if tls != "plain" and context is None:
        context = target.context()
    name = target.server_name or target.host
    _, client = await loop.create_connection(
        lambda: POP3Client(loop), target.host, target.tls_port if implicit else target.port,
        ssl=context if implicit else None, server_hostname=name if implicit else None)
    try:
        _check(b"greeting", await client.greeting)
        if tls == "stls":
            assert context is not None
            await client.start_tls(context, name)
    except BaseException:
        client.close()
        raise
    return client


@dataclass(frozen=True)
class Users:
    """Who client k logs in as: C{user % k}, password C{password.format(user=...)}."""

    user: str = "u%d"
    password: str = "pw-{user}"
    offset: int = 0

    def credentials(self, k: int) -> tuple[bytes, bytes]:
        name = self.user % (k + self.offset) if "%" in self.user else self.user
        return name.encode("utf-8"), self.password.format(user=name).encode("utf-8")


async def login(client: POP3Client, user: bytes, password: bytes, pipeline: bool) -> None:
    if pipeline:
        await client.batch([(b"USER " + user, False), (b"PASS " + password, False)])
    else:
        await client.command(b"USER " + user)
        await client.command(b"PASS " + password)


async def capabilities(target: Target, tls: str = "plain") -> list[str]:
    """The server's CAPA list (empty when CAPA is refused)."""
    client = await connect(target, tls)
    try:
        (reply, _) = [await f for f in client.send([(b"CAPA", True), (b"QUIT", False)])]
        if not reply.status.startswith(b"+OK"):
            return []
        return [line.decode("utf-8", "replace").strip() for line in reply.body.split(b"\r\n") if line]
    finally:
        client.close()


# -- One operation of each kind; each returns the body bytes it received -----------------------


@dataclass(frozen=True)
class Shape:
    """What one client does, over and over."""

    kind: str  # "session", "login" or "open"
    tls: str = "plain"
    pipeline: bool = False
    retr: int = 1

    async def run(self, target: Target, user: bytes, password: bytes, context: ssl.SSLContext | None) -> int:
        client = await connect(target, self.tls, context)
        try:
            if self.kind == "login":
                await login(client, user, password, self.pipeline)
                await client.command(b"QUIT")
                return 0
            if self.kind == "open":
                await login(client, user, password, False)
                await client.batch([(b"STAT", False), (b"QUIT", False)])
                return 0
            return await self._session(client, user, password)
        finally:
            client.close()

    async def _session(self, client: POP3Client, user: bytes, password: bytes) -> int:
        retrs = [(b"RETR %d" % i, True) for i in range(1, self.retr + 1)]
        await login(client, user, password, self.pipeline)
        if self.pipeline:
            replies = await client.batch([(b"STAT", False), (b"UIDL", True), *retrs, (b"QUIT", False)])
            return sum(r.size for r in replies)
        await client.command(b"STAT")
        received = (await client.command(b"UIDL", multi=True)).size
        for line, _ in retrs:
            received += (await client.command(line, multi=True)).size
        await client.command(b"QUIT")
        return received


def error_kind(exc: BaseException) -> str:
    """A short name for an error, to count errors by kind."""
    if isinstance(exc, POP3Error):
        return "-ERR " + str(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "SSLError: %s" % (exc.reason or exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return "%s (errno %d)" % (type(exc).__name__, exc.errno)
    return type(exc).__name__


# -- Worker processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """C{clients} clients of one shape, in one worker process."""

    name: str
    shape: Shape
    users: Users
    clients: list[int]
    #: seconds each client waits between two operations
    interval: float = 0.0
    #: a command run (outside the timed window) before each operation
    before_each: list[str] = field(default_factory=list)


@dataclass
class JobResult:
    name: str
    #: (wall-clock start, seconds) of each completed operation
    samples: list[tuple[float, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    received: int = 0
    cpu: float = 0.0
    wall: float = 0.0
    loop: str = ""
    #: the wall-clock window new operations were started in
    start: float = 0.0
    stop: float = 0.0

    def completed_in_window(self) -> int:
        """Operations that ended before the window closed (the rate's numerator)."""
        return sum(1 for began, seconds in self.samples if began + seconds <= self.stop)


def new_loop(name: str) -> tuple[asyncio.AbstractEventLoop, str]:
    if name in ("auto", "uvloop"):
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            if name == "uvloop":
                raise
        else:
            return uvloop.new_event_loop(), "uvloop"  # type: ignore[no-any-return,unused-ignore]
    return asyncio.new_event_loop(), "asyncio"


async def drive(job: Job, target: Target, start: float, stop: float, timeout: float,
                result: JobResult) -> None:
    """Run the job's clients from wall-clock C{start} until C{stop}."""
    context = target.context() if job.shape.tls != "plain" else None

    async def client(k: int) -> None:
        user, password = job.users.credentials(k)
        while time.time() < stop:
            if job.before_each:
                done = await asyncio.to_thread(subprocess.run, job.before_each, stdout=subprocess.DEVNULL)
                if done.returncode:
                    result.errors["before-each command exited with %d" % done.returncode] += 1
                    return
            began, t0 = time.time(), time.perf_counter()
            try:
                received = await asyncio.wait_for(job.shape.run(target, user, password, context), timeout)
            except Exception as e:
                result.errors[error_kind(e)] += 1
                await asyncio.sleep(0.05)  # no hot loop against a refusing server
            else:
                result.samples.append((began, time.perf_counter() - t0))
                result.received += received
            if job.interval:
                await asyncio.sleep(job.interval)

    await asyncio.sleep(max(0.0, start - time.time()))
    await asyncio.gather(*(client(k) for k in job.clients))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_job(job: Job, target: Target, start: float, stop: float, timeout: float, loop_name: str,
            results: Any) -> None:
    """A worker process: one event loop running one job; its L{JobResult} goes on the queue."""
    loop, name = new_loop(loop_name)
    result = JobResult(job.name, loop=name, start=start, stop=stop)
    cpu = cpu_seconds()
    try:
        loop.run_until_complete(drive(job, target, start, stop, timeout, result))
    except Exception as e:  # the worker itself broke: counted, never hidden
        result.errors["worker: " + error_kind(e)] += 1
    finally:
        loop.close()
    result.cpu = cpu_seconds() - cpu
    result.wall = max(time.time() - start, 1e-9)
    results.put(result)


def split(job: Job, procs: int) -> list[Job]:
    """The job's clients spread over at most C{procs} workers."""
    groups = [job.clients[i::procs] for i in range(max(1, procs))]
    return [Job(job.name, job.shape, job.users, g, job.interval, job.before_each) for g in groups if g]


def run_jobs(jobs: Sequence[Job], options: argparse.Namespace, server: ServerWatch | None,
             seconds: float) -> tuple[list[JobResult], dict[str, Any]]:
    """
    Run C{jobs} (one process each) for C{seconds}; their results merged per
    job name, and what was seen of the server meanwhile.
    """
    settled = server.settle() if server else None
    context = multiprocessing.get_context("fork")  # Linux (/proc) only anyway
    queue = context.Queue()
    start = time.time() + 0.3 + 0.05 * len(jobs)
    stop = start + seconds
    workers = [context.Process(target=run_job, args=(job, options.target, start, stop, options.timeout,
                                                     options.loop, queue), daemon=True)
               for job in jobs]
    for w in workers:
        w.start()
    time.sleep(max(0.0, start - time.time()))
    watch = server.watch() if server else None
    collected: list[JobResult] = []
    try:
        for _ in workers:
            collected.append(queue.get(timeout=seconds + options.timeout + 60))
    finally:
        seen = watch.stop() if watch else {}
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
    merged: dict[str, JobResult] = {}
    busiest: dict[str, float] = {}
    for r in collected:
        m = merged.setdefault(r.name, JobResult(r.name, loop=r.loop, start=r.start, stop=r.stop))
        m.samples += r.samples
        m.errors += r.errors
        m.received += r.received
        m.cpu += r.cpu
        m.wall = max(m.wall, r.wall)
        busiest[r.name] = max(busiest.get(r.name, 0.0), r.cpu / r.wall)
    seen["gen_busiest"] = {name: round(b, 3) for name, b in busiest.items()}
    if settled is not None:
        seen["server_settle_s"] = settled
    lost = len(workers) - len(collected)
    names = list(dict.fromkeys(j.name for j in jobs))
    for name in names:
        if name not in merged:
            merged[name] = JobResult(name)
        if lost:
            merged[name].errors["generator worker lost"] += lost
    return [merged[name] for name in names], seen


# -- The server, seen from /proc -------------------------------------------------------------


def _stat(pid: int) -> list[bytes]:
    with open("/proc/%d/stat" % pid, "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].split()  # from field 3 (state) on


class Memory(NamedTuple):
    processes: int
    rss_kib: int
    pss_kib: int


class ServerWatch:
    """A server's process tree (the root and its descendants), from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, ()))
        return tree

    def cpu(self) -> float:
        """CPU seconds: utime + stime of each live process, plus its reaped children's."""
        total = 0
        for pid in self.pids():
            try:
                fields = _stat(pid)
            except OSError:
                continue
            total += sum(int(x) for x in fields[11:15])
        return total / CLOCK_TICKS

    def memory(self, pss: bool = False) -> Memory:
        rss = pss_total = 0
        pids = self.pids()
        for pid in pids:
            rss += _kib_field("/proc/%d/status" % pid, "VmRSS:")
            if pss:
                pss_total += _kib_field("/proc/%d/smaps_rollup" % pid, "Pss:")
        return Memory(len(pids), rss, pss_total)

    def watch(self, interval: float = 0.1) -> Watch:
        return Watch(self, interval)

    def settle(self, limit: float = 120.0, idle_share: float = 0.1, step: float = 0.5) -> float:
        """
        Wait (at most C{limit} seconds) until the server uses less than
        C{idle_share} of a CPU, so that work left from an earlier run (hashes
        of logins whose clients gave up, say) does not land in this one.
        How long it took.
        """
        began = time.monotonic()
        before = self.cpu()
        while time.monotonic() - began < limit:
            time.sleep(step)
            now = self.cpu()
            if now - before < idle_share * step:
                break
            before = now
        return round(time.monotonic() - began, 1)


def _kib_field(path: str, name: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Watch:
    """The server's CPU time over a window, and its peak RSS (sampled in a thread)."""

    def __init__(self, server: ServerWatch, interval: float) -> None:
        self.server = server
        self.interval = interval
        self.peak_rss = server.memory().rss_kib
        self.cpu = server.cpu()
        self.began = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self.server.memory().rss_kib)

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.thread.join()
        return {"server_cpu_s": round(self.server.cpu() - self.cpu, 3),
                "server_window_s": round(time.monotonic() - self.began, 3),
                "server_peak_rss_kib": max(self.peak_rss, self.server.memory().rss_kib)}


# -- Figures -------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def latency(samples: Sequence[tuple[float, float]], prefix: str = "") -> dict[str, Any]:
    seconds = [s for _, s in samples]
    return {prefix + "n": len(seconds), prefix + "p50_ms": ms(percentile(seconds, 50)),
            prefix + "p99_ms": ms(percentile(seconds, 99)), prefix + "max_ms": ms(max(seconds, default=None))}


def throughput(result: JobResult, seconds: float, seen: dict[str, Any], unit: str) -> dict[str, Any]:
    """Rate, latency, errors, generator and server CPU of one job's run."""
    n = len(result.samples)
    # the rate counts what ended inside the window; latency and CPU per operation count every one
    in_window = result.completed_in_window()
    out: dict[str, Any] = {unit: n, unit + "_in_window": in_window,
                           unit + "_per_s": round(in_window / seconds, 2), **latency(result.samples),
                           "errors": sum(result.errors.values()), "error_kinds": dict(result.errors),
                           "received_bytes": result.received, "loop": result.loop,
                           "gen_cpu_s": round(result.cpu, 3),
                           "gen_busiest": seen.get("gen_busiest", {}).get(result.name)}
    if "server_cpu_s" in seen:
        out.update({k: v for k, v in seen.items() if k.startswith("server_")})
        per = round(seen["server_cpu_s"] * 1000 / n, 3) if n else None
        out["server_cpu_ms_per_" + unit.rstrip("s")] = per
    return out


# -- Scenarios -------------------------------------------------------------------------------


def server_of(options: argparse.Namespace) -> ServerWatch | None:
    return ServerWatch(options.server_pid) if options.server_pid else None


def auto_procs(options: argparse.Namespace, clients: int) -> int:
    if options.procs > 0:
        return int(options.procs)
    return max(1, min(clients, (os.cpu_count() or 2) // 2, math.ceil(clients / 25)))


def pipelining(options: argparse.Namespace, tls: str) -> bool:
    if not options.pipeline:
        return False
    capa = asyncio.run(capabilities(options.target, tls))
    return "PIPELINING" in (c.split()[0].upper() for c in capa if c.split())


def scenario_sessions(options: argparse.Namespace, tls: str = "plain", kind: str = "session",
                      scenario: str = "sessions") -> dict[str, Any]:
    pipeline = pipelining(options, tls)
    shape = Shape(kind, tls, pipeline, options.retr)
    users = Users(options.user, options.password)
    job = Job(scenario, shape, users, list(range(options.concurrency)))
    server = server_of(options)
    (result,), seen = run_jobs(split(job, auto_procs(options, options.concurrency)), options, server,
                               options.duration)
    unit = "logins" if kind == "login" else "sessions"
    return {"scenario": scenario, "tls": tls, "concurrency": options.concurrency,
            "pipeline_asked": options.pipeline, "pipeline": pipeline,
            "retr": options.retr if kind == "session" else 0,
            "procs": auto_procs(options, options.concurrency), "duration_s": options.duration,
            **throughput(result, options.duration, seen, unit)}


def scenario_tls(options: argparse.Namespace) -> list[dict[str, Any]]:
    modes = ["implicit", "stls"] if options.mode == "both" else [options.mode]
    return [scenario_sessions(options, tls=mode, scenario="tls") for mode in modes]


def scenario_login(options: argparse.Namespace) -> dict[str, Any]:
    return scenario_sessions(options, kind="login", scenario="login")


def scenario_bigretr(options: argparse.Namespace) -> dict[str, Any]:
    server = server_of(options)
    user, password = Users(options.big_user, options.password).credentials(0)
    rates: list[float] = []
    errors: Counter[str] = Counter()
    size = 0

    async def once() -> tuple[int, float]:
        client = await connect(options.target, "implicit" if options.tls else "plain")
        try:
            await login(client, user, password, False)
            t0 = time.perf_counter()
            reply = await client.command(b"RETR 1", multi=True, keep=False)
            seconds = time.perf_counter() - t0
            await client.command(b"QUIT")
            return reply.size, seconds
        finally:
            client.close()

    loop, name = new_loop(options.loop)
    cpu = cpu_seconds()
    began = time.monotonic()
    settled = server.settle() if server else None
    watch = server.watch(0.05) if server else None
    before = server.memory() if server else None
    try:
        for _ in range(options.repeat):
            try:
                size, seconds = loop.run_until_complete(asyncio.wait_for(once(), options.timeout))
                rates.append(size / seconds / 1e6)
            except Exception as e:
                errors[error_kind(e)] += 1
    finally:
        loop.close()
        seen = watch.stop() if watch else {}
    out: dict[str, Any] = {
        "scenario": "bigretr", "user": user.decode(), "tls": "implicit" if options.tls else "plain",
        "repeat": options.repeat, "body_bytes": size, "loop": name,
        "MBps_median": round(sorted(rates)[len(rates) // 2], 1) if rates else None,
        "MBps_each": [round(r, 1) for r in rates],
        "errors": sum(errors.values()), "error_kinds": dict(errors),
        "gen_cpu_s": round(cpu_seconds() - cpu, 3),
        "gen_busiest": round((cpu_seconds() - cpu) / (time.monotonic() - began), 3)}
    if before is not None:
        out.update(seen)
        out["server_rss_before_kib"] = before.rss_kib
        out["server_settle_s"] = settled
    return out


def scenario_idle(options: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < options.connections + 64 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = server_of(options)
    users = Users(options.idle_user, options.password)
    errors: Counter[str] = Counter()
    clients: list[POP3Client] = []
    out: dict[str, Any] = {"scenario": "idle", "connections": options.connections}

    async def open_one(k: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                client = await asyncio.wait_for(connect(options.target), options.timeout)
            except Exception as e:
                errors[error_kind(e)] += 1
                return
            try:
                await asyncio.wait_for(login(client, *users.credentials(k), False), options.timeout)
            except Exception as e:
                errors[error_kind(e)] += 1
                client.close()
                return
            clients.append(client)

    async def alive(client: POP3Client) -> bool:
        try:
            await asyncio.wait_for(client.command(b"NOOP"), options.timeout)
            return True
        except Exception as e:
            errors["NOOP: " + error_kind(e)] += 1
            return False

    async def warm_up(k: int) -> None:
        """A login and QUIT: the server's code paths and buffers in use before memory is read."""
        try:
            client = await asyncio.wait_for(connect(options.target), options.timeout)
            try:
                await asyncio.wait_for(login(client, *users.credentials(k), False), options.timeout)
                await asyncio.wait_for(client.command(b"QUIT"), options.timeout)
            finally:
                client.close()
        except Exception as e:
            errors["warm-up: " + error_kind(e)] += 1

    async def run() -> None:
        for k in range(min(options.warmup, options.connections)):
            await warm_up(k)
        if server:
            out["server_settle_s"] = server.settle()
        before = server.memory(pss=True) if server else None
        t0 = time.perf_counter()
        gate = asyncio.Semaphore(options.parallel)
        await asyncio.gather(*(open_one(k, gate) for k in range(options.connections)))
        out["open_s"] = round(time.perf_counter() - t0, 2)
        await asyncio.sleep(options.settle)
        held = server.memory(pss=True) if server else None
        fresh: list[tuple[float, float]] = []
        shape = Shape("session", retr=options.retr)
        for _ in range(options.fresh):
            began, t1 = time.time(), time.perf_counter()
            try:
                await asyncio.wait_for(shape.run(options.target, *Users(options.user, options.password)
                                                 .credentials(0), None), options.timeout)
                fresh.append((began, time.perf_counter() - t1))
            except Exception as e:
                errors["fresh session: " + error_kind(e)] += 1
        out.update(latency(fresh, "fresh_session_"))
        sample = clients[::max(1, len(clients) // 50)]
        answered = await asyncio.gather(*(alive(c) for c in sample))
        out["noop_answered"] = "%d/%d" % (sum(answered), len(sample))
        if before is not None and held is not None:
            n = max(1, len(clients))
            out.update({"server_processes": held.processes, "rss_before_kib": before.rss_kib,
                        "rss_held_kib": held.rss_kib, "pss_before_kib": before.pss_kib,
                        "pss_held_kib": held.pss_kib,
                        "rss_per_conn_kib": round((held.rss_kib - before.rss_kib) / n, 2),
                        "pss_per_conn_kib": round((held.pss_kib - before.pss_kib) / n, 2)})
        for c in clients:
            if c.transport is not None and not c.transport.is_closing():
                c.send([(b"QUIT", False)])
            c.close()
        await asyncio.sleep(0.2)

    loop, name = new_loop(options.loop)
    cpu = cpu_seconds()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    out.update({"opened": len(clients), "errors": sum(errors.values()), "error_kinds": dict(errors),
                "loop": name, "gen_cpu_s": round(cpu_seconds() - cpu, 3)})
    return out


@dataclass(frozen=True)
class Background:
    """A C{--background KIND:ARG} load."""

    kind: str
    clients: int
    user: str

    @classmethod
    def parse(cls, text: str) -> Background:
        kind, _, arg = text.partition(":")
        if kind in ("logins", "argon2-logins", "sessions") and arg.isdigit() and int(arg) > 0:
            return cls(kind, int(arg), "")
        if kind == "cold-maildir" and arg:
            return cls(kind, 1, arg)
        raise argparse.ArgumentTypeError(
            "%r: expected logins:N, argon2-logins:N, sessions:N or cold-maildir:USER" % text)

    def job(self, index: int, first_user: int, options: argparse.Namespace) -> Job:
        """The load; its users are numbered from C{first_user} (the foreground client is user 0)."""
        name = "background %d: %s" % (index, self.kind)
        if self.kind == "cold-maildir":
            return Job(name, Shape("open"), Users(self.user, options.password), [0], interval=0.05,
                       before_each=shlex.split(options.recool_cmd) if options.recool_cmd else [])
        shape = Shape("session" if self.kind == "sessions" else "login", retr=options.retr)
        return Job(name, shape, Users(options.background_user, options.password, offset=first_user),
                   list(range(self.clients)))


def overlapping(samples: Sequence[tuple[float, float]],
                windows: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The samples whose time overlaps one of the windows (both as (start, seconds))."""
    merged: list[list[float]] = []
    for start, seconds in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + seconds)
        else:
            merged.append([start, start + seconds])
    starts = [m[0] for m in merged]
    out = []
    for start, seconds in samples:
        i = bisect.bisect_right(starts, start + seconds) - 1
        if i >= 0 and merged[i][1] >= start:
            out.append((start, seconds))
    return out


def scenario_latency_under(options: argparse.Namespace) -> dict[str, Any]:
    backgrounds: list[Background] = options.background or [Background("argon2-logins", 50, "")]
    foreground = Job("foreground", Shape("session", retr=options.retr), Users(options.user, options.password),
                     [0], interval=options.interval)
    server = server_of(options)
    (alone,), seen_alone = run_jobs([foreground], options, server, options.duration)
    jobs = [foreground]
    first_user = 1
    for i, b in enumerate(backgrounds):
        jobs += split(b.job(i, first_user, options), auto_procs(options, b.clients))
        first_user += b.clients
    results, seen = run_jobs(jobs, options, server, options.duration)
    fg, *bg = results
    windows = [w for r in bg for w in r.samples]
    under = overlapping(fg.samples, windows)
    out: dict[str, Any] = {
        "scenario": "latency-under", "background": [f"{b.kind}:{b.user or b.clients}" for b in backgrounds],
        "duration_s": options.duration, "interval_s": options.interval,
        **latency(alone.samples, "alone_"), **latency(under, "under_"),
        "errors": sum(alone.errors.values()) + sum(fg.errors.values()),
        "error_kinds": dict(alone.errors + fg.errors),
        "gen_busiest": max(seen.get("gen_busiest", {}).values(), default=None)}
    if "server_cpu_s" in seen_alone:
        out["server_cpu_s_alone"] = seen_alone["server_cpu_s"]
        out["server_cpu_s_under"] = seen["server_cpu_s"]
    for b, r in zip(backgrounds, bg, strict=True):
        key = "bg_" + b.kind.replace("-", "_")
        out[key + "_ops"] = len(r.samples)
        out[key + "_per_s"] = round(r.completed_in_window() / options.duration, 2)
        out[key + "_errors"] = sum(r.errors.values())
        out[key + "_error_kinds"] = dict(r.errors)
        out[key + "_p50_ms"] = ms(percentile([s for _, s in r.samples], 50))
        if b.kind == "cold-maildir":
            out[key + "_first_open_ms"] = ms(min(r.samples)[1]) if r.samples else None
            out[key + "_recooled"] = bool(options.recool_cmd)
        out["errors"] += sum(r.errors.values())
    return out


# -- Output ----------------------------------------------------------------------------------


def table(results: Sequence[dict[str, Any]]) -> str:
    """A human table: one block per result, the figures that matter first."""
    lines = []
    for r in results:
        head = r["scenario"] + "".join(" %s=%s" % (k, r[k]) for k in ("tls", "concurrency", "pipeline")
                                       if k in r and not (k == "tls" and r[k] == "plain"))
        lines.append(head)
        for key, value in r.items():
            if key in ("scenario", "tls", "concurrency", "pipeline") or value in (None, {}, []):
                continue
            lines.append("  %-32s %s" % (key, value))
        if (r.get("gen_busiest") or 0) > 0.9:
            lines.append("  WARNING: a generator process was >90% busy: add --procs")
        if r.get("errors"):
            lines.append("  WARNING: %d errors (see error_kinds)" % r["errors"])
    return "\n".join(lines)


# -- Command line ----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("target and generator")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=110, help="plain POP3 (and STLS) port")
    g.add_argument("--tls-port", type=int, default=995, help="implicit TLS port")
    g.add_argument("--cafile", help="verify the server's certificate against these CAs (default: no check)")
    g.add_argument("--tls-name", help="server name for SNI and verification (default: --host)")
    g.add_argument("--user", default="u%d", help="user of client k (printf, k from 0); default u%%d")
    g.add_argument("--password", default="pw-{user}", help="password template; default pw-{user}")
    g.add_argument("--server-pid", type=int, help="root pid of the server: its CPU and memory from /proc")
    g.add_argument("--procs", type=int, default=0, help="generator processes (default: by load)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds one operation may take")
    g.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    g.add_argument("--retr", type=int, default=1, help="messages RETRieved per session (1..K)")
    g.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    g.add_argument("--json-out", help="also append each result as one JSON line to this file")
    g.add_argument("--label", help="a label copied into each result")

    def duration(p: argparse.ArgumentParser, default: float) -> None:
        p.add_argument("-d", "--duration", type=float, default=default, help="seconds of load")

    def concurrency(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--concurrency", type=int, default=10, help="concurrent clients")

    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("sessions", parents=[common], help="full sessions in a loop")
    concurrency(p)
    duration(p, 5.0)
    p.add_argument("--pipeline", action="store_true", help="pipeline commands (when CAPA has PIPELINING)")
    p = sub.add_parser("tls", parents=[common], help="sessions over implicit TLS and/or STLS")
    concurrency(p)
    duration(p, 5.0)
    p.add_argument("--mode", choices=["implicit", "stls", "both"], default="implicit")
    p.add_argument("--pipeline", action="store_true")
    p = sub.add_parser("login", parents=[common], help="connect, USER, PASS, QUIT in a loop")
    concurrency(p)
    duration(p, 5.0)
    p.add_argument("--pipeline", action="store_true", help="USER and PASS in one write")
    p = sub.add_parser("bigretr", parents=[common], help="RETR of one big message, MB/s")
    p.add_argument("--big-user", default="big")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tls", action="store_true", help="over implicit TLS")
    p = sub.add_parser("idle", parents=[common], help="N authenticated idle connections: memory each")
    p.add_argument("-n", "--connections", type=int, default=1000)
    p.add_argument("--idle-user", default="i%d", help="user of idle connection k; default i%%d")
    p.add_argument("--parallel", type=int, default=50, help="logins under way at once while opening")
    p.add_argument("--settle", type=float, default=1.0, help="seconds before memory is read")
    p.add_argument("--fresh", type=int, default=5, help="fresh sessions timed while the N are held")
    p.add_argument("--warmup", type=int, default=20, help="logins (and QUITs) before memory is first read")
    p = sub.add_parser("latency-under", parents=[common],
                       help="a well-behaved session's latency alone and under a background load")
    duration(p, 10.0)
    p.add_argument("--background", action="append", type=Background.parse,
                   help="logins:N, argon2-logins:N, sessions:N or cold-maildir:USER (repeatable; "
                        "default argon2-logins:50)")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between the client's sessions")
    p.add_argument("--background-user", default="u%d",
                   help="user of background client k (numbered from 1, after the foreground's 0)")
    p.add_argument("--recool-cmd", help="cold-maildir: a command run before each open (e.g. fixture.py "
                                        "DIR --recool USER)")
    return top


SCENARIOS: dict[str, Callable[[argparse.Namespace], dict[str, Any] | list[dict[str, Any]]]] = {
    "sessions": scenario_sessions,
    "tls": scenario_tls,
    "login": scenario_login,
    "bigretr": scenario_bigretr,
    "idle": scenario_idle,
    "latency-under": scenario_latency_under,
}


def main(argv: Sequence[str] | None = None) -> int:
    options = parser().parse_args(argv)
    options.target = Target(options.host, options.port, options.tls_port, options.cafile, options.tls_name)
    options.pipeline = getattr(options, "pipeline", False)
    found = SCENARIOS[options.scenario](options)
    results = found if isinstance(found, list) else [found]
    for r in results:
        port = options.tls_port if r.get("tls") == "implicit" else options.port
        r["target"] = "%s:%d" % (options.host, port)
        if options.label:
            r["label"] = options.label
    if options.json_out:
        with open(options.json_out, "a") as f:
            for r in results:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    print(json.dumps(results, indent=1) if options.json else table(results), flush=True)
    return 1 if any(r.get("errors") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
