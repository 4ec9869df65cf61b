"""Neighbourhood models: item-kNN, user-kNN, RP3beta and content similarity.

All four are "history x similarity": a sparse neighbour matrix is built once
by kernels.similarity (knn_self for the symmetric item-item, user-user and
content cases, knn for RP3beta; top-K per row, self excluded) and a user's scores
are their history times it, selected by the fused score_topk kernel. They
differ only in which matrices the neighbours come from:

  itemknn   items x users interactions (optionally BM25/TF-IDF weighted)
  userknn   users x items; a user's score sums their neighbours' rows
  rp3beta   random walk item -> user -> item (Paudel et al. 2016), with a
            popularity penalty deg(j)^-beta
  content   items x features (genres, tags) with TF-IDF: it recommends items
            that have no interactions at all (how new items get served)

Heavy-tailed values (counts) weigh as log1p(|value| / median) in the
similarities and in every history, training rows and fold-ins alike
(`values`, base.log_median); ratings as they are.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from recserve.data import Dataset
from recserve.kernels import similarity as simk
from recserve.models.base import (
    HISTORY_PRIOR,
    MIN_EVENTS,
    MIN_HISTORY,
    USER_PRIOR,
    VALUES,
    Param,
    Recommender,
    ScratchPool,
    check_k,
    identity_rows,
    known_user,
    log_median,
    log_scaled,
    without_dislikes,
)
from recserve.models.registry import register

log = logging.getLogger(__name__)

# Bytes of per-row top-k buffers knn_self may hold (threads x rows x 2k slots
# x 8 bytes); beyond it the general kernel runs instead (same result, less
# memory). Small catalogues take knn_self's dense path (at most
# simk.DENSE_SCORES_BYTES of scores) and never reach this limit.
KNN_SELF_BUDGET = 512 * 2**20

SIMILARITY = Param(
    str, "cosine", "dot, cosine, asymmetric (alpha) or jaccard", choices=tuple(simk.SIMILARITIES)
)
WEIGHTING = Param(
    str, "none", "input weighting: none, bm25 or tfidf", choices=tuple(simk.WEIGHTINGS)
)
# itemknn's "auto" similarity / weighting: below this median of training events
# per user the log counts as sparse (docs/algorithms.md, "Very sparse logs").
SPARSE_LOG_EVENTS = 10


def median_events(rows: sp.csr_matrix) -> float:
    """The median number of events of the users (rows) that have any: how
    sparse a log is, as its typical user sees it (0.0 for an empty log)."""
    per_user = np.diff(rows.indptr)
    per_user = per_user[per_user > 0]
    return float(np.median(per_user)) if per_user.size else 0.0


COMMON: dict[str, Param] = {
    "k": Param(int, 100, "neighbours kept per row", min=1, max=100_000, search=(5, 1000), log=True),
    "shrink": Param(
        float, 0.0, "shrinkage added to the similarity denominator", min=0, search=(0, 200)
    ),
    "similarity": SIMILARITY.searched(search_choices=tuple(simk.SIMILARITIES)),
    "alpha": Param(float, 0.5, "asymmetric cosine exponent", min=0, max=1, search=(0, 1)),
    "weighting": WEIGHTING.searched(search_choices=tuple(simk.WEIGHTINGS)),
    "K1": Param(float, 1.2, "BM25 term saturation", min=0, search=(0.2, 3.0), log=True),
    "B": Param(float, 0.75, "BM25 length normalisation", min=0, max=1, search=(0.0, 1.0)),
    "values": VALUES,
}


def csr(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    """A CSR view over existing (possibly memory-mapped) arrays, no copy."""
    m = sp.csr_matrix((data, indices, indptr), shape=shape, copy=False)
    m.has_sorted_indices = False
    return m


@functools.lru_cache(maxsize=8)
def _identity_checked(n: int) -> simk.CheckedCSR:
    """The n x n identity, validated once (shared by models of n items)."""
    return simk.CheckedCSR(*identity_rows(n), n)


def _scratch_pool(n: int) -> ScratchPool[simk.Scratch]:
    """score_one's scratch for n items, one per call in progress."""
    return ScratchPool(lambda: simk.Scratch(n))


def _score_one(hist, row: int, scored, k: int, seen, pool: ScratchPool[simk.Scratch]):
    """simk.score_one with a scratch taken from `pool` for the call."""
    scratch = pool.take()
    try:
        return simk.score_one(hist, row, scored, k, seen, scratch)
    finally:
        pool.give(scratch)


class _Neighbourhood(Recommender):
    """Shared machinery: a neighbour CSR `sim` and history x sim scoring."""

    sim: sp.csr_matrix
    ranks_from_history = True
    weighs_by_value = True  # a history's values times the similarities
    sparse_scores = True  # 0: no neighbour of the history reaches the item
    # > 0: values weigh as log1p(|value| / value_median) in the similarity and in
    # every history (training rows and fold-ins alike); 0: as they are (and for
    # bundles written before the log scale existed).
    value_median = 0.0

    def _set_value_scale(self) -> sp.csr_matrix:
        """Decide the value scale from the training values (`values` param) at
        fit; returns the training rows as they weigh."""
        assert self.user_items is not None
        self.value_median = log_median(self.user_items.data, self.params["values"], self.algorithm)
        return self._weights_rows()

    def _scaled(self, rows: sp.csr_matrix) -> sp.csr_matrix:
        """History rows (raw values, as callers give them) as they weigh."""
        if self.value_median <= 0:
            return rows
        rows = rows.tocsr()
        return sp.csr_matrix(
            (log_scaled(rows.data, self.value_median), rows.indices, rows.indptr), shape=rows.shape
        )

    def _weights_rows(self) -> sp.csr_matrix:
        """The training rows as they weigh: user_items itself on the linear
        scale; on the log scale a copy of its values (made once per user_items,
        or read from the bundle), indices and indptr shared."""
        x = self.user_items
        assert x is not None
        if self.value_median <= 0:
            return x
        held = self.__dict__.get("_weights_held")
        if held is None or held[0] is not x or held[1] != self.value_median:
            data = log_scaled(x.data, self.value_median)
            weights = csr(x.indptr, x.indices, data, x.shape)
            held = self._weights_held = (x, self.value_median, weights)
        return held[2]

    def _weighted(self, rows_by_docs: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray, float]:
        """The configured weighting applied to a CSR whose rows are documents, with
        the idf and mean row length it used (to weight a new row the same way)."""
        scheme = self.params.get("weighting", "none")
        m = rows_by_docs.tocsr().astype(np.float32)
        if scheme == "none":
            return m, np.zeros(0, np.float32), 0.0
        data, idf, avg = simk.weight(
            m.indptr,
            m.indices,
            m.data,
            m.shape[1],
            scheme,
            self.params["K1"],
            self.params["B"],
            n_threads=self.n_threads,
        )
        return csr(m.indptr.astype(np.int64), m.indices, data, m.shape), idf, avg

    def _knn_self(self, a: sp.csr_matrix, similarity: str | None = None) -> sp.csr_matrix:
        """Top-k neighbours among the rows of `a` (itself excluded).

        knn_self computes each pair once but keeps a top-k buffer per row and
        thread; above KNN_SELF_BUDGET bytes the general kernel (per-thread
        scratch only, same result) is used instead.
        """
        p = self.params
        sim = similarity or p.get("similarity", "dot")
        threads = self.n_threads if self.n_threads > 0 else (os.cpu_count() or 1)
        if threads * a.shape[0] * p["k"] * 16 > KNN_SELF_BUDGET:
            return self._knn(a, a.T.tocsr(), a.shape[0], exclude_self=True, similarity=sim)
        ip, ix, v = simk.knn_self(
            a.indptr,
            a.indices,
            a.data,
            a.shape[1],
            p["k"],
            sim,
            p.get("alpha", 0.5),
            p.get("shrink", 0.0),
            None,
            self.n_threads,
        )
        return csr(ip, ix, v, (a.shape[0], a.shape[0]))

    def _knn(
        self,
        a: sp.csr_matrix,
        b: sp.csr_matrix,
        n_cols: int,
        exclude_self: bool,
        col_scale: np.ndarray | None = None,
        similarity: str | None = None,
        col_norm: np.ndarray | None = None,
    ) -> sp.csr_matrix:
        p = self.params
        sim = similarity or p.get("similarity", "dot")
        ip, ix, v = simk.knn(
            a.indptr,
            a.indices,
            a.data,
            b.indptr,
            b.indices,
            b.data,
            n_cols,
            p["k"],
            sim,
            # The asymmetric cosine's exponent; rp3beta's own "alpha" is another one.
            p.get("alpha", 0.5) if sim == "asymmetric" else 0.5,
            p.get("shrink", 0.0),
            col_scale,
            exclude_self,
            self.n_threads,
            col_norm,
        )
        return csr(ip, ix, v, (a.shape[0], n_cols))

    def _score(
        self,
        h: sp.csr_matrix,
        s: sp.csr_matrix,
        k: int,
        excl: tuple[np.ndarray, np.ndarray],
        cand: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        ca = cand if cand is not None else (None, None)
        return simk.score_topk(
            h.indptr,
            h.indices,
            h.data,
            *self._checked(s),
            s.shape[1],
            k,
            excl[0],
            excl[1],
            ca[0],
            ca[1],
            self.n_threads,
        )

    def _checked(self, s: sp.csr_matrix) -> tuple[Any, Any, Any]:
        """S's arrays for score_topk: the model's own similarity matrix as a
        CheckedCSR (validated once, not on every request), others as they are."""
        if s is not self.sim:
            return s.indptr, s.indices, s.data
        cached = getattr(self, "_sim_checked", None)
        if cached is None or cached[0] is not s:
            cached = (s, simk.CheckedCSR(s.indptr, s.indices, s.data, s.shape[1]))
            self._sim_checked = cached
        return cached[1], None, None

    def _rank(self, users, history, k, excl, cand):
        return self._score(self._scaled(history.tocsr()), self.sim, k, excl, cand)

    def _one_user(self) -> tuple[Any, Any]:
        """(history rows, scored matrix) of a known user's ranking: the training
        rows (as they weigh) x sim here; userknn scores sim rows x those rows."""
        return self._weights_rows(), self.sim

    def recommend_user(
        self, user: int, k: int = 10, filter_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """The serving call, fused: one kernel call over matrices validated once
        (per model), scratch reused across calls. Equal to recommend([user], k)."""
        check_k(k)
        cache = self._one_checked()
        return _score_one(
            cache[3], int(user), cache[4], k, cache[5] if filter_seen else None, cache[6]
        )

    def dense_user(self, user: int, out: np.ndarray, filter_seen: bool = True) -> bool:
        """The row recommend_user selects from (history x similarity, 0 where
        untouched), summed in the same order, into `out`."""
        cache = self._one_checked()
        simk.dense_one(cache[3], int(user), cache[4], cache[5] if filter_seen else None, out)
        return True

    def dense_history(self, row: sp.csr_matrix, out: np.ndarray, filter_seen: bool = True) -> bool:
        """The fold-in row (history x similarity, summed as score_topk sums it)."""
        cache = self._one_checked()
        if row.shape != (1, self.n_items):
            raise ValueError(f"row: expected shape (1, {self.n_items}), got {row.shape}")
        indices, weights = self._history_weights(row)
        items = np.asarray(row.indices, np.int32) if filter_seen else None
        simk.dense_history(cache[4], indices, weights, out, items)
        return True

    def _history_weights(self, row: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """The sparse row that multiplies the scored matrix for a fold-in, as
        (indices int32, values float32): the history itself (as it weighs) here;
        userknn's neighbours of the history."""
        return np.asarray(row.indices, np.int32), log_scaled(row.data, self.value_median)

    def _one_checked(self) -> tuple[Any, ...]:
        """The one-user call's matrices, validated once per model: (history rows,
        scored matrix, seen, their CheckedCSRs, a scratch pool)."""
        seen = self._require_fitted()
        hist, scored = self._one_user()
        cache = getattr(self, "_one_cache", None)
        if cache is None or cache[0] is not hist or cache[1] is not scored or cache[2] is not seen:
            check = simk.CheckedCSR
            cache = (
                hist,
                scored,
                seen,
                check(hist.indptr, hist.indices, hist.data, hist.shape[1]),
                check(scored.indptr, scored.indices, scored.data, scored.shape[1]),
                check(seen.indptr, seen.indices, seen.data, seen.shape[1]),
                _scratch_pool(scored.shape[1]),
            )
            self._one_cache = cache
        return cache

    def _score_users(self, users: np.ndarray) -> np.ndarray:
        assert self.user_items is not None
        return self._score_history(self.user_items[users])

    def _score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray((self._scaled(history) @ self.sim).toarray(), dtype=np.float32)

    def _similar_one(self, item: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Row `item` of the identity picks the item's similarity row and excludes
        the item itself: one score_one call over matrices validated once answers
        what _similar's score_topk answers."""
        if type(self)._similar is not _Neighbourhood._similar:  # a model's own _similar
            return None
        cache = getattr(self, "_similar_cache", None)
        if cache is None or cache[0] is not self.sim:
            cache = (self.sim, self._checked(self.sim)[0], _scratch_pool(self.n_items))
            self._similar_cache = cache
        eye = _identity_checked(self.n_items)
        return _score_one(eye, item, cache[1], k, eye, cache[2])

    def _similar(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = items.size
        unit = sp.csr_matrix(
            (np.ones(n, np.float32), items.astype(np.int32), np.arange(n + 1, dtype=np.int64)),
            shape=(n, self.n_items),
        )
        excl = (np.arange(n + 1, dtype=np.int64), items.astype(np.int32))
        return self._score(unit, self.sim, k, excl, None)

    def _contributions_many(self, history, items, user):
        hist = history.indices
        scored = self._one_checked()[4]  # the similarity, validated once
        cols = simk.block(scored, np.asarray(hist, np.int64), np.asarray(items, np.int64))
        weights = log_scaled(history.data, self.value_median).astype(np.float64)
        return hist, weights[:, None] * cols

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {
            "sim_indptr": self.sim.indptr,
            "sim_indices": self.sim.indices,
            "sim_data": self.sim.data,
            "value_median": np.array([self.value_median], np.float64),
        }
        if self.value_median > 0:  # stored, so loading stays a memory map
            out["weights_data"] = self._weights_rows().data
        return out

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        n = arrays["sim_indptr"].shape[0] - 1
        self.sim = csr(
            arrays["sim_indptr"], arrays["sim_indices"], arrays["sim_data"], (n, self._sim_cols())
        )
        if "value_median" in arrays:  # bundles written before the log scale: linear
            self.value_median = float(np.asarray(arrays["value_median"])[0])
        x = self.user_items
        if self.value_median > 0 and x is not None and "weights_data" in arrays:
            weights = csr(x.indptr, x.indices, arrays["weights_data"], x.shape)
            self._weights_held = (x, self.value_median, weights)

    def _sim_cols(self) -> int:
        return self.n_items


@register
class ItemKNN(_Neighbourhood):
    """Item-based kNN: items similar to the user's items, weighted by their history."""

    algorithm = "itemknn"
    # Defaults: the study in docs/algorithms.md (was k 100, shrink 0, no weighting).
    # similarity and weighting "auto": cosine and bm25 (the study's), or dot and
    # tfidf on a sparse log (docs/algorithms.md, "Very sparse logs"); the
    # bundle's manifest records the choice made.
    params_spec: ClassVar[Mapping[str, Param]] = {
        **COMMON,
        "k": COMMON["k"].searched(default=600),
        "shrink": COMMON["shrink"].searched(default=200.0),
        "similarity": replace(
            COMMON["similarity"],
            default="auto",
            choices=("auto", *simk.SIMILARITIES),
            search_choices=("auto", *simk.SIMILARITIES),  # the first trial: the default
            help="dot, cosine, asymmetric (alpha), jaccard, or auto: cosine, or dot "
            f"on a sparse log (median events per user < {SPARSE_LOG_EVENTS})",
        ),
        "weighting": replace(
            COMMON["weighting"],
            default="auto",
            choices=("auto", *simk.WEIGHTINGS),
            search_choices=("auto", *simk.WEIGHTINGS),
            help="input weighting: none, bm25, tfidf, or auto: bm25, or tfidf on a sparse log",
        ),
        "K1": COMMON["K1"].searched(default=0.4),
        "B": COMMON["B"].searched(default=0.5),
        "min_events": MIN_EVENTS,
        "min_history": MIN_HISTORY,
        "history_prior": HISTORY_PRIOR,
        "user_prior": USER_PRIOR,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        # What each fit resolves again (a refit on other data may choose otherwise).
        self._auto = {n for n in ("similarity", "weighting") if self.params[n] == "auto"}

    def _fit(self, dataset: Dataset) -> None:
        assert self.user_items is not None
        # Items are the documents; a dislike is no evidence two items go together.
        likes = without_dislikes(self._set_value_scale())
        if self._auto:
            self._resolve_auto(likes, dataset.name)
        a, _, _ = self._weighted(likes.T.tocsr())
        self.sim = self._knn_self(a)

    def _resolve_auto(self, likes: sp.csr_matrix, name: str) -> None:
        """Settle "auto" similarity / weighting from the log's density. With a
        handful of events per user the study's cosine divides the popularity
        out of co-occurrences that are mostly ones, and its neighbours are rare
        items: on logs with a median of 3-5 events per user it ranked at half
        of popularity's recall, where dot with tfidf ranked at or above it."""
        median = median_events(likes)
        sparse_log = median < SPARSE_LOG_EVENTS
        chosen = {"similarity": "dot" if sparse_log else "cosine"}
        chosen["weighting"] = "tfidf" if sparse_log else "bm25"
        for n in self._auto:
            self.params[n] = chosen[n]
        log.info(
            "itemknn: %s on %s (median %.0f events per user: %s)",
            ", ".join(f"{n} auto -> {self.params[n]}" for n in sorted(self._auto)),
            name,
            median,
            f"a sparse log, < {SPARSE_LOG_EVENTS}" if sparse_log else f">= {SPARSE_LOG_EVENTS}",
        )


@register
class RP3beta(_Neighbourhood):
    """RP3beta: 3-step random-walk item similarity with a popularity penalty."""

    algorithm = "rp3beta"
    params_spec: ClassVar[Mapping[str, Param]] = {
        "k": COMMON["k"].searched(default=22),
        # Defaults: the study in docs/algorithms.md (was k 100, alpha 1.0, beta 0.6);
        # on a sparse log, SPARSE_DEFAULTS where not given.
        "alpha": Param(
            float,
            1.1,
            "exponent on the transition probabilities (default 1.1; 0.5 on a sparse "
            f"log, median events per user < {SPARSE_LOG_EVENTS})",
            min=0,
            search=(0.1, 2.0),
        ),
        "beta": Param(
            float,
            0.16,
            "popularity penalty exponent (default 0.16; 0 on a sparse log)",
            min=0,
            search=(0.0, 1.0),
        ),
        "binary": Param(bool, True, "the walk's steps ignore values (histories still weigh)"),
        "values": VALUES,
        "min_events": MIN_EVENTS,
        "min_history": MIN_HISTORY,
        "history_prior": HISTORY_PRIOR,
        "user_prior": USER_PRIOR,
    }
    # What a sparse log (median events per user < SPARSE_LOG_EVENTS) gets for the
    # parameters not given: the study's values penalise popularity, which is
    # most of what a handful of events per user says (docs/algorithms.md, "Very
    # sparse logs": 0.59-0.75 of popularity's recall at 3-5 events per
    # user, 0.81-1.12 with these).
    SPARSE_DEFAULTS: ClassVar[Mapping[str, float]] = {"alpha": 0.5, "beta": 0.0}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        # The parameters each fit settles by the log's density (a bundle loaded
        # gives them all: its manifest records what its fit chose).
        self._by_density = [n for n in self.SPARSE_DEFAULTS if n not in params]

    @classmethod
    def defaults_on(cls, dataset: Dataset) -> dict[str, Any]:
        """SPARSE_DEFAULTS over the declared defaults on a sparse log."""
        return cls._defaults_at(median_events(without_dislikes(dataset.interactions.tocsr())))

    @classmethod
    def _defaults_at(cls, median: float) -> dict[str, Any]:
        """The defaults for a log whose median user has `median` events (liked)."""
        out = {n: p.default for n, p in cls.params_spec.items()}
        if median < SPARSE_LOG_EVENTS:
            out.update(cls.SPARSE_DEFAULTS)
        return out

    def _fit(self, dataset: Dataset) -> None:
        x = without_dislikes(self._set_value_scale()).astype(np.float32)  # walks follow interest
        if self._by_density:
            median = median_events(x)
            chosen = self._defaults_at(median)
            for n in self._by_density:
                self.params[n] = chosen[n]
            if median < SPARSE_LOG_EVENTS:
                log.info(
                    "rp3beta: %s on %s (median %.0f events per user: a sparse log, < %d)",
                    ", ".join(f"{n} {self.params[n]:g}" for n in self._by_density),
                    dataset.name,
                    median,
                    SPARSE_LOG_EVENTS,
                )
        if self.params["binary"]:
            x = x.copy()
            x.data[:] = 1.0
        alpha = self.params["alpha"]
        p_ui = _row_normalise(x).power(alpha).tocsr()  # users x items
        p_iu = _row_normalise(x.T.tocsr()).power(alpha).tocsr()  # items x users
        degree = np.diff(x.tocsc().indptr).astype(np.float64)
        penalty = np.zeros_like(degree)
        penalty[degree > 0] = degree[degree > 0] ** -self.params["beta"]
        self.sim = self._knn(
            p_iu,
            p_ui,
            self.n_items,
            exclude_self=True,
            col_scale=penalty.astype(np.float32),
            similarity="dot",
        )


@register
class ContentKNN(_Neighbourhood):
    """Content similarity: TF-IDF genres/tags, cosine item-item, scored from the history."""

    algorithm = "content"
    params_spec: ClassVar[Mapping[str, Param]] = {
        "k": COMMON["k"],
        "shrink": COMMON["shrink"],
        "weighting": Param(
            str, "tfidf", "feature weighting: none, bm25 or tfidf", choices=tuple(simk.WEIGHTINGS)
        ),
        "K1": COMMON["K1"],
        "B": COMMON["B"],
        "values": VALUES,
        "min_events": MIN_EVENTS,
        "min_history": MIN_HISTORY,
        "history_prior": HISTORY_PRIOR,
        "user_prior": USER_PRIOR,
    }

    def _fit(self, dataset: Dataset) -> None:
        self._set_value_scale()  # how histories weigh
        f = dataset.item_features
        if f is None or f.nnz == 0:
            raise ValueError(
                f"{dataset.name}: the content model needs item features "
                "(genres or tags), and this dataset has none"
            )
        a, _, _ = self._weighted(f.tocsr())  # items are the documents, features the terms
        self.sim = self._knn_self(a, similarity="cosine")


@register
class UserKNN(_Neighbourhood):
    """User-based kNN: the items of the users most similar to this one.

    `sim` is users x users. A new user is folded in by computing their
    similarity to every training user with the same weighting (stored idf).
    """

    algorithm = "userknn"
    # Defaults: the study in docs/algorithms.md (was k 100, shrink 0, no weighting).
    params_spec: ClassVar[Mapping[str, Param]] = {
        **COMMON,
        "k": COMMON["k"].searched(default=170),
        "shrink": COMMON["shrink"].searched(default=65.0),
        "weighting": COMMON["weighting"].searched(default="bm25"),
        "min_events": MIN_EVENTS,
        "min_history": MIN_HISTORY,
        "history_prior": HISTORY_PRIOR,
        "user_prior": USER_PRIOR,
    }
    ranks_from_history = False  # known users rank from their sim row

    def _fit(self, dataset: Dataset) -> None:
        assert self.user_items is not None
        # Users are the documents; keep the idf and mean length to weight new users.
        # Users are alike by what they like: dislikes stay out of the similarity
        # (they still count against an item when a neighbour's row is scored).
        x = self._set_value_scale()
        self.users_w, self._idf, self._avg_len = self._weighted(without_dislikes(x))
        self.sim = self._knn_self(self.users_w)

    def _neighbours(self, history: sp.csr_matrix) -> sp.csr_matrix:
        """Top-k similar training users of each history row (fold-in)."""
        if history.shape[0] == 1:  # _history_weights drops the dislikes itself
            ix, v = self._history_weights(history.tocsr())
            return csr(np.array([0, ix.size], np.int64), ix, v, (1, self.n_users))
        h = without_dislikes(history.tocsr())
        data = self._weighted_data(h.indptr, h.indices, h.data)
        h = csr(h.indptr.astype(np.int64), h.indices, data, h.shape)
        b, norm, _, _ = self._fold_index()
        return self._knn(h, b, self.n_users, exclude_self=False, col_norm=norm)

    def _history_weights(self, row: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        # One row from its arrays: scipy's tocsr/astype cost more than the search.
        # A known user's row (KnownUserRow) is not their own neighbour, as in
        # training (sim excludes the diagonal): unchanged, it is their trained row.
        known = known_user(row)
        row = without_dislikes(row)
        indices = np.asarray(row.indices, np.int32)
        indptr = np.array([0, indices.size], np.int64)
        return self._neighbour_row(indices, self._weighted_data(indptr, indices, row.data), known)

    def _weighted_data(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> Any:
        """History rows' values weighted as the training users were (stored idf,
        mean row length), float32; on the log scale, scaled first, as they were."""
        data = log_scaled(data, self.value_median)
        if self.params["weighting"] == "none" or not data.size:
            return data
        weighted, _, _ = simk.weight(
            np.asarray(indptr, np.int64),
            indices,
            data,
            self.n_items,
            self.params["weighting"],
            self.params["K1"],
            self.params["B"],
            idf=self._idf,
            avg_len=self._avg_len,
            n_threads=self.n_threads,
        )
        return weighted

    def _neighbour_row(
        self, indices: np.ndarray, data: np.ndarray, skip: int = -1
    ) -> tuple[np.ndarray, np.ndarray]:
        """One weighted history's top-k training users, (users int32, similarities
        float32): knn's row, by a KnnIndex validated once and pooled scratch;
        training user `skip` (>= 0) left out."""
        _, _, index, pool = self._fold_index()
        k = self.params["k"]
        scratch = pool.take()
        try:
            users, sims = index.query(indices, data, k + (skip >= 0), scratch)
        finally:
            pool.give(scratch)
        if skip >= 0:
            keep = users != skip
            users, sims = users[keep][:k], sims[keep][:k]
        return users, sims

    def _fold_index(self) -> tuple[Any, ...]:
        """What every fold-in searches, built on the first one and kept while
        users_w is the same (was a transpose and a pass over every interaction
        per cold request): the weighted training users by item (items x users),
        their column norms, the same as a KnnIndex, and a scratch pool.
        A racing first build makes an equal twin."""
        w = self.users_w
        cache = getattr(self, "_fold_cache", None)
        if cache is None or cache[0] is not w:
            b = w.T.tocsr()
            b = csr(b.indptr.astype(np.int64), b.indices, b.data.astype(np.float32), b.shape)
            p = self.params
            sim = p.get("similarity", "dot")
            norm = simk.knn_col_norm(b.indices, b.data, b.shape[1], sim)
            alpha = p.get("alpha", 0.5) if sim == "asymmetric" else 0.5
            index = simk.KnnIndex(
                b.indptr, b.indices, b.data, b.shape[1], sim, alpha, p.get("shrink", 0.0),
                col_norm=norm,
            )  # fmt: skip
            n_users = self.n_users
            pool = ScratchPool(lambda: simk.KnnScratch(n_users))
            cache = self._fold_cache = (w, b, norm, index, pool)
        return cache[1:]

    def _item_users(self) -> sp.csr_matrix:
        """The training interactions by item (items x users), kept while
        user_items is the same (was a transpose per SimilarItems call)."""
        return self._item_users_checked()[1]

    def _item_users_checked(self) -> tuple[Any, ...]:
        """(user_items, items x users, both as CheckedCSRs, a scratch
        pool): what the fused SimilarItems call reads, made once while
        user_items is the same."""
        x = self._weights_rows()
        cache = getattr(self, "_item_users_cache", None)
        if cache is None or cache[0] is not x:
            xt = x.T.tocsr()
            check = simk.CheckedCSR
            cache = (
                x,
                xt,
                check(xt.indptr, xt.indices, xt.data.astype(np.float32), self.n_users),
                check(x.indptr, x.indices, x.data, self.n_items),
                _scratch_pool(self.n_items),
            )
            self._item_users_cache = cache
        return cache

    def _similar_one(self, item: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """_similar in one score_one call: the item's users times the training
        rows, the identity excluding the item itself."""
        _, _, by_item, rows, pool = self._item_users_checked()
        eye = _identity_checked(self.n_items)
        return _score_one(by_item, item, rows, k, eye, pool)

    def _rank(self, users, history, k, excl, cand):
        h = self.sim[users] if users is not None else self._neighbours(history)
        return self._score(h.tocsr(), self._weights_rows(), k, excl, cand)

    def _one_user(self) -> tuple[Any, Any]:
        return self.sim, self._weights_rows()

    def _score_users(self, users: np.ndarray) -> np.ndarray:
        return np.asarray((self.sim[users] @ self._weights_rows()).toarray(), np.float32)

    def _score_history(self, history: sp.csr_matrix) -> np.ndarray:
        scored = self._weights_rows()
        return np.asarray((self._neighbours(history) @ scored).toarray(), np.float32)

    def _similar(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # Items co-consumed with the item, weighted like user-user cosine on the item side.
        x = self._weights_rows()
        cols = self._item_users()
        n = items.size
        h = cols[items]
        excl = (np.arange(n + 1, dtype=np.int64), items.astype(np.int32))
        return self._score(h, x, k, excl, None)

    def _contributions_many(self, history, items, user):
        # The neighbours once for every explained item (a fold-in's are a search).
        cache = self._one_checked()
        sim, x = cache[3], cache[4]  # validated once: user x user, the rows as they weigh
        if user is not None:
            a, b = sim.indptr[user], sim.indptr[user + 1]
            nb_users, nb_sims = sim.indices[a:b], sim.data[a:b]
        else:
            nb = self._neighbours(history).tocsr()
            nb_users, nb_sims = nb.indices, nb.data
        nb_users = np.asarray(nb_users, np.int64)
        has = simk.block(x, nb_users, np.asarray(items, np.int64))  # neighbours x explained
        weights = np.asarray(nb_sims, np.float64)[:, None] * has
        hist = history.indices
        shared = weights.T @ simk.block(x, nb_users, np.asarray(hist, np.int64))  # m x h
        scaled = log_scaled(history.data, self.value_median).astype(np.float64)
        return hist, shared.T * scaled[:, None]

    def _arrays(self) -> dict[str, np.ndarray]:
        w = self.users_w
        return {
            **super()._arrays(),
            "uw_indptr": w.indptr.astype(np.int64),
            "uw_indices": w.indices,
            "uw_data": w.data,
            "idf": np.asarray(self._idf, np.float32),
            "avg_len": np.array([self._avg_len], np.float64),
        }

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        super()._restore(arrays)
        self.users_w = csr(
            arrays["uw_indptr"],
            arrays["uw_indices"],
            arrays["uw_data"],
            (self.n_users, self.n_items),
        )
        self._idf = arrays["idf"]
        self._avg_len = float(arrays["avg_len"][0])

    def _sim_cols(self) -> int:
        return self.n_users


def _row_normalise(m: sp.csr_matrix) -> sp.csr_matrix:
    """Rows scaled to sum to 1 (empty rows stay empty)."""
    m = m.tocsr().astype(np.float32)
    sums = np.asarray(m.sum(axis=1)).ravel()
    inv = np.zeros_like(sums)
    inv[sums > 0] = 1.0 / sums[sums > 0]
    return sp.diags(inv.astype(np.float32)) @ m
