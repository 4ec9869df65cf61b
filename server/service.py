"""The gRPC service: validate -> convert -> call the router -> answer (one message,
or a stream). No math here.

`App` assembles a running server: config, feedback store (replayed into the
online state), the model catalogue loading in the background, health (overall
SERVING as soon as any model is loaded; `model/<name>` per model, hybrid and
experiment), server reflection, Prometheus metrics, an admission limit that
fails fast with RESOURCE_EXHAUSTED, and a drain that answers in-flight calls and
streams before exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from recserve.v1 import recommender_pb2 as pb
from recserve.v1 import recommender_pb2_grpc as pb_grpc
from server import convert
from server.config import ServerConfig
from server.feedback import Event, FeedbackStore, OnlineState, now
from server.memstat import file_residency, process_memory
from server.metrics import FLUSH_SECONDS, Metrics
from server.metrics import multiprocess as metrics_multiprocess
from server.retrieval import (
    MAX_ID_BYTES,
    SERVING,
    Catalog,
    Loader,
    Ranked,
    RequestError,
    Router,
    Slot,
    default_loader,
)

log = logging.getLogger("recserve.service")

OVERALL = ""
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Recommender"].full_name,
    pb.DESCRIPTOR.services_by_name["Admin"].full_name,
)
FEEDBACK_BATCH = 1000
MEMORY_INTERVAL = 5.0  # seconds between memory gauge updates
CHECK_EVERY = 64  # streamed items between cancellation checks


def health_name(model: str) -> str:
    """The health service name of one model (models cannot contain '/')."""
    return f"model/{model}"


class _Stop(Exception):
    """The client went away or its deadline passed: stop working."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class App:
    """A configured recserve server: build, start, drain."""

    def __init__(
        self,
        cfg: ServerConfig,
        loader: Loader = default_loader,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = Metrics(registry) if registry is not None else Metrics()
        # In-flight calls: read at scrape time from `active`, except with --workers,
        # where each process writes its count to its metrics file (livesum).
        self._count_inflight = metrics_multiprocess()
        if not self._count_inflight:
            self.metrics.inflight.set_function(lambda: self.active)
        self.aio = cfg.server == "asyncio"
        self.health = health.aio.HealthServicer() if self.aio else health.HealthServicer()
        self._loop: Any = None  # the asyncio server's event loop (server = "asyncio")
        self._health_state: dict[str, int] = {}
        self.online = OnlineState(cfg.online_history)
        self.store = FeedbackStore(cfg.feedback_db)
        self._seen_changes: int | None = None  # the log's change counter at the last sync
        self.catalog = Catalog(
            cfg.models,
            full_verify=cfg.verify == "full",
            kernel_threads=cfg.kernel_threads,
            loader=loader,
            on_change=self._model_changed,
            memory_budget=int(cfg.memory_budget_mb * 1024 * 1024),
        )
        self.router = Router(cfg, self.catalog, self.online)
        # Admitted calls still running: at most max_concurrency; the drain waits for them.
        self.active = 0
        self.last_call = 0.0  # monotonic time of the last call that asked for a slot
        self._active_lock = threading.Lock()
        self.draining = False
        self.server: grpc.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self.started = time.monotonic()
        self.serving_after: float | None = None  # seconds from start to overall SERVING
        self._info_labels: dict[str, tuple[str, str, str]] = {}
        self._stopped = threading.Event()
        self._metrics_http: tuple[Any, Any] | None = None
        for name in (OVERALL, *SERVICE_NAMES):
            self._set_health(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, name: str, status: int) -> None:
        """Set a health status from any thread (the asyncio servicer lives on its loop)."""
        if self._health_state.get(name) == status:
            return
        self._health_state[name] = status
        if not self.aio:
            self.health.set(name, status)
        elif self._loop is not None:  # before the loop runs, start_aio applies _health_state
            asyncio.run_coroutine_threadsafe(self.health.set(name, status), self._loop)

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> int:
        """Replay feedback, bind, start loading models; returns the bound port."""
        self.started = time.monotonic()
        n = self.online.sync(self.store)
        if n:
            log.info("replayed %d feedback events for %d users", n, len(self.online))
        if self.aio:
            from server.service_aio import start_aio

            port = start_aio(self)
        else:
            port = self._start_threads()
        self.port = port
        if self.cfg.metrics_port:
            self._metrics_http = start_http_server(
                self.cfg.metrics_port, registry=self.metrics.registry
            )
            self.metrics_port = self.cfg.metrics_port
        self.catalog.start()
        self.metrics.workers.set(1)
        self._refresh_health()
        threading.Thread(target=self._sample_forever, name="memory", daemon=True).start()
        if not self.aio:  # the asyncio server flushes on its loop, between calls
            threading.Thread(target=self._flush_forever, name="metrics", daemon=True).start()
        log.info(
            "listening on %s:%d (%d models loading)", self.cfg.host, port, len(self.catalog.slots())
        )
        return port

    def server_options(self) -> list[tuple[str, int]]:
        """Channel options shared by both server kinds."""
        return [
            ("grpc.max_receive_message_length", self.cfg.max_message_bytes),
            ("grpc.max_send_message_length", self.cfg.max_message_bytes),
            # Several worker processes share the port; one process must fail to
            # bind a taken port instead of silently sharing it.
            ("grpc.so_reuseport", 1 if self.cfg.workers > 1 else 0),
        ]

    def register(self, server: Any, recommender: Any, admin: Any) -> int:
        """Add every service and reflection to a (sync or asyncio) server; bind; the port."""
        convert.add_services(server, recommender, admin)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{self.cfg.host}:{self.cfg.port}"
        try:
            creds = self.server_credentials()
            port = (
                server.add_secure_port(address, creds)
                if creds is not None
                else server.add_insecure_port(address)
            )
        except RuntimeError as exc:
            raise OSError(f"port: cannot bind {address} ({exc})") from None
        if port == 0:
            raise OSError(f"port: cannot bind {address}")
        return port

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS (mutual when tls_client_ca is set) from the configured PEM files, or None."""
        cfg = self.cfg
        if not cfg.tls_cert:
            return None
        ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def _start_threads(self) -> int:
        # Workers beyond the admission cap leave room for health, admin and the
        # RESOURCE_EXHAUSTED answers themselves.
        pool = ThreadPoolExecutor(self.cfg.max_concurrency + 8, thread_name_prefix="rpc")
        server = grpc.server(pool, options=self.server_options())
        port = self.register(server, RecommenderServicer(self), AdminServicer(self))
        server.start()
        self.server = server
        return port

    def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` s."""
        grace = self.cfg.grace_seconds if grace is None else grace
        self.draining = True
        self._stopped.set()
        if self.aio:
            from server.service_aio import stop_aio

            stop_aio(self, grace)
        else:
            self.health.enter_graceful_shutdown()
            if self.server is not None:
                self.server.stop(grace).wait()
        self.catalog.close()
        self.store.close()
        self.metrics.flush()
        if self._metrics_http is not None:
            self._metrics_http[0].shutdown()
        log.info("drained and stopped")

    def wait(self) -> None:
        """Block until the server stops."""
        if self.server is not None:
            self.server.wait_for_termination()

    def shared_sync(self) -> None:
        """With several workers, pick up events other workers recorded: a read of
        the log when its shared change counter moved since the last one."""
        if self.cfg.workers > 1:
            changes = self.store.changes()
            if changes != self._seen_changes or changes < 0:
                # Noted before reading: a bump during the read triggers another one.
                self._seen_changes = changes
                self.online.sync(self.store)

    # -- health --------------------------------------------------------------------------

    def _model_changed(self, slot: Slot) -> None:
        m = self.metrics
        m.model_serving.labels(slot.name).set(1 if slot.state == SERVING else 0)
        if slot.state == SERVING and slot.model is not None:
            m.model_load_seconds.labels(slot.name).set(slot.load_seconds)
            old = self._info_labels.pop(slot.name, None)
            if old is not None:
                with contextlib.suppress(KeyError):
                    m.model_info.remove(*old)
            labels = (slot.name, slot.model.algorithm, slot.version)
            m.model_info.labels(*labels).set(1)
            self._info_labels[slot.name] = labels
            self.sample_memory()
        self._refresh_health()

    def sample_memory(self) -> None:
        """Update the memory gauges: process RSS/PSS, per model file mapped/resident."""
        m = self.metrics
        rss, pss = process_memory()
        m.resident_bytes.set(rss)
        m.proportional_bytes.set(pss)
        files: dict[str, tuple[str, str, int]] = {}
        for slot in self.catalog.slots():
            if slot.state != SERVING or slot.model is None:
                continue
            for fname, entry in slot.model.manifest.get("files", {}).items():
                path = str((Path(slot.path) / fname).resolve())
                files[path] = (slot.name, fname.removesuffix(".npy"), int(entry["bytes"]))
        resident = file_residency(files)
        for path, (model, component, size) in files.items():
            m.model_bytes.labels(model, component, "mapped").set(size)
            m.model_bytes.labels(model, component, "resident").set(resident.get(path, 0))

    def _sample_forever(self) -> None:
        while not self._stopped.wait(MEMORY_INTERVAL):
            try:
                self.sample_memory()
            except Exception:  # metrics must never take the server down
                log.exception("memory sampling failed")

    def _flush_forever(self) -> None:
        while not self._stopped.wait(FLUSH_SECONDS):
            try:
                self.metrics.flush()
            except Exception:  # metrics must never take the server down
                log.exception("applying metrics failed")

    def _refresh_health(self) -> None:
        if self.draining:
            return
        S, N = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        names = self.router.names()
        for name in names:
            self._set_health(health_name(name), S if self.router.ready(name) else N)
        if any(s.state == SERVING for s in self.catalog.slots()):
            if self.serving_after is None:
                self.serving_after = time.monotonic() - self.started
                log.info("SERVING %.3fs after start", self.serving_after)
            for name in (OVERALL, *SERVICE_NAMES):
                self._set_health(name, S)

    # -- admission -----------------------------------------------------------------------

    def auth_error(self, context: Any, admin: bool) -> str | None:
        """Why the call's bearer token is refused, or None when it may proceed.

        Admin RPCs need `authorization: Bearer <admin_token>` when a token is
        configured; Recommender RPCs too with token_for_all. The comparison is
        constant-time, and the token is never logged or echoed."""
        token = self.cfg.admin_token
        if not token or not (admin or self.cfg.token_for_all):
            return None
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                given = value.removeprefix("Bearer ").strip()
        if hmac.compare_digest(given.encode(), token.encode()):
            return None
        return "authorization: missing or wrong bearer token"

    def try_admit(self, method: str, context: Any = None) -> tuple[grpc.StatusCode, str] | None:
        """Take one of max_concurrency slots; else the status to fail fast with."""
        self.last_call = time.monotonic()
        if context is not None and (denied := self.auth_error(context, admin=False)):
            self.metrics.rejected.labels(method, "UNAUTHENTICATED").inc()
            return grpc.StatusCode.UNAUTHENTICATED, denied
        if self.draining:
            self.metrics.rejected.labels(method, "UNAVAILABLE").inc()
            return grpc.StatusCode.UNAVAILABLE, "server: draining, retry another replica"
        with self._active_lock:
            full = self.active >= self.cfg.max_concurrency
            if not full:
                self.active += 1
        if full:
            self.metrics.rejected.labels(method, "RESOURCE_EXHAUSTED").inc()
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server: {self.cfg.max_concurrency} requests in flight (max_concurrency); retry",
            )
        if self._count_inflight:
            self.metrics.inflight.inc()
        return None

    def release(self) -> None:
        """Give back the slot try_admit took."""
        with self._active_lock:
            self.active -= 1
        if self._count_inflight:
            self.metrics.inflight.dec()

    def finish(self, method: str, code: str, t0: float) -> None:
        """Release the slot and record the call's duration under its final status."""
        self.release()
        self.metrics.rpc_seconds.labels(method, code).observe(time.perf_counter() - t0)

    @staticmethod
    def failure(method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """The status and message for an exception raised while answering."""
        if isinstance(exc, _Stop):
            return exc.code, str(exc)
        if isinstance(exc, RequestError):
            return getattr(grpc.StatusCode, exc.status), str(exc)
        log.exception("%s failed", method, exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"server: internal error ({type(exc).__name__}), logged"

    @contextlib.contextmanager
    def admitted(self, method: str, context: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
        """Hold one of max_concurrency slots for the call, or fail fast; time the call."""
        t0 = time.perf_counter()
        refused = self.try_admit(method, context)
        if refused is not None:
            context.abort(*refused)
        state: dict[str, Any] = {"code": "OK", "t0": t0}
        try:
            yield state
        except GeneratorExit:
            state["code"] = "CANCELLED"
            raise
        except Exception as exc:
            code, message = self.failure(method, exc)
            state["code"] = code.name
            if code is not grpc.StatusCode.CANCELLED:
                context.abort(code, message)
        finally:
            self.finish(method, state["code"], t0)

    def checker(self, context: grpc.ServicerContext, stage: str = "") -> Callable[[], None]:
        """A callable that raises _Stop once the client cancelled or its deadline passed."""

        def check() -> None:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise _Stop(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the answer")
            if not context.is_active():
                raise _Stop(grpc.StatusCode.CANCELLED, "client cancelled")

        return check

    def stream(
        self, method: str, context: grpc.ServicerContext, r: Ranked, state: dict[str, Any]
    ) -> Iterator[pb.RankedItem]:
        """Send metadata, then the ranked items, stopping if the client goes away."""
        context.send_initial_metadata(convert.metadata(r))
        self.observe(method, r)
        check = self.checker(context)
        sent = 0
        try:
            for item in convert.ranked_items(r):
                if sent == 0:
                    self.metrics.first_item_seconds.labels(method).observe(
                        time.perf_counter() - state["t0"]
                    )
                elif sent % CHECK_EVERY == 0:
                    check()
                yield item
                sent += 1
        finally:
            self.metrics.items.labels(method).inc(sent)

    def answer(
        self, method: str, context: Any, request_id: str, r: Ranked, state: dict[str, Any]
    ) -> pb.RecommendResponse | bytes:
        """A unary ranking (the thread-pool server's): one message, the metadata
        as trailers (no extra header write), and the same metrics a stream records."""
        context.set_trailing_metadata(convert.metadata(r))
        out = convert.response_bytes(request_id, r)
        self.record_answer(method, r, state["t0"], time.perf_counter(), finish=False)
        return out

    def record_answer(
        self, method: str, r: Ranked, t0: float, t1: float, finish: bool = True
    ) -> None:
        """The metrics of a unary answer built at perf_counter t1 for a call
        admitted at t0 (the call's duration too, with `finish`). The asyncio
        server runs this after the answer is on its way."""
        self.observe(method, r)
        n = len(r)
        if n:
            self.metrics.first_item_seconds.labels(method).observe(t1 - t0)
            self.metrics.items.labels(method).inc(n)
        if finish:
            self.metrics.rpc_seconds.labels(method, "OK").observe(t1 - t0)

    def observe(self, method: str, r: Ranked) -> None:
        """Count an answered request: who served it, fallbacks, fold-ins, arms, stages."""
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


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """recserve.v1.Recommender over an App."""

    def __init__(self, app: App) -> None:
        self.app = app

    def Recommend(
        self, request: pb.RecommendRequest, context: grpc.ServicerContext
    ) -> pb.RecommendResponse:
        _refuse_undecodable(request, context)
        with self.app.admitted("Recommend", context) as state:
            self.app.shared_sync()
            check = self.app.checker(context)
            r = self.app.router.recommend(convert.rec_query(request), check)
            check()
            return self.app.answer("Recommend", context, request.request_id, r, state)
        return pb.RecommendResponse()  # reached only when the client cancelled

    def RecommendStream(self, request: pb.RecommendRequest, context: grpc.ServicerContext):
        _refuse_undecodable(request, context)
        with self.app.admitted("RecommendStream", context) as state:
            self.app.shared_sync()
            r = self.app.router.recommend(convert.rec_query(request), self.app.checker(context))
            self.app.checker(context)()
            yield from self.app.stream("RecommendStream", context, r, state)

    def RecommendBatch(self, request_iterator, context: grpc.ServicerContext):
        with self.app.admitted("RecommendBatch", context):
            check = self.app.checker(context)
            for request in request_iterator:
                check()
                if isinstance(request, convert.Undecodable):
                    number = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    yield convert.batch_error(pb.RecommendRequest(), number, request.message)
                    continue
                self.app.shared_sync()
                try:
                    r = self.app.router.recommend(convert.rec_query(request), check)
                except RequestError as err:
                    number = getattr(grpc.StatusCode, err.status).value[0]
                    yield convert.batch_error(request, number, str(err))
                    continue
                self.app.observe("RecommendBatch", r)
                self.app.metrics.items.labels("RecommendBatch").inc(len(r))
                yield convert.response_bytes(request.request_id, r)

    def SimilarItems(self, request: pb.SimilarItemsRequest, context: grpc.ServicerContext):
        _refuse_undecodable(request, context)
        with self.app.admitted("SimilarItems", context) as state:
            check = self.app.checker(context)
            r = self.app.router.similar(request.item_id, int(request.k), request.model, check)
            check()
            yield from self.app.stream("SimilarItems", context, r, state)

    def PredictRatings(
        self, request: pb.PredictRatingsRequest, context: grpc.ServicerContext
    ) -> pb.PredictRatingsResponse:
        _refuse_undecodable(request, context)
        with self.app.admitted("PredictRatings", context):
            self.app.shared_sync()
            p = self.app.router.predict(
                request.user_id,
                [(h.item_id, float(h.value)) for h in request.history],
                list(request.item_ids),
                request.model,
                float(request.interval),
            )
            self.app.checker(context)()
            md = [("x-recserve-model", p.model), ("x-recserve-version", p.version)]
            if p.served_by:
                md.append(("x-recserve-served-by", p.served_by))
            context.send_initial_metadata(tuple(md))
            self.app.metrics.requests.labels(
                "PredictRatings", p.model, p.served_by or p.model, ""
            ).inc()
            return convert.predictions(p)
        return pb.PredictRatingsResponse()  # reached only when the client cancelled

    def RecordInteractions(
        self, request_iterator, context: grpc.ServicerContext
    ) -> pb.RecordSummary:
        app = self.app
        with app.admitted("RecordInteractions", context):
            accepted = rejected = 0
            batch: list[Event] = []

            def flush() -> None:
                nonlocal accepted
                if batch:
                    accepted += app.store.append(batch)  # committed before it counts
                    app.online.sync(app.store)
                    batch.clear()

            for ev in request_iterator:
                e = None if isinstance(ev, convert.Undecodable) else _event(ev)
                if e is None or not app.router.known_item(e.item_id):
                    rejected += 1
                    continue
                batch.append(e)
                if len(batch) >= FEEDBACK_BATCH:
                    flush()
            flush()
            app.metrics.feedback_events.labels("accepted").inc(accepted)
            app.metrics.feedback_events.labels("rejected").inc(rejected)
            return pb.RecordSummary(accepted=accepted, rejected=rejected)
        return pb.RecordSummary()  # reached only when the client cancelled


def _refuse_undecodable(request: Any, context: grpc.ServicerContext) -> None:
    if isinstance(request, convert.Undecodable):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _event(ev: pb.Interaction) -> Event | None:
    """A valid feedback event, or None (counted as rejected)."""
    if not ev.user_id or not ev.item_id or not np.isfinite(ev.value):
        return None
    if max(len(ev.user_id.encode()), len(ev.item_id.encode())) > MAX_ID_BYTES:
        return None
    return Event(ev.user_id, ev.item_id, float(ev.value) or 1.0, int(ev.timestamp) or now())


class AdminServicer(pb_grpc.AdminServicer):
    """recserve.v1.Admin over an App."""

    def __init__(self, app: App) -> None:
        self.app = app

    def _infos(self) -> list[pb.ModelInfo]:
        router, cfg = self.app.router, self.app.cfg
        out = [convert.model_info(s) for s in self.app.catalog.slots()]
        out += [
            convert.virtual_info(h.name, "hybrid", h.weights, router.ready(h.name))
            for h in cfg.hybrids.values()
        ]
        out += [
            convert.virtual_info(e.name, "experiment", e.arms, router.ready(e.name))
            for e in cfg.experiments.values()
        ]
        return sorted(out, key=lambda i: i.name)

    def _deny(self, context) -> None:
        denied = self.app.auth_error(context, admin=True)
        if denied:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)

    def ListModels(self, request, context) -> pb.ListModelsResponse:
        self._deny(context)
        return pb.ListModelsResponse(models=self._infos())

    def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        self._deny(context)
        for info in self._infos():
            if info.name == request.name:
                return info
        known = ", ".join(self.app.router.names())
        context.abort(
            grpc.StatusCode.NOT_FOUND, f"name: unknown model {request.name!r} (available: {known})"
        )
        raise AssertionError("unreachable")

    def ReloadModels(self, request, context) -> pb.ReloadModelsResponse:
        self._deny(context)
        return self.reload()

    def reload(self) -> pb.ReloadModelsResponse:
        """Switch to newly published versions (no authorization check: callers do it)."""
        switched, refused = self.app.catalog.reload()
        for slot in refused:
            self.app.metrics.refused_versions.labels(slot.name).inc()
        return pb.ReloadModelsResponse(
            reloaded=[convert.model_info(s) for s in switched],
            refused=[convert.model_info(s) for s in refused],
        )
