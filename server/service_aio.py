"""The asyncio (grpc.aio) server: `server = "asyncio"`, the default.

Same contract, validation, metrics and drain as the thread-pool server in
server/service.py, on one event loop running in its own thread. Requests are
computed on the loop itself: handing each request to a thread pool and back
costs more on a small machine than the compute it would overlap (measured with
`recserve bench`; see the README). A request therefore occupies the loop while
its model works: use `--workers N` for more cores. Feedback writes (an fsync)
and model reloads (sha256 of every file) go to a thread so they never stall
the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from recserve.v1 import recommender_pb2 as pb
from recserve.v1 import recommender_pb2_grpc as pb_grpc
from server import convert
from server.feedback import Event
from server.metrics import FLUSH_SECONDS
from server.retrieval import RequestError
from server.service import (
    CHECK_EVERY,
    FEEDBACK_BATCH,
    AdminServicer,
    App,
    _event,
    _Stop,
)

log = logging.getLogger("recserve.service")

# Seconds without a new call after which a draining asyncio server stops.
DRAIN_QUIET = 0.25


def _checker(context: grpc.aio.ServicerContext) -> Callable[[], None]:
    def check() -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise _Stop(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the answer")
        if context.cancelled():
            raise _Stop(grpc.StatusCode.CANCELLED, "client cancelled")

    return check


@contextlib.asynccontextmanager
async def _admitted(app: App, method: str, context) -> AsyncIterator[dict[str, Any]]:
    """The thread-pool server's `App.admitted` for grpc.aio (whose abort is awaited):
    take a slot or fail fast, turn exceptions into statuses, time the call."""
    t0 = time.perf_counter()
    refused = app.try_admit(method, context)
    if refused is not None:
        await context.abort(*refused)
    state: dict[str, Any] = {"code": "OK", "t0": t0}
    try:
        yield state
    except Exception as exc:
        status, message = app.failure(method, exc)
        state["code"] = status.name
        if status is not grpc.StatusCode.CANCELLED:
            await context.abort(status, message)
    except BaseException:  # the client went away (GeneratorExit, CancelledError)
        state["code"] = "CANCELLED"
        raise
    finally:
        app.finish(method, state["code"], t0)


class AioRecommender(pb_grpc.RecommenderServicer):
    """recserve.v1.Recommender on grpc.aio."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def _ranked(self, method: str, request, context, compute) -> AsyncIterator[pb.RankedItem]:
        app = self.app
        if isinstance(request, convert.Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        sent = 0
        try:
            async with _admitted(app, method, context) as state:
                check = _checker(context)
                r = compute(check)
                # The loop was busy computing: let it take in a cancellation or a
                # deadline that arrived meanwhile before anything is sent.
                await asyncio.sleep(0)
                check()
                await context.send_initial_metadata(convert.metadata(r))
                app.observe(method, r)
                for item in convert.ranked_items(r):
                    if sent == 0:
                        elapsed = time.perf_counter() - state["t0"]
                        app.metrics.first_item_seconds.labels(method).observe(elapsed)
                    elif sent % CHECK_EVERY == 0:
                        check()
                    yield item
                    sent += 1
        finally:
            app.metrics.items.labels(method).inc(sent)

    async def Recommend(self, request, context):
        # `_admitted` spelled out: the most frequent call skips the context
        # manager's generator, and its metrics are recorded once the answer is
        # handed to gRPC (call_soon), not while the client waits for it.
        app = self.app
        method = "Recommend"
        if isinstance(request, convert.Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        t0 = time.perf_counter()
        refused = app.try_admit(method, context)
        if refused is not None:
            await context.abort(*refused)
        try:
            check = _checker(context)
            app.shared_sync()
            r = app.router.recommend(convert.rec_query(request), check)
            check()  # a deadline that passed while computing (a cancel shows only later)
            context.set_trailing_metadata(convert.metadata(r))
            out = convert.response_bytes(request.request_id, r)
        except Exception as exc:
            status, message = app.failure(method, exc)
            app.finish(method, status.name, t0)
            if status is not grpc.StatusCode.CANCELLED:
                await context.abort(status, message)
            return pb.RecommendResponse()  # reached only when the client cancelled
        except BaseException:  # the client went away (CancelledError)
            app.finish(method, "CANCELLED", t0)
            raise
        app.release()
        asyncio.get_running_loop().call_soon(app.record_answer, method, r, t0, time.perf_counter())
        return out

    # grpc.aio needs streaming handlers themselves to be async generator functions.
    async def RecommendStream(self, request, context):
        app = self.app

        def compute(check):
            app.shared_sync()
            return app.router.recommend(convert.rec_query(request), check)

        async for item in self._ranked("RecommendStream", request, context, compute):
            yield item

    async def SimilarItems(self, request, context):
        app = self.app

        def compute(check):
            return app.router.similar(request.item_id, int(request.k), request.model, check)

        async for item in self._ranked("SimilarItems", request, context, compute):
            yield item

    async def RecommendBatch(self, request_iterator, context):
        app = self.app
        method = "RecommendBatch"
        async with _admitted(app, method, context):
            check = _checker(context)
            async for request in request_iterator:
                check()
                if isinstance(request, convert.Undecodable):
                    number = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    yield convert.batch_error(pb.RecommendRequest(), number, request.message)
                    continue
                app.shared_sync()
                try:
                    r = app.router.recommend(convert.rec_query(request), check)
                except RequestError as err:
                    number = getattr(grpc.StatusCode, err.status).value[0]
                    yield convert.batch_error(request, number, str(err))
                    continue
                app.observe(method, r)
                app.metrics.items.labels(method).inc(len(r))
                yield convert.response_bytes(request.request_id, r)

    async def PredictRatings(self, request, context):
        app = self.app
        method = "PredictRatings"
        if isinstance(request, convert.Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async with _admitted(app, method, context):
            app.shared_sync()
            p = app.router.predict(
                request.user_id,
                [(h.item_id, float(h.value)) for h in request.history],
                list(request.item_ids),
                request.model,
                float(request.interval),
            )
            _checker(context)()
            md = [("x-recserve-model", p.model), ("x-recserve-version", p.version)]
            if p.served_by:
                md.append(("x-recserve-served-by", p.served_by))
            await context.send_initial_metadata(tuple(md))
            app.metrics.requests.labels(method, p.model, p.served_by or p.model, "").inc()
            return convert.predictions(p)
        return pb.PredictRatingsResponse()  # reached only when the client cancelled

    async def RecordInteractions(self, request_iterator, context):
        app = self.app
        method = "RecordInteractions"
        loop = asyncio.get_running_loop()
        accepted = rejected = 0
        batch: list[Event] = []

        def store(events: list[Event]) -> int:
            n = app.store.append(events)  # committed (fsync) before it counts
            app.online.sync(app.store)
            return n

        async with _admitted(app, method, context):
            async for ev in request_iterator:
                e = None if isinstance(ev, convert.Undecodable) else _event(ev)
                if e is None or not app.router.known_item(e.item_id):
                    rejected += 1
                    continue
                batch.append(e)
                if len(batch) >= FEEDBACK_BATCH:
                    accepted += await loop.run_in_executor(None, store, list(batch))
                    batch.clear()
            if batch:
                accepted += await loop.run_in_executor(None, store, list(batch))
            app.metrics.feedback_events.labels("accepted").inc(accepted)
            app.metrics.feedback_events.labels("rejected").inc(rejected)
            return pb.RecordSummary(accepted=accepted, rejected=rejected)
        return pb.RecordSummary()  # reached only when the client cancelled


class AioAdmin(pb_grpc.AdminServicer):
    """recserve.v1.Admin on grpc.aio (the thread-pool servicer's logic)."""

    def __init__(self, app: App) -> None:
        self.sync = AdminServicer(app)

    async def _deny(self, context) -> None:
        denied = self.sync.app.auth_error(context, admin=True)
        if denied:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)

    async def ListModels(self, request, context):
        await self._deny(context)
        return pb.ListModelsResponse(models=self.sync._infos())

    async def GetModel(self, request, context):
        await self._deny(context)
        for info in self.sync._infos():
            if info.name == request.name:
                return info
        known = ", ".join(self.sync.app.router.names())
        await context.abort(
            grpc.StatusCode.NOT_FOUND, f"name: unknown model {request.name!r} (available: {known})"
        )

    async def ReloadModels(self, request, context):
        await self._deny(context)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.sync.reload)


def start_aio(app: App) -> int:
    """Start the asyncio server on a new loop thread; returns the bound port."""
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    started = threading.Event()

    async def boot() -> None:
        try:
            server = grpc.aio.server(options=app.server_options())
            port = app.register(server, AioRecommender(app), AioAdmin(app))
            for name, status in list(app._health_state.items()):
                await app.health.set(name, status)
            await server.start()
            loop.call_later(FLUSH_SECONDS, flush)
            ready.update(server=server, port=port)
        except BaseException as exc:  # reported to the caller of start_aio
            ready["error"] = exc
        finally:
            started.set()

    def flush() -> None:
        # The metrics queue is applied here, on the loop between two calls: a
        # thread doing it would take the GIL whenever a kernel lets go of it,
        # holding up the call in progress.
        try:
            app.metrics.flush()
        except Exception:  # metrics must never take the server down
            log.exception("applying metrics failed")
        if not app._stopped.is_set():
            loop.call_later(FLUSH_SECONDS, flush)

    def run() -> None:
        asyncio.set_event_loop(loop)
        ready["boot"] = loop.create_task(boot())
        loop.run_forever()

    threading.Thread(target=run, name="grpc-aio", daemon=True).start()
    started.wait()
    if "error" in ready:
        loop.call_soon_threadsafe(loop.stop)
        raise ready["error"]
    app._loop, app.server = loop, ready["server"]
    return int(ready["port"])


def stop_aio(app: App, grace: float) -> None:
    """Health NOT_SERVING, stop accepting, let streams finish within grace, stop the loop."""
    loop = app._loop
    if loop is None or app.server is None:
        return

    async def shutdown() -> None:
        # New calls already get UNAVAILABLE from the draining flag; wait for the
        # admitted ones and for callers to go quiet, then stop. (grpc.aio's stop
        # answers calls that are still arriving with CANCELLED, not UNAVAILABLE.)
        await app.health.enter_graceful_shutdown()
        end = loop.time() + grace
        while loop.time() < end and (app.active or time.monotonic() - app.last_call < DRAIN_QUIET):
            await asyncio.sleep(0.02)
        await app.server.stop(max(0.0, end - loop.time()))

    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(grace + 30)
    loop.call_soon_threadsafe(loop.stop)
