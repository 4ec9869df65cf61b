"""The catalogue of served models: slots, background loading, versions, reloads.

Every published model under the models folder gets a `Slot`. `start` loads
them in the background, smallest bundle first, so the service answers as soon
as the cheapest model (usually popularity) is mapped. `reload` swaps in newly
published versions; a version that fails verification is refused and the one
serving stays. There is one load path for both, and reloads are serialized.

With `settle_heap` (the serving process, not a library user's) the objects
the loads leave are moved out of the cyclic collector's reach (`gc.freeze`)
once they are done: a full collection then scans only what came later, not
the whole process (the quickstart server's ~55,000 objects took 14-25 ms to
scan here, a stall of every call in flight while it holds the GIL).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recserve.models import Recommender, bundle, load
from recserve.models.base import liked_counts, popular_order

log = logging.getLogger("recserve.catalog")

LOADING, SERVING, FAILED = "loading", "serving", "failed"


@dataclass
class Slot:
    """One named model: its load state and, once loaded, the model."""

    name: str
    state: str = LOADING
    model: Recommender | None = None
    version: str = ""
    path: str = ""
    error: str = ""
    load_seconds: float = 0.0
    bytes: int = 0
    _popular: np.ndarray | None = field(default=None, repr=False)
    _counts: np.ndarray | None = field(default=None, repr=False)
    _row: np.ndarray | None = field(default=None, repr=False)
    _counted: bool | None = field(default=None, repr=False)
    _order32: np.ndarray | None = field(default=None, repr=False)

    def popular_counts(self) -> np.ndarray:
        """Training interactions per item, dislikes (negative values) not
        counted: the last-resort ranking's scores."""
        if self._counts is None:
            assert self.model is not None and self.model.user_items is not None
            self._counts = liked_counts(self.model.user_items)
        return self._counts

    def popular_row(self) -> np.ndarray:
        """popular_counts as float32: a hybrid's popularity row, copied per call
        into blend scratch (from int64 it cost 8.5 us on 10k items, 1.9 this way)."""
        if self._row is None:
            self._row = self.popular_counts().astype(np.float32)
        return self._row

    def popular_order32(self) -> np.ndarray:
        """popular_order as int32: the blend kernel's popularity part."""
        if self._order32 is None:
            self._order32 = self.popular_order().astype(np.int32)
        return self._order32

    def popularity_known(self) -> bool:
        """Whether any item has a training interaction: a prior blends
        popularity in only then. A model imported without its interactions
        (`recserve import` without --data) counts none, and a flat popularity
        would add weight to the first items by index."""
        if self._counted is None:
            self._counted = bool(self.popular_counts().any())
        return self._counted

    def popular_order(self) -> np.ndarray:
        """Items by training interaction count (ties by index): the last resort."""
        if self._popular is None:
            self._popular = popular_order(self.popular_counts())
        return self._popular


Loader = Callable[[Path, bool], Recommender]


def default_loader(path: Path, full_verify: bool) -> Recommender:
    """Verify (sha256 when full_verify) and memory-map a bundle."""
    return load(path, verify=full_verify)


class Catalog:
    """Every model under the models folder, loaded in the background."""

    def __init__(
        self,
        models_dir: str | Path,
        full_verify: bool = True,
        kernel_threads: int = 1,
        loader: Loader = default_loader,
        on_change: Callable[[Slot], None] | None = None,
        memory_budget: int = 0,
        settle_heap: bool = False,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.settle_heap = settle_heap
        self._loading = 0  # initial loads not finished yet
        self.memory_budget = memory_budget  # bytes of bundles mapped at once; 0 = no limit
        self.full_verify = full_verify
        self.kernel_threads = kernel_threads
        self.loader = loader
        self.on_change = on_change or (lambda slot: None)
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._reloading = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list = []
        self.started = time.monotonic()
        # Bumped after every change of a slot's state or of which slot serves a
        # name, so a router can cache what it derives from the slots (hybrid
        # plans) and rebuild it only when this moved.
        self.generation = 0

    def _changed(self) -> None:
        with self._lock:
            self.generation += 1

    def discover(self) -> dict[str, tuple[Path, int]]:
        """name -> (current version folder, bytes) for every published model."""
        out = {}
        for entry in bundle.list_bundles(self.models_dir):
            if entry.get("current") and "error" not in entry:
                path = self.models_dir / entry["name"] / entry["current"]
                out[entry["name"]] = (path, int(entry.get("bytes", 0)))
            elif entry.get("error"):
                log.error("model %s: %s", entry["name"], entry["error"])
        return out

    def start(self, workers: int = 2) -> None:
        """Register every published model as LOADING and load them, smallest first."""
        found = self.discover()
        if not found:
            log.warning("no published models under %s", self.models_dir)
        self.started = time.monotonic()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load")
        with self._lock:  # all counted first: the heap settles once, after the last
            self._loading += len(found)
        for name, (path, size) in sorted(found.items(), key=lambda kv: (kv[1][1], kv[0])):
            slot = Slot(name, path=str(path), bytes=size)
            with self._lock:
                self._slots[name] = slot
                self.generation += 1
            self.on_change(slot)
            self._pending.append(self._pool.submit(self._initial, slot, path))

    def over_budget(self, slot: Slot) -> str | None:
        """Why loading `slot` would exceed the memory budget (checked before loading)."""
        if not self.memory_budget:
            return None
        with self._lock:
            others = sum(
                s.bytes for s in self._slots.values() if s.state == SERVING and s.name != slot.name
            )
        if others + slot.bytes <= self.memory_budget:
            return None
        return (
            f"memory budget: {slot.bytes:,} bytes of bundle + {others:,} already mapped "
            f"> memory_budget {self.memory_budget:,}"
        )

    def _load(self, slot: Slot, path: Path, full_verify: bool) -> bool:
        """Load `path` into `slot` (SERVING, or FAILED with the reason); True on success.
        Any failure is reported in the slot, never raised."""
        t = time.perf_counter()
        try:
            if reason := self.over_budget(slot):
                raise bundle.BundleError(reason)
            model = self.loader(path, full_verify)
            model.n_threads = self.kernel_threads
        except Exception as exc:
            slot.state, slot.error = FAILED, str(exc)
            self._changed()
            log.error("model %s: refused %s: %s", slot.name, path, exc)
            return False
        slot.model, slot.version = model, path.name
        slot.load_seconds = time.perf_counter() - t
        slot.state = SERVING
        self._changed()
        return True

    def _initial(self, slot: Slot, path: Path) -> None:
        try:
            if self._load(slot, path, self.full_verify):
                log.info(
                    "model %s %s serving (%.3fs to load, %.3fs after start)",
                    slot.name,
                    slot.version,
                    slot.load_seconds,
                    time.monotonic() - self.started,
                )
            self.on_change(slot)
        finally:
            with self._lock:
                self._loading -= 1
                last = self._loading == 0
            if last:
                self._settle()

    def _settle(self) -> None:
        """After the loads: collect once (what a replaced version left in cycles
        too, hence the unfreeze) and freeze what survives, so that later full
        collections skip the models, indexes and modules. A no-op unless
        settle_heap."""
        if not self.settle_heap:
            return
        t = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        log.debug(
            "heap settled: %d objects frozen in %.1f ms",
            gc.get_freeze_count(),
            (time.perf_counter() - t) * 1e3,
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every initial load finished; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for fut in list(self._pending):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                fut.result(timeout=left)
            except TimeoutError:
                return False
        return True

    def get(self, name: str) -> Slot | None:
        """The slot of a model name, or None."""
        with self._lock:
            return self._slots.get(name)

    def slots(self) -> list[Slot]:
        """Every slot, by name."""
        with self._lock:
            return [self._slots[n] for n in sorted(self._slots)]

    def ready(self, name: str) -> bool:
        """True when `name` is a loaded real model."""
        slot = self.get(name)
        return slot is not None and slot.state == SERVING

    def reload(self) -> tuple[list[Slot], list[Slot]]:
        """Load every model whose current version changed (or that is new), checking
        every sha256 whatever `verify` says. One reload at a time.

        Returns (switched, refused). A refused version leaves the serving one in place.
        """
        switched, refused = [], []
        with self._reloading:
            for name, (path, size) in self.discover().items():
                old = self.get(name)
                if old is not None and old.path == str(path) and old.state == SERVING:
                    continue
                fresh = Slot(name, path=str(path), bytes=size)
                if self._load(fresh, path, full_verify=True):
                    switched.append(fresh)
                else:
                    refused.append(fresh)
                    if old is not None:
                        continue  # the serving (or failed) version stays
                with self._lock:
                    self._slots[name] = fresh
                    self.generation += 1
                self.on_change(fresh)
            if switched or refused:
                self._settle()
        return switched, refused

    def close(self) -> None:
        """Stop loading (pending loads are abandoned)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
