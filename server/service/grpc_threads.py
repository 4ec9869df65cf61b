"""The thread-pool gRPC transport (`server = "threads"`): grpc.server over the core.

Each RPC is a call into `recserve.service.core`; this module only adapts
gRPC's context (deadline, cancellation, metadata, statuses) and runs the
server, its health and its metrics flush.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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


# How long stop waits for the threads still running handlers once gRPC stopped:
# gRPC returns when the calls are over for their clients, not when the threads
# running their handlers have returned, and the app closes the store next.
HANDLERS_JOIN_S = 10.0

# How long a refused request stream is read to its end before the refusal is sent:
# a client that writes its requests at once is answered when the last one arrives.
DRAIN_REQUESTS_S = 1.0


def _drain(requests: Iterator, seconds: float) -> None:
    """Read what a client still sends of a refused request stream, for at most
    `seconds`, before the status goes out: clients still writing when the call
    ends report INTERNAL instead of the status. A reader thread, since the
    iterator blocks; the status ends the call, and with it the reader."""

    def read() -> None:
        try:
            for _ in requests:
                pass
        except Exception:  # the call ended meanwhile: nothing left to read
            pass

    reader = threading.Thread(target=read, name="drain", daemon=True)
    reader.start()
    reader.join(seconds)


class _Call:
    """A grpc.ServicerContext as the core's Call."""

    __slots__ = ("context",)

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context

    def time_remaining(self) -> float | None:
        return self.context.time_remaining()

    def cancelled(self) -> bool:
        return not self.context.is_active()

    def invocation_metadata(self) -> Any:
        return self.context.invocation_metadata()

    def peer(self) -> str:
        return self.context.peer()


def _requests(requests: Iterator, context: grpc.ServicerContext) -> Iterator:
    """A client request stream. gRPC raises a bare RpcError when the call ends
    while it is read (the client cancelled, or the deadline passed mid-stream):
    that is the caller gone, not an internal error (found under overload:
    batches counted INTERNAL, each logged with a traceback)."""
    try:
        yield from requests
    except grpc.RpcError:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise Failure(
                Code.DEADLINE_EXCEEDED, "deadline passed while the requests were read"
            ) from None
        raise Failure(Code.CANCELLED, "client went away while its requests were read") from None


def _abort(context: grpc.ServicerContext, f: Failure) -> bytes:
    """Answer the Failure's status (raises), or, for a caller that went away,
    nothing: an empty message nobody reads."""
    if f.code is not Code.CANCELLED:
        code, details, trailer = grpc_common.status(f)
        context.set_trailing_metadata(trailer)
        context.abort(code, details)
    return b""


class Recommender(pb_grpc.RecommenderServicer):
    """recserve.v1.Recommender over the core."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def _unary(self, method: str, request: Any, context, answer: Callable) -> Any:
        try:
            with self.core.session(method, _Call(context)) as s:
                out, md = answer(s, request)
        except Failure as f:
            return _abort(context, f)
        if md:
            context.set_trailing_metadata(md)
        return out

    def _stream(self, method: str, request: Any, context, answer: Callable) -> Iterator[Any]:
        try:
            with self.core.session(method, _Call(context)) as s:
                md, items = answer(s, request)
                context.send_initial_metadata(md)
                yield from items
        except Failure as f:
            _abort(context, f)

    def Recommend(self, request, context):
        return self._unary("Recommend", request, context, self.core.recommend)

    def RecommendStream(self, request, context):
        return self._stream("RecommendStream", request, context, self.core.recommend_stream)

    def SimilarItems(self, request, context):
        return self._stream("SimilarItems", request, context, self.core.similar)

    def GetSimilarItems(self, request, context):
        return self._unary("GetSimilarItems", request, context, self.core.similar_unary)

    def RecommendBatch(self, request_iterator, context):
        try:
            with self.core.session("RecommendBatch", _Call(context)) as s:
                for request in _requests(request_iterator, context):
                    yield self.core.batch_one(s, request)
        except Failure as f:
            _drain(request_iterator, DRAIN_REQUESTS_S)
            _abort(context, f)

    def PredictRatings(self, request, context):
        return self._unary("PredictRatings", request, context, self.core.predict)

    def RecordInteractions(self, request_iterator, context):
        requests = _requests(request_iterator, context)
        return self._unary("RecordInteractions", requests, context, self.core.record)


class Admin(pb_grpc.AdminServicer):
    """recserve.v1.Admin over the core."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def _admin(self, request: Any, context, answer: Callable) -> Any:
        try:
            self.core.admin(_Call(context))
            return answer(request)
        except Failure as f:
            return _abort(context, f)

    def ListModels(self, request, context):
        return self._admin(request, context, self.core.list_models)

    def GetModel(self, request, context):
        return self._admin(request, context, self.core.get_model)

    def ReloadModels(self, request, context):
        return self._admin(request, context, self.core.reload)


class ThreadsTransport:
    """A running grpc.server: health, metrics flush, stop."""

    def __init__(self, app: App) -> None:
        cfg = app.cfg
        self.app = app
        self.health = health.HealthServicer()
        # Workers beyond the admission cap leave room for health, admin and the
        # OVERLOADED refusals themselves.
        self._workers: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(
            cfg.max_concurrency + 8,
            thread_name_prefix="rpc",
            initializer=lambda: self._workers.append(threading.current_thread()),
        )
        self.server = grpc.server(self._pool, options=grpc_common.server_options(cfg))
        self.port = grpc_common.register(
            self.server, cfg, Recommender(app.core), Admin(app.core), self.health
        )
        self._stopped = threading.Event()
        self._flusher = threading.Thread(target=self._flush_forever, name="metrics", daemon=True)

    def start(self, states: dict[str, int]) -> None:
        """Serve, with the health statuses set so far."""
        for name, state in states.items():
            self.health.set(name, state)
        self.server.start()
        self._flusher.start()

    def set_health(self, name: str, state: int) -> None:
        """Set one health status (from any thread)."""
        self.health.set(name, state)

    def _flush_forever(self) -> None:
        while not self._stopped.wait(FLUSH_SECONDS):
            try:
                self.app.metrics.flush()
            except Exception:  # metrics must never take the server down
                log.exception("applying metrics failed")

    def stop(self, grace: float) -> None:
        """NOT_SERVING everywhere, then let in-flight calls finish within `grace` s."""
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        # Then the handlers' threads: nothing of ours runs once stop returns.
        self._pool.shutdown(wait=False, cancel_futures=True)
        end = time.monotonic() + HANDLERS_JOIN_S
        for thread in [*self._workers, self._flusher]:
            thread.join(max(0.0, end - time.monotonic()))
        if busy := [t.name for t in self._workers if t.is_alive()]:
            log.warning(
                "%d handler threads still running %.0f s after the server stopped: %s",
                len(busy),
                HANDLERS_JOIN_S,
                ", ".join(busy),
            )

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()
