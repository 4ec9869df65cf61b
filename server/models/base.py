"""The model contract, stated once.

Every algorithm subclasses Recommender and gets recommend / fold-in /
similar-items / score / save / load with exclusions handled here. Models work
on dense indices; external string ids are mapped by the caller through
`model.users` / `model.items` (IdMaps stored in the bundle).
"""

from __future__ import annotations

import functools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np
import scipy.sparse as sp

from recserve import __version__
from recserve.data import Dataset, IdMap, build_csr
from recserve.kernels import similarity as simk
from recserve.kernels import topk
from recserve.models import bundle

log = logging.getLogger(__name__)
T = TypeVar("T")


class ScratchPool(Generic[T]):
    """Buffers reused across calls: one per call in progress, not one per thread.
    The thread-pool server has dozens of threads but only a few calls inside a
    kernel at once, and on a large catalogue a buffer is megabytes (one per
    thread measured +150 MB RSS for one 400k-item itemknn and 64 threads).
    take() pops a free buffer or makes one; give() returns it, as the caller
    found it (kernels leave their masks and accumulators cleared). list.pop
    and list.append are atomic: no lock."""

    __slots__ = ("_free", "_make")

    def __init__(self, make: Callable[[], T]) -> None:
        self._free: list[T] = []
        self._make = make

    def take(self) -> T:
        try:
            return self._free.pop()
        except IndexError:
            return self._make()

    def give(self, buffer: T) -> None:
        self._free.append(buffer)

    def __len__(self) -> int:
        """Buffers made and now free (the peak of calls that held one at once)."""
        return len(self._free)


Exclude = np.ndarray | Sequence[int] | Sequence[np.ndarray | Sequence[int]] | None
SCORE_CHUNK = 1024  # users scored densely at once, at most
# A chunk's dense scores stay within this many floats (128 MB of float32): on a
# 150k-item catalogue 1,024 users made 620 MB per temporary, and SVD's
# evaluation peaked at 1.6 GB.
SCORE_FLOATS = 1 << 25


def score_chunk(n_items: int) -> int:
    """Users scored densely at once over n_items: SCORE_CHUNK, fewer where
    chunk x items would pass SCORE_FLOATS."""
    return max(1, min(SCORE_CHUNK, SCORE_FLOATS // max(n_items, 1)))


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: type, default, help, optional bounds or choices, and
    what `recserve tune` searches: `search` a (low, high) range (on a log scale
    with `log`) or `search_choices` a set of values; neither = not tuned."""

    type: type
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    search: tuple[float, float] | None = None
    log: bool = False
    search_choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.search is not None:
            lo, hi = self.search
            if not lo < hi or (self.log and lo <= 0):
                raise ValueError(
                    f"search range {self.search} (log={self.log}) is empty or not positive"
                )
            for bound in (lo, hi):
                if (self.min is not None and bound < self.min) or (
                    self.max is not None and bound > self.max
                ):
                    raise ValueError(f"search range {self.search} leaves [{self.min}, {self.max}]")

    @property
    def tuned(self) -> bool:
        """Whether `recserve tune` searches this parameter."""
        return self.search is not None or self.search_choices is not None

    def searched(self, **changes: Any) -> Param:
        """This parameter with a search declaration (shared Params stay as they are)."""
        return replace(self, **changes)

    def parse(self, name: str, value: Any) -> Any:
        """Convert and check a value (strings come from --param key=value)."""
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                v: Any = value.lower() in ("1", "true", "yes")
            else:
                v = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"param {name}: expected {self.type.__name__}, got {value!r}"
            ) from None
        if isinstance(v, float) and not np.isfinite(v):
            raise ValueError(f"param {name}: must be finite, got {value!r}")
        if self.min is not None and v < self.min:
            raise ValueError(f"param {name}: must be >= {self.min}, got {v}")
        if self.max is not None and v > self.max:
            raise ValueError(f"param {name}: must be <= {self.max}, got {v}")
        if self.choices is not None and v not in self.choices:
            raise ValueError(f"param {name}: expected one of {', '.join(self.choices)}, got {v!r}")
        return v


MIN_EVENTS = Param(
    int,
    0,
    "a known user with fewer events that count as evidence (likes: values >= 0, "
    "> 0 where values weigh) is answered by the fallbacks (popularity), as a cold "
    "user is; 0: none. `tune` learns it on the validation split",
    min=0,
    max=1_000_000,
)
MIN_HISTORY = Param(
    int,
    -1,
    "the same for a new user's inline history (a request's items, no training "
    "row); -1: as min_events. `tune` learns it on new users folded in from 1-5 events",
    min=-1,
    max=1_000_000,
)
HISTORY_PRIOR = Param(
    float,
    0.0,
    "a new user's inline history of n events is answered by the model's ranking "
    "blended with popularity's, popularity weighted c / (c + n) (as a hybrid of the "
    "two blends: min-max, weighted sum); 0: none. `tune` learns it on new users",
    min=0.0,
    max=1e6,
)
USER_PRIOR = Param(
    float,
    0.0,
    "a known user with n events (training, recorded, inline) is answered by the "
    "model's ranking blended with popularity's, popularity weighted c / (c + n); 0: "
    "none. `tune` learns it on the validation users",
    min=0.0,
    max=1e6,
)

# `values = "auto"` weighs values on a log scale when their 99th percentile is
# more than this many times their median: counts, quantities, durations; not
# ratings (1-5: 1.25x).
HEAVY_TAIL_RATIO = 4.0

VALUES = Param(
    str,
    "auto",
    "how a value weighs: linear, log (log1p(|value| / median)), "
    "or auto: log for heavy-tailed values (counts), else linear",
    choices=("auto", "linear", "log"),
)


def value_tail(values: np.ndarray) -> tuple[float, float] | None:
    """(median, 99th percentile / median) of the non-zero finite |values|, or
    None when there are none: what `values = "auto"` decides by."""
    mags = np.abs(np.asarray(values, np.float64))
    mags = mags[np.isfinite(mags) & (mags > 0)]
    if mags.size == 0:
        return None
    median = float(np.median(mags))
    return median, float(np.quantile(mags, 0.99)) / median


def log_median(values: np.ndarray, mode: str, algorithm: str = "") -> float:
    """The median of the non-zero |values| when they weigh on the log scale
    (`mode` "log", or "auto" and heavy-tailed: 99th percentile over
    HEAVY_TAIL_RATIO x the median), else 0.0 (linear). A few huge counts would
    otherwise outweigh the many ordinary ones."""
    if mode == "linear":
        return 0.0
    found = value_tail(values)
    if found is None:
        return 0.0
    median, tail = found
    if mode == "auto":
        if tail <= HEAVY_TAIL_RATIO:
            return 0.0
        log.info(
            "%s: values heavy-tailed (99th percentile %.1fx the median): log scale",
            algorithm or "model",
            tail,
        )
    return median


def log_scaled(values: np.ndarray, median: float) -> np.ndarray:
    """float32 values as they weigh: sign(v) log1p(|v| / median) on the log scale
    (median > 0; a dislike stays negative, a 0 stays 0), as they are otherwise."""
    v = np.asarray(values, np.float32)
    if median <= 0:
        return v
    return np.copysign(np.log1p(np.abs(v) / np.float32(median)), v).astype(np.float32)


class NotFittedError(RuntimeError):
    """The model has neither been fitted nor loaded."""


class TrainingError(ValueError):
    """Training failed for these parameters on this data (it diverged, or a
    solve had no answer): there is no model to publish, and the message says
    which parameter to change."""


class Recommender(ABC):
    """Base class of every recserve model: the contract and its shared machinery."""

    algorithm: ClassVar[str] = ""
    params_spec: ClassVar[Mapping[str, Param]] = {}
    # The parameter counting training passes (iterations, epochs), if any: `tune`
    # scores a trial first at a fraction of it and prunes the unpromising ones.
    budget_param: ClassVar[str] = ""
    predicts_ratings: ClassVar[bool] = False
    # True when an empty history still gets a meaningful ranking (popularity):
    # the service sends users it knows nothing about only to such models.
    serves_cold: ClassVar[bool] = False
    # True when negative values are ratings the model fits (svd, bayes_mf), not
    # dislikes: a user whose values are all negative is still known to it.
    rates_negatives: ClassVar[bool] = False
    # True when score()/score_history() return a std (Bayesian models).
    uncertainty: ClassVar[bool] = False
    # True when _rank reads the training rows of known users (item-kNN scores
    # history x similarity); otherwise recommend() passes history=None for them.
    ranks_from_history: ClassVar[bool] = False
    # True when a history item weighs by its value (neighbourhood scores are
    # history values x similarities): an event of value 0 then weighs nothing,
    # and a user whose values are all <= 0 is cold to the model. Otherwise a 0
    # is an interaction like any other (ALS's confidence 1, BPR's positive).
    weighs_by_value: ClassVar[bool] = False
    # True when scoring many known users in one recommend() call costs less per
    # user than one call each (a FAISS search or a BLAS product over factor
    # rows): the asyncio server's dynamic batching coalesces concurrent calls.
    batches_well: ClassVar[bool] = False
    # True when a score sums the evidence that reaches an item (neighbourhood
    # models, EASE: history x similarity), so exactly 0 means nothing reached
    # it, not a low score: the service never ranks such items by index. A
    # user reaching no item is answered as a cold one (fallbacks, popularity),
    # unreached items that fill an answer come by popularity, and a hybrid
    # takes only the reached items (score > 0) as this component's candidates.
    sparse_scores: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.params_spec))
        if unknown:
            known = ", ".join(sorted(self.params_spec)) or "none"
            raise ValueError(
                f"{self.algorithm}: unknown param(s) {', '.join(unknown)} (known: {known})"
            )
        self.params: dict[str, Any] = {
            name: spec.parse(name, params.get(name, spec.default))
            for name, spec in self.params_spec.items()
        }
        self.users: IdMap | None = None
        self.items: IdMap | None = None
        self.user_items: sp.csr_matrix | None = None
        self.manifest: dict[str, Any] = {}  # set when loaded from a bundle
        self.n_threads = 0  # kernel threads; 0 = OpenMP default

    # -- to implement -------------------------------------------------------

    @abstractmethod
    def _fit(self, dataset: Dataset) -> None:
        """Learn from dataset (user_items, users and items are already set)."""

    @abstractmethod
    def _score_users(self, users: np.ndarray) -> np.ndarray:
        """Dense float32 scores (len(users), n_items) for known users."""

    @abstractmethod
    def _score_history(self, history: sp.csr_matrix) -> np.ndarray:
        """Dense float32 scores (rows, n_items) for users given only by history rows."""

    @abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]:
        """The model's own arrays to store in a bundle."""

    @abstractmethod
    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Set the model's state from (memory-mapped) bundle arrays."""

    def _similar(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k similar items per item (item itself excluded); override per model."""
        raise NotImplementedError(f"{self.algorithm} has no item similarity")

    def _rank(
        self,
        users: np.ndarray | None,
        history: sp.csr_matrix | None,
        k: int,
        excl: tuple[np.ndarray, np.ndarray],
        cand: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per row for known `users` (history = their training rows, or None
        unless `ranks_from_history`) or, when users is None, for users given only
        by `history` rows (fold-in).

        The default scores densely and selects with the shared top-k kernel;
        sparse models override this to fuse scoring and selection.
        """
        scores = self._score_users(users) if users is not None else self._score_history(history)
        ca = cand if cand is not None else (None, None)
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        return topk.topk_dense(scores, k, excl[0], excl[1], ca[0], ca[1], self.n_threads)

    # -- the contract ---------------------------------------------------------

    @property
    def n_users(self) -> int:
        return 0 if self.users is None else len(self.users)

    @property
    def n_items(self) -> int:
        return 0 if self.items is None else len(self.items)

    def _require_fitted(self) -> sp.csr_matrix:
        if self.user_items is None:
            raise NotFittedError(f"{self.algorithm}: fit or load the model first")
        return self.user_items

    @classmethod
    def fixed_by_data(cls, dataset: Dataset) -> dict[str, Any]:
        """Parameters a search must leave at these values on `dataset`: settings
        the data cannot support (a time decay without timestamps), which a
        trial would only fail on. Empty by default."""
        return {}

    @classmethod
    def defaults_on(cls, dataset: Dataset) -> dict[str, Any]:
        """The defaults a fit on `dataset` takes for the parameters not given
        (some models choose by the data's density); `tune`'s first trial is
        these. The declared defaults here."""
        return {n: p.default for n, p in cls.params_spec.items()}

    def fit(self, dataset: Dataset) -> Self:
        """Train on a dataset; returns self."""
        if dataset.nnz == 0:
            raise ValueError(f"{dataset.name}: no interactions to train on")
        t = time.perf_counter()
        self.users, self.items = dataset.users, dataset.items
        m = dataset.interactions.tocsr()
        self.user_items = sp.csr_matrix(
            (
                m.data.astype(np.float32, copy=False),
                m.indices.astype(np.int32, copy=False),
                m.indptr.astype(np.int64, copy=False),
            ),
            shape=m.shape,
        )
        self._fit(dataset)
        self._require_finite(self._arrays())
        log.info("%s: fitted on %s in %.2fs", self.algorithm, dataset.name, time.perf_counter() - t)
        return self

    def _divergence_hint(self) -> str:
        """What to change when training ended with NaN or inf (names the params)."""
        return "check the parameters"

    def _require_finite(self, arrays: Mapping[str, Any]) -> None:
        """Refuse a model whose float arrays hold NaN or inf: it would answer every
        request with nothing (NaN is never eligible) or with arbitrary ties, and
        be published as if it had trained. A float64 sum is non-finite exactly
        when an entry is (float32 entries cannot overflow it), so the common case
        allocates nothing; a float64 array is confirmed entry by entry."""
        for key, arr in arrays.items():
            a = np.asarray(arr)
            if a.dtype.kind != "f" or a.size == 0 or np.isfinite(a.sum(dtype=np.float64)):
                continue
            if a.dtype.itemsize < 8 or not np.isfinite(a).all():
                raise TrainingError(
                    f"{self.algorithm}: training diverged ({key} holds NaN or inf); "
                    + self._divergence_hint()
                )

    def recommend(
        self,
        users: Sequence[int] | np.ndarray,
        k: int = 10,
        exclude: Exclude = None,
        filter_seen: bool = True,
        candidates: Exclude = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items for known users (dense indices).

        exclude / candidates: one list for every user or one list per user.
        Returns (items int32, scores float32) of shape (len(users), k), best
        first, padded with -1 / -inf only where fewer than k items are eligible.
        """
        seen = self._require_fitted()
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        if users.size and (users.min() < 0 or users.max() >= self.n_users):
            raise IndexError(f"users: indices must be in [0, {self.n_users})")
        check_k(k)
        if users.size == 1 and (exclude is None or len(exclude) == 0):
            return self._recommend_one(int(users[0]), k, filter_seen, candidates)
        out_i = np.empty((users.size, k), np.int32)
        out_s = np.empty((users.size, k), np.float32)
        step = score_chunk(self.n_items)
        for lo in range(0, users.size, step):
            chunk = users[lo : lo + step]
            # One user (the serving case): a row slice, far cheaper than fancy indexing.
            history = seen[int(chunk[0]) : int(chunk[0]) + 1] if chunk.size == 1 else seen[chunk]
            excl = exclusion_rows(
                history if filter_seen else None,
                _rows_for(exclude, lo, chunk.size),
                chunk.size,
                self.n_items,
            )
            cand = candidate_rows(_rows_for(candidates, lo, chunk.size), chunk.size)
            out_i[lo : lo + chunk.size], out_s[lo : lo + chunk.size] = self._rank(
                chunk, history, k, excl, cand
            )
        return out_i, out_s

    def recommend_user(
        self, user: int, k: int = 10, filter_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for one known user (dense index) with no extra exclusions: the
        common serving request. Same answer as recommend([user], k)[:, :eligible];
        1-d (items int32, scores float32), exactly min(k, eligible) long."""
        items, scores = self.recommend([user], k, filter_seen=filter_seen)
        n = unpadded(items[0])
        return items[0, :n], scores[0, :n]

    @property
    def has_dense_rows(self) -> bool:
        """Whether dense_user / dense_history write rows (False: the ranking is
        an approximate index's, not the top-k of a dense row)."""
        return True

    def dense_user(self, user: int, out: np.ndarray, filter_seen: bool = True) -> bool:
        """Write a known user's scores over every item into `out` (float32,
        n_items), NaN at the seen items when filter_seen: the row whose top-k
        recommend_user returns (same scores, ties by lower index). A hybrid
        blends such rows in one kernel pass. False (out untouched) when the
        model's ranking is not the top-k of a dense row (an approximate index)."""
        self._require_fitted()
        if not 0 <= user < self.n_users:
            raise IndexError(f"users: indices must be in [0, {self.n_users})")
        topk.check_row(out, self.n_items)
        out[:] = self._score_users(np.array([user], np.int64))[0]
        if filter_seen:
            indptr, indices = self._csr_views()
            out[indices[indptr[user] : indptr[user + 1]]] = np.nan
        return True

    def prior_user(
        self,
        user: int,
        k: int,
        weights: tuple[float, float],
        popular: tuple[np.ndarray, np.ndarray],
        n_cand: int,
        filter_seen: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, int] | None:
        """A known user's answer under a prior in one kernel call: dense_user's
        row blended with popularity's part (`popular`: order int32, counts
        float32), weighted `weights` (row, popularity), each part its n_cand
        best, popularity's without the seen items when filter_seen; the k best
        (items int32, sums float64) and the row's number of candidates (0:
        none eligible). What blend_dense answers for that row, for a model
        whose rows are products of vectors (_user_vectors); None for any
        other, whose row the caller blends itself."""
        found = self._user_vectors(user)
        if found is None:
            return None
        queries, vectors, bias = found
        indptr, indices = self._csr_views() if filter_seen else (None, None)
        order, counts = popular
        return topk.prior_user(
            queries, user, vectors, *weights, n_cand, k, order, counts, indptr, indices, bias
        )

    def _user_vectors(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(queries, item vectors, per-item bias or None), float32, whose
        queries[user] . vectors + bias is known `user`'s dense row (what the
        one-user kernels read); None where rows are not such products."""
        return None

    def _vector_row(self, user: int, out: np.ndarray, filter_seen: bool) -> bool:
        """dense_user for a model whose rows are products of vectors
        (_user_vectors): the one-user kernel's row, computed as topk_user
        computes it; False (out untouched) where they are not."""
        found = self._user_vectors(user)
        if found is None:
            return False
        queries, vectors, bias = found
        indptr, indices = self._csr_views() if filter_seen else (None, None)
        topk.dense_user(queries, user, vectors, out, indptr, indices, bias)
        return True

    def dense_history(self, row: sp.csr_matrix, out: np.ndarray, filter_seen: bool = True) -> bool:
        """dense_user for a user given by one history row (fold-in): the row
        whose top-k recommend_histories returns, NaN at the row's items when
        filter_seen. False (out untouched) where that ranking is not the top-k
        of a dense row (an approximate index)."""
        self._require_fitted()
        topk.check_row(out, self.n_items)
        if row.shape != (1, self.n_items):
            raise ValueError(f"row: expected shape (1, {self.n_items}), got {row.shape}")
        out[:] = self._score_history(row)[0]
        if filter_seen:
            out[row.indices] = np.nan
        return True

    def _recommend_dense(
        self, user: int, k: int, filter_seen: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """recommend_user through dense_user into a scratch row and one
        top-k kernel call: for models whose one-user row is cheap to compute
        but whose batch path (a sparse matrix, a dense product) costs more."""
        check_k(k)
        pool = self._row_pool()
        row = pool.take()
        try:
            self.dense_user(user, row, filter_seen)
            return topk.topk_row(row, k)
        finally:
            pool.give(row)

    def _row_pool(self) -> ScratchPool[np.ndarray]:
        """Scratch rows of n_items float32 (a new pool when n_items changes)."""
        n = self.n_items
        held = self.__dict__.get("_rows_free")
        if held is None or held[0] != n:
            held = self._rows_free = (n, ScratchPool(lambda: np.empty(n, np.float32)))
        return held[1]

    def _recommend_one(
        self, user: int, k: int, filter_seen: bool, candidates: Exclude
    ) -> tuple[np.ndarray, np.ndarray]:
        """recommend() for one user without extra exclusions (the serving case):
        the seen items are a slice of the training CSR, so no sparse matrix is
        built unless the model ranks from history rows. Same answer as the batch path."""
        seen = self.user_items
        assert seen is not None
        indptr, indices = self._csr_views()
        a, b = int(indptr[user]), int(indptr[user + 1])
        if filter_seen:
            excl = (np.array([0, b - a], np.int64), indices[a:b])
        else:
            excl = (np.zeros(2, np.int64), np.zeros(0, np.int32))
        history = None
        if self.ranks_from_history:
            history = sp.csr_matrix(
                (np.asarray(seen.data)[a:b], indices[a:b], np.array([0, b - a], np.int64)),
                shape=(1, seen.shape[1]),
                copy=False,
            )
        cand = candidate_rows(_rows_for(candidates, 0, 1), 1)
        users = np.array([user], np.int64)
        return self._rank(users, history, k, excl, cand)

    def is_cold(self, user: int) -> bool:
        """Whether this model learned nothing about a known user: no training
        events (a model fitted on a split), or only dislikes (negative values)
        where the model learns from likes, or only values <= 0 where a history
        weighs by its values (`weighs_by_value`). Its ranking would be all
        zeros, items in index order. The service answers such a user as it answers an
        unknown one without a history (fallbacks, popularity). One look at the
        user's training row (and, for ALS, its factors). Never for a model that
        serves cold users: its answer (popular items the user has not seen) is
        the one a fallback would give."""
        if self.serves_cold:
            return False
        indptr, _ = self._csr_views()
        a, b = indptr[user], indptr[user + 1]
        if a == b:
            return self._learned_nothing(user)
        if self.rates_negatives:
            return False
        by_value = self.weighs_by_value
        if not (self.has_dislikes() or (by_value and self._has_nonpositive())):
            return False
        assert self.user_items is not None
        top = np.asarray(self.user_items.data)[a:b].max()
        return bool(top <= 0 if by_value else top < 0) and self._learned_nothing(user)

    def evidence(self, values: np.ndarray) -> int:
        """How many of a history's values count as evidence for this model: likes
        (>= 0; > 0 where a history weighs by its values), or all of them for a
        model that fits negative ratings."""
        if self.rates_negatives:
            return int(values.size)
        return int(np.count_nonzero(values > 0 if self.weighs_by_value else values >= 0))

    def prior_row(
        self,
        out: np.ndarray,
        user: int = -1,
        row: sp.csr_matrix | None = None,
        filter_seen: bool = True,
    ) -> int | None:
        """The dense row a prior blends with popularity written into `out` (a
        known `user`'s own, or a history `row`'s fold-in), and the number of
        events n that weighs it (`training_evidence`, or the row's `evidence`);
        None for a model without dense rows (an approximate index)."""
        if row is None:
            if not self.dense_user(user, out, filter_seen):
                return None
            return self.training_evidence(user)
        if not self.dense_history(row, out, filter_seen):
            return None
        return self.evidence(np.asarray(row.data, np.float32))

    def training_evidence(self, user: int) -> int:
        """`evidence` of a known user's training row; its length where every
        training value counts (no dislikes, no values <= 0 for a model that
        weighs by value): a serving-path count without a pass over the row."""
        if self.rates_negatives or not (
            self._has_nonpositive() if self.weighs_by_value else self.has_dislikes()
        ):
            seen = self._require_fitted()
            return int(seen.indptr[user + 1] - seen.indptr[user])
        return self.evidence(np.asarray(self.training_row(user)[1]))

    def history_gate(self) -> int:
        """The gate for a new user's inline history: `min_history`, or
        `min_events` where that is -1 (the default, and bundles made before it)."""
        gate = int(self.params.get("min_history", -1))
        return int(self.params.get("min_events", 0)) if gate < 0 else gate

    def unrated(self, items: np.ndarray, values: np.ndarray) -> np.ndarray:
        """`values` (float32) with each NaN, an interaction sent without a value,
        replaced by what such an interaction means to this model: 1, one event
        (the contract's default); a model that fits ratings overrides it."""
        values[np.isnan(values)] = 1.0
        return values

    def too_little(self, values: np.ndarray, known: bool = True) -> bool:
        """Whether a history (its values) is below the model's gate, `min_events`
        for a known user (`known`: training row and newer events) and
        `history_gate()` for a new user's inline history: the service answers it
        as a cold user (fallbacks), where the model ranks worse than popularity
        (`tune` measures where that is)."""
        gate = self.params.get("min_events", 0) if known else self.history_gate()
        return bool(gate) and self.evidence(values) < gate

    def gated(self, user: int) -> bool:
        """`too_little` for a known user's training row."""
        if not self.params.get("min_events", 0):
            return False
        return self.too_little(self.training_row(user)[1])

    def has_dislikes(self) -> bool:
        """Whether any training value is negative: the bundle's manifest says so
        ("dislikes"); else one pass over the values, kept per training matrix."""
        seen = self._require_fitted()
        held = self.__dict__.get("_dislikes")
        if held is None or held[0] is not seen:
            data = np.asarray(seen.data)
            held = self._dislikes = (seen, bool(data.size and data.min() < 0))
        return held[1]

    def _has_nonpositive(self) -> bool:
        """Whether any training value is <= 0 (one pass, kept per training matrix)."""
        seen = self._require_fitted()
        held = self.__dict__.get("_nonpositive")
        if held is None or held[0] is not seen:
            data = np.asarray(seen.data)
            held = self._nonpositive = (seen, bool(data.size and data.min() <= 0))
        return held[1]

    def _learned_nothing(self, user: int) -> bool:
        """For a user without training events (or with only dislikes): True
        unless the model holds user parameters learned elsewhere (imported
        factors)."""
        return True

    def _csr_views(self) -> tuple[np.ndarray, np.ndarray]:
        """Plain-ndarray views of the training CSR's indptr and indices (a
        memmap's __getitem__ costs microseconds per call on the serving path)."""
        seen = self.user_items
        cached = getattr(self, "_views", None)
        if cached is None or cached[0] is not seen:
            cached = (seen, np.asarray(seen.indptr, np.int64), np.asarray(seen.indices, np.int32))
            self._views = cached
        return cached[1], cached[2]

    def recommend_from_history(
        self,
        items: Sequence[int] | np.ndarray,
        values: Sequence[float] | np.ndarray | None = None,
        k: int = 10,
        exclude: Sequence[int] | np.ndarray | None = None,
        filter_seen: bool = True,
        candidates: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for a user not seen in training, from an inline history (fold-in).

        Returns 1-d (items, scores), exactly min(k, eligible) long.
        """
        self._require_fitted()
        history = self.history_matrix([items], None if values is None else [values])
        i, s = self.recommend_histories(
            history,
            k,
            None if exclude is None else [exclude],
            filter_seen,
            None if candidates is None else [candidates],
        )
        n = unpadded(i[0])
        return i[0, :n], s[0, :n]

    def recommend_histories(
        self,
        history: sp.csr_matrix,
        k: int = 10,
        exclude: Exclude = None,
        filter_seen: bool = True,
        candidates: Exclude = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Batch fold-in: top-k for each row of a (rows x items) history matrix."""
        self._require_fitted()
        check_k(k)
        history = history.tocsr()
        if history.shape[1] != self.n_items:
            raise ValueError(
                f"history: expected {self.n_items} item columns, got {history.shape[1]}"
            )
        n = history.shape[0]
        out_i = np.empty((n, k), np.int32)
        out_s = np.empty((n, k), np.float32)
        step = score_chunk(self.n_items)
        for lo in range(0, n, step):
            # One chunk is the matrix itself: a slice would be a plain copy,
            # without a KnownUserRow's user.
            rows = history if n <= step else history[lo : lo + step]
            size = rows.shape[0]
            excl = exclusion_rows(
                rows if filter_seen else None, _rows_for(exclude, lo, size), size, self.n_items
            )
            cand = candidate_rows(_rows_for(candidates, lo, size), size)
            out_i[lo : lo + size], out_s[lo : lo + size] = self._rank(None, rows, k, excl, cand)
        return out_i, out_s

    def similar_items(self, item: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k items most similar to one item (never the item itself), best first."""
        self._require_fitted()
        check_k(k)
        if not 0 <= int(item) < self.n_items:
            raise IndexError(f"item: index must be in [0, {self.n_items})")
        one = self._similar_one(int(item), k)
        if one is not None:
            return one
        i, s = self._similar(np.array([item], np.int64), k)
        n = unpadded(i[0])
        return i[0, :n], s[0, :n]

    def _similar_one(self, item: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """similar_items' answer by a fused one-item kernel call (the serving
        path), or None for the general _similar call; inputs are checked."""
        return None

    def explain(self, user: int, item: int, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Up to n items of the user's history that contributed most to `item`'s score,
        with their contributions, largest first. Empty where the model's score does
        not depend on the history (popularity)."""
        return self.explain_user_items(user, [item], n)[0]

    def explain_user_items(
        self, user: int, items: Sequence[int] | np.ndarray, n: int = 5
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """explain() for several items of a known user's answer, in one call."""
        self._require_fitted()
        if not 0 <= int(user) < self.n_users:
            raise IndexError(f"user: index must be in [0, {self.n_users})")
        return self.explain_items(self._user_row(int(user)), items, n, user=int(user))

    def _user_row(self, user: int) -> sp.csr_matrix:
        """Row `user` of the training CSR (1 x items), read from its arrays:
        scipy's row indexing costs ~30 us, a tenth of an explained answer."""
        seen = self.user_items
        assert seen is not None
        if not seen.has_canonical_format:  # csr_row needs sorted, distinct indices
            return seen[user]
        return csr_row(*self.training_row(user), self.n_items)

    def training_row(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices int32, values float32) of a known user's training
        events, views of the training CSR's arrays in their stored order
        (scipy's row indexing, ~30 us, copies them into a new matrix)."""
        seen = self.user_items
        assert seen is not None
        if not 0 <= user < self.n_users:
            raise IndexError(f"user: index must be in [0, {self.n_users})")
        indptr, indices = self._csr_views()
        a, b = int(indptr[user]), int(indptr[user + 1])
        return indices[a:b], np.asarray(seen.data[a:b], np.float32)

    def explain_history(
        self, history: sp.csr_matrix, item: int, n: int = 5, user: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """explain() for a history row (1 x items); `user` when it is a known user."""
        return self.explain_items(history, [item], n, user)[0]

    def explain_items(
        self,
        history: sp.csr_matrix,
        items: Sequence[int] | np.ndarray,
        n: int = 5,
        user: int | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """explain_history for several items of one answer at once: what the
        history gives every item is computed once (one factorisation, one slice
        of the similarities), not once per explained item."""
        self._require_fitted()
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        if items.size and (items.min() < 0 or items.max() >= self.n_items):
            raise IndexError(f"item: index must be in [0, {self.n_items})")
        history = history.tocsr()
        hist, contrib = self._contributions_many(history, items, user)
        hist = np.asarray(hist)
        if hist.size == 0 or n <= 0:
            return [(np.zeros(0, np.int32), np.zeros(0, np.float32)) for _ in range(items.size)]
        # Every item's column at once (a loop of numpy calls per item cost ~10 us
        # each, 1 ms for a k=100 answer): positive contributions first, largest
        # first, ties by lower history item; the rest sort last and are cut.
        c = np.asarray(contrib).reshape(hist.size, items.size)
        if hist.size > 1 and not (hist[1:] > hist[:-1]).all():
            by_item = np.argsort(hist, kind="stable")  # a CSR row's are sorted already
            hist, c = hist[by_item], c[by_item]
        positive = c > 0
        # Stable over rows sorted by item: ties go to the lower history item.
        order = np.argsort(np.where(positive, -c, np.inf), axis=0, kind="stable")[:n]
        cols = np.arange(items.size)
        counts = positive[order, cols].sum(0).tolist()
        best_idx = np.ascontiguousarray(hist[order.T], np.int32)
        best_val = np.ascontiguousarray(c[order, cols].T, np.float32)
        return [(best_idx[j, :m], best_val[j, :m]) for j, m in enumerate(counts)]

    def _contributions_many(
        self, history: sp.csr_matrix, items: np.ndarray, user: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(history items h, their contributions to each of `items`: h x len(items)).
        None by default (the score does not decompose over the history); models
        whose score does override this, computing what the items share once."""
        return np.zeros(0, np.int32), np.zeros((0, items.size))

    def score(
        self, user: int, items: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (and std where the model has uncertainty, else None) of items for a user."""
        self._require_fitted()
        items = np.asarray(items, dtype=np.int64)
        if items.size and (items.min() < 0 or items.max() >= self.n_items):
            raise IndexError(f"items: indices must be in [0, {self.n_items})")
        return self._score_users(np.array([user], np.int64))[0, items], None

    def score_history(
        self, history: sp.csr_matrix, items: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """score() for a user given only by a history row (fold-in)."""
        items = self._checked_items(items)
        return np.asarray(self._score_history(history.tocsr())[0, items], np.float32), None

    def std_user(self, user: int, items: np.ndarray) -> np.ndarray | None:
        """The std of score(user, items) alone (None without uncertainty): what
        the serving path attaches to an answer whose scores it already has."""
        return self.score(user, items)[1] if self.uncertainty else None

    def std_history(self, history: sp.csr_matrix, items: np.ndarray) -> np.ndarray | None:
        """std_user for a user given only by a history row (fold-in)."""
        return self.score_history(history, items)[1] if self.uncertainty else None

    def _checked_items(self, items: Sequence[int] | np.ndarray) -> np.ndarray:
        """Item indices as int64, after checking the model is fitted and every index
        lies in the catalogue (IndexError naming the range)."""
        self._require_fitted()
        items = np.asarray(items, dtype=np.int64)
        if items.size and (items.min() < 0 or items.max() >= self.n_items):
            raise IndexError(f"items: indices must be in [0, {self.n_items})")
        return items

    def history_matrix(
        self,
        histories: Sequence[Sequence[int] | np.ndarray],
        values: Sequence[Sequence[float] | np.ndarray] | None = None,
    ) -> sp.csr_matrix:
        """Histories (dense item indices, optional values) as a rows x items CSR.

        Repeated items keep their last value; indices outside the catalogue
        raise IndexError naming them.
        """
        if len(histories) == 1:  # one request's history (fold-in): no general COO build
            return self._history_row(histories[0], None if values is None else values[0])
        rows, cols, vals = [], [], []
        for r, items in enumerate(histories):
            items = np.asarray(items, dtype=np.int64).reshape(-1)
            bad = items[(items < 0) | (items >= self.n_items)]
            if bad.size:
                raise IndexError(f"history: item index {int(bad[0])} outside [0, {self.n_items})")
            v = (
                np.ones(items.size, np.float32)
                if values is None
                else np.asarray(values[r], dtype=np.float32).reshape(-1)
            )
            if v.shape != items.shape:
                raise ValueError("history: values and items differ in length")
            if not np.isfinite(v).all():
                raise ValueError("history: values must be finite")
            rows.append(np.full(items.size, r, np.int64))
            cols.append(items)
            vals.append(v)
        n = len(histories)
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        v = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        m, _ = build_csr(r, c, v, np.arange(r.size), n, self.n_items)
        return m

    def _history_row(
        self, items: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray | None
    ) -> sp.csr_matrix:
        """history_matrix of one history: the same checks, the same matrix (sorted
        indices, a repeated item keeps its last value), without the general COO
        build or scipy's re-validation of arrays built valid (a cold request's
        fold-in: 48 -> 10 us on a ten-item history)."""
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        v = None if values is None else np.asarray(values, dtype=np.float32).reshape(-1)
        indices, data = simk.history_row(items, v, self.n_items)
        return csr_row(indices, data, self.n_items)

    # -- bundles ----------------------------------------------------------------

    def save(
        self,
        models_dir: str | Path,
        name: str,
        metrics: Mapping[str, float] | None = None,
        dataset: Dataset | None = None,
        make_current: bool = True,
        tuning: Mapping[str, Any] | None = None,
        baseline: Mapping[str, Any] | None = None,
    ) -> Path:
        """Publish this model as a new bundle version of `name`; returns its folder.
        `tuning`: the search record of `recserve tune`, kept in the manifest;
        `baseline`: popularity's metrics on the split `metrics` came from."""
        seen = self._require_fitted()
        assert self.users is not None and self.items is not None
        arrays = {
            "user_ids": self.users.array,
            "item_ids": self.items.array,
            "seen_indptr": seen.indptr.astype(np.int64, copy=False),
            "seen_indices": seen.indices,
            "seen_data": seen.data,
        }
        for key, arr in self._arrays().items():
            if key in arrays:
                raise KeyError(f"{self.algorithm}: array name {key!r} is reserved")
            arrays[key] = arr
        manifest = {
            "algorithm": self.algorithm,
            "params": self.params,
            "recserve_version": __version__,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "metrics": dict(metrics or {}),
            "dislikes": self.has_dislikes(),
            "dataset": (
                {**dataset.summary(), "fingerprint": dataset.fingerprint()}
                if dataset is not None
                else {}
            ),
        }
        if tuning is not None:
            manifest["tuning"] = dict(tuning)
        if baseline is not None:
            manifest["baseline"] = dict(baseline)
        return bundle.publish(
            models_dir, name, manifest, arrays, self._files(), make_current=make_current
        )

    def _files(self) -> dict[str, Any]:
        """Extra non-array files for the bundle (FAISS indexes); none by default."""
        return {}

    @classmethod
    def from_bundle(cls, path: Path, doc: Mapping[str, Any], mmap: bool = True) -> Self:
        """Rebuild a model from a verified bundle's manifest and arrays."""
        model = cls(**doc["params"])
        arrays = bundle.load_arrays(path, doc, mmap=mmap)
        model.users = IdMap(arrays["user_ids"])
        model.items = IdMap(arrays["item_ids"])
        model.user_items = sp.csr_matrix(
            (arrays["seen_data"], arrays["seen_indices"], arrays["seen_indptr"]),
            shape=(len(model.users), len(model.items)),
            copy=False,
        )
        if "dislikes" in doc:  # bundles written before it was kept: one pass when asked
            model._dislikes = (model.user_items, bool(doc["dislikes"]))
        model._restore(arrays)
        return model


def topk_excluding_self(
    scores: np.ndarray, items: np.ndarray, k: int, n_threads: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row of `scores` (row r scores every item against items[r]),
    never returning the row's own item."""
    n = items.size
    return topk.topk_dense(
        np.ascontiguousarray(scores, dtype=np.float32),
        k,
        np.arange(n + 1, dtype=np.int64),
        items.astype(np.int32),
        None,
        None,
        n_threads,
    )


def cosine_similar(
    factors: np.ndarray, items: np.ndarray, k: int, n_threads: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Items most similar to `items` by cosine of their factor rows; a zero
    row scores 0 against everything rather than NaN."""
    unit = unit_rows(factors)
    scores = unit[items] @ unit.T
    return topk_excluding_self(scores, items, k, n_threads)


_UNIT: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def cosine_similar_one(factors: np.ndarray, item: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """cosine_similar for one item, the serving call: one topk_user call over the
    unit rows, row `item` of the identity excluding the item itself. 1-d,
    min(k, n - 1) long."""
    unit = unit_rows(factors)
    indptr, indices, _ = identity_rows(unit.shape[0])
    return topk.topk_user(unit, int(item), unit, k, indptr, indices, True, None)


def without_dislikes(m: sp.csr_matrix) -> sp.csr_matrix:
    """The entries of a CSR whose value is not negative (same shape, same
    order): negative values are dislikes (a thumbs-down), which the models
    that learn from positive evidence alone (item and user similarities, BPR's
    positives) must not count as interest. `m` itself when it has none."""
    m = m.tocsr()
    data = np.asarray(m.data)
    if data.size == 0 or data.min() >= 0:
        return m
    keep = data >= 0
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    indptr = np.zeros(m.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=m.shape[0]), out=indptr[1:])
    out = sp.csr_matrix((data[keep], np.asarray(m.indices)[keep], indptr), shape=m.shape)
    out.has_sorted_indices = m.has_sorted_indices
    return out


def unpadded(items: np.ndarray) -> int:
    """How many entries of a top-k row (1-d) are items: rows are padded with -1
    at the end past their eligible items, so a row whose last entry is an item
    has no padding (one look, where `(row >= 0).sum()` cost ~2 us a call on the
    serving path)."""
    n = int(items.shape[0])
    if n and items[n - 1] < 0:
        return int(np.count_nonzero(items >= 0))
    return n


def liked_counts(user_items: sp.csr_matrix) -> np.ndarray:
    """Training interactions per item, dislikes (negative values) not counted:
    the popularity the service falls back on and fills answers with."""
    items = np.asarray(user_items.indices)
    if user_items.nnz and np.asarray(user_items.data).min() < 0:
        items = items[np.asarray(user_items.data) >= 0]
    return np.bincount(items, minlength=user_items.shape[1])


def popular_order(counts: np.ndarray) -> np.ndarray:
    """Item indices by count, most first, ties by lower index."""
    return np.lexsort((np.arange(counts.size), -counts))


def prior_weight(c: float, n: int) -> float:
    """Popularity's weight in the answer to a user (or history) of n events
    (evidence) under a prior c (history_prior, a hybrid's user_prior):
    c / (c + n), n at least 1."""
    return c / (c + max(n, 1))


def blend_popularity(
    rows: np.ndarray,
    counts: np.ndarray,
    weight: float,
    k: int,
    sparse: bool,
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A user's answer under a prior (`history_prior`, `user_prior`): rows[0]
    holds the model's dense row (NaN: not eligible); popularity's `counts`
    where that row is eligible are blended with it as a hybrid of the model
    and popularity with weights (1 - weight, weight) is (each one's best
    max(3k, 100) candidates, only reached ones (> 0) for a `sparse` model's
    row, min-max, weighted sum). With `order` (int32: the counts' items, most
    first, ties by index) popularity's part is read from it (the serving
    path); without, rows[1] (scratch) gets the counts. The same answer either
    way. Returns (items int32, scores float32)."""
    n_cand = min(max(3 * k, 100), rows.shape[1])
    w = np.array([1.0 - weight, weight])
    if order is not None:
        banned = np.flatnonzero(np.isnan(rows[0])).astype(np.int32)
        items, sums, _ = topk.blend_dense(
            rows[:1], w, n_cand, k, np.array([sparse], np.uint8), order, counts, banned
        )
        return items, np.asarray(sums, np.float32)
    pop = rows[1]
    pop[:] = counts
    pop[np.isnan(rows[0])] = np.nan
    items, sums, _ = topk.blend_dense(rows, w, n_cand, k, np.array([sparse, 0], np.uint8))
    return items, np.asarray(sums, np.float32)


def fill_unreached(
    items: np.ndarray, scores: np.ndarray, row: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """A `sparse_scores` answer (best first, no padding) whose items scored 0
    (unreached) are replaced by the first items of `order` (popularity) that
    `row`, the dense row it was ranked from (NaN: not eligible), scores exactly
    0: same length, their scores 0, items scored < 0 after them if room is
    left. None when no item scores > 0 (the evidence reaches nothing eligible:
    a cold user to this model)."""
    pos = int(np.count_nonzero(scores > 0))
    if pos == 0:
        return None
    n = scores.size
    neg = pos + int(np.count_nonzero(scores == 0))
    # The first n - pos of `order` scored 0, read a growing prefix at a time: the
    # most popular items mostly qualify, and a whole large catalogue's gather
    # cost more than the rest of the call.
    need, start, step = n - pos, 0, max(64, 4 * (n - pos))
    parts = []
    while need > 0 and start < order.size:
        head = order[start : start + step]
        got = head[row[head] == 0][:need]
        parts.append(got)
        need -= got.size
        start, step = start + step, 4 * step
    unreached = (np.concatenate(parts) if parts else order[:0]).astype(items.dtype)
    rest = n - pos - unreached.size
    return (
        np.concatenate([items[:pos], unreached, items[neg:][:rest]]),
        np.concatenate([scores[:pos], np.zeros(unreached.size, scores.dtype), scores[neg:][:rest]]),
    )


@functools.lru_cache(maxsize=8)
def identity_rows(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The n x n identity as read-only CSR arrays (indptr int64, indices int32,
    data float32): row i picks item i, or, as a seen row, excludes it."""
    out = (np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int32), np.ones(n, np.float32))
    for a in out:
        a.flags.writeable = False
    return out


def unit_rows(factors: np.ndarray) -> np.ndarray:
    """factors' rows scaled to unit length (zero rows stay zero), made once per
    factor array (SimilarItems asked it on every call: most of its time)."""
    hit = _UNIT.get(id(factors))
    if hit is None or hit[0] is not factors:
        if len(_UNIT) > 64:
            _UNIT.clear()
        y = np.asarray(factors, np.float32)
        norms = np.linalg.norm(y, axis=1)
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        hit = _UNIT[id(factors)] = (factors, y * inv[:, None])
    return hit[1]


def check_k(k: int) -> None:
    if not isinstance(k, int | np.integer) or k <= 0:
        raise ValueError(f"k: must be a positive integer, got {k!r}")


def _rows_for(spec: Exclude, lo: int, size: int) -> list[np.ndarray] | None:
    """Per-row item lists for rows lo..lo+size of an exclude/candidates spec."""
    if spec is None:
        return None
    if isinstance(spec, np.ndarray) and spec.ndim == 1 and spec.dtype.kind in "iu":
        return [spec] * size if spec.size else None  # empty: excludes nothing
    seq = list(spec)
    if not seq:
        return None  # an empty list excludes nothing and restricts nothing
    if all(isinstance(x, int | np.integer) for x in seq):
        arr = np.asarray(seq, dtype=np.int64)
        return [arr] * size
    return [np.asarray(x, dtype=np.int64).reshape(-1) for x in seq[lo : lo + size]]


def exclusion_rows(
    history: sp.csr_matrix | None, extra: list[np.ndarray] | None, n_rows: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr int64, indices int32) of items to exclude per row: history plus extras.

    Every stored history entry counts, whatever its value: an explicit 0 (a
    rating of 0, an event sent with value 0) is still an item the user has seen.
    The union is therefore built on the history's structure (ones), never on its
    values, which scipy's sum would drop where they add up to 0."""
    h = history.tocsr() if history is not None else None
    x = _lists_to_csr(extra, n_rows, n_items) if extra is not None else None
    if h is None and x is None:
        return np.zeros(n_rows + 1, np.int64), np.zeros(0, np.int32)
    if x is None:
        m = h
    else:
        if h is not None:
            ones = np.ones(h.indices.size, np.float32)
            x = sp.csr_matrix((ones, h.indices, h.indptr), shape=h.shape) + x
        m = x.tocsr()
    return m.indptr.astype(np.int64), m.indices.astype(np.int32, copy=False)


def candidate_rows(
    lists: list[np.ndarray] | None, n_rows: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """CSR of allowed items per row (an empty row means unrestricted), or None."""
    if lists is None:
        return None
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum([len(x) for x in lists], out=indptr[1:])
    indices = np.concatenate(lists).astype(np.int32) if indptr[-1] else np.zeros(0, np.int32)
    return indptr, indices


def _lists_to_csr(lists: list[np.ndarray], n_rows: int, n_items: int) -> sp.csr_matrix:
    lengths = np.array([len(x) for x in lists], np.int64)
    cols = np.concatenate(lists).astype(np.int64) if lengths.sum() else np.zeros(0, np.int64)
    keep = (cols >= 0) & (cols < n_items)
    rows = np.repeat(np.arange(n_rows), lengths)[keep]
    m = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols[keep])), shape=(n_rows, n_items))
    m.sum_duplicates()
    return m


class KnownUserRow(sp.csr_matrix):
    """A one-row history that continues a known user's training row: their
    training events followed by newer ones (recorded since training, or sent
    with the request), later values winning; `user` is that user's index.

    A model whose fold-in of a training row is not the user it trained (the
    SGD fits: svd, bayes_mf, bpr) updates the trained factors with what the
    row changes instead of folding the user in from nothing, so that one
    recorded event moves a known user's answer as far as that event says and
    no further (folded in from nothing, half of their top 10 changed). Every
    other model reads it as the plain history row it is. Matrices scipy
    derives from it (copies, products) have `user` -1: plain rows."""

    user: int = -1

    @classmethod
    def of(cls, row: sp.csr_matrix, user: int) -> KnownUserRow:
        """`row` (one row, CSR) as continuing known user `user` (its arrays shared)."""
        if not isinstance(row, sp.csr_matrix) or row.shape[0] != 1:
            raise ValueError(f"row: expected a 1-row CSR matrix, got {type(row).__name__}")
        if user < 0:
            raise ValueError(f"user: expected a known user's index (>= 0), got {user}")
        out = cls.__new__(cls)
        out.__dict__.update(row.__dict__)  # as csr_row: no second validation of the arrays
        out.user = int(user)
        return out


def known_user(history: sp.csr_matrix) -> int:
    """The known user a one-row history continues (a KnownUserRow), else -1."""
    if isinstance(history, KnownUserRow) and history.shape[0] == 1:
        return history.user
    return -1


_ROW_TEMPLATES: dict[int, sp.csr_matrix] = {}


def csr_row(indices: np.ndarray, data: np.ndarray, n_items: int) -> sp.csr_matrix:
    """A 1 x n_items CSR matrix over `indices` (int32, sorted, distinct, in
    range) and `data` (float32), marked canonical. scipy's constructor checks
    and converts its arrays again (about 18 us, a third of a cold request's
    row); these are valid by construction, so the matrix takes the attributes
    of a template the constructor built once, with its own arrays. If this
    scipy's constructor sets attributes the copy would miss, the constructor
    is used instead (tests/test_model_contract.py compares the two)."""
    tpl = _ROW_TEMPLATES.get(n_items)
    if tpl is None:
        tpl = _row_template(n_items)
        if len(_ROW_TEMPLATES) > 64:
            _ROW_TEMPLATES.clear()
        _ROW_TEMPLATES[n_items] = tpl
    indptr = np.array([0, indices.shape[0]], np.int32)
    if tpl is _NO_TEMPLATE:
        m = sp.csr_matrix((data, indices, indptr), shape=(1, n_items))
        m.has_canonical_format = True
        return m
    m = sp.csr_matrix.__new__(sp.csr_matrix)
    m.__dict__.update(tpl.__dict__)
    m.data, m.indices, m.indptr = data, indices, indptr
    return m


_NO_TEMPLATE = sp.csr_matrix((1, 1), dtype=np.float32)


def _row_template(n_items: int) -> sp.csr_matrix:
    """The empty canonical float32 row csr_row copies, or _NO_TEMPLATE when a
    copy would not equal the constructor's matrix on this scipy."""
    empty = (np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(2, np.int32))
    tpl = sp.csr_matrix(empty, shape=(1, n_items))
    tpl.has_canonical_format = True
    probe = sp.csr_matrix(
        (np.ones(1, np.float32), np.zeros(1, np.int32), np.array([0, 1], np.int32)),
        shape=(1, n_items),
    )
    probe.has_canonical_format = True
    arrays = {"data", "indices", "indptr"}
    a, b = probe.__dict__, tpl.__dict__
    # Every attribute besides the arrays must be data-independent (a cached
    # count would differ between the empty template and the probe).
    same = set(a) == set(b) and all(
        type(a[key]) is type(b[key]) and not isinstance(a[key], np.ndarray) and a[key] == b[key]
        for key in set(a) - arrays
    )
    if not same:
        log.warning("csr_row: this scipy's rows carry data-dependent attributes; constructor used")
        return _NO_TEMPLATE
    return tpl
