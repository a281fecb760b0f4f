"""Prometheus metrics of a verification server and of a board (`--metrics-port`).

Each component gets its own `CollectorRegistry` rather than prometheus-client's global one, so
several components in one process (the local fleet, tests) keep their figures apart, and a
component's endpoint shows only its own metrics. Which server or board a series belongs to is
the scrape target's `instance` label, as for any exporter.

The hot path pays one call per batch or per verdict: counters and histograms are plain
in-memory increments. Gauges that mirror state another object already holds (sessions, queue
depth, active requests) are read at scrape time through a callback instead of being set on
every change.

Error reasons become label values, so they must come from a closed set of codes (the protocol's
error codes, `busy`, `resync`, ...), never from free text.
"""

from collections.abc import Callable
from dataclasses import dataclass
from threading import Thread
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Verification time of one batched forward pass: a few ms on a GPU, up to seconds on CPU.
VERIFY_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Board round trip (publish a draft -> verdict back): verification plus two broker hops.
ROUND_TRIP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Drafted tokens accepted per verdict: 0..k_max (MAX_DRAFT_TOKENS caps k at 64).
ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64)


class ServerMetrics:
    """What a verification server exposes; `VerificationService` calls the `record_*` methods.

    Without a registry it records into a private one nobody serves, so the service can always
    call it instead of testing whether metrics are on."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.sessions = Gauge("fleet_server_sessions", "Sessions open on this server.", registry=registry)
        self.queue_depth = Gauge(
            "fleet_server_queue_depth", "Messages received and not yet handled by the scheduler.", registry=registry
        )
        self.batch_size = Histogram(
            "fleet_server_batch_size", "Sessions verified together in one forward pass.",
            buckets=BATCH_SIZE_BUCKETS, registry=registry,
        )
        self.verify_seconds = Histogram(
            "fleet_server_verify_seconds", "Wall time of one batched verification.",
            buckets=VERIFY_SECONDS_BUCKETS, registry=registry,
        )
        self.accepted_length = Histogram(
            "fleet_server_accepted_length", "Drafted tokens accepted per verdict.",
            buckets=ACCEPTED_BUCKETS, registry=registry,
        )
        self.drafted_tokens = Counter(
            "fleet_server_drafted_tokens", "Drafted tokens verified (acceptance rate = accepted / drafted).", registry=registry
        )
        self.committed_tokens = Counter(
            "fleet_server_committed_tokens", "Tokens committed by verdicts (accepted plus the target's token).",
            registry=registry,
        )
        self.errors = Counter(
            "fleet_server_errors", "Drafts refused or sessions ended with an error verdict, by code.", ["reason"],
            registry=registry,
        )

    def track_load(self, sessions: Callable[[], int], queue_depth: Callable[[], int]) -> None:
        """Read the open sessions and the inbox length at scrape time."""
        self.sessions.set_function(sessions)
        self.queue_depth.set_function(queue_depth)

    def record_batch(self, batch_size: int, verify_s: float) -> None:
        self.batch_size.observe(batch_size)
        self.verify_seconds.observe(verify_s)

    def record_verdict(self, drafted: int, accepted: int, committed: int) -> None:
        """One verdict that committed tokens (error verdicts go to `record_error`)."""
        self.accepted_length.observe(accepted)
        self.drafted_tokens.inc(drafted)
        self.committed_tokens.inc(committed)

    def record_error(self, reason: str) -> None:
        self.errors.labels(reason=reason).inc()


class DeviceMetrics:
    """What a board exposes; `BoardAgent` and its generations call the `record_*` methods
    (into a private, unserved registry when none is given, as for `ServerMetrics`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.active_requests = Gauge(
            "fleet_device_active_requests", "Generation requests being served.", registry=registry
        )
        self.drafted_tokens = Counter("fleet_device_drafted_tokens", "Tokens drafted and sent.", registry=registry)
        self.accepted_tokens = Counter(
            "fleet_device_accepted_tokens", "Drafted tokens the server accepted.", registry=registry
        )
        self.committed_tokens = Counter(
            "fleet_device_committed_tokens", "Tokens committed to generations on this board.", registry=registry
        )
        self.pipelined_tokens = Counter(
            "fleet_device_pipelined_tokens",
            "Drafted tokens sent that were drafted ahead while the previous verdict was in flight.",
            registry=registry,
        )
        self.round_trip_seconds = Histogram(
            "fleet_device_round_trip_seconds", "Draft published -> verdict received.",
            buckets=ROUND_TRIP_SECONDS_BUCKETS, registry=registry,
        )
        self.errors = Counter(
            "fleet_device_errors", "Requests refused, resyncs and failed generations, by reason.", ["reason"],
            registry=registry,
        )

    def track_active(self, active_requests: Callable[[], int]) -> None:
        """Read the number of requests in service at scrape time."""
        self.active_requests.set_function(active_requests)

    def record_verdict(self, drafted: int, accepted: int, committed: int, pipelined: int = 0) -> None:
        """One verdict applied to a generation (`pipelined` of the drafted tokens were
        drafted ahead)."""
        self.drafted_tokens.inc(drafted)
        self.pipelined_tokens.inc(pipelined)
        self.accepted_tokens.inc(accepted)
        self.committed_tokens.inc(committed)

    def record_round_trip(self, seconds: float) -> None:
        """One draft published -> its verdict received."""
        self.round_trip_seconds.observe(seconds)

    def record_error(self, reason: str) -> None:
        self.errors.labels(reason=reason).inc()


ComponentMetrics = TypeVar("ComponentMetrics", ServerMetrics, DeviceMetrics)


@dataclass
class MetricsServer:
    """A running `/metrics` endpoint; `close()` frees the port (tests start many)."""

    httpd: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}/metrics"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def serve_metrics(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> MetricsServer:
    """Serve `registry` on http://host:port/metrics from a daemon thread; port 0 picks a free
    one (read it back from `.port`). Binds every interface by default, as Prometheus scrapes
    from another machine; pass host="127.0.0.1" to keep it local."""
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(httpd, thread)


def serve_component_metrics(
    kind: type[ComponentMetrics], port: int, host: str = "0.0.0.0"
) -> tuple[ComponentMetrics, MetricsServer]:
    """New `ServerMetrics` or `DeviceMetrics` on their own registry, served on `port`; raises
    OSError when the port is taken."""
    metrics = kind(CollectorRegistry())
    return metrics, serve_metrics(port, metrics.registry, host)
