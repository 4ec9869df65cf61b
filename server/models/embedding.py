"""Embedding models (score = query . item vector) ranked through a FAISS index.

A mixin for models whose ranking score is an inner product: ALS (user x item
factors), BPR ([p, 1] . [q, b]) and biased MF (svd, bayes_mf: [p, 1] . [q, b],
mu + b_u added to the scores). The `index` parameter picks the retrieval:

- `exact`: dense scores for every item and the shared top-k kernel (no FAISS);
- `flat`: FAISS exact inner product;
- `hnsw`, `ivf`, `ivfpq`: approximate (server/index.py), with a second, cosine
  index for similar_items;
- `auto` (default): `exact` below AUTO_ANN_ITEMS items, `ivf` from there:
  the crossover measured by bench/bench_index.py (see the README).

Index files are bundle files (sha256 in the manifest) and load memory-mapped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp

from recserve.index import ItemIndex, SearchConfig, SimilarIndex
from recserve.kernels import topk
from recserve.models import bundle
from recserve.models.base import (
    Param,
    Recommender,
    check_k,
    cosine_similar,
    cosine_similar_one,
    topk_excluding_self,
)

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "exact", "flat", "hnsw", "ivf", "ivfpq")
# From bench/bench_index.py (64 dims, one thread per query): at 50k items exact
# scoring takes 0.52 ms, IVF 0.27 ms (recall@10 0.9995), HNSW 0.50 ms; at 20k
# exact wins (0.17 ms vs 0.41 / 0.71); at 1M exact takes 26.5 ms, IVF 0.39 ms
# (recall 0.992, built in 23 s) and HNSW 0.78 ms (recall 0.992, built in 324 s).
# So: exact below 50k items, IVF from there.
AUTO_ANN_ITEMS = 50_000
AUTO_ANN_KIND = "ivf"
ITEMS_FILE = "items.faiss"
SIMILAR_FILE = "similar.faiss"

INDEX_PARAMS: Mapping[str, Param] = {
    "index": Param(
        str,
        "auto",
        "retrieval: exact scoring, FAISS flat, or ANN (hnsw, ivf, ivfpq); auto picks by size",
        choices=INDEX_KINDS,
    ),
    "ef_search": Param(int, 128, "HNSW efSearch per query", min=1, max=100_000),
    "nprobe": Param(int, 32, "IVF lists probed per query", min=1, max=100_000),
    "recall_target": Param(
        float,
        0.95,
        "ANN indexes: recall@10 against exact retrieval, measured at build on sampled "
        "users and items, that sets nprobe / ef_search (doubled until met, or halved "
        "while no recall is lost); an auto index that needs over a quarter of its lists "
        "for it ranks exactly instead; 0 = search at the configured nprobe / ef_search",
        min=0,
        max=1,
    ),
}
# Calibration: how many sampled users (items) measure an index's recall, at
# which k, and how far efSearch may be raised for it (HNSW).
CALIBRATION_QUERIES = 512
CALIBRATION_K = 10
MAX_EF_SEARCH = 4096


class EmbeddingIndexMixin(Recommender):
    """Ranks through `item_index` when the model has one; else the dense default."""

    batches_well = True

    item_index: ItemIndex | None = None
    similar_index: SimilarIndex | None = None
    # True where _item_vectors() composes a new array (BPR's and biased MF's
    # [q, b]) rather than returning the model's own (ALS's item factors).
    composed_items: ClassVar[bool] = False
    # Calibrated search breadth (items, similar items); 0: that index dropped.
    index_probes: tuple[int, int] | None = None
    _index_kinds: ClassVar[tuple[str, ...]] = INDEX_KINDS

    # -- what a model provides -------------------------------------------------------

    def _item_vectors(self) -> np.ndarray:
        """(n_items, d) vectors whose inner product with a query is the score."""
        raise NotImplementedError

    def _user_queries(self, users: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _history_queries(self, history: sp.csr_matrix) -> np.ndarray:
        raise NotImplementedError

    def _similarity_vectors(self) -> np.ndarray:
        """Vectors whose cosine defines item-item similarity."""
        raise NotImplementedError

    def _exact_items(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(item vectors, per-item bias or None): exact scores are q . v + b."""
        return self._item_vectors(), None

    def _exact_user_matrix(self) -> np.ndarray:
        """(n_users, d) float32 rows of the known users for `_exact_items` (the
        one-user serving call; batches keep the BLAS product, which reuses each
        item vector across users where one row at a time would stream them)."""
        raise NotImplementedError

    # -- index life cycle ------------------------------------------------------------------

    def index_kind(self) -> str:
        """The resolved retrieval kind (auto -> exact or ivf by catalogue size)."""
        kind = self.params["index"]
        if kind == "auto":
            return AUTO_ANN_KIND if self.n_items >= AUTO_ANN_ITEMS else "exact"
        return kind

    def build_index(self) -> None:
        """(Re)build the FAISS indexes from the current vectors, then calibrate
        their search breadth against exact retrieval (`recall_target`)."""
        kind = self.index_kind()
        self.item_index = self.similar_index = None
        self.index_probes = None
        if kind == "exact":
            return
        # FAISS would index NaN vectors without a word (HNSW's graph, IVF's k-means).
        vectors = self._item_vectors()
        self._require_finite({"item vectors": vectors})
        seed = int(self.params.get("seed", 0))
        self.item_index = ItemIndex.build(vectors, kind, seed)
        if kind != "flat":
            self.similar_index = SimilarIndex.build(self._similarity_vectors(), kind, seed)
            self._calibrate(seed)

    # -- calibration -------------------------------------------------------------------

    def _calibrate(self, seed: int) -> None:
        """Set each ANN index's nprobe / efSearch from the configured value by
        recall@10 against exact retrieval on sampled users (the item index)
        and items (the similar-items index): doubled until it reaches
        `recall_target`, or, reached there, halved while it stays as it was
        (less to scan per call, no recall lost on the sample).
        How many lists a good answer needs depends on the vectors, not only on
        the catalogue's size: before norm-ranging, ALS's 18 factors over 151k
        generated items reached 0.87 at nprobe 32 and 0.995 at 64, biased MF's
        100 factors 0.93 at 128.
        An `auto` index that needs more than a quarter of its lists is dropped
        (exact scoring costs less than such a search); a kind asked for by
        name keeps its index at the breadth found, with a warning."""
        target = float(self.params.get("recall_target", 0.0))
        if target <= 0 or self.item_index is None or self.similar_index is None:
            return
        rng = np.random.default_rng(seed)
        kind = self.item_index.kind
        limit = self.item_index.index.nlist if kind in ("ivf", "ivfpq") else MAX_EF_SEARCH
        start = self.params["ef_search"] if kind == "hnsw" else self.params["nprobe"]
        users = np.sort(rng.choice(self.n_users, min(self.n_users, CALIBRATION_QUERIES), False))
        queries = np.ascontiguousarray(self._user_queries(users), np.float32)
        # Without their seen items, as served: the answer lies deeper in the order.
        seen = self._require_fitted()[users]
        excl = (np.asarray(seen.indptr, np.int64), np.asarray(seen.indices, np.int32))
        want = _exact_top(queries, self.item_index.vectors, CALIBRATION_K, excl)
        p_items, r_items = _breadth(
            lambda p: self.item_index.search(queries, CALIBRATION_K, excl, cfg=self._config(p))[0],
            want,
            start,
            limit,
            target,
        )
        n = self.similar_index.ids.size
        items = np.sort(rng.choice(self.similar_index.ids, min(n, CALIBRATION_QUERIES), False))
        sim = self._similarity_vectors()
        want = _exact_similar(sim, items, CALIBRATION_K)
        p_sim, r_sim = _breadth(
            lambda p: self.similar_index.similar(items, sim, CALIBRATION_K, self._config(p))[0],
            want,
            start,
            limit,
            target,
        )
        auto = self.params["index"] == "auto"
        name = "nprobe" if kind != "hnsw" else "ef_search"
        for what, probe, recall in (("item", p_items, r_items), ("similar-items", p_sim, r_sim)):
            if auto and kind != "hnsw" and (recall < target or probe * 4 > limit):
                log.info(
                    "%s: the %s index needs %s %d of %d for recall@10 %.3f (target %.2f): "
                    "scored exactly instead",
                    self.algorithm,
                    what,
                    name,
                    probe,
                    limit,
                    recall,
                    target,
                )
            elif recall < target:
                log.warning(
                    "%s: the %s %s index reaches recall@10 %.3f at %s %d (target %.2f); "
                    "index=exact would be exact, index=hnsw may reach it for less",
                    self.algorithm,
                    what,
                    kind,
                    recall,
                    name,
                    probe,
                    target,
                )
            elif probe != start:
                log.info(
                    "%s: %s index %s %d -> %d for recall@10 %.3f (target %.2f)",
                    self.algorithm,
                    what,
                    name,
                    start,
                    probe,
                    recall,
                    target,
                )
        if auto and kind != "hnsw":
            p_items = p_items if r_items >= target and p_items * 4 <= limit else 0
            p_sim = p_sim if r_sim >= target and p_sim * 4 <= limit else 0
        self._apply_probes((p_items, p_sim))

    def _apply_probes(self, probes: tuple[int, int]) -> None:
        """Keep the calibrated breadths; 0 drops that index (exact instead)."""
        self.index_probes = probes
        if probes[0] == 0:
            self.item_index = None
        if probes[1] == 0:
            self.similar_index = None

    def _config(self, probe: int) -> SearchConfig:
        """A search at breadth `probe` (nprobe or efSearch by the index's kind)."""
        cfg = SearchConfig(self.params["ef_search"], self.params["nprobe"], self.n_threads)
        if self.index_kind() == "hnsw":
            cfg.ef_search = probe
        else:
            cfg.nprobe = probe
        return cfg

    def _search_config(self, similar: bool = False) -> SearchConfig:
        if self.index_probes is None:  # not calibrated (recall_target 0, older bundles)
            return SearchConfig(self.params["ef_search"], self.params["nprobe"], self.n_threads)
        return self._config(self.index_probes[1 if similar else 0])

    def recommend_user(
        self, user: int, k: int = 10, filter_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """One known user, exact retrieval: scored and selected in one kernel call
        (topk_user) over the user's vector and the training CSR, with none of the
        batch path's per-call arrays. Other retrievals take the general path."""
        if self.item_index is not None:
            return super().recommend_user(user, k, filter_seen)
        self._require_fitted()
        check_k(k)
        if not 0 <= user < self.n_users:
            raise IndexError(f"users: indices must be in [0, {self.n_users})")
        indptr, indices = self._csr_views()
        vectors, bias = self._exact_items()
        return topk.topk_user(
            self._exact_user_matrix(), user, vectors, k, indptr, indices, filter_seen, bias
        )

    def _user_vectors(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """Exact retrieval's vectors; None with an index (no dense row)."""
        if self.item_index is not None:
            return None
        self._require_fitted()
        if not 0 <= user < self.n_users:
            raise IndexError(f"users: indices must be in [0, {self.n_users})")
        vectors, bias = self._exact_items()
        return self._exact_user_matrix(), vectors, bias

    @property
    def has_dense_rows(self) -> bool:
        return self.item_index is None

    def dense_user(self, user: int, out: np.ndarray, filter_seen: bool = True) -> bool:
        """Exact retrieval: topk_user's scores, into `out`; False with an index."""
        return self._vector_row(user, out, filter_seen)

    def dense_history(self, row: sp.csr_matrix, out: np.ndarray, filter_seen: bool = True) -> bool:
        """The exact fold-in row; False with an index (the ranking is approximate)."""
        if self.item_index is not None:
            return False
        return super().dense_history(row, out, filter_seen)

    def _rank(self, users, history, k, excl, cand):
        if self.item_index is None:
            return super()._rank(users, history, k, excl, cand)
        q = self._user_queries(users) if users is not None else self._history_queries(history)
        return self.item_index.search(q, k, excl, cand, self._search_config())

    def _similar_one(self, item: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.similar_index is not None:
            return None
        return cosine_similar_one(self._similarity_vectors(), item, k)

    def _similar(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.similar_index is None:
            return cosine_similar(self._similarity_vectors(), items, k, self.n_threads)
        return self.similar_index.similar(
            items, self._similarity_vectors(), k, self._search_config(similar=True)
        )

    # -- bundles ---------------------------------------------------------------------------

    def _files(self) -> dict[str, Any]:
        files: dict[str, Any] = {}
        if self.item_index is not None:
            files[ITEMS_FILE] = self.item_index.write
        if self.similar_index is not None:
            files[SIMILAR_FILE] = self.similar_index.write
        return files

    def _index_arrays(self) -> dict[str, np.ndarray]:
        """Arrays the indexes need at load (stored next to the model's own): the
        max norm, the cosine index's ids, and item vectors composed from the
        model's arrays ([q, b]), which would otherwise be rebuilt in memory at
        every load (400 MB for a million items of 100 factors) where stored
        they map from the file, shared by every process serving the bundle."""
        out = {}
        if self.index_probes is not None:
            out["index_probes"] = np.array(self.index_probes, np.int64)
        if self.item_index is not None:
            out["index_max_norm"] = np.array([self.item_index.max_norm], np.float64)
            if self.item_index.head.size:
                out["index_head"] = self.item_index.head
            if self.composed_items:
                out["index_vectors"] = self.item_index.vectors
        if self.similar_index is not None:
            out["similar_ids"] = self.similar_index.ids
        return out

    @classmethod
    def from_bundle(cls, path: Path, doc: Mapping[str, Any], mmap: bool = True) -> Self:
        model = super().from_bundle(path, doc, mmap)
        kind = model.index_kind()
        if kind == "exact":
            return model
        arrays = bundle.load_arrays(path, doc, mmap=mmap)  # mapped: no copy
        if "index_probes" in arrays:
            model.index_probes = (int(arrays["index_probes"][0]), int(arrays["index_probes"][1]))
        if ITEMS_FILE not in doc["files"]:
            if model.index_probes is None or model.index_probes[0] != 0:  # not calibrated away
                log.warning("%s: no %s in the bundle; ranking by exact scoring", path, ITEMS_FILE)
            return model
        # Bundles written before index_vectors was stored compose them here.
        vectors = arrays.get("index_vectors")
        if vectors is None:
            vectors = model._item_vectors()
        model.item_index = ItemIndex.read(
            path / ITEMS_FILE,
            kind,
            np.asarray(vectors, np.float32),
            float(arrays["index_max_norm"][0]),
            mmap=mmap,
            head=arrays.get("index_head"),
        )
        if SIMILAR_FILE in doc["files"]:
            model.similar_index = SimilarIndex.read(
                path / SIMILAR_FILE, kind, np.asarray(arrays["similar_ids"], np.int64), mmap
            )
        return model


def _exact_top(
    queries: np.ndarray, vectors: np.ndarray, k: int, excl: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Exact top-k item ids by inner product per query, never one of the row's
    `excl` (CSR indptr, indices), -1 past the eligible; chunks of 32 queries,
    so a million items' scores stay 128 MB."""
    v = np.ascontiguousarray(vectors, np.float32)
    ptr, idx = excl
    out = np.empty((queries.shape[0], k), np.int32)
    for lo in range(0, queries.shape[0], 32):
        hi = min(lo + 32, queries.shape[0])
        scores = np.ascontiguousarray(queries[lo:hi] @ v.T, np.float32)
        rows = ptr[lo : hi + 1] - ptr[lo]
        out[lo:hi] = topk.topk_dense(scores, k, rows, idx[ptr[lo] : ptr[hi]])[0]
    return out


def _exact_similar(vectors: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k cosine neighbours of `items` (never themselves), as
    cosine_similar answers, without its cache of unit rows: a build must not
    leave a unit copy of every trial's factors behind (tuning builds many)."""
    v = np.asarray(vectors, np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", v, v))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    out = np.empty((items.size, min(k, v.shape[0] - 1)), np.int32)
    for lo in range(0, items.size, 32):
        rows = items[lo : lo + 32]
        scores = (v[rows] * scale[rows, None]) @ v.T * scale[None, :]
        out[lo : lo + 32] = topk_excluding_self(scores, rows, k)[0][:, : out.shape[1]]
    return out


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    """Mean share of each row of `want` (valid ids) found in the row of `got`."""
    shares = []
    for g, w in zip(got, want, strict=True):
        w = w[w >= 0]
        if w.size:
            shares.append(np.isin(w, g).mean())
    return float(np.mean(shares)) if shares else 1.0


def _breadth(search, want: np.ndarray, start: int, limit: int, target: float) -> tuple[int, float]:
    """The breadth start * 2^j (1 to `limit`) to search at, and the recall it
    reached against `want`: doubled from `start` until recall reaches
    `target`; or, met at `start`, halved while the recall stays what it was
    there (narrower, never worse than configured on the sample). `limit` and
    its recall when nothing meets the target."""
    probe = max(1, min(start, limit))
    recall = _recall(search(probe), want)
    while recall < target and probe < limit:
        probe = min(probe * 2, limit)
        recall = _recall(search(probe), want)
    if recall < target or probe != max(1, min(start, limit)):
        return probe, recall
    floor = recall
    while probe > 1:  # met at the start: narrower may do (less to scan per call)
        narrower = _recall(search(probe // 2), want)
        if narrower < floor:
            break
        probe, recall = probe // 2, narrower
    return probe, recall
