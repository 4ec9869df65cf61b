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
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health

from recserve.metrics import FLUSH_SECONDS
from recserve.service import grpc_common
from recserve.service.core import Code, Core, Failure
from recserve.v1 import recommender_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from recserve.service.app import App

log = logging.getLogger("recserve.service")

# Seconds without a new call after which a draining asyncio server stops.
DRAIN_QUIET = 0.25


class _Call:
    """A grpc.aio.ServicerContext as the core's Call."""

    __slots__ = ("context",)

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.context = context

    def time_remaining(self) -> float | None:
        return self.context.time_remaining()

    def cancelled(self) -> bool:
        return self.context.cancelled()

    def metadata(self) -> Any:
        return self.context.invocation_metadata()

    def peer(self) -> str:
        return self.context.peer()


async def _abort(context: grpc.aio.ServicerContext, f: Failure) -> bytes:
    """Answer the Failure's status (raises), or nothing for a caller that went away."""
    if f.code is not Code.CANCELLED:
        await context.abort(*grpc_common.status(f))
    return b""


class Recommender(pb_grpc.RecommenderServicer):
    """recserve.v1.Recommender over the core, on grpc.aio."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def _unary(self, method: str, request: Any, context, answer: Callable) -> Any:
        defer = asyncio.get_running_loop().call_soon
        try:
            with self.core.session(method, _Call(context), defer) as s:
                out, md = answer(s, request)
        except Failure as f:
            return await _abort(context, f)
        if md:
            context.set_trailing_metadata(md)
        return out

    async def _stream(self, method: str, request: Any, context, answer: Callable):
        try:
            with self.core.session(method, _Call(context)) as s:
                md, items = answer(s, request)
                # The loop was busy computing: take in a cancellation or a deadline
                # that arrived meanwhile before anything is sent.
                await asyncio.sleep(0)
                await context.send_initial_metadata(md)
                for item in items:
                    yield item
        except Failure as f:
            await _abort(context, f)

    async def Recommend(self, request, context):
        return await self._unary("Recommend", request, context, self.core.recommend)

    # grpc.aio needs streaming handlers themselves to be async generator functions.
    async def RecommendStream(self, request, context):
        async for item in self._stream(
            "RecommendStream", request, context, self.core.recommend_stream
        ):
            yield item

    async def SimilarItems(self, request, context):
        async for item in self._stream("SimilarItems", request, context, self.core.similar):
            yield item

    async def RecommendBatch(self, request_iterator: AsyncIterator, context):
        try:
            with self.core.session("RecommendBatch", _Call(context)) as s:
                async for request in request_iterator:
                    yield self.core.batch_one(s, request)
        except Failure as f:
            await _abort(context, f)

    async def PredictRatings(self, request, context):
        return await self._unary("PredictRatings", request, context, self.core.predict)

    async def RecordInteractions(self, request_iterator: AsyncIterator, context):
        loop = asyncio.get_running_loop()
        try:
            with self.core.session("RecordInteractions", _Call(context)):
                rec = self.core.recorder()
                async for ev in request_iterator:
                    if (full := rec.add(ev)) is not None:
                        await loop.run_in_executor(None, rec.store, full)
                await loop.run_in_executor(None, rec.store, rec.rest())
                return rec.summary()
        except Failure as f:
            return await _abort(context, f)


class Admin(pb_grpc.AdminServicer):
    """recserve.v1.Admin over the core, on grpc.aio."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def _admin(self, request: Any, context, answer: Callable, blocking: bool = False):
        try:
            self.core.admin(_Call(context))
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
        self.loop = asyncio.new_event_loop()
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._stopped = threading.Event()

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
                    server, cfg, Recommender(core), Admin(core), self.health
                )
                for name, state in states.items():
                    await self.health.set(name, state)
                await server.start()
                self.server = server
                loop.call_later(FLUSH_SECONDS, self._flush)
            except BaseException as exc:  # reported to the caller of start
                ready["error"] = exc
            finally:
                started.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            ready["boot"] = loop.create_task(boot())
            loop.run_forever()

        threading.Thread(target=run, name="grpc-aio", daemon=True).start()
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

    def set_health(self, name: str, state: int) -> None:
        """Set one health status from any thread (the servicer lives on the loop)."""
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

    def wait(self) -> None:
        """Block until the server stops."""
        self._stopped.wait()
