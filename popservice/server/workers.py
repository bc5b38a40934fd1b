"""
C{twistd pop3 --workers N}: N worker processes serving the same listening
sockets, under one supervising parent.

The parent (L{supervisor}) binds every C{--listen}, C{--listen-tls} and
C{--lmtp} endpoint itself, with Twisted's endpoint strings (so C{systemd:}
sockets, C{unix:} paths and ports below 1024 work as in one process), in
C{privilegedStartService}, before twistd drops to C{--uid}/C{--gid}.  It never
accepts on them (L{SharedListener}: the port stops reading at once).  Once the
reactor runs, L{WorkerPool} spawns the workers, as the user the parent now is:
the same Python running twistd with the same C{pop3} arguments and
C{--worker-index I --worker-fds 3,4,...}, the listening sockets passed as
those file descriptors.  Each worker adopts them
(L{popservice.server.worker.AdoptingReactor}) below the same layers one
process builds (the PROXY header reader, C{ssl:} and
C{--listen-tls} TLS reloaded on SIGHUP), so every worker accepts from the one
queue of each socket: the kernel hands each connection to a worker that is
waiting in C{accept}, a busy one takes none.

The parent supervises:

  - a worker that exits is spawned again: at once when it had run for
    L{STABLE_AFTER} seconds, else after a delay doubling from
    L{RESTART_DELAY} to L{MAX_RESTART_DELAY}, so a crash loop does not spin;
  - SIGTERM/SIGINT (twistd stops the application): every worker gets SIGTERM
    and stops gracefully (C{--shutdown-grace}); a worker still there
    L{KILL_MARGIN} seconds after the grace is killed; the parent exits when
    all are gone;
  - SIGHUP is forwarded to every worker (each reloads users and TLS);
  - systemd: the parent is the main process (C{READY=1} once the workers are
    spawned, C{STOPPING=1}); workers do not see C{$NOTIFY_SOCKET};
  - a worker watches a pipe from the parent on its stdin and stops
    gracefully when the parent is gone (killed), so no orphan serves on.

Workers log through twistd's C{--logger}
(L{popservice.server.workerlog.worker_log_observer}) on one more descriptor
(after the sockets), each line with C{worker=N} in front of its system (or
a C{worker} field in JSON): when the parent logs to a stream (stdout with
C{-n}), that descriptor I{is} the parent's, and each worker writes its lines
there itself; with C{--logfile PATH} (rotated by twistd) it is a pipe whose
lines the parent writes unparsed to its log file; else (C{--syslog}, a
C{--logger}) it carries records the parent publishes to its observers
(L{popservice.server.workerlog.route}).  The workers' stdout and stderr are
pipes to the parent: other lines a worker writes (a traceback before its
logging started) are logged line by line, naming the worker.

The parent makes a private directory (mode 0700) for the workers' runtime
files (take-over control sockets, metrics sockets), unless C{--runtime-dir}
or C{$POPSERVICE_RUNTIME_DIR} names one, and passes it as
C{$POPSERVICE_RUNTIME_DIR} (and C{--runtime-dir}); it removes a directory
it made at stop.  With C{--metrics}, the parent serves every worker's
figures (L{popservice.server.gathermetrics}).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.interfaces import IListeningPort
from twisted.logger import LogBeginner, Logger, globalLogBeginner, globalLogPublisher
from twisted.python.failure import Failure

from popservice import sdnotify
from popservice.server.startup import ListeningServices
from popservice.server.workerlog import (
    ENVIRONMENT,
    RECORD_SEPARATOR,
    pass_through,
    record_event,
    worker_log_observer,
    worker_setting,
    worker_system,
)

__all__ = ["ADOPTABLE_KINDS", "LogFileFinder", "SharedListener", "WorkerPool", "WorkerProcess", "relay_line",
           "supervisor", "worker_command"]

log = Logger(namespace="popservice.workers")

#: endpoint kinds a worker can adopt from its parent: stream sockets
ADOPTABLE_KINDS = frozenset({"tcp", "tcp6", "ssl", "unix", "systemd"})

#: the worker's file descriptor of the first listening socket; the others follow
FIRST_FD = 3

#: a worker that ran at least this many seconds is spawned again at once
STABLE_AFTER = 10.0
#: the first delay before spawning a worker that died sooner; doubles per quick death
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: seconds after the shutdown grace at which a worker still running is killed
KILL_MARGIN = 5.0
#: a line a worker writes longer than this is relayed in pieces
MAX_LINE = 1 << 20

#: the twistd runner, with the Python running us (a venv's twistd script may not be on PATH)
_TWISTD = "from twisted.scripts.twistd import run; run()"


class _NotAccepting(protocol.Factory):
    """The factory of the parent's ports, which never read: nothing is built."""

    noisy = False

    def logPrefix(self) -> str:
        return "Listener for the workers"

    def buildProtocol(self, addr: Any) -> None:
        return None


class SharedListener(service.Service):
    """
    Listens on an endpoint string (with the privileges twistd starts with)
    but never accepts: L{fileno} is for the workers.  At stop it waits for
    C{until()} (the workers' end) before it closes: closing shuts the socket
    down for every process sharing it.
    """

    def __init__(self, description: str, reactor: Any = None,
                 until: Callable[[], defer.Deferred[None]] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.description = description
        self.reactor: Any = reactor
        self.until = until
        self.port: IListeningPort | None = None

    def _bind(self) -> None:
        if self.port is not None:
            return
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        outcome: list[object] = []
        endpoint.listen(_NotAccepting()).addBoth(outcome.append)
        if not outcome:
            raise error.CannotListenError(None, self.description, "the endpoint did not listen at once")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        port: Any = outcome[0]
        port.stopReading()
        self.port = port

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        self._bind()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._bind()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is None:
            return None
        ended = self.until() if self.until is not None else defer.succeed(None)

        def close(_: object) -> defer.Deferred[None] | None:
            stopped: defer.Deferred[None] | None = port.stopListening()
            return stopped

        return ended.addCallback(close)

    def fileno(self) -> int:
        if self.port is None:
            raise RuntimeError("%s is not listening" % (self.description,))
        return int(self.port.fileno())  # type: ignore[attr-defined]


def relay_line(index: int, fd: int, line: bytes, publish: Callable[[dict[str, Any]], None], *,
               records: bool | None = None) -> None:
    """
    One line worker C{index} wrote on C{fd}: a log record (on stdout, or
    on the log descriptor of the C{records} route: C{records=True};
    L{popservice.server.workerlog.event_record}) is published as its event,
    with C{worker} and C{worker=N} in front of its system; anything else is
    logged as a line of that worker.
    """
    text = line.decode("utf-8", "replace").rstrip("\r")
    if (fd == 1 if records is None else records) and text.startswith(RECORD_SEPARATOR):
        try:
            event = record_event(text)
        except ValueError:
            pass
        else:
            event["log_system"] = worker_system(index, event)
            event["worker"] = index
            publish(event)
            return
    text = text.lstrip(RECORD_SEPARATOR)
    if text.strip():
        stream = "stdout" if fd == 1 else "stderr"
        log.warn("{line}", line=text, worker=index, stream=stream,
                 log_system="worker=%d %s" % (index, stream))


class WorkerProcess(protocol.ProcessProtocol):
    """
    One worker process: relays its output, tells the pool when it ends.
    C{log_fd}: its log descriptor when it is a pipe to us, carrying records
    (C{log_file} None) or lines for C{log_file}.
    """

    def __init__(self, pool: WorkerPool, index: int, publish: Callable[[dict[str, Any]], None],
                 log_fd: int | None = None, log_file: Any = None) -> None:
        self.pool = pool
        self.index = index
        self.publish = publish
        self.log_fd = log_fd
        self.log_file = log_file
        self.pid: int | None = None
        self.started = time.monotonic()
        self.ended = False
        self._buffers: dict[int, bytes] = {}
        self._waiting: list[defer.Deferred[None]] = []

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self.log_fd and self.log_file is not None:
            rest = pass_through(self._buffers.pop(childFD, b""), data, self.log_file)
            if len(rest) > MAX_LINE:
                rest = pass_through(rest, b"\n", self.log_file)
            if rest:
                self._buffers[childFD] = rest
            return
        lines = (self._buffers.pop(childFD, b"") + data).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        if rest:
            self._buffers[childFD] = rest
        records = childFD in (1, self.log_fd)
        for line in lines:
            relay_line(self.index, childFD, line, self.publish, records=records)

    def signal(self, name: str) -> None:
        """Send the signal C{name} (C{TERM}, C{HUP}, C{KILL}) unless the worker is gone."""
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def wait(self) -> defer.Deferred[None]:
        """Fires once the worker has ended."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.ended:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in sorted(self._buffers.items()):
            if fd == self.log_fd and self.log_file is not None:
                pass_through(rest, b"\n", self.log_file)
            else:
                relay_line(self.index, fd, rest, self.publish, records=fd in (1, self.log_fd))
        self._buffers.clear()
        self.ended = True
        self.pool.worker_ended(self, reason)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


def _how(reason: Failure) -> str:
    value: Any = reason.value
    code, sig = getattr(value, "exitCode", None), getattr(value, "signal", None)
    if sig is not None:
        try:
            return "signal %s" % (signal.Signals(sig).name,)
        except ValueError:
            return "signal %d" % (sig,)
    return "exit status %s" % (code if code is not None else "?",)


class LogFileFinder:
    """
    The file twistd's log observer writes to (its C{--logfile}), for the
    C{-pass} routes: catches the observers twistd hands to
    C{beginner.beginLoggingTo} (once, after C{makeService}; whatever
    wrapped that method before, C{use_json_logs}, is called as it was).
    """

    def __init__(self, beginner: LogBeginner = globalLogBeginner) -> None:
        self.observers: list[object] = []
        had = "beginLoggingTo" in vars(beginner)
        original = beginner.beginLoggingTo

        def begin_logging_to(observers: Any, discardBuffer: bool = False,
                             redirectStandardIO: bool = True) -> None:
            if had:
                setattr(beginner, "beginLoggingTo", original)  # noqa: B010 (mypy: no assigning to a method)
            else:
                vars(beginner).pop("beginLoggingTo", None)
            observers = list(observers)
            self.observers.extend(observers)
            original(observers, discardBuffer, redirectStandardIO)

        setattr(beginner, "beginLoggingTo", begin_logging_to)  # noqa: B010

    def file(self) -> Any:
        """The first file observer's file (twistd's C{LogFile}), or None."""
        for observer in self.observers:
            out = getattr(observer, "_outFile", None)
            if out is not None and callable(getattr(out, "write", None)):
                return out
        return None


class WorkerPool(service.Service):
    """
    Spawns C{count} workers once the reactor runs (after twistd dropped its
    privileges), spawns again those that end, forwards SIGHUP, and stops them
    all gracefully.  C{command(index, runtime_dir)} is a worker's argv.
    C{log_route}: where the workers' log lines go
    (L{popservice.server.workerlog.route}); C{log_file()}, the parent's log
    file for the C{-pass} routes (else, or when it gives None, records).
    """

    def __init__(self, count: int, command: Callable[[int, str], list[str]],
                 listeners: Sequence[SharedListener], *, grace: float, runtime_dir: str | None = None,
                 environ: Mapping[str, str] | None = None, reactor: Any = None,
                 notify: Callable[[str], object] = sdnotify.notify,
                 publish: Callable[[dict[str, Any]], None] = globalLogPublisher,
                 log_route: str = "records", log_file: Callable[[], Any] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.count = count
        self.command = command
        #: the parent's listening sockets, passed in this order
        self.listeners = list(listeners)
        self.grace = grace
        self.runtime_dir = runtime_dir
        self.environ = dict(os.environ if environ is None else environ)
        self.reactor: Any = reactor
        self.publish = publish
        self.log_route = log_route
        self.log_file = log_file
        self._notify = notify
        #: the live workers by index (1..count)
        self.workers: dict[int, WorkerProcess] = {}
        self._quick_deaths: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self._made_dir: str | None = None
        self._previous_sighup: Any = None
        self._sighup_installed = False
        self._stopped: defer.Deferred[None] | None = None

    # -- start ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.runtime_dir is None:
            # After twistd's privilege drop: the workers' user owns it.
            self._made_dir = self.runtime_dir = tempfile.mkdtemp(prefix="popservice-workers-")
        if threading.current_thread() is threading.main_thread():
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            self._sighup_installed = True
        self.reactor.callWhenRunning(self._start_all)

    def _start_all(self) -> None:
        if not self.running:
            return
        for index in range(1, self.count + 1):
            self.spawn(index)
        self.send("READY=1\nSTATUS=Accepting connections (%d workers)" % (self.count,))

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", ENVIRONMENT)}
        # The workers import what we imported, from where we did (twistd finds plugins on sys.path).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        if self.runtime_dir is not None:
            env["POPSERVICE_RUNTIME_DIR"] = self.runtime_dir
        return env

    def spawn(self, index: int) -> None:
        """Start worker C{index} (again)."""
        self._restarts.pop(index, None)
        if not self.running or index in self.workers:
            return
        assert self.runtime_dir is not None
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        for k, listener in enumerate(self.listeners):
            child_fds[FIRST_FD + k] = listener.fileno()
        # The log descriptor, after the sockets: our own log's, or a pipe to us.
        log_fd = FIRST_FD + len(self.listeners)
        chosen, log_file = self.log_route, None
        if chosen.endswith("-pass"):
            log_file = self.log_file() if self.log_file is not None else None
            if log_file is None:
                chosen = "records"
        direct = chosen in ("text", "json")
        child_fds[log_fd] = 1 if direct else "r"
        worker = WorkerProcess(self, index, self.publish, log_fd=None if direct else log_fd,
                               log_file=log_file)
        env = self._environment()
        env[ENVIRONMENT] = worker_setting(chosen, log_fd, index)
        try:
            self.reactor.spawnProcess(worker, sys.executable, self.command(index, self.runtime_dir),
                                      env=env, childFDs=child_fds)
        except OSError as e:
            log.error("worker {worker} could not be started: {why}", worker=index, why=str(e))
            self._schedule(index, quick=True)
            return
        self.workers[index] = worker
        log.info("worker {worker} started: pid {pid}", worker=index, pid=worker.pid)

    # -- supervision ----------------------------------------------------------------

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        """Called by L{WorkerProcess}: log it, and spawn it again unless we are stopping."""
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        uptime = time.monotonic() - worker.started
        how = _how(reason)
        if not self.running:
            log.info("worker {worker} (pid {pid}) ended: {how}", worker=worker.index, pid=worker.pid, how=how)
            return
        quick = uptime < STABLE_AFTER
        delay = self._schedule(worker.index, quick=quick)
        log.warn("worker {worker} (pid {pid}) ended after {uptime} s: {how}; starting it again in {delay} s",
                 worker=worker.index, pid=worker.pid, uptime=round(uptime, 3), how=how, delay=delay)

    def _schedule(self, index: int, *, quick: bool) -> float:
        deaths = self._quick_deaths.get(index, 0) + 1 if quick else 0
        self._quick_deaths[index] = deaths
        delay = 0.0 if deaths == 0 else min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (deaths - 1))
        self._restarts[index] = self.reactor.callLater(delay, self.spawn, index)
        return delay

    # -- reload ---------------------------------------------------------------------

    def _sighup(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """SIGHUP to every worker (each re-reads its users and certificates)."""
        self.send("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000,))
        log.info("SIGHUP: forwarded to {count} workers", count=len(self.workers))
        for worker in list(self.workers.values()):
            worker.signal("HUP")
        self.send("READY=1\nSTATUS=Accepting connections (%d workers, reloaded)" % (self.count,))

    # -- stop -----------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._sighup_installed:
            self._sighup_installed = False
            previous = self._previous_sighup
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        live = list(self.workers.values())
        self.send("STOPPING=1\nSTATUS=Stopping %d workers\nEXTEND_TIMEOUT_USEC=%d"
                  % (len(live), int((self.grace + KILL_MARGIN + 5) * 1e6)))
        log.info("stopping: {count} workers get up to {grace} s", count=len(live), grace=self.grace)
        for worker in live:
            worker.signal("TERM")

        def kill() -> None:
            for worker in live:
                if not worker.ended:
                    log.warn("worker {worker} (pid {pid}) still running: killed", worker=worker.index,
                             pid=worker.pid)
                    worker.signal("KILL")

        killing = self.reactor.callLater(self.grace + KILL_MARGIN, kill)

        def done(_: object) -> None:
            if killing.active():
                killing.cancel()
            if self._made_dir is not None:
                shutil.rmtree(self._made_dir, ignore_errors=True)
                self._made_dir = self.runtime_dir = None
            log.info("stopped: every worker has ended")

        all_ended = defer.gatherResults([worker.wait() for worker in live], consumeErrors=True)
        self._stopped = all_ended.addBoth(done)
        return self.ended()

    def ended(self) -> defer.Deferred[None]:
        """Fires once a stop is over (every worker has ended); at once when not stopping."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._stopped is None or self._stopped.called:
            d.callback(None)
        else:
            def fire(result: object) -> object:
                d.callback(None)
                return result

            self._stopped.addBoth(fire)
        return d

    def send(self, state: str) -> None:
        """A systemd notification (none without C{$NOTIFY_SOCKET}); a failure is logged."""
        try:
            self._notify(state)
        except OSError as e:
            log.warn("cannot notify systemd ($NOTIFY_SOCKET): {error}", error=str(e))


def worker_command(arguments: Sequence[str], index: int, fds: Sequence[int],
                   runtime_dir: str | None = None, metrics: str | None = None) -> list[str]:
    """
    The argv of worker C{index}: twistd with the same Python, no pidfile, logging
    through L{worker_log_observer}, C{pop3} with the parent's C{arguments}, its
    index and its sockets' descriptors (and C{--runtime-dir}, C{--metrics} when
    given: later options win).
    """
    argv = [sys.executable, "-c", _TWISTD, "--nodaemon", "--pidfile=",
            "--logger", "%s.worker_log_observer" % (worker_log_observer.__module__,), "pop3", *arguments,
            "--worker-index", str(index), "--worker-fds", ",".join(str(fd) for fd in fds)]
    if runtime_dir is not None:
        argv += ["--runtime-dir", runtime_dir]
    if metrics is not None:
        argv += ["--metrics", metrics]
    return argv


def supervisor(arguments: Sequence[str], descriptions: Sequence[str], count: int, *, grace: float,
               runtime_dir: str | None = None, pass_runtime_dir: bool = False,
               metrics: str | None = None, log_route: str = "records") -> service.MultiService:
    """
    The application of the parent: a L{SharedListener} per endpoint string
    (every C{--listen}, C{--listen-tls}, then C{--lmtp}; a bind failure is one
    log line and exit status 1), and the L{WorkerPool} of C{count} workers
    running C{pop3 ARGUMENTS}.  C{pass_runtime_dir}: give the workers the
    runtime directory as C{--runtime-dir} too (the option exists and was not
    given: C{runtime_dir} is None).  C{metrics}: the endpoint where the
    parent serves every worker's metrics (L{popservice.server.gathermetrics};
    each worker serves its own on a unix socket in the runtime directory).
    C{log_route}: where the workers' log lines go
    (L{popservice.server.workerlog.route}).
    """
    top = ListeningServices()
    listeners: list[SharedListener] = []
    fds = [FIRST_FD + k for k in range(len(descriptions))]

    def command(index: int, directory: str) -> list[str]:
        own_metrics = None
        if metrics is not None:
            from popservice.server.gathermetrics import worker_endpoint

            own_metrics = worker_endpoint(directory, index)
        return worker_command(arguments, index, fds, directory if pass_runtime_dir else None, own_metrics)

    finder = LogFileFinder() if log_route.endswith("-pass") else None
    pool = WorkerPool(count, command, listeners, grace=grace, runtime_dir=runtime_dir, log_route=log_route,
                      log_file=finder.file if finder is not None else None)
    for description in descriptions:
        listener = SharedListener(description, until=pool.ended)
        listeners.append(listener)
        top.listen(description, listener)
    pool.listeners = listeners
    if metrics is not None:
        from popservice.server.gathermetrics import gathered_site, worker_socket

        def sockets() -> dict[str, str]:
            directory = pool.runtime_dir
            if directory is None:
                return {}
            return {str(i): worker_socket(directory, i) for i in sorted(pool.workers)}

        top.listen(metrics, strports.service(metrics, gathered_site(sockets)))
    # Added last, stopped first (the listeners wait for its end).
    top.addService(pool)
    return top
