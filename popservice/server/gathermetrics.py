"""
C{--metrics} with C{--workers N}: the parent serves one endpoint for all.

Each worker serves its own metrics (L{popservice.server.metrics}) on a unix
socket in the runtime directory (L{worker_endpoint}, mode 0600): a
connection gets the exposition text, then the end (L{ExpositionFactory}, no
HTTP).  At each scrape the parent reads every worker's (at most L{SCRAPE_TIMEOUT} seconds,
all at once) and answers with every family once, each sample labelled with
the C{worker} it came from, plus the parent's own process metrics as
C{worker="0"}.  Samples are not summed: a worker started again starts its
counters from zero, which Prometheus sees as a reset of that worker's
series only (C{sum by (...) (rate(...))} gives the totals).  A worker that
does not answer is missing from that scrape, and
C{popservice_workers_scraped} says how many answered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from popservice.server.metrics import MetricsSite

__all__ = ["SCRAPE_TIMEOUT", "ExpositionFactory", "GatheredMetrics", "gathered_site", "merge",
           "read_exposition", "worker_endpoint", "worker_socket"]

log = Logger(namespace="popservice.workers")

#: seconds the parent waits for a worker's metrics
SCRAPE_TIMEOUT = 5.0


def worker_socket(runtime_dir: str, index: int) -> str:
    """The path of worker C{index}'s metrics socket."""
    return os.path.join(runtime_dir, "metrics-%d.sock" % (index,))


def worker_endpoint(runtime_dir: str, index: int) -> str:
    """The C{--metrics} endpoint string of worker C{index} (a stale socket of a killed one is replaced)."""
    path = worker_socket(runtime_dir, index).replace("\\", "\\\\").replace(":", "\\:")
    return "unix:%s:mode=600:lockfile=1" % (path,)


def merge(texts: Iterable[tuple[str, str]]) -> list[Metric]:
    """
    The families of several expositions (C{(worker, text)} pairs), each
    family once, its samples labelled with their C{worker}.
    """
    families: dict[str, Metric] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
            for sample in family.samples:
                merged.samples.append(Sample(sample.name, {**sample.labels, "worker": worker}, sample.value,
                                             sample.timestamp, sample.exemplar))
    return list(families.values())


class _Exposition(protocol.Protocol):
    def connectionMade(self) -> None:
        factory: Any = self.factory
        assert self.transport is not None
        self.transport.write(generate_latest(factory.registry))
        self.transport.loseConnection()


class ExpositionFactory(protocol.Factory):
    """A worker's side: each connection gets C{registry}'s exposition, then the end."""

    protocol = _Exposition
    noisy = False

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry


class _Reader(protocol.Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.done: defer.Deferred[str] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.done.callback(b"".join(self.received).decode("utf-8"))


class _ReaderFactory(protocol.Factory):
    noisy = False

    def buildProtocol(self, addr: Any) -> _Reader:
        return _Reader()


def read_exposition(reactor: Any, path: str, timeout: float = SCRAPE_TIMEOUT) -> defer.Deferred[str]:
    """The parent's side: the exposition text served on the unix socket C{path}."""
    endpoint = UNIXClientEndpoint(reactor, path, timeout=max(1, int(timeout)))

    def read(reader: _Reader) -> defer.Deferred[str]:
        return reader.done

    d: defer.Deferred[Any] = endpoint.connect(_ReaderFactory())
    d.addCallback(read)
    d.addTimeout(timeout, reactor)
    return d


class _Families:
    """A collector yielding the families it was made with."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class GatheredMetrics(Resource):
    """
    The parent's metrics resource (every path): the workers' metrics, asked
    at each scrape of C{sockets()} (worker label -> socket path).
    """

    isLeaf = True

    def __init__(self, sockets: Callable[[], dict[str, str]], reactor: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor
        self.reactor: Any = reactor
        self.sockets = sockets
        self._own = CollectorRegistry()
        ProcessCollector(registry=self._own)

    def gather(self) -> defer.Deferred[bytes]:
        """The exposition of every worker that answers, and of this process."""
        sockets = sorted(self.sockets().items())
        asked = [read_exposition(self.reactor, path) for _, path in sockets]

        def render(results: list[tuple[bool, Any]]) -> bytes:
            texts = [("0", generate_latest(self._own).decode("utf-8"))]
            for (worker, _), (ok, result) in zip(sockets, results, strict=True):
                if ok:
                    texts.append((worker, result))
                else:
                    log.warn("metrics of worker {worker} not read: {why}", worker=int(worker),
                             why=result.getErrorMessage())
            scraped = GaugeMetricFamily("popservice_workers_scraped", "Workers whose metrics this scrape has")
            scraped.add_metric([], len(texts) - 1)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Families([*merge(texts), scraped]))
            return generate_latest(registry)

        gathered: defer.Deferred[list[tuple[bool, Any]]] = defer.DeferredList(asked, consumeErrors=True)
        return gathered.addCallback(render)

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))

        def write(body: bytes) -> None:
            if not request.finished and not request._disconnected:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            log.failure("metrics scrape failed", failure)
            if not request.finished and not request._disconnected:
                request.setResponseCode(500)
                request.finish()

        self.gather().addCallback(write).addErrback(failed)
        return NOT_DONE_YET


def gathered_site(sockets: Callable[[], dict[str, str]]) -> Site:
    """The parent's metrics site (every path serves L{GatheredMetrics}; scrapes are not logged)."""
    return MetricsSite(GatheredMetrics(sockets))  # type: ignore[no-untyped-call]
