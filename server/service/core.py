"""The request core: each RPC's semantics once, in plain Python (no grpc).

A transport (grpc_aio, grpc_threads) turns a gRPC call into a `Call` (deadline,
cancellation, metadata, peer) and a parsed request, calls the core, and turns
the answer into bytes or a stream, and a `Failure` into a status. Everything
else happens here: admission (one counter, fail fast), authorization, request
validation, routing, ranking, the answer and its metadata, and the metrics of
every call, recorded once by the call's `Session` with its final status.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from recserve import contract
from recserve.config import (
    HYBRID_PRIOR,
    LIVE,
    USER_PRIOR,
    ConfigError,
    Experiment,
    Hybrid,
    ServerConfig,
    reread,
)
from recserve.data import MAX_VALUE
from recserve.feedback import (
    Event,
    FeedbackStore,
    FeedbackUnavailable,
    OnlineState,
    RedisFeedbackStore,
    now,
)
from recserve.metrics import Metrics
from recserve.metrics import multiprocess as metrics_multiprocess
from recserve.service import auth, convert
from recserve.serving import (
    MAX_ID_BYTES,
    Catalog,
    Prediction,
    Ranked,
    RecQuery,
    RequestError,
    Router,
    Slot,
)
from recserve.v1 import recommender_pb2 as pb

log = logging.getLogger("recserve.service")

CHECK_EVERY = 64  # streamed items between cancellation checks
FEEDBACK_BATCH = 1000  # events committed together by RecordInteractions
LIST_PAGE, LIST_PAGE_MAX = 100, 1000  # ListModels page sizes: default, largest
MAX_EVENT_ID_BYTES = 128
# The RetryInfo delay of a draining refusal: long enough for the client's next
# attempt to find another replica (a 0 ms gRPC pushback made grpc-python's retry
# wait out the whole deadline against a stopping server, measured).
DRAIN_RETRY_MS = 100
# The loop thread's least CPU share (CPU seconds per wall second between two
# probes) for a late probe to count as calls backing up (queue_budget_ms).
LOOP_BUSY = 0.3
# Accept-queue shedding (asyncio): the loop counts as saturated while it spent
# less than this share of a probe window waiting for events.
SATURATED_IDLE = 0.05
# ...and for this long after such a window: refusing fast gives the loop brief
# idle moments, which must not let the next long-waiting calls be computed.
SATURATION_HOLD_S = 0.1
# How long a peer's deadline high-water mark is remembered (two such windows).
PEAK_WINDOW_S = 10.0
# While the server sheds other calls (an accept-queue or queue refusal of a
# non-bulk call in the last SHED_HEAVY_S), bulk calls are refused first: a
# RecommendBatch costs a dozen Recommends and takes a loop turn per request,
# turns the loop needs to take in and refuse the calls queued behind it
# (the mix at 2x its maximum, 1 s deadlines: goodput 0.06-0.17 of the maximum
# with batches admitted, and some calls expired; 0.28-0.41 and none expired).
SHED_HEAVY_S = 1.0
HEAVY = frozenset({"RecommendBatch"})
TIMEOUT_ROUNDING = 0.01  # gRPC's timeout header's rounding, relative
ACCEPT_WAIT_SHARE = 0.25  # of its deadline, the longest a call may wait to be accepted
DEADLINE_CLASSES = 2.0  # this many times a peer's unqueued time left: another deadline
NO_DEADLINE_S = 1e7  # more time left than this: the call has no deadline
# Deadline-aware shedding reads a method's pace from its recent answers: a low
# quantile of the last PACE_SAMPLES, so that one heavy call (k=1000 with
# explanations, a long history: 90 ms where most take 1) does not make every
# short-deadline call look hopeless. A pace no answer has renewed for
# PACE_STALE_S (or four times the pace) is dropped: refused calls add no
# answers, so an old pace would otherwise refuse a short-deadline client for
# good (an average of the answers did: one 87 ms call, then every call with a
# 6 ms deadline refused, without end).
PACE_SAMPLES = 32
PACE_QUANTILE = 0.1
PACE_MIN = 4  # answers needed before the pace is trusted
PACE_STALE_S = 1.0

Metadata = tuple[tuple[str, str], ...]


class Code(enum.IntEnum):
    """The status of an answer: gRPC's codes, by number; transports map them by name."""

    OK = 0
    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class Failure(Exception):
    """A call answered with a non-OK status and the details the transports put
    in its google.rpc.Status: `reason` (recserve.contract.REASONS), the offending
    `field`, every field violation, ErrorInfo metadata, and a retry delay."""

    def __init__(
        self,
        code: Code,
        message: str,
        field: str = "",
        reason: str = "",
        violations: Sequence[tuple[str, str]] = (),
        info: dict[str, str] | None = None,
        retry_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.reason = reason or _REASON_OF_CODE.get(code, "INTERNAL_ERROR")
        if self.reason not in contract.REASONS:
            raise ValueError(f"unlisted error reason {self.reason!r}")
        self.violations = list(violations)
        self.info = dict(info or {})
        if field and "field" not in self.info:
            self.info["field"] = field
        self.retry_ms = retry_ms


_REASON_OF_CODE = {
    Code.DEADLINE_EXCEEDED: "DEADLINE_PASSED",
    Code.INVALID_ARGUMENT: "MALFORMED_REQUEST",
    Code.INTERNAL: "INTERNAL_ERROR",
    Code.CANCELLED: "INTERNAL_ERROR",  # never sent: the caller went away
}


class Call(Protocol):
    """What the core needs of a transport's call. The names are grpc.aio's
    ServicerContext's, so that transport passes its context as it is."""

    def time_remaining(self) -> float | None:
        """Seconds until the deadline, or None without one."""

    def cancelled(self) -> bool:
        """True once the client went away."""

    def invocation_metadata(self) -> Iterable[tuple[str, Any]] | None:
        """The request's metadata (key, value) pairs."""

    def peer(self) -> str:
        """The peer as gRPC names it (ipv4:1.2.3.4:5, ipv6:[::1]:5, unix:...)."""


class Session:
    """One admitted call, from admission to its final status, recorded once.

    Use as a context manager around the call's work. An exception leaving it
    becomes a `Failure` (an unexpected one is logged and answered INTERNAL), a
    BaseException (the client went away) counts as CANCELLED. On success the
    admission slot is released at once and the metrics are recorded by `defer`
    (the asyncio transport runs them after the answer is handed to gRPC)."""

    __slots__ = ("call", "core", "defer", "held", "method", "ranked", "sent", "t0", "t1")

    def __init__(
        self, core: Core, method: str, call: Call, t0: float, defer: Callable[..., Any] | None
    ) -> None:
        self.core, self.method, self.call, self.t0, self.defer = core, method, call, t0, defer
        self.ranked: Ranked | None = None  # the answer's ranking (unary Recommend)
        self.sent = 0  # items streamed
        self.t1 = 0.0
        self.held = True  # holds its admission slot (see pause)

    def pause(self) -> None:
        """Give the admission slot back while the call only waits: for its
        client's next message, or for its client to read what it was sent. An
        open stream is not work in flight; counted as such, 64 idle feedback
        or batch streams refused every other call (max_concurrency). The
        asyncio transport pauses its streams; on the thread-pool server a
        stream holds a worker thread while open, so it keeps its slot too (a
        call beyond the threads is refused at once instead of queued)."""
        if self.held:
            self.held = False
            self.core.release()

    def resume(self) -> None:
        """Take the slot back to work on a message. Never refused: the call was
        admitted, and its work is one message's."""
        if not self.held:
            self.held = True
            self.core.retake()

    def check(self) -> None:
        """Raise Failure once the client cancelled or its deadline passed."""
        remaining = self.call.time_remaining()
        if remaining is not None and remaining <= 0:
            raise Failure(
                Code.DEADLINE_EXCEEDED, "deadline passed before the answer", "", "DEADLINE_PASSED"
            )
        if self.call.cancelled():
            raise Failure(Code.CANCELLED, "client cancelled")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb) -> bool:
        core = self.core
        if kind is None:
            self.t1 = time.perf_counter()
            if self.held:
                self.held = False
                core.release()
            if self.defer is not None:
                self.defer(core.record_ok, self)
            else:
                core.record_ok(self)
            return False
        if isinstance(exc, Exception):
            failure = core.failure(self.method, exc)
            core.finish(self, failure.code.name)
            if failure is not exc:
                raise failure from None
            return False
        # GeneratorExit, asyncio.CancelledError: the caller went away, or its
        # deadline passed (grpc.aio cancels the handler for both)
        remaining = self.call.time_remaining()
        core.finish(
            self, "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        )
        return False


@dataclass(slots=True)
class Plan:
    """A plain Recommend resolved for dynamic batching: requests with the same
    `key` (model, version, k, filter_seen) can be scored in one batched call."""

    key: tuple[str, str, int, bool]
    slot: Slot
    q: RecQuery
    user: int
    stages: dict[str, float]
    request_id: str


class Pace:
    """A method's recent answer times (seconds) and the pace deadline-aware
    shedding compares a new call's time left with (see PACE_QUANTILE)."""

    __slots__ = ("at", "n", "times", "value")

    def __init__(self) -> None:
        self.times = [0.0] * PACE_SAMPLES
        self.n = 0  # answers recorded since the last reset
        self.at = 0.0  # monotonic time of the last answer
        self.value = 0.0  # the pace; 0.0: none yet

    def add(self, took: float, now: float) -> None:
        """Record one answer's time (thread-safe enough: a lost update under a
        race only drops one sample)."""
        if self.n and self.stale(now):
            self.n, self.value = 0, 0.0  # a new episode: the old answers say nothing
        self.times[self.n % PACE_SAMPLES] = took
        self.n += 1
        self.at = now
        if self.n >= PACE_MIN:
            recent = sorted(self.times[: min(self.n, PACE_SAMPLES)])
            self.value = recent[int(PACE_QUANTILE * (len(recent) - 1))]

    def stale(self, now: float) -> bool:
        """No answer has renewed the pace for long enough that it may no longer hold."""
        return now - self.at > max(PACE_STALE_S, 4 * self.value)

    def now(self, now: float) -> float:
        """The pace to judge a call by at `now`: 0.0 when there is none to trust."""
        return 0.0 if self.stale(now) else self.value


class Core:
    """The semantics of every recserve.v1 RPC over a catalogue, router and feedback."""

    def __init__(
        self,
        cfg: ServerConfig,
        catalog: Catalog,
        router: Router,
        online: OnlineState,
        store: FeedbackStore | RedisFeedbackStore,
        metrics: Metrics,
    ) -> None:
        self.cfg, self.catalog, self.router = cfg, catalog, router
        self.online, self.store, self.metrics = online, store, metrics
        # Admitted calls still running: at most max_concurrency; the drain waits for them.
        self.active = 0
        self._active_lock = threading.Lock()
        self.draining = False
        self.last_call = 0.0  # monotonic time of the last call that asked for a slot
        # Before this no call could wait in gRPC's queue (the server starts later).
        self.created = time.monotonic()
        self._paces: dict[str, Pace] = {}  # recent answer times, by method
        # Queue-time admission (asyncio): since when calls have waited for the loop
        # longer than the budget (0.0: they do not), fed by note_wait.
        self._budget = cfg.queue_budget_ms / 1000
        self._backlog_since = 0.0
        # Accept-queue shedding (asyncio): grpc.aio takes in one new call per loop
        # turn, so past capacity calls wait inside gRPC, where no probe sees them.
        # What a call's deadline has lost before admission, against the most its
        # peer's calls of that method had left lately, is that wait. Used only
        # while the loop is saturated (never waiting for events): a lower
        # remaining time then is queueing, not a client with a shorter deadline.
        self._saturated_until = 0.0  # monotonic time until which the loop counts as saturated
        # The monotonic time the loop last found nothing to do (a select that
        # timed out without events; the asyncio transport sets it): no call can
        # have waited in gRPC's queue since before then. None: not known.
        self.quiet_at: Callable[[], float] | None = None
        # Judges the loop's probe window still open, as its probe would (calling
        # note_idle), when that window has outlasted its length: the loop has
        # run callbacks without a probe since. None: no such judge.
        self.judge_open_window: Callable[[], None] | None = None
        # Called after ReloadModels has reloaded this process. A worker of `serve
        # --workers N` sets it to ask the launcher to pass the reload on to every
        # worker (SIGHUP): the call reaches one worker, and the others went on
        # serving the old versions.
        self.after_reload: Callable[[], None] | None = None
        # Called with the names of hybrids and experiments a reload removed, after
        # it swapped in the config read again (the App refreshes health).
        self.on_config: Callable[[list[str]], None] | None = None
        self.metrics.config_reload_ok.set(1)  # the config this process started with
        self._reload_lock = threading.Lock()  # Admin and SIGHUP may reload at once
        self._shed_at = -SHED_HEAVY_S  # monotonic time of the last such refusal of a cheap call
        # (peer, method) -> most seconds left at admission, this window and the one before
        self._peak: dict[tuple[str, str], float] = {}
        self._peak_old: dict[tuple[str, str], float] = {}
        self._peak_until = 0.0
        # (peer, method) whose deadlines vary (see _waited), this window and the one before
        self._varied: set[tuple[str, str]] = set()
        self._varied_old: set[tuple[str, str]] = set()
        self._calm: dict[tuple[str, str], float] = {}  # like _peak, unsaturated calls only
        self._calm_old: dict[tuple[str, str], float] = {}
        self._seen_changes: int | None = None  # the feedback log's counter at the last sync
        # In flight: read at scrape time from `active`, except with --workers, where
        # each process writes its count to its metrics file (livesum).
        self._count_inflight = metrics_multiprocess()
        if not self._count_inflight:
            metrics.inflight.set_function(lambda: self.active)

    # -- admission -------------------------------------------------------------------

    def session(self, method: str, call: Call, defer: Callable[..., Any] | None = None) -> Session:
        """Admit a Recommender call (token, draining, max_concurrency) or raise Failure."""
        t0 = time.perf_counter()
        self.last_call = time.monotonic()
        metadata = call.invocation_metadata if self.cfg.token_for_all else None
        if metadata is not None and (denied := auth.token_error(self.cfg, metadata())):
            reason, message = denied
            self.metrics.rejected.labels(method, reason).inc()
            raise Failure(Code.UNAUTHENTICATED, message, "authorization", reason)
        if self.draining:
            self.metrics.rejected.labels(method, "DRAINING").inc()
            raise Failure(
                Code.UNAVAILABLE,
                "server: draining, retry another replica",
                reason="DRAINING",
                retry_ms=DRAIN_RETRY_MS,
            )
        if self._backlog_since and time.monotonic() - self._backlog_since >= self._budget:
            # Calls have waited longer than queue_budget_ms for the loop for at
            # least that long: refuse at once, so the backlog drains instead of
            # growing until every waiting call misses its deadline.
            self._shed(method)
            self.metrics.rejected.labels(method, "QUEUE").inc()
            raise Failure(
                Code.UNAVAILABLE,
                f"server: calls wait over {1000 * self._budget:.0f} ms to start "
                "(queue_budget_ms); retry after the RetryInfo delay",
                reason="OVERLOADED",
                info={"cause": "queue", "queue_budget_ms": f"{1000 * self._budget:g}"},
                retry_ms=self.cfg.overload_retry_ms,
            )
        remaining = call.time_remaining()
        # (the thread-pool server reports a call without a deadline as ~292 years)
        if remaining is not None and self._budget > 0 and remaining < NO_DEADLINE_S:
            waited, allowed = self._waited(call, method, remaining)
            judge = self.judge_open_window
            if waited > allowed and judge is not None and self.last_call >= self._saturated_until:
                # The probe has not judged the loop since before this loop turn:
                # one turn runs every call gRPC handed over at once, and calls
                # computed back to back (20 ms each, a starved machine) were all
                # admitted until it ended (a 300-call burst: 16-22 computed, but
                # 25-34 in 5 rounds of 100, and 53 in one test run). Judge the
                # window now.
                judge()
            if waited > allowed and self.last_call < self._saturated_until:
                # The call waited in gRPC's own queue longer than the budget, and
                # than a share of its deadline, while the loop had no idle moment:
                # answer it (and its successors) at once, so that queue drains
                # instead of holding every call until its deadline passes.
                self._shed(method)
                self.metrics.rejected.labels(method, "ACCEPT_QUEUE").inc()
                raise Failure(
                    Code.UNAVAILABLE,
                    f"server: this call waited ~{1000 * waited:.0f} ms to be accepted "
                    f"(allowed {1000 * allowed:.0f}); retry after the RetryInfo delay",
                    reason="OVERLOADED",
                    info={
                        "cause": "accept-queue",
                        "waited_ms": f"{1000 * waited:.0f}",
                        "allowed_ms": f"{1000 * allowed:.0f}",
                    },
                    retry_ms=self.cfg.overload_retry_ms,
                )
        if method in HEAVY and self.last_call - self._shed_at < SHED_HEAVY_S:
            # Calls are being shed: a bulk call goes first, so the loop's turns go to
            # the calls it can still answer in time.
            self.metrics.rejected.labels(method, "HEAVY").inc()
            raise Failure(
                Code.UNAVAILABLE,
                f"server: shedding load, {method} is refused first; "
                "retry after the RetryInfo delay",
                reason="OVERLOADED",
                info={"cause": "heavy"},
                retry_ms=self.cfg.overload_retry_ms,
            )
        pace = self._paces.get(method)
        took = 0.0 if pace is None else pace.now(self.last_call)
        if remaining is not None and (remaining <= 0 or remaining < took):
            # Deadline-aware shedding: this call cannot be answered in time at the
            # pace calls take now (or its deadline has passed), so it is refused at
            # once instead of computed for a client that will have given up (a
            # retry would fail the same way).
            self.metrics.rejected.labels(method, "DEADLINE").inc()
            why = (
                f"{1000 * remaining:.0f} ms left of the deadline, and {method} takes "
                f"~{1000 * took:.0f} ms now"
                if remaining > 0
                else "the deadline passed before the call was taken in"
            )
            raise Failure(
                Code.UNAVAILABLE,
                f"server: {why}; not computed",
                reason="OVERLOADED",
                info={"cause": "deadline", "expected_ms": f"{1000 * took:.1f}"},
                retry_ms=-1,
            )
        with self._active_lock:
            full = self.active >= self.cfg.max_concurrency
            if not full:
                self.active += 1
        if full:
            self.metrics.rejected.labels(method, "OVERLOADED").inc()
            raise Failure(
                Code.UNAVAILABLE,
                f"server: {self.cfg.max_concurrency} requests in flight (max_concurrency); "
                "retry after the RetryInfo delay",
                reason="OVERLOADED",
                info={"max_concurrency": str(self.cfg.max_concurrency)},
                retry_ms=self.cfg.overload_retry_ms,
            )
        if self._count_inflight:
            self.metrics.inflight.inc()
        return Session(self, method, call, t0, defer)

    def _shed(self, method: str) -> None:
        """A call of `method` is being refused for queueing: from now on, for
        SHED_HEAVY_S, bulk calls go first. Only a cheap call's refusal counts: a
        load of batches alone is shed by the queue rules like any other."""
        if method not in HEAVY:
            self._shed_at = self.last_call

    def note_wait(self, seconds: float, busy: float = 1.0) -> None:
        """How long work queued for the loop waited just now (the asyncio
        transport's probe), and the share of that time the loop's thread spent
        on the CPU. Over the budget, calls are refused once it has lasted a
        budget's length, so one slow call or a pause is forgiven. A late loop
        that was mostly off the CPU (`busy` under LOOP_BUSY: the machine's other
        processes or the model loader's threads held it back, not calls) is not
        a backlog of ours: refusing would turn away calls an idle server can take."""
        if self._budget <= 0:
            return
        if seconds > self._budget and busy >= LOOP_BUSY:
            if not self._backlog_since:
                self._backlog_since = time.monotonic()
        else:
            self._backlog_since = 0.0

    def note_idle(self, idle: float, busy: float = 1.0, waiting: float = 0.0) -> None:
        """The shares of the last probe window the loop spent waiting for events,
        its thread spent on the CPU (`busy`) and waiting for a CPU (`waiting`:
        runnable, while the machine's other processes ran; the asyncio
        transport's probe). Under SATURATED_IDLE idle while it ran or wanted to
        run (`busy` + `waiting` >= LOOP_BUSY), the loop is saturated: calls gRPC
        holds for it are waiting in its queue (accept-queue shedding), for
        SATURATION_HOLD_S past the window. A loop kept from running by other
        threads of ours (a model loading: waiting for the GIL) or blocked
        (a lock, a page fault) is neither idle nor busy, and is not saturated.
        One starved by a busy machine is: its calls back up all the same
        (test_overload_on_a_starved_machine_is_refused_fast_too)."""
        if idle < SATURATED_IDLE and busy + waiting >= LOOP_BUSY:
            self._saturated_until = time.monotonic() + SATURATION_HOLD_S

    def _waited(self, call: Call, method: str, remaining: float) -> tuple[float, float]:
        """Seconds this call lost before admission, estimated against the most
        time its peer's calls of the same method had left in the last one or two
        PEAK_WINDOW_S (one client gives a batch 30 s and a Recommend 1 s), and
        the wait allowed: queue_budget_ms, or ACCEPT_WAIT_SHARE of the deadline
        if more (a client that gives a call 10 s would rather wait 0.3 s than be
        refused; one that gives it 1 s needs the queue short). No wait for a
        peer seen giving the method deadlines of different lengths lately (a
        call with DEADLINE_CLASSES times the time left of its calls admitted on
        an unsaturated loop): its shorter ones would look late (test_fuzz once
        saw a 10 s Recommend after 10 s and 30 s ones refused as ~20 s late). A
        peer whose first calls have the longest deadline is not told apart."""
        now = self.last_call
        if now >= self._peak_until:
            self._peak_old, self._peak = self._peak, {}
            self._varied_old, self._varied = self._varied, set()
            self._calm_old, self._calm = self._calm, {}
            self._peak_until = now + PEAK_WINDOW_S
        key = (call.peer(), method)
        peak = self._peak.get(key, 0.0)
        if remaining > peak:
            self._peak[key] = remaining
        best = max(peak, self._peak_old.get(key, 0.0))
        # The most time left of the peer's calls admitted while the loop was not
        # saturated: those did not wait in gRPC's queue, so theirs are deadlines.
        calm = max(self._calm.get(key, 0.0), self._calm_old.get(key, 0.0))
        if now >= self._saturated_until and remaining > calm:
            self._calm[key] = remaining
        if calm and remaining > DEADLINE_CLASSES * calm:  # far more: queueing never adds
            self._varied.add(key)
        if key in self._varied or key in self._varied_old:
            # The peer gives this method deadlines of different lengths (or
            # propagates its callers'): a call with less left may just have had
            # less. Its calls are not judged by their deadlines for a while.
            return 0.0, self._budget
        # The wire carries the timeout rounded up to a few digits (up to 1% more:
        # 100 ms units for 10-100 s), so only a loss beyond that is a wait.
        lost = best - remaining - TIMEOUT_ROUNDING * best - 0.001
        if self.quiet_at is not None and (quiet := self.quiet_at()) > 0:
            # A loop that found nothing to do had taken in every call gRPC held:
            # a call with less time left than its peer's best came with a shorter
            # deadline, past what it can have waited since. (A pause of the loop,
            # a collection, marked it saturated, and a fresh 2 s call after the
            # peer's 30 s one was refused as ~28 s late: a make test run.)
            lost = min(lost, now - quiet)
        # Nor can it have waited since before this server existed (a fresh
        # server's first 30 s call, then a 2 s one, on a loop marked saturated
        # while the machine's pressure kept quiet moments untrusted: refused as
        # ~28 s late in a fresh-clone CI run).
        lost = min(lost, now - self.created)
        allowed = ACCEPT_WAIT_SHARE * best
        return (lost if lost > 0 else 0.0), (allowed if allowed > self._budget else self._budget)

    def release(self) -> None:
        """Give back the admission slot of a finished (or paused) call."""
        with self._active_lock:
            self.active -= 1
        if self._count_inflight:
            self.metrics.inflight.dec()

    def retake(self) -> None:
        """A slot taken back by a paused call (Session.resume), or taken by a
        stream's commit while it runs on an executor thread."""
        with self._active_lock:
            self.active += 1
        if self._count_inflight:
            self.metrics.inflight.inc()

    def finish(self, s: Session, code: str) -> None:
        """Release a call that ended with `code` and record its duration and items."""
        if s.held:
            s.held = False
            self.release()
        self.metrics.rpc_seconds.labels(s.method, code).observe(time.perf_counter() - s.t0)
        if s.sent:
            self.metrics.items.labels(s.method).inc(s.sent)

    def record_ok(self, s: Session) -> None:
        """The metrics of a call answered OK (its slot is released already)."""
        m = self.metrics
        if s.ranked is not None:
            self.observe(s.method, s.ranked)
            n = len(s.ranked)
            if n:
                m.first_item_seconds.labels(s.method).observe(s.t1 - s.t0)
                m.items.labels(s.method).inc(n)
        if s.sent:
            m.items.labels(s.method).inc(s.sent)
        took = s.t1 - s.t0
        m.rpc_seconds.labels(s.method, "OK").observe(took)
        # The pace of this method now, which deadline-aware shedding compares a
        # new call's time left with.
        pace = self._paces.get(s.method)
        if pace is None:
            pace = self._paces.setdefault(s.method, Pace())
        pace.add(took, time.monotonic())

    def failure(self, method: str, exc: BaseException) -> Failure:
        """The Failure to answer for an exception raised while answering."""
        if isinstance(exc, Failure):
            return exc
        if isinstance(exc, RequestError):
            return _failure_of(exc)
        if isinstance(exc, FeedbackUnavailable):
            log.warning("%s: %s", method, exc)
            return Failure(
                Code.UNAVAILABLE,
                f"{exc}; nothing more was stored, retry",
                "feedback",
                "FEEDBACK_UNAVAILABLE",
                retry_ms=1000,
            )
        log.exception("%s failed", method, exc_info=exc)
        return Failure(
            Code.INTERNAL,
            f"server: internal error ({type(exc).__name__}), logged",
            reason="INTERNAL_ERROR",
        )

    def shared_sync(self) -> None:
        """With several workers, pick up events other workers recorded: a read of
        the log when its shared change counter moved since the last one."""
        if self.cfg.workers > 1 and not self.store.shared:  # a shared store is followed
            changes = self.store.changes()
            if changes != self._seen_changes or changes < 0:
                # Noted before reading: a bump during the read triggers another one.
                self._seen_changes = changes
                self.online.sync(self.store)

    def observe(self, method: str, r: Ranked) -> None:
        """Count an answered ranking: who served it, fallbacks, fold-ins, arms, stages."""
        m = self.metrics
        m.requests.labels(method, r.model, r.served_by or r.arm or r.model, r.arm).inc()
        for stage, seconds in r.stages.items():
            m.stage_seconds.labels(method, stage).observe(seconds)
        if r.served_by:
            m.fallbacks.labels(r.start, r.served_by).inc()
        if r.folded_in:
            m.fold_ins.labels(r.served_by or r.start).inc()
        if r.arm:
            m.assignments.labels(r.model, r.arm).inc()

    # -- Recommender -----------------------------------------------------------------

    def _ranking(self, s: Session, request: Any) -> Ranked:
        _refuse_undecodable(request)
        self.shared_sync()
        r = self.router.recommend(convert.rec_query(request), s.check)
        s.check()  # a deadline that passed while computing
        return r

    def recommend(self, s: Session, request: pb.RecommendRequest) -> tuple[Any, Metadata]:
        """Recommend: the ranking in one message (bytes when encoded from arrays)."""
        r = self._ranking(s, request)
        s.ranked = r
        return convert.response_bytes(request.request_id, r), _metadata(r)

    # -- dynamic batching (the asyncio transport's Batcher) --------------------------

    def batch_plan(self, s: Session, request: pb.RecommendRequest) -> Plan | None:
        """The plan of a Recommend that dynamic batching may score with others: a
        plain request (Router.plain_target) to a model that `batches_well`
        (embedding and factor models); None for any other, which `recommend`
        answers. Validation errors raise as in `recommend`."""
        t = time.perf_counter()
        _refuse_undecodable(request)
        self.shared_sync()
        q = convert.rec_query(request)
        self.router.validate(q)
        target = self.router.plain_target(q)
        kind = None if target is None else type(target[0].model)
        if kind is None or not kind.batches_well or kind.sparse_scores:
            return None  # (a sparse_scores answer may need Router._plain's fill)
        slot, user = target
        if Router.plain_prior(slot):
            return None  # blended with popularity per user (Router._plain)
        stages = {"resolve": time.perf_counter() - t, "retrieve": 0.0, "rank": 0.0}
        key = (slot.name, slot.version, q.k, not q.include_seen)
        return Plan(key, slot, q, user, stages, request.request_id)

    def plan_one(self, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """A plan's top-k on its own (the one-user kernel, as `recommend` would)."""
        m = plan.slot.model
        assert m is not None
        return m.recommend_user(plan.user, plan.q.k, filter_seen=not plan.q.include_seen)

    def plan_answer(
        self, s: Session, plan: Plan, items: np.ndarray, scores: np.ndarray, seconds: float
    ) -> tuple[Any, Metadata]:
        """Recommend's answer to a plan from its top-k (computed alone or in a batch
        that took `seconds` from queueing to result)."""
        plan.stages["retrieve"] += seconds
        s.check()  # a deadline that passed while the batch was computed
        r = self.router.plain_answer(plan.slot, plan.q, plan.user, items, scores, plan.stages)
        s.ranked = r
        return convert.response_bytes(plan.request_id, r), _metadata(r)

    def recommend_stream(
        self, s: Session, request: pb.RecommendRequest
    ) -> tuple[Metadata, Iterator[pb.RankedItem]]:
        """RecommendStream: the same ranking, one RankedItem per message."""
        r = self._ranking(s, request)
        return _metadata(r), self._items(s, r)

    def _similar(self, s: Session, request: pb.SimilarItemsRequest) -> Ranked:
        _refuse_undecodable(request)
        k = int(request.k) or contract.DEFAULT_K
        r = self.router.similar(request.item_id, k, request.model, s.check, request.version)
        s.check()
        return r

    def similar(
        self, s: Session, request: pb.SimilarItemsRequest
    ) -> tuple[Metadata, Iterator[pb.RankedItem]]:
        """SimilarItems: the k items most like one item, streamed."""
        r = self._similar(s, request)
        return _metadata(r), self._items(s, r)

    def similar_unary(
        self, s: Session, request: pb.SimilarItemsRequest
    ) -> tuple[pb.SimilarItemsResponse | bytes, Metadata]:
        """GetSimilarItems: the same ranking in one message."""
        r = self._similar(s, request)
        s.ranked = r
        return convert.similar_bytes(r), _metadata(r)

    def _items(self, s: Session, r: Ranked) -> Iterator[pb.RankedItem]:
        self.observe(s.method, r)
        for item in convert.ranked_items(r, first=True):
            if s.sent % CHECK_EVERY == 0:
                if s.sent == 0:
                    elapsed = time.perf_counter() - s.t0
                    self.metrics.first_item_seconds.labels(s.method).observe(elapsed)
                s.check()
            yield item
            s.sent += 1

    def batch_one(self, s: Session, request: Any) -> Any:
        """One answer of a RecommendBatch stream: a refused request is answered with
        its status in the message and the stream carries on."""
        s.check()
        if isinstance(request, convert.Undecodable):
            f = Failure(Code.INVALID_ARGUMENT, request.message, "request", "MALFORMED_REQUEST")
            return convert.batch_error(pb.RecommendRequest(), f)
        self.shared_sync()
        try:
            r = self.router.recommend(convert.rec_query(request), s.check)
        except RequestError as err:
            return convert.batch_error(request, _failure_of(err))
        self.observe(s.method, r)
        self.metrics.items.labels(s.method).inc(len(r))
        return convert.response_bytes(request.request_id, r)

    def predict(self, s: Session, request: pb.PredictRatingsRequest) -> tuple[Any, Metadata]:
        """PredictRatings: mean, std and a central interval per item, in request order."""
        _refuse_undecodable(request)
        self.shared_sync()
        p: Prediction = self.router.predict(
            request.user_id,
            convert.history(request.history),  # omitted values as in Recommend
            list(request.item_ids),
            request.model,
            float(request.interval) if request.HasField("interval") else None,
            request.version,
        )
        s.check()
        self.metrics.requests.labels(s.method, p.model, p.served_by or p.model, "").inc()
        return convert.predictions(p), convert.metadata(p.model, p.version, p.served_by)

    def recorder(self) -> Recorder:
        """The state of one RecordInteractions stream."""
        return Recorder(self)

    def record(
        self, s: Session, requests: Iterable[pb.Interaction]
    ) -> tuple[pb.RecordSummary, Metadata]:
        """RecordInteractions over a plain iterator (the thread-pool transport)."""
        rec = self.recorder()
        for ev in requests:
            if (full := rec.add(ev)) is not None:
                rec.store(full)
        rec.store(rec.rest())
        return rec.summary(), ()

    # -- Admin ---------------------------------------------------------------------------

    def admin(self, call: Call) -> None:
        """Raise Failure unless the caller may use Admin (token, or loopback without one)."""
        denied = auth.admin_error(self.cfg, call.invocation_metadata(), call.peer())
        if denied is not None:
            code, reason, message = denied
            raise Failure(Code[code], message, "authorization", reason)

    def _infos(self) -> list[pb.ModelInfo]:
        cfg = self.cfg
        out = [convert.model_info(s) for s in self.catalog.slots()]
        out += [self._virtual_info(v) for v in (*cfg.hybrids.values(), *cfg.experiments.values())]
        return sorted(out, key=lambda i: i.name)

    def list_models(self, request: pb.ListModelsRequest | None = None) -> pb.ListModelsResponse:
        """ListModels: a page of models, hybrids and experiments with their state,
        by name. The page token is the last name of the previous page, so a
        model added or removed between pages neither repeats nor shifts one."""
        request = request if request is not None else pb.ListModelsRequest()
        _refuse_undecodable(request)
        size = int(request.page_size) or LIST_PAGE
        if not 1 <= size <= LIST_PAGE_MAX:
            raise Failure(
                Code.INVALID_ARGUMENT,
                f"page_size: must be in [0, {LIST_PAGE_MAX}], got {request.page_size}",
                "page_size",
                "PAGE_SIZE_OUT_OF_RANGE",
                [("page_size", f"must be in [0, {LIST_PAGE_MAX}]")],
            )
        infos = self._infos()
        if request.page_token:
            after = convert.page_after(request.page_token)
            if after is None:
                raise Failure(
                    Code.INVALID_ARGUMENT,
                    "page_token: not a token this server issued",
                    "page_token",
                    "INVALID_PAGE_TOKEN",
                    [("page_token", "not a token this server issued")],
                )
            infos = [i for i in infos if i.name > after]
        page = infos[:size]
        token = convert.page_token(page[-1].name) if len(infos) > size else ""
        return pb.ListModelsResponse(models=page, next_page_token=token)

    def get_model(self, request: pb.GetModelRequest) -> pb.ModelInfo:
        """GetModel: one model by name, or NOT_FOUND naming the known ones."""
        _refuse_undecodable(request)
        for info in self._infos():
            if info.name == request.name:
                return info
        known = ", ".join(self.router.names())
        raise Failure(
            Code.NOT_FOUND,
            f"name: unknown model {request.name!r} (available: {known})",
            "name",
            "UNKNOWN_MODEL",
            info={"model": request.name},
        )

    def reload_models(
        self,
    ) -> tuple[list[Slot], list[Slot], list[Hybrid | Experiment], str]:
        """Switch this process to newly published versions (ReloadModels, SIGHUP),
        then to the config file and hybrids.json as they are now: (switched,
        refused, hybrids and experiments new or changed, why the config was
        refused or ""), refused versions counted."""
        with self._reload_lock:
            switched, refused = self.catalog.reload()
            for slot in refused:
                self.metrics.refused_versions.labels(slot.name).inc()
            return switched, refused, *self._reconfigure()

    def _reconfigure(self) -> tuple[list[Hybrid | Experiment], str]:
        """Read the config's sources again (config.reread) and swap in what changed
        among the settings a reload applies; log the others, which need a restart.
        A file that no longer loads is logged and changes nothing (as Prometheus
        and nginx do): the metric recserve_config_last_reload_successful says so,
        and so does the returned reason (else "")."""
        try:
            cfg, pending = reread(self.cfg)
        except ConfigError as exc:
            self.metrics.config_reload_ok.set(0)
            log.error("reload: %s; still serving the configuration loaded before", exc)
            return [], str(exc)
        self.metrics.config_reload_ok.set(1)
        if pending:
            log.warning("reload: %s changed; restart to apply", ", ".join(pending))
        old = self.cfg
        if cfg == old:
            return [], ""
        changed: list[Hybrid | Experiment] = [
            v
            for new, before in ((cfg.hybrids, old.hybrids), (cfg.experiments, old.experiments))
            for n, v in new.items()
            if before.get(n) != v
        ]
        gone = [
            n
            for n in (*old.hybrids, *old.experiments)
            if n not in cfg.hybrids and n not in cfg.experiments
        ]
        settings = [
            k
            for k in sorted(LIVE - {"hybrids", "experiments"})
            if getattr(cfg, k) != getattr(old, k)
        ]
        self.cfg = self.router.cfg = cfg  # requests read the new routing from here on
        log.info(
            "reload: %s",
            "; ".join(
                [f"hybrid {v.name} {_hybrid_params(v)}" for v in changed if isinstance(v, Hybrid)]
                + [f"experiment {v.name} {v.arms}" for v in changed if isinstance(v, Experiment)]
                + ([f"removed {', '.join(gone)}"] if gone else [])
                + [f"{k} = {getattr(cfg, k)!r}" for k in settings]
            ),
        )
        if self.on_config is not None:
            self.on_config(gone)
        return changed, ""

    def reload(self, request: Any = None) -> pb.ReloadModelsResponse:
        """ReloadModels: switch to newly published versions (blocking: sha256 of
        every file) and to the config as it is now; hybrids and experiments new
        or changed are listed among the reloaded, as algorithm "hybrid" or
        "experiment"; a config that no longer loads among the refused, as
        algorithm "config" with the reason (the one loaded before still
        routes: without it the caller heard nothing of the refusal)."""
        switched, refused, virtual, config_error = self.reload_models()
        if self.after_reload is not None:
            self.after_reload()
        return pb.ReloadModelsResponse(
            reloaded=[convert.model_info(s) for s in switched]
            + [self._virtual_info(v) for v in virtual],
            refused=[convert.model_info(s) for s in refused]
            + ([convert.config_refusal(config_error)] if config_error else []),
        )

    def _virtual_info(self, v: Hybrid | Experiment) -> pb.ModelInfo:
        if isinstance(v, Hybrid):
            return convert.virtual_info(
                v.name, "hybrid", _hybrid_params(v), self.router.ready(v.name)
            )
        return convert.virtual_info(v.name, "experiment", v.arms, self.router.ready(v.name))


def _hybrid_params(hy: Hybrid) -> dict[str, float]:
    """A hybrid's component weights, and its priors where it has them."""
    priors = {HYBRID_PRIOR: hy.history_prior, USER_PRIOR: hy.user_prior}
    return {**hy.weights, **{k: v for k, v in priors.items() if v}}


class Recorder:
    """Validates, batches and stores the events of one RecordInteractions stream.

    Events are committed FEEDBACK_BATCH at a time; a commit is durable before
    it counts as accepted, and the online state sees it at once. An event whose
    (user, event_id) the store already holds counts as a duplicate, not again."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.accepted = self.rejected = self.duplicates = 0
        self._batch: list[Event] = []

    def add(self, ev: Any) -> list[Event] | None:
        """Take one event; returns a full batch to store, else None."""
        e = None if isinstance(ev, convert.Undecodable) else _event(ev)
        if e is None or not self.core.router.known_item(e.item_id):
            self.rejected += 1
            return None
        self._batch.append(e)
        if len(self._batch) < FEEDBACK_BATCH:
            return None
        full, self._batch = self._batch, []
        return full

    def rest(self) -> list[Event]:
        """The events not yet handed out for storing."""
        rest, self._batch = self._batch, []
        return rest

    def store(self, events: Sequence[Event]) -> None:
        """Commit events (blocking: an fsync) and apply them to the online state."""
        if events:
            new = self.core.store.append(events)  # committed before it counts
            self.accepted += new
            self.duplicates += len(events) - new
            if new:
                self.core.online.sync(self.core.store)

    def summary(self) -> pb.RecordSummary:
        """The stream's answer; also counts the events in the metrics."""
        m = self.core.metrics
        m.feedback_events.labels("accepted").inc(self.accepted)
        m.feedback_events.labels("rejected").inc(self.rejected)
        m.feedback_events.labels("duplicate").inc(self.duplicates)
        return pb.RecordSummary(
            accepted=self.accepted, rejected=self.rejected, duplicates=self.duplicates
        )


def _metadata(r: Ranked) -> Metadata:
    return convert.metadata(r.model, r.version, r.served_by, r.arm)


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, convert.Undecodable):
        raise Failure(Code.INVALID_ARGUMENT, request.message, "request", "MALFORMED_REQUEST")


def _failure_of(err: RequestError) -> Failure:
    """The Failure answering a serving refusal, with its reason and violations."""
    return Failure(Code[err.status], str(err), err.field, err.reason, err.violations, err.info)


def _event(ev: pb.Interaction) -> Event | None:
    """A valid feedback event, or None (counted as rejected). An omitted value is
    NaN (each model's `unrated`: 1, but for a rating model what it expects of the
    item) and an omitted timestamp now; explicit zeros are kept."""
    if ev.HasField("value"):
        value = float(ev.value)
        if not -MAX_VALUE <= value <= MAX_VALUE:  # NaN too
            return None
    else:
        value = math.nan
    if not ev.user_id or not ev.item_id:
        return None
    if max(len(ev.user_id.encode()), len(ev.item_id.encode())) > MAX_ID_BYTES:
        return None
    if len(ev.event_id.encode()) > MAX_EVENT_ID_BYTES:
        return None
    ts = int(ev.timestamp) if ev.HasField("timestamp") else now()
    return Event(ev.user_id, ev.item_id, value, ts, event_id=ev.event_id)
