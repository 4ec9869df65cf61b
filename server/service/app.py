"""A running recserve server's life cycle: build, start, health, drain.

`App` assembles the parts (config, feedback store replayed into the online
state, the catalogue loading in the background, router, core, metrics) and
runs one gRPC transport over them. Health: overall SERVING as soon as any
model is loaded, `model/<name>` per model, hybrid and experiment, NOT_SERVING
while draining. The drain answers in-flight calls and streams before exiting.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from recserve.config import ServerConfig
from recserve.feedback import FeedbackUnavailable, OnlineState, open_store
from recserve.memstat import file_residency, process_memory
from recserve.metrics import Metrics, serve_http
from recserve.service import auth
from recserve.service.core import Core
from recserve.service.grpc_common import NOT_SERVING, OVERALL, SERVICE_NAMES
from recserve.service.grpc_common import SERVING as HEALTH_SERVING
from recserve.serving import SERVING, Catalog, Loader, Router, Slot, default_loader

log = logging.getLogger("recserve.service")

MEMORY_INTERVAL = 5.0  # seconds between memory gauge updates
FEEDBACK_HEALTH = "feedback"  # health name: SERVING while a shared store is followed
THREAD_JOIN_S = 2.0  # drain's wait for the memory sampler and the follower to end
FOLLOW_BLOCK_MS = 1000  # a follower's blocking read; new events end it at once
FOLLOW_RETRY, FOLLOW_RETRY_MAX = 0.1, 2.0  # seconds between reconnection attempts


def health_name(model: str) -> str:
    """The health service name of one model (models cannot contain '/')."""
    return f"model/{model}"


class App:
    """A configured recserve server: build, start, drain."""

    def __init__(
        self,
        cfg: ServerConfig,
        loader: Loader = default_loader,
        registry: CollectorRegistry | None = None,
        settle_heap: bool = False,
    ) -> None:
        """settle_heap: freeze the loaded models' objects out of the cyclic GC
        (Catalog); for a server process, not for an App embedded in a test."""
        self.cfg = cfg
        self.metrics = Metrics(registry) if registry is not None else Metrics()
        self.online = OnlineState(cfg.online_history, cfg.online_max_events)
        self.store = open_store(cfg.feedback_target())
        self.catalog = Catalog(
            cfg.models,
            full_verify=cfg.verify == "full",
            kernel_threads=cfg.kernel_threads,
            loader=loader,
            on_change=self._model_changed,
            memory_budget=int(cfg.memory_budget_mb * 1024 * 1024),
            settle_heap=settle_heap,
        )
        self.router = Router(cfg, self.catalog, self.online)
        self.core = Core(cfg, self.catalog, self.router, self.online, self.store, self.metrics)
        self.core.on_config = self._config_changed
        self.transport: Any = None  # grpc_aio.AioTransport or grpc_threads.ThreadsTransport
        self.port = 0
        self.metrics_port = 0
        self.started = time.monotonic()
        self.serving_after: float | None = None  # seconds from start to overall SERVING
        self._health: dict[str, int] = {}
        self._health_lock = threading.Lock()
        self._info_labels: dict[str, tuple[str, str, str]] = {}
        # model -> (bundle path, its files), for the memory gauges (_bundle_files)
        self._files: dict[str, tuple[str, dict[str, tuple[str, str, int]]]] = {}
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []  # the memory sampler and follower
        self._drain_lock = threading.RLock()
        self._metrics_http: tuple[Any, Any] | None = None
        self._feedback_up: bool | None = None
        for name in (OVERALL, *SERVICE_NAMES):
            self._set_health(name, NOT_SERVING)

    @property
    def draining(self) -> bool:
        """True once drain began: new calls are refused with UNAVAILABLE."""
        return self.core.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.core.draining = value

    def shared_sync(self) -> None:
        """Pick up feedback other workers recorded (see Core.shared_sync)."""
        self.core.shared_sync()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> int:
        """Replay feedback, bind, start loading models; returns the bound port."""
        self.started = time.monotonic()
        try:
            n = self.online.sync(self.store)  # caught up before any call is answered
        except FeedbackUnavailable as exc:  # a shared store: the follower retries
            n = 0
            self._feedback_state(False, exc)
        else:
            self._feedback_state(True)
        if n:
            log.info("replayed %d feedback events for %d users", n, len(self.online))
        if not self.cfg.admin_token and not auth.is_loopback_host(self.cfg.host):
            log.warning(
                "Admin is reachable on %s without admin_token: it answers loopback peers "
                "only; set admin_token (RECSERVE_ADMIN_TOKEN) to manage this server remotely",
                self.cfg.host,
            )
        if self.cfg.server == "asyncio":
            from recserve.service.grpc_aio import AioTransport as Transport
        else:
            from recserve.service.grpc_threads import ThreadsTransport as Transport
        if self.cfg.metrics_port:  # first: a taken port stops start-up before gRPC listens
            self._metrics_http = serve_http(self.cfg.metrics_port, self.metrics.registry)
            self.metrics_port = self.cfg.metrics_port
        transport = Transport(self)
        try:
            with self._health_lock:
                transport.start(dict(self._health))
                self.transport = transport
        except BaseException:
            if self._metrics_http is not None:
                self._metrics_http[0].shutdown()
                self._metrics_http[0].server_close()
                self._metrics_http = None
            raise
        self.port = transport.port
        self.catalog.start()
        self.metrics.workers.set(1)
        self._refresh_health()
        self._threads.append(
            threading.Thread(target=self._sample_forever, name="memory", daemon=True)
        )
        if self.store.shared:
            follower = threading.Thread(target=self._follow, name="feedback", daemon=True)
            self._threads.append(follower)
        for thread in self._threads:
            thread.start()
        self._warn_unknown()
        log.info(
            "listening on %s:%d (%d models loading)",
            self.cfg.host,
            self.port,
            len(self.catalog.slots()),
        )
        return self.port

    def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` s.
        A second call (a signal handler and a `finally` both draining) waits for
        the first to finish and returns."""
        with self._drain_lock:
            if self._stopped.is_set():
                return
            self._drain(self.cfg.grace_seconds if grace is None else grace)

    def _drain(self, grace: float) -> None:
        self.core.draining = True
        self._stopped.set()
        if self.transport is not None:
            self.transport.stop(grace)
        self.catalog.close()
        self.store.close()  # ends a follower's blocking read
        for thread in self._threads:  # both end at _stopped: none outlives drain
            thread.join(THREAD_JOIN_S)
        self.metrics.flush()
        if self._metrics_http is not None:
            self._metrics_http[0].shutdown()
        log.info("drained and stopped")

    def wait(self) -> None:
        """Block until the server stops."""
        if self.transport is not None:
            self.transport.wait()

    # -- health --------------------------------------------------------------------------

    def _set_health(self, name: str, status: int) -> None:
        """Set a health status from any thread (applied by the transport once it runs)."""
        with self._health_lock:
            if self._health.get(name) == status:
                return
            self._health[name] = status
            if self.transport is not None:
                self.transport.set_health(name, status)

    def _refresh_health(self) -> None:
        if self.core.draining:
            return
        for name in self.router.names():
            ready = self.router.ready(name)
            self._set_health(health_name(name), HEALTH_SERVING if ready else NOT_SERVING)
        if any(s.state == SERVING for s in self.catalog.slots()):
            if self.serving_after is None:
                self.serving_after = time.monotonic() - self.started
                log.info("SERVING %.3fs after start", self.serving_after)
            for name in (OVERALL, *SERVICE_NAMES):
                self._set_health(name, HEALTH_SERVING)

    def _warn_unknown(self) -> None:
        """Log every name the config uses that names nothing here (a typo, or a
        model not published yet), at start and after a reload changed the config."""
        for where, name in self.router.unknown_names():
            log.warning(
                "%s: %r is no model, hybrid or experiment under %s; %s",
                where,
                name,
                self.cfg.models,
                "until it is published, requests naming no model are answered by its "
                "fallback chain (served_by names the model that answered)"
                if where == "default_model"
                else "requests that reach it go on down its fallback chain",
            )

    def _config_changed(self, gone: list[str]) -> None:
        """A reload swapped in a new config (Core._reconfigure): health for new
        hybrids and experiments, NOT_SERVING for those it removed."""
        self.cfg = self.core.cfg
        for name in gone:
            self._set_health(health_name(name), NOT_SERVING)
        self._refresh_health()
        self._warn_unknown()

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

    # -- feedback ------------------------------------------------------------------------

    def _follow(self) -> None:
        """Apply what other replicas record as it arrives (a shared store); while the
        store is unreachable, retry with backoff, then catch up without a restart."""
        backoff = FOLLOW_RETRY
        while not self._stopped.is_set():
            try:
                self.online.sync(self.store)
                self._feedback_state(True)
                backoff = FOLLOW_RETRY
                self.store.wait(self.online.last_id, FOLLOW_BLOCK_MS)
            except FeedbackUnavailable as exc:
                if self._stopped.is_set():  # drain closed the store under a blocking read
                    return
                self._feedback_state(False, exc)
                self._stopped.wait(backoff)
                backoff = min(2 * backoff, FOLLOW_RETRY_MAX)
            except Exception:  # never let the follower die: log, wait, go on
                log.exception("following the feedback store failed")
                self._stopped.wait(FOLLOW_RETRY_MAX)

    def _feedback_state(self, up: bool, why: BaseException | None = None) -> None:
        """The feedback store's reachability: gauge, health name, one log line per change."""
        if up != self._feedback_up:
            if up:
                if self._feedback_up is not None:
                    log.info("feedback store reachable again; caught up to %s", self.online.last_id)
            else:
                log.warning("%s; answers use the events applied so far", why)
            self._feedback_up = up
        self.metrics.feedback_up.set(1 if up else 0)
        if self.store.shared:
            self._set_health(FEEDBACK_HEALTH, HEALTH_SERVING if up else NOT_SERVING)

    # -- memory --------------------------------------------------------------------------

    def sample_memory(self) -> None:
        """Update the memory gauges: process RSS/PSS, per model file mapped/resident."""
        m = self.metrics
        rss, pss = process_memory()
        m.resident_bytes.set(rss)
        m.proportional_bytes.set(pss)
        online = self.online
        m.online_users.set(len(online))
        m.online_events.set(online.events)
        m.online_evicted.set(online.evicted)
        files: dict[str, tuple[str, str, int]] = {}
        for slot in self.catalog.slots():
            if slot.state != SERVING or slot.model is None:
                continue
            files.update(self._bundle_files(slot))
        resident = file_residency(files)
        for path, (model, component, size) in files.items():
            m.model_bytes.labels(model, component, "mapped").set(size)
            m.model_bytes.labels(model, component, "resident").set(resident.get(path, 0))

    def _bundle_files(self, slot: Slot) -> dict[str, tuple[str, str, int]]:
        """A loaded bundle's files: resolved path -> (model, component, bytes),
        resolved once per version (a path resolution is a syscall per folder)."""
        known = self._files.get(slot.name)
        if known is not None and known[0] == slot.path:
            return known[1]
        assert slot.model is not None
        found = {}
        for fname, entry in slot.model.manifest.get("files", {}).items():
            path = str((Path(slot.path) / fname).resolve())
            found[path] = (slot.name, fname.removesuffix(".npy"), int(entry["bytes"]))
        self._files[slot.name] = (slot.path, found)  # a new version replaces the old
        return found

    def _sample_forever(self) -> None:
        while not self._stopped.wait(MEMORY_INTERVAL):
            try:
                self.sample_memory()
            except Exception:  # metrics must never take the server down
                log.exception("memory sampling failed")
