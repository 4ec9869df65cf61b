"""Every Prometheus metric recserve exports, defined once.

Names carry their unit (`_seconds`, `_bytes`, `_total`); labels hold only
bounded values (method, status code, configured model names, arms), never a
user or item id. Process memory and CPU come from prometheus_client's default
process collector (`process_resident_memory_bytes`, ...). This module imports
nothing of the project, so anything may import it.
"""

from __future__ import annotations

import bisect
import os
from collections import deque
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# 100 us .. 10 s, roughly x2.5 per step.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


# Seconds between two applications of the buffered per-request updates.
FLUSH_SECONDS = 0.1


def serve_http(port: int, registry: CollectorRegistry) -> Any:
    """prometheus_client's /metrics server on `port` (all interfaces); an
    OSError naming the setting when the port cannot be bound (it said only
    "[Errno 98] Address already in use", which read as the gRPC port's)."""
    from prometheus_client import start_http_server

    try:
        return start_http_server(port, registry=registry)
    except OSError as exc:
        raise OSError(f"metrics_port: cannot bind port {port} ({exc.strerror or exc})") from None


def multiprocess() -> bool:
    """Whether prometheus_client writes values to files (`--workers N`)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class _Pending:
    """Per-request metric updates, applied in aggregate by `flush`.

    prometheus_client takes a lock per value: a histogram observation costs
    about 2 us (4.5 us with --workers, where every value is a write to a mapped
    file), and a request records about ten. Here a request only appends to a
    deque (thread-safe); `flush` sums counter increments per child and counts
    histogram observations per bucket, then writes each touched value once.
    Metrics.flush runs before every scrape of this process's registry and
    every FLUSH_SECONDS from the server (the only path with --workers)."""

    def __init__(self) -> None:
        self._queue: deque[tuple[Any, float, bool]] = deque()

    def add(self, child: Any, value: float, histogram: bool) -> None:
        self._queue.append((child, value, histogram))

    def __len__(self) -> int:
        return len(self._queue)

    def flush(self) -> None:
        counts: dict[Any, float] = {}
        observed: dict[Any, list[float]] = {}
        take = self._queue.popleft
        while True:
            try:
                child, value, histogram = take()
            except IndexError:
                break
            if histogram:
                observed.setdefault(child, []).append(value)
            else:
                counts[child] = counts.get(child, 0.0) + value
        for child, amount in counts.items():
            child.inc(amount)
        for child, values in observed.items():
            observe_many(child, values)


def observe_many(child: Any, values: list[float]) -> None:
    """`child.observe(v)` for each value, writing each bucket and the sum once.

    Uses the histogram child's value objects (prometheus_client keeps them in
    `_upper_bounds`, `_buckets`, `_sum` since its first releases); without
    them it falls back to one observe() per value. tests/test_metrics.py checks
    that both give the same exposition."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            child.observe(v)
        return
    per_bucket = [0] * len(bounds)
    for v in values:  # the first bucket whose upper bound is >= v, as observe()
        per_bucket[bisect.bisect_left(bounds, v)] += 1
    total.inc(sum(values))
    for value, n in zip(buckets, per_bucket, strict=True):
        if n:
            value.inc(n)


class _Child:
    """A labelled child whose observe()/inc() are queued on `_Pending`."""

    __slots__ = ("_pending", "child")

    def __init__(self, child: Any, pending: _Pending) -> None:
        self.child = child
        self._pending = pending

    def observe(self, value: float) -> None:
        self._pending.add(self.child, value, True)

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._pending.add(self.child, amount, False)


class _Children:
    """A labelled metric whose children are looked up once per label set and
    whose updates are queued (see _Pending).

    prometheus_client's labels() validates and locks on every call; the serving
    path records about ten labelled values per request, so it keeps the
    children in a dict. Label sets are bounded (see the module docstring), and
    everything else (remove, collect) goes to the metric itself."""

    __slots__ = ("_children", "_pending", "metric")

    def __init__(self, metric: Any, pending: _Pending) -> None:
        self.metric = metric
        self._pending = pending
        self._children: dict[tuple[str, ...], _Child] = {}

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Child(self.metric.labels(*values), self._pending)
        return child

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


class _FlushFirst:
    """A collector that yields nothing and applies the queued updates: registered
    before every metric, so a scrape of this registry sees every finished call."""

    def __init__(self, pending: _Pending) -> None:
        self._pending = pending

    def collect(self) -> list:
        self._pending.flush()
        return []

    def describe(self) -> list:
        return []


class Metrics:
    """The service's metrics on one registry (tests use a fresh one each).

    Gauges carry a multiprocess mode for `recserve serve --workers N`
    (prometheus_client's multi-process mode, set up by the launcher): in-flight
    calls and process memory add up over live workers; model gauges take the
    live workers' maximum (each worker maps the same files).
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.pending = _Pending()
        registry.register(_FlushFirst(self.pending))
        self.rpc_seconds = Histogram(
            "recserve_rpc_duration_seconds",
            "RPC duration over the whole response stream, by method and status code",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_item_seconds = Histogram(
            "recserve_time_to_first_item_seconds",
            "Time from request to the first ranked item sent (for unary Recommend: the answer)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "recserve_stage_duration_seconds",
            "Time per serving stage: resolve (user, history, ids), retrieve (the model's "
            "top-k), rank (blend, explanations, uncertainty)",
            ["method", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "recserve_requests_total",
            "Answered requests by asked model, the model that served them and experiment arm",
            ["method", "model", "served_by", "arm"],
            registry=registry,
        )
        self.items = Counter(
            "recserve_returned_items_total",
            "Ranked items returned to callers, unary answers and streams alike",
            ["method"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "recserve_fallbacks_total",
            "Requests another model answered, by the model asked (after experiments) and "
            "the model that answered",
            ["from_model", "to_model"],
            registry=registry,
        )
        self.fold_ins = Counter(
            "recserve_fold_ins_total",
            "Requests where a model folded the user in from a history",
            ["model"],
            registry=registry,
        )
        self.assignments = Counter(
            "recserve_experiment_assignments_total",
            "Experiment arm assignments",
            ["experiment", "arm"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "recserve_batch_size",
            "Plain Recommend calls scored together by dynamic batching, per model",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.rejected = Counter(
            "recserve_rejected_requests_total",
            "Requests refused before any work, by cause (OVERLOADED: max_concurrency; "
            "QUEUE: the loop late; ACCEPT_QUEUE: waited in gRPC's queue; HEAVY: a bulk "
            "call while shedding; DEADLINE: "
            "cannot finish in time; DRAINING; TOKEN_MISSING, TOKEN_INVALID)",
            ["method", "reason"],
            registry=registry,
        )
        self.feedback_events = Counter(
            "recserve_feedback_events_total",
            "Recorded feedback events by outcome (accepted, rejected)",
            ["outcome"],
            registry=registry,
        )
        self.feedback_up = Gauge(
            "recserve_feedback_store_up",
            "1 while the feedback store answers; 0 while it cannot be reached "
            "(RecordInteractions is refused with UNAVAILABLE, answers use what was applied)",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.refused_versions = Counter(
            "recserve_refused_versions_total",
            "Published model versions a reload refused (corrupt, unreadable, over the memory "
            "budget); the previous version kept serving",
            ["model"],
            registry=registry,
        )
        self.online_users = Gauge(
            "recserve_online_users",
            "Users with recorded events held in memory (each worker holds the same)",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.online_events = Gauge(
            "recserve_online_events",
            "Recorded events held in memory over all users (bounded by online_max_events)",
            registry=registry,
            multiprocess_mode="livemax",
        )
        # A gauge, not a counter: every worker drops the same users, and a
        # multi-process counter would add them up once per worker.
        self.online_evicted = Gauge(
            "recserve_online_evicted_users",
            "Users whose recorded events were dropped from memory for online_max_events "
            "since the process started (least recently active first; the feedback log "
            "keeps the events)",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.config_reload_ok = Gauge(
            "recserve_config_last_reload_successful",
            "1 if the last reload read the config file (and hybrids.json) cleanly; 0 if it "
            "could not, and the config loaded before is still in use",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.inflight = Gauge(
            "recserve_inflight_requests",
            "Recommender RPCs at work, as max_concurrency counts them",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.model_serving = Gauge(
            "recserve_model_serving",
            "1 when the model is loaded and serving, else 0",
            ["model"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.model_info = Gauge(
            "recserve_model_info",
            "1 for the serving version of each model",
            ["model", "algorithm", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.model_load_seconds = Gauge(
            "recserve_model_load_seconds",
            "Seconds the serving version took to load",
            ["model"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.model_bytes = Gauge(
            "recserve_model_bytes",
            "Bytes of each bundle file of a serving model: mapped (file size) and resident "
            "(pages of it in this process's memory)",
            ["model", "component", "kind"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.workers = Gauge(
            "recserve_worker_processes",
            "Serving processes (1 each; summed over live workers)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.resident_bytes = Gauge(
            "recserve_process_resident_memory_bytes",
            "Resident memory of the serving process(es); shared mapped pages count once per "
            "process",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.proportional_bytes = Gauge(
            "recserve_process_proportional_memory_bytes",
            "Proportional set size (shared pages split between the processes mapping them): "
            "sums correctly over worker processes",
            registry=registry,
            multiprocess_mode="livesum",
        )
        # Recorded on every request: cached children, queued updates (see _Children).
        for name in (
            "rpc_seconds",
            "first_item_seconds",
            "stage_seconds",
            "requests",
            "items",
            "fallbacks",
            "fold_ins",
            "assignments",
        ):
            setattr(self, name, _Children(getattr(self, name), self.pending))

    def flush(self) -> None:
        """Apply the queued per-request updates now (the server calls it every
        FLUSH_SECONDS and when it stops)."""
        self.pending.flush()
