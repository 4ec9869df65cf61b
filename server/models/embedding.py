"""Embedding models (score = query . item vector) ranked through a FAISS index.

A mixin for models whose ranking score is an inner product: ALS (user x item
factors) and BPR ([p, 1] . [q, b]). The `index` parameter picks the retrieval:

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
from recserve.models.base import Param, Recommender, check_k, cosine_similar, cosine_similar_one

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
}


class EmbeddingIndexMixin(Recommender):
    """Ranks through `item_index` when the model has one; else the dense default."""

    batches_well = True

    item_index: ItemIndex | None = None
    similar_index: SimilarIndex | None = None
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
        """(Re)build the FAISS indexes from the current vectors."""
        kind = self.index_kind()
        self.item_index = self.similar_index = None
        if kind == "exact":
            return
        # FAISS would index NaN vectors without a word (HNSW's graph, IVF's k-means).
        self._require_finite({"item vectors": self._item_vectors()})
        seed = int(self.params.get("seed", 0))
        self.item_index = ItemIndex.build(self._item_vectors(), kind, seed)
        if kind != "flat":
            self.similar_index = SimilarIndex.build(self._similarity_vectors(), kind, seed)

    def _search_config(self) -> SearchConfig:
        return SearchConfig(self.params["ef_search"], self.params["nprobe"], self.n_threads)

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
            items, self._similarity_vectors(), k, self._search_config()
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
        """Small arrays the indexes need at load (stored next to the model's own)."""
        out = {}
        if self.item_index is not None:
            out["index_max_norm"] = np.array([self.item_index.max_norm], np.float64)
        if self.similar_index is not None:
            out["similar_ids"] = self.similar_index.ids
        return out

    @classmethod
    def from_bundle(cls, path: Path, doc: Mapping[str, Any], mmap: bool = True) -> Self:
        model = super().from_bundle(path, doc, mmap)
        kind = model.index_kind()
        if kind == "exact":
            return model
        if ITEMS_FILE not in doc["files"]:
            log.warning("%s: no %s in the bundle; ranking by exact scoring", path, ITEMS_FILE)
            return model
        arrays = bundle.load_arrays(path, doc, mmap=mmap)  # mapped: no copy
        model.item_index = ItemIndex.read(
            path / ITEMS_FILE,
            kind,
            np.asarray(model._item_vectors(), np.float32),
            float(arrays["index_max_norm"][0]),
            mmap=mmap,
        )
        if SIMILAR_FILE in doc["files"]:
            model.similar_index = SimilarIndex.read(
                path / SIMILAR_FILE, kind, np.asarray(arrays["similar_ids"], np.int64), mmap
            )
        return model
