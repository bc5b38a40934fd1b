"""
Prometheus metrics (C{twistd pop3 --metrics ENDPOINT}), from the session events.

L{MetricsObserver} is an L{ISessionObserver}: the connection shell already
reports every event to its observer, so metrics cost one call per event; per
command a few integer additions (read by a collector at scrape time), per
session a few of prometheus_client's locked additions.  The figures live in a
registry of their own (not prometheus_client's global one), so several
servers (and tests) in one process do not collide; L{metrics_site} serves it
with prometheus_client's Twisted resource.

Every label value comes from a fixed set: listener names from the
configuration, C{plaintext}/C{tls}, the command table's keywords (anything
else is C{other}), login methods (USER, APOP, the SASL mechanisms, else
C{other}) and fixed result, refusal and failure kinds.  Never a user name or
an address.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.twisted import MetricsResource
from twisted.web.http import Request
from twisted.web.server import Site
from zope.interface import implementer

from popservice.interfaces import ISessionObserver
from popservice.sasl.server import MECHANISMS
from popservice.states import COMMANDS

#: login results: C{ok}, or why a login failed
LOGIN_RESULTS = ("ok", "auth", "in_use", "unavailable", "login_delay", "internal")
#: login methods (anything else: C{other})
LOGIN_METHODS = frozenset({"USER", "APOP", *MECHANISMS})
#: why a connection was refused at once: the per-address or the total cap, a graceful stop
REFUSAL_LIMITS = ("per_address", "total", "shutdown")
#: command labels: the table's keywords and C{other} (unknown, malformed or out-of-state lines)
COMMAND_LABELS = (*COMMANDS, "other")

#: seconds; most commands take well under a millisecond, RETR of a big message or PASS with a
#: failure delay seconds
COMMAND_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0)
SESSION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)

#: more listener names than this (they come from the configuration) are counted as C{other}
MAX_LISTENERS = 64


def new_registry() -> CollectorRegistry:
    """A registry of our own, with the process collector (CPU, memory, open files, start time)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


def _method(fields: Mapping[str, object]) -> str:
    method = fields.get("method")
    return method if isinstance(method, str) and method in LOGIN_METHODS else "other"


class _CommandStats:
    """One command's count and latency histogram, in plain numbers (the reactor thread only writes)."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.count = 0
        #: observations per bucket, not cumulative: [i] holds those <= COMMAND_BUCKETS[i] and above the
        #: previous bound; the last one those above every bound
        self.buckets = [0] * (len(COMMAND_BUCKETS) + 1)
        self.sum = 0.0


class _CommandCollector:
    """
    C{pop3_commands_total} and C{pop3_command_duration_seconds}, read from
    L{_CommandStats} at scrape time.  The per-command path is the hot one:
    there a few integer additions replace prometheus_client's locked values
    (a counter increment and a histogram observation cost ~2 us of locking
    and method calls per command, measured; this ~0.3 us).  The scrape runs
    in a thread: it copies each histogram's buckets in one step (atomic
    under the GIL) and derives the count from the copy, so a histogram is
    always self-consistent.
    """

    def __init__(self, stats: dict[str, _CommandStats]) -> None:
        self.stats = stats
        self.bounds = [repr(float(b)) for b in COMMAND_BUCKETS] + ["+Inf"]  # as prometheus_client writes them

    def collect(self) -> Iterator[Metric]:
        counts = CounterMetricFamily("pop3_commands", "Commands by keyword (other: unknown, malformed or not "
                                     "valid in the state)", labels=["command"])
        latency = HistogramMetricFamily(
            "pop3_command_duration_seconds", "From reading a command to its answer written (RETR/TOP: the "
            "whole body; PASS/APOP/AUTH: the login, failure delays included; QUIT: the deletions)",
            labels=["command"])
        for label, stats in self.stats.items():
            counts.add_metric([label], stats.count)
            if label == "other":
                continue
            buckets = list(stats.buckets)
            cumulative, total = [], 0
            for bound, n in zip(self.bounds, buckets, strict=True):
                total += n
                cumulative.append((bound, float(total)))
            latency.add_metric([label], cumulative, stats.sum)
        yield counts
        yield latency


class _ListenerMetrics:
    """The children of one listener's labelled metrics, resolved once."""

    __slots__ = ("active", "bytes", "duration", "refused", "sessions")

    def __init__(self, observer: MetricsObserver, label: str) -> None:
        #: indexed by TLS (False, True)
        self.active = (observer.sessions_active.labels(label, "plaintext"),
                       observer.sessions_active.labels(label, "tls"))
        self.sessions = (observer.sessions.labels(label, "plaintext"), observer.sessions.labels(label, "tls"))
        self.duration = observer.session_duration.labels(label)
        self.bytes = observer.bytes_sent.labels(label)
        self.refused = {limit: observer.refused.labels(label, limit) for limit in REFUSAL_LIMITS}


@implementer(ISessionObserver)
class MetricsObserver:
    """Session events into Prometheus metrics (see the module's docstring for the labels)."""

    def __init__(self, registry: CollectorRegistry | None = None, listeners: Iterable[str] = ()) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.sessions_active = Gauge(
            "pop3_sessions_active", "Connections being served (refused ones excluded), by listener and "
            "by TLS (implicit, or since STLS)", ["listener", "tls"], registry=r)
        self.sessions = Counter(
            "pop3_sessions", "Sessions ended, by listener and by TLS in use at the end", ["listener", "tls"],
            registry=r)
        self.session_duration = Histogram(
            "pop3_session_duration_seconds", "Session length, connect to disconnect", ["listener"],
            buckets=SESSION_BUCKETS, registry=r)
        self.refused = Counter(
            "pop3_connections_refused", "Connections refused at once (-ERR [SYS/TEMP]) by the per-address "
            "or the total connection cap, or during a graceful stop", ["listener", "limit"], registry=r)
        self.logins = Counter(
            "pop3_logins", "Logins by method (USER, APOP, SASL mechanism) and result (ok, auth, in_use, "
            "unavailable, login_delay, internal)", ["method", "result"], registry=r)
        self.in_use = Counter("pop3_in_use_refusals", "Logins answered -ERR [IN-USE] (mailbox locked)",
                              registry=r)
        self.takeovers = Counter("pop3_takeovers", "Idle sessions ended by a new login taking their mailbox "
                                 "over", registry=r)
        self.failure_delays = Counter("pop3_failure_delays", "Failed logins answered after a delay",
                                      registry=r)
        self.failure_delay_seconds = Counter("pop3_failure_delay_seconds", "Seconds of failure delays "
                                             "applied", registry=r)
        self.bytes_sent = Counter("pop3_sent_bytes", "Bytes written to clients (before TLS), counted at "
                                  "the end of each session", ["listener"], registry=r)
        self.retrieved = Counter("pop3_messages_retrieved", "Messages sent by RETR or TOP", ["command"],
                                 registry=r)
        self.retrieved_bytes = Counter("pop3_retrieved_bytes", "Message bytes sent by RETR or TOP (as "
                                       "transmitted, dot-stuffed, final dot included)", ["command"],
                                       registry=r)
        self.deleted = Counter("pop3_messages_deleted", "Messages removed at QUIT (UPDATE)", registry=r)
        self.deleted_bytes = Counter("pop3_deleted_bytes", "Sizes of the messages removed at QUIT",
                                     registry=r)
        self.expired = Counter("pop3_messages_expired", "Messages removed at login by RFC 2449 EXPIRE",
                               registry=r)
        self.update_failures = Counter("pop3_update_failures", "QUITs whose deletions failed", registry=r)
        #: by every label value, made here: the scrape's thread iterates this dict, so it never grows
        self.command_stats = {label: _CommandStats() for label in COMMAND_LABELS}
        r.register(_CommandCollector(self.command_stats))

        # Children by label values, resolved once (labels() takes a lock and builds a tuple).
        self._listeners: dict[object, _ListenerMetrics] = {}
        self._logins: dict[tuple[str, str], Any] = {}
        self._retrieved = [(count, size, self.retrieved.labels(command), self.retrieved_bytes.labels(command))
                           for command, count, size in (("RETR", "retr", "retr_bytes"),
                                                        ("TOP", "top", "top_bytes"))]
        for name in listeners:
            self._listener(name)
        for method in ("USER", "APOP"):
            for result in LOGIN_RESULTS:
                self._login(method, result)
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "command": self._on_command, "bad_command": self._on_bad_command,
            "connect": self._on_connect, "stls": self._on_stls, "logout": self._on_logout,
            "refused": self._on_refused, "login": self._on_login, "login_failed": self._on_login_failed,
            "login_delay": self._on_login_delay, "takeover": self._on_takeover, "expired": self._on_expired,
            "update_failed": self._on_update_failed,
        }
        #: the events wanted (L{popservice.server.events.Observers} sends only these)
        self.events = frozenset(self._handlers)

    # -- label children

    def _listener(self, name: object) -> _ListenerMetrics:
        children = self._listeners.get(name)
        if children is None:
            label = name if isinstance(name, str) and len(self._listeners) < MAX_LISTENERS else "other"
            children = self._listeners.get(label)
            if children is None:
                children = self._listeners[label] = _ListenerMetrics(self, label)
        return children

    def _login(self, method: str, result: str) -> Any:
        child = self._logins.get((method, result))
        if child is None:
            child = self._logins[method, result] = self.logins.labels(method, result)
        return child

    # -- ISessionObserver

    def event(self, name: str, session: object, **fields: Any) -> None:
        self.event_fields(name, session, fields)

    def event_fields(self, name: str, session: object, fields: dict[str, Any]) -> None:
        """L{event} without copying the fields (L{popservice.server.events.Observers} calls this)."""
        handler = self._handlers.get(name)
        if handler is not None:
            handler(fields)

    def _on_command(self, fields: dict[str, Any]) -> None:
        stats = self.command_stats.get(fields["command"]) or self.command_stats["other"]
        stats.count += 1
        seconds = fields["seconds"]
        stats.buckets[bisect_left(COMMAND_BUCKETS, seconds)] += 1
        stats.sum += seconds

    def _on_bad_command(self, fields: dict[str, Any]) -> None:
        self.command_stats["other"].count += 1

    def _on_connect(self, fields: dict[str, Any]) -> None:
        self._listener(fields.get("listener")).active[bool(fields.get("tls"))].inc()

    def _on_stls(self, fields: dict[str, Any]) -> None:
        active = self._listener(fields.get("listener")).active
        active[0].dec()
        active[1].inc()

    def _on_logout(self, fields: dict[str, Any]) -> None:
        children = self._listener(fields.get("listener"))
        tls = bool(fields.get("tls"))
        children.active[tls].dec()
        children.sessions[tls].inc()
        children.duration.observe(fields.get("seconds") or 0.0)
        children.bytes.inc(fields.get("bytes_out") or 0)
        for count, size, messages, octets in self._retrieved:
            if fields.get(count):
                messages.inc(fields[count])
                octets.inc(fields.get(size) or 0)
        if fields.get("deleted"):
            self.deleted.inc(fields["deleted"])
            self.deleted_bytes.inc(fields.get("deleted_bytes") or 0)

    def _on_refused(self, fields: dict[str, Any]) -> None:
        limit = fields.get("limit")
        self._listener(fields.get("listener")).refused[limit if limit in REFUSAL_LIMITS else "total"].inc()

    def _on_login(self, fields: dict[str, Any]) -> None:
        self._login(_method(fields), "ok").inc()

    def _on_login_failed(self, fields: dict[str, Any]) -> None:
        reason = fields.get("reason", "auth")
        if reason not in LOGIN_RESULTS or reason == "ok":
            reason = "internal"
        self._login(_method(fields), reason).inc()
        if reason == "in_use":
            self.in_use.inc()
        delay = fields.get("delay")
        if delay:
            self.failure_delays.inc()
            self.failure_delay_seconds.inc(delay)

    def _on_login_delay(self, fields: dict[str, Any]) -> None:
        self._login(_method(fields), "login_delay").inc()

    def _on_takeover(self, fields: dict[str, Any]) -> None:
        self.takeovers.inc()

    def _on_expired(self, fields: dict[str, Any]) -> None:
        self.expired.inc(fields.get("count") or 0)

    def _on_update_failed(self, fields: dict[str, Any]) -> None:
        self.update_failures.inc()


class MetricsSite(Site):
    """The metrics resource on every path (C{/metrics} too); scrapes are not logged."""

    def log(self, request: Request) -> None:
        pass


def metrics_site(registry: CollectorRegistry) -> MetricsSite:
    """An HTTP site serving C{registry} in the Prometheus text format (rendered in the reactor's threads)."""
    return MetricsSite(MetricsResource(registry))  # type: ignore[no-untyped-call]
