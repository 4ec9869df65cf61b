"""The asyncio gRPC transport (`server = "asyncio"`, the default): grpc.aio over the core.

One event loop in its own thread. Requests are computed on the loop itself:
handing each to a thread pool and back costs more on a small machine than the
compute it would overlap (measured with `recserve bench`; docs/performance.md),
so a request occupies the loop while its model works: use `--workers N` for
more cores. Feedback writes (an fsync) and reloads (sha256 of every file) go
to a thread so they never stall the loop. The metrics queue is applied on the
loop between calls, and a unary call's metrics are recorded after its answer
is handed to gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import selectors
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health

from recserve.metrics import FLUSH_SECONDS
from recserve.service import grpc_common
from recserve.service.batching import Batcher
from recserve.service.core import Code, Core, Failure, Recorder
from recserve.v1 import recommender_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from recserve.service.app import App

log = logging.getLogger("recserve.service")

# Seconds without a new call after which a draining asyncio server stops.
DRAIN_QUIET = 0.25
# How often the loop measures how long queued work waits for it (queue_budget_ms).
PROBE_SECONDS = 0.002
# Probes per window over which the loop's idle share is measured (20 ms; a window
# also ends once it has lasted that long).
IDLE_WINDOW = 10
# The loop thread's share of a window spent waiting for a CPU below which its
# quiet moments are trusted (a starved loop's select can find nothing while
# gRPC holds calls).
QUIET_TRUST_WAIT = 0.2
# The share of a window in which any thread on the machine waited for a CPU
# (Linux PSI) below which its quiet moments are trusted: a call gRPC holds
# reaches the loop through gRPC's own threads (its poller, its event engine),
# which a busy machine keeps off the CPU while the loop's select finds nothing.
QUIET_TRUST_PRESSURE = 0.02
# How long the loop must have found no events before a wait that finds none
# counts as quiet: an empty wait just after events proves nothing, the next
# call may be on its way through those threads.
QUIET_SPAN = 0.01
# How long a refused request stream is read to its end before the refusal is sent:
# a client that writes its requests at once is answered when the last one arrives.
DRAIN_REQUESTS_S = 1.0


async def _abort(context: grpc.aio.ServicerContext, f: Failure) -> bytes:
    """Answer the Failure's status (raises), or nothing for a caller that went away.
    Past the call's deadline nothing is sent either: gRPC core ends such a call
    itself (the client has DEADLINE_EXCEEDED), and a status sent to it can fail
    in core, which grpc.aio logs as an ERROR with a traceback while its loop has
    not yet seen the call close (a saturated loop refusing calls that waited
    ~1 s of their 1 s: 2 such tracebacks in 10 overload runs of 5 s)."""
    if f.code is Code.CANCELLED:
        return b""
    left = context.time_remaining()
    if left is not None and left <= 0:
        raise asyncio.CancelledError  # what grpc.aio itself raises in a cancelled call
    await context.abort(*grpc_common.status(f))
    return b""


async def _drain(requests: AsyncIterator, seconds: float) -> None:
    """Read what a client still sends of a refused request stream (for at most
    `seconds`) before the status goes out: grpc.aio clients that are still
    writing when the call ends report INTERNAL ("Internal error from Core")
    instead of the status (measured: 5 of 18 refused RecommendBatch streams)."""
    try:
        async with asyncio.timeout(seconds):
            async for _ in requests:
                pass
    except (TimeoutError, grpc.RpcError):
        pass


def quiet_stale_grpc_events(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: everything goes to asyncio's default
    handler except grpc.aio's known noise. Its completion queue is one per
    process, read by every loop that ran gRPC; a late event of a call whose
    loop has closed (a server stopped earlier in the same process, as in tests
    or an application embedding recserve) raises "Event loop is closed" in the
    reader callback of another loop, and a loop that wakes for a byte another
    loop read raises BlockingIOError (grpc/grpc#25364, #34139). Nobody is left
    to receive the first; the second is harmless; the events behind either in
    the queue are handled on the next wake-up. Both are logged at DEBUG, not
    as ERROR with a traceback."""
    exc = context.get("exception")
    callback = getattr(context.get("handle"), "_callback", None)
    # grpc.aio registers functools.partial(PollerCompletionQueue._handle_events,
    # loop) as the reader: a partial has no __qualname__ (so nothing matched, and
    # a clean test run failed on the ERROR this logged)
    callback = getattr(callback, "func", callback)
    if getattr(callback, "__qualname__", "") == "PollerCompletionQueue._handle_events" and (
        isinstance(exc, BlockingIOError)
        or (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc))
    ):
        log.debug("grpc.aio: an event for another loop dropped: %r", exc)
        return
    loop.default_exception_handler(context)


def run_queue_wait() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU (Linux
    schedstat: the machine's other processes ran); 0.0 where that is not known."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_pressure() -> float | None:
    """Seconds (a running total) in which some thread on the machine was runnable
    but waited for a CPU (Linux PSI, /proc/pressure/cpu); None where unknown."""
    try:
        with open("/proc/pressure/cpu", "rb") as fh:
            return int(fh.readline().rsplit(b"total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


class TimedSelector(selectors.DefaultSelector):
    """The loop's selector, adding up the time the loop spent waiting for events
    (`idle`): a loop that never waits is saturated, and then gRPC is holding
    calls for it that it has not accepted yet (accept-queue shedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.idle = 0.0
        self.quiet_at = 0.0  # monotonic time of the last quiet wait (QUIET_SPAN)
        self.events_at = 0.0  # monotonic time of the last wait or poll that found events

    def select(self, timeout: float | None = None) -> list:
        if timeout == 0:  # the loop has ready callbacks: a poll, not a wait
            ready = super().select(0)
            if ready:
                self.events_at = time.monotonic()
            return ready
        t0 = time.perf_counter()
        try:
            ready = super().select(timeout)
        finally:
            self.idle += time.perf_counter() - t0
        now = time.monotonic()
        if ready:
            self.events_at = now
        elif now - self.events_at >= QUIET_SPAN:  # gRPC held no call for the loop
            self.quiet_at = now
        return ready


class Recommender(pb_grpc.RecommenderServicer):
    """recserve.v1.Recommender over the core, on grpc.aio. The core reads the aio
    context itself as its Call (same method names): no adapter per call."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._defer: Callable | None = None  # the loop's call_soon, once known
        self.batcher = Batcher(core) if core.cfg.batch_delay_ms > 0 else None

    def _unary(self, method: str, request: Any, context, answer: Callable) -> Any:
        """The answer, or the Failure to abort with (a plain function: no extra
        coroutine on the hottest path)."""
        if self._defer is None:
            self._defer = asyncio.get_running_loop().call_soon
        try:
            with self.core.session(method, context, self._defer) as s:
                out, md = answer(s, request)
        except Failure as f:
            return f
        if md:
            context.set_trailing_metadata(md)
        return out

    async def _stream(self, method: str, request: Any, context, answer: Callable):
        try:
            with self.core.session(method, context) as s:
                md, items = answer(s, request)
                # The loop was busy computing: take in a cancellation or a deadline
                # that arrived meanwhile before anything is sent.
                await asyncio.sleep(0)
                s.pause()  # computed: sending to a slow reader is not work in flight
                await context.send_initial_metadata(md)
                for item in items:
                    yield item
        except Failure as f:
            await _abort(context, f)

    async def Recommend(self, request, context):
        if self.batcher is None:
            out = self._unary("Recommend", request, context, self.core.recommend)
            return out if type(out) is not Failure else await _abort(context, out)
        if self._defer is None:
            self._defer = asyncio.get_running_loop().call_soon
        try:
            with self.core.session("Recommend", context, self._defer) as s:
                out, md = await self.batcher.recommend(s, request)
        except Failure as f:
            return await _abort(context, f)
        if md:
            context.set_trailing_metadata(md)
        return out

    # grpc.aio needs streaming handlers themselves to be async generator functions;
    # aclosing ends the inner stream (and its session) at once when the client goes.
    async def RecommendStream(self, request, context):
        answer = self.core.recommend_stream
        async with aclosing(self._stream("RecommendStream", request, context, answer)) as items:
            async for item in items:
                yield item

    async def SimilarItems(self, request, context):
        answer = self.core.similar
        async with aclosing(self._stream("SimilarItems", request, context, answer)) as items:
            async for item in items:
                yield item

    async def RecommendBatch(self, request_iterator: AsyncIterator, context):
        try:
            with self.core.session("RecommendBatch", context) as s:
                s.pause()  # the slot is held while a request is answered, not between
                async for request in request_iterator:
                    s.resume()
                    try:
                        out = self.core.batch_one(s, request)
                    finally:
                        s.pause()
                    yield out
                    # Between two requests of a batch, let every other call that is
                    # waiting take its turn: a long batch never holds the loop.
                    await asyncio.sleep(0)
                # grpc.aio ends the request stream quietly when the deadline passes
                s.check()
        except Failure as f:
            await _drain(request_iterator, DRAIN_REQUESTS_S)
            await _abort(context, f)

    async def GetSimilarItems(self, request, context):
        out = self._unary("GetSimilarItems", request, context, self.core.similar_unary)
        return out if type(out) is not Failure else await _abort(context, out)

    async def PredictRatings(self, request, context):
        out = self._unary("PredictRatings", request, context, self.core.predict)
        return out if type(out) is not Failure else await _abort(context, out)

    async def RecordInteractions(self, request_iterator: AsyncIterator, context):
        loop = asyncio.get_running_loop()
        try:
            with self.core.session("RecordInteractions", context) as s:
                rec = self.core.recorder()
                s.pause()  # while the client sends, and while a commit waits for a thread
                async for ev in request_iterator:
                    if (full := rec.add(ev)) is not None:
                        await loop.run_in_executor(None, _store, self.core, rec, full)
                s.check()  # a stream ended by the deadline is not the client's last event
                await loop.run_in_executor(None, _store, self.core, rec, rec.rest())
                return rec.summary()
        except Failure as f:
            await _drain(request_iterator, DRAIN_REQUESTS_S)
            return await _abort(context, f)


def _store(core: Core, rec: Recorder, events: list) -> None:
    """Commit a stream's events on an executor thread, holding an admission
    slot while the commit runs: a commit is work, but a commit waiting for a
    thread (behind other streams' commits, on a slow disk) is not, and counted
    as such a burst of writers refused every read (max_concurrency). The slot
    is the thread's own, not the paused session's: a handler cancelled while
    the commit runs releases nothing of it (its session's flag is never
    touched from this thread)."""
    core.retake()
    try:
        rec.store(events)
    finally:
        core.release()


class Admin(pb_grpc.AdminServicer):
    """recserve.v1.Admin over the core, on grpc.aio."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def _admin(self, request: Any, context, answer: Callable, blocking: bool = False):
        try:
            self.core.admin(context)
            if blocking:
                return await asyncio.get_running_loop().run_in_executor(None, answer, request)
            return answer(request)
        except Failure as f:
            return await _abort(context, f)

    async def ListModels(self, request, context):
        return await self._admin(request, context, self.core.list_models)

    async def GetModel(self, request, context):
        return await self._admin(request, context, self.core.get_model)

    async def ReloadModels(self, request, context):
        return await self._admin(request, context, self.core.reload, blocking=True)


class AioTransport:
    """A grpc.aio server on its own loop thread: health, metrics flush, drain."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.selector = TimedSelector()
        self.loop = asyncio.SelectorEventLoop(self.selector)
        self.loop.set_exception_handler(quiet_stale_grpc_events)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._stopped = threading.Event()
        self._probe_cpu = (0.0, 0.0)  # (loop time, loop thread CPU time) at the last probe
        self._probe_failed = False  # a probe raised (logged once)
        # (probes, perf_counter, selector idle, thread CPU time, run-queue wait,
        # machine CPU pressure, monotonic time) at the idle window's start
        self._idle_window: tuple = (0, 0.0, 0.0, 0.0, 0.0, None, 0.0)
        self.recommender = Recommender(app.core)
        # The selector's last quiet moment, taken from windows in which no thread
        # was kept waiting for a CPU (see _probe), for the core's wait bound.
        self._quiet = 0.0
        app.core.quiet_at = lambda: self._quiet
        app.core.judge_open_window = self._judge_open_window

    def start(self, states: dict[str, int]) -> None:
        """Start the loop thread and the server on it, with the health statuses set
        so far; raises what the server's start raised (a port that cannot bind)."""
        cfg, core, loop = self.app.cfg, self.app.core, self.loop
        ready: dict[str, Any] = {}
        started = threading.Event()

        async def boot() -> None:
            try:
                server = grpc.aio.server(options=grpc_common.server_options(cfg))
                self.port = grpc_common.register(
                    server, cfg, self.recommender, Admin(core), self.health, registered=False
                )
                for name, state in states.items():
                    await self.health.set(name, state)
                await server.start()
                self.server = server
                loop.call_later(FLUSH_SECONDS, self._flush)
                if cfg.queue_budget_ms > 0:
                    due = loop.time() + PROBE_SECONDS
                    self._probe_cpu = (loop.time(), time.thread_time())
                    self._idle_window = (
                        0,
                        time.perf_counter(),
                        self.selector.idle,
                        time.thread_time(),
                        run_queue_wait(),
                        cpu_pressure(),
                        time.monotonic(),
                    )
                    loop.call_at(due, self._probe, due)
            except BaseException as exc:  # reported to the caller of start
                ready["error"] = exc
            finally:
                started.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            ready["boot"] = loop.create_task(boot())
            try:
                loop.run_forever()
            finally:
                # Join the executor threads that committed recorded events, then
                # close the loop: left idle, those threads kept the loop, and
                # through it this App and its mapped models, alive for good.
                try:
                    loop.run_until_complete(loop.shutdown_default_executor())
                finally:
                    loop.close()

        self._thread = threading.Thread(target=run, name="grpc-aio", daemon=True)
        self._thread.start()
        started.wait()
        if "error" in ready:
            loop.call_soon_threadsafe(loop.stop)
            raise ready["error"]

    def _flush(self) -> None:
        # Applied here, on the loop between two calls: a thread doing it would take
        # the GIL whenever a kernel lets go of it, holding up the call in progress.
        try:
            self.app.metrics.flush()
        except Exception:  # metrics must never take the server down
            log.exception("applying metrics failed")
        if not self._stopped.is_set():
            self.loop.call_later(FLUSH_SECONDS, self._flush)

    def _probe(self, due: float) -> None:
        # Run when the loop reaches it: its lateness is how long work queued on
        # the loop (calls gRPC has accepted included) waits before it runs.
        now = self.loop.time()
        try:
            self._measure(due, now)
        except Exception:
            # Never lose the probe: one that stopped would leave a backlog it had
            # seen in place, and queue-time admission would refuse every call.
            if not self._probe_failed:  # once, not every PROBE_SECONDS
                log.exception("the loop probe failed; it probes on")
            self._probe_failed = True
            self.app.core.note_wait(0.0)
        finally:
            if not self._stopped.is_set():
                self.loop.call_at(now + PROBE_SECONDS, self._probe, now + PROBE_SECONDS)

    def _measure(self, due: float, now: float) -> None:
        # The loop thread's CPU time since the last probe tells a loop busy with
        # calls from one held back by other processes or threads.
        cpu = time.thread_time()
        wall0, cpu0 = self._probe_cpu
        self._probe_cpu = (now, cpu)
        self.app.core.note_wait(now - due, (cpu - cpu0) / max(now - wall0, 1e-6))
        probes, t0, idle0, cpu0, wait0, pressure0, start = self._idle_window
        t = time.perf_counter()
        # A window is IDLE_WINDOW probes, or as long as those take when calls
        # are short: with calls of 20 ms each, ten probes spanned ten calls, all
        # computed whenever a hold ran out before saturation was seen again.
        if probes >= IDLE_WINDOW or t - t0 >= IDLE_WINDOW * PROBE_SECONDS:
            idle, wait, pressure = self.selector.idle, run_queue_wait(), cpu_pressure()
            span = max(t - t0, 1e-6)
            waiting = (wait - wait0) / span
            self.app.core.note_idle((idle - idle0) / span, (cpu - cpu0) / span, waiting)
            quiet = self.selector.quiet_at
            if (
                quiet >= start  # a quiet moment of this window, not one judged before
                and waiting < QUIET_TRUST_WAIT
                and pressure is not None
                and pressure0 is not None
                and (pressure - pressure0) / span < QUIET_TRUST_PRESSURE
            ):
                # A quiet select means gRPC held no call only when the threads
                # that hand calls over could run: on a starved machine the loop
                # idled in 16-29% of half its windows with hundreds of calls
                # queued (its thread waiting 28-75% for a CPU; 3-7% under load),
                # and with the loop's thread on a CPU but gRPC's threads kept
                # off one, a burst's calls were admitted as if they had not
                # waited (two busy processes: 39-51 of 300 computed, against
                # 17-20; suspected in two fresh-clone CI runs that computed 101
                # and 109). Where the machine's pressure is unknown, none is
                # trusted.
                self._quiet = quiet
            self._idle_window = (0, t, idle, cpu, wait, pressure, time.monotonic())
        else:
            self._idle_window = (probes + 1, t0, idle0, cpu0, wait0, pressure0, start)

    def _judge_open_window(self) -> None:
        # On the loop thread, from a call's admission: a window open longer than
        # its length means the probe has not run since the loop began this turn
        # (it runs the callbacks of every call gRPC handed over at once). Its
        # shares so far are what the probe would find; the probe still judges
        # the whole window when it runs.
        _, t0, idle0, cpu0, wait0, _, _ = self._idle_window
        span = time.perf_counter() - t0
        if t0 and span >= IDLE_WINDOW * PROBE_SECONDS:
            self.app.core.note_idle(
                (self.selector.idle - idle0) / span,
                (time.thread_time() - cpu0) / span,
                (run_queue_wait() - wait0) / span,
            )

    def set_health(self, name: str, state: int) -> None:
        """Set one health status from any thread (the servicer lives on the loop);
        nothing once the server has stopped (its loop is closed)."""
        if self._stopped.is_set() or self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.health.set(name, state), self.loop)

    def stop(self, grace: float) -> None:
        """NOT_SERVING, then wait for admitted calls and for callers to go quiet
        (new calls already get UNAVAILABLE from the core's draining flag: grpc.aio's
        stop would answer calls still arriving with CANCELLED), then stop."""
        self._stopped.set()
        server, core = self.server, self.app.core
        if server is None:
            return

        async def shutdown() -> None:
            await self.health.enter_graceful_shutdown()
            end = self.loop.time() + grace
            while self.loop.time() < end and (
                core.active or time.monotonic() - core.last_call < DRAIN_QUIET
            ):
                await asyncio.sleep(0.02)
            await server.stop(max(0.0, end - self.loop.time()))

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(grace + 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)  # the loop closed: its executor's commits are done

    def wait(self) -> None:
        """Block until the server stops."""
        self._stopped.wait()
