"""Matrix factorization models. `als`: implicit-feedback ALS (Hu, Koren & Volinsky 2008).

Confidence c = 1 + alpha * value / s for observed pairs, preference 1; every
other pair has confidence 1 and preference 0. s is the training data's mean
|value| (1 with `binary`), kept in the bundle, so alpha means the same on
ratings 1-5, play counts in the thousands or clicks: with the raw value
(Hu et al.'s form) the default alpha had ml-100k's ratings x 100 at
Recall@10 0.08 against 0.36, and now every scale gives 0.41. Heavy-tailed
values (play counts, quantities) weigh on a log scale instead, log1p(value /
median) over its mean (`values`, "auto" by default). Each iteration solves all users
given the items, then all items given the users (kernels.als: a few
warm-started conjugate-gradient steps by default, exact Cholesky with
cg_steps=0). Training ends with one exact user pass against the final items,
and fold-in runs that same exact solve against the stored YtY + reg I: a user
folded in from their history gets their trained vector. (Solving items first
was measured: 0.01 lower Recall@20 on ml-100k at 64-128 factors.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from recserve.data import Dataset
from recserve.kernels import als as alsk
from recserve.kernels import sgd as sgdk
from recserve.kernels import topk
from recserve.models.base import (
    HISTORY_PRIOR,
    MIN_EVENTS,
    MIN_HISTORY,
    USER_PRIOR,
    VALUES,
    Param,
    TrainingError,
    check_k,
    known_user,
    log_median,
    log_scaled,
    without_dislikes,
)
from recserve.models.embedding import INDEX_PARAMS, EmbeddingIndexMixin
from recserve.models.registry import register


def with_one(p: np.ndarray) -> np.ndarray:
    """[p, 1] per row, float32: the query whose inner product with [q, b] is
    p . q + b (BPR's and biased MF's index vectors)."""
    return np.hstack([p, np.ones((p.shape[0], 1), np.float32)]).astype(np.float32, copy=False)


# The spread (standard deviation) of 1-5 star ratings, ml-100k's 1.1257: SGD's
# defaults mean what they were tuned for on ratings of any scale (rating_unit).
STAR_SPREAD = 1.125
UNIT_SAMPLE = 1_000_000  # ratings rating_unit reads at most (evenly spaced)
# ALS's confidence counts a value as at most this many units (value_scale).
MAX_VALUE_UNITS = 1e4


def serial_blas() -> threadpool_limits:
    """BLAS on one thread, for kernels that call it from every OpenMP thread."""
    return threadpool_limits(limits=1, user_api="blas")


@register
class ALS(EmbeddingIndexMixin):
    """Implicit ALS: user and item factors whose dot product ranks items."""

    algorithm = "als"
    budget_param = "iterations"
    params_spec: ClassVar[Mapping[str, Param]] = {
        # Defaults: the study in docs/algorithms.md (was 64 / 0.01 / 1.0 / 15).
        "factors": Param(int, 18, "latent dimensions", min=1, max=1024, search=(8, 256), log=True),
        "regularization": Param(float, 0.65, "L2 penalty", min=0, search=(1e-4, 10.0), log=True),
        "alpha": Param(
            float,
            3.7,
            "confidence = 1 + alpha * value / mean |value| of the training data",
            min=0,
            max=1e6,
            search=(0.1, 100.0),
            log=True,
        ),
        "values": replace(
            VALUES,
            help="how a value weighs: linear (value / mean), log (log1p(value / median), "
            "over its mean), auto: log for heavy-tailed values (counts), else linear",
        ),
        "iterations": Param(int, 22, "alternating sweeps", min=1, max=1000, search=(5, 30)),
        "cg_steps": Param(int, 3, "CG steps per solve; 0 = exact Cholesky", min=0, max=100),
        "weighted_reg": Param(
            bool,
            False,
            "ALS-WR (Zhou et al. 2008), as Spark MLlib's ALS: a user's (item's) L2 penalty "
            "is regularization times their number of positive events (at least 1); "
            "set by `import spark-als`, so a folded-in user is solved as Spark solved its own",
        ),
        "seed": Param(int, 0, "random seed of the initial factors"),
        "binary": Param(bool, False, "treat every interaction as value 1"),
        **INDEX_PARAMS,
        "min_events": MIN_EVENTS,
        "min_history": MIN_HISTORY,
        "history_prior": HISTORY_PRIOR,
        "user_prior": USER_PRIOR,
    }

    def _divergence_hint(self) -> str:
        p = self.params
        return (
            f"lower alpha (now {p['alpha']:g}) or raise regularization "
            f"(now {p['regularization']:g})"
        )

    def _confidence(self, m: sp.csr_matrix) -> sp.csr_matrix:
        m = m.tocsr()
        return sp.csr_matrix((self._confidence_values(m.data), m.indices, m.indptr), shape=m.shape)

    # The unit of the values alpha applies to (the training data's mean |value|,
    # or of log1p(|value| / value_median) on the log scale); 1.0 for bundles
    # written before it was kept and for imported Spark factors, whose confidence
    # is Spark's 1 + alpha * value.
    value_scale = 1.0
    # > 0: values weigh on the log scale, log1p(|value| / value_median); 0: linear
    # (and for bundles written before the log scale existed).
    value_median = 0.0

    def _confidence_values(self, data: np.ndarray) -> np.ndarray:
        """Signed confidences of a CSR's stored values r, float32, the form the
        kernels read: c = 1 + alpha |r| / value_scale (|r| = 1 when binary; on
        the log scale log1p(|r| / value_median) in place of |r|),
        +c for r >= 0 and -c for a negative r, a dislike: preference 0 at
        confidence c (Hu et al.'s objective as implicit and Spark MLlib extend
        it). Training and every fold-in use this one form."""
        r = np.asarray(data, np.float32)
        if self.params["binary"]:
            magnitude = np.ones(r.shape, np.float32)
        elif self.value_median > 0:
            magnitude = np.abs(log_scaled(r, self.value_median)) / np.float32(self.value_scale)
        else:
            magnitude = np.abs(r) / np.float32(self.value_scale)
        # Capped: a value 10^9 times the unit (a corrupt row, a client's
        # 1e30) made a confidence whose float32 solve failed, and the user got
        # zeros: items in index order. 10^4 units is beyond any real value.
        magnitude = np.minimum(magnitude, np.float32(MAX_VALUE_UNITS))
        c = (1.0 + self.params["alpha"] * magnitude).astype(np.float32)
        return np.where(r < 0, -c, c) if (r < 0).any() else c

    def _fit(self, dataset: Dataset) -> None:
        assert self.user_items is not None
        p = self.params
        self.value_median, self.value_scale = value_units(
            self.user_items.data, "linear" if p["binary"] else p["values"]
        )
        cui = self._confidence(self.user_items)
        ciu = cui.T.tocsr()
        rng = np.random.default_rng(p["seed"])
        f = p["factors"]
        self.user_factors = (rng.standard_normal((self.n_users, f)) * 0.01).astype(np.float32)
        self.item_factors = (rng.standard_normal((self.n_items, f)) * 0.01).astype(np.float32)
        bar = tqdm(
            range(p["iterations"]),
            desc="als",
            unit="it",
            file=sys.stderr,
            disable=None,
            leave=False,
        )
        # The row solves call BLAS from every OpenMP thread: a threaded BLAS
        # inside them oversubscribes the cores (measured on 2 cores, 128
        # factors: the exact pass took 21 s with 2 OpenBLAS threads, 3.6 s with 1;
        # bench/bench_als_passes.py).
        with serial_blas():
            self._sweeps(cui, ciu, bar)
        self.build_index()

    def _sweeps(self, cui: sp.csr_matrix, ciu: sp.csr_matrix, bar: Any) -> None:
        p = self.params
        reg, steps, nt = p["regularization"], p["cg_steps"], self.n_threads
        wr = p["weighted_reg"]
        for _ in bar:
            alsk.solve_rows(
                cui.indptr,
                cui.indices,
                cui.data,
                self.item_factors,
                self.user_factors,
                reg,
                steps,
                n_threads=nt,
                weighted=wr,
            )
            alsk.solve_rows(
                ciu.indptr,
                ciu.indices,
                ciu.data,
                self.user_factors,
                self.item_factors,
                reg,
                steps,
                n_threads=nt,
                weighted=wr,
            )
        # Users end fitted to the final items by the exact solve fold-in runs.
        self.gram = alsk.gram(self.item_factors, reg)
        alsk.solve_rows(
            cui.indptr,
            cui.indices,
            cui.data,
            self.item_factors,
            self.user_factors,
            reg,
            0,
            G=self.gram,
            n_threads=nt,
            weighted=wr,
        )

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        """Factors of users given only by history rows: the exact training solve."""
        h = history.tocsr()  # the confidences go to the kernel as arrays: no second CSR
        if h.shape[0] == 1:  # a serving request: the one-row solve, the same arithmetic
            x = np.empty((1, self.item_factors.shape[1]), np.float32)
            alsk.solve_row(
                np.asarray(h.indices, np.int32),
                self._confidence_values(h.data),
                self.item_factors,
                self._gram32(),
                x[0],
                self._weighted_reg(),
            )
            return x
        x = np.zeros((h.shape[0], self.item_factors.shape[1]), np.float32)
        # Many rows run on every OpenMP thread: serial BLAS inside (see _fit).
        # One row (a serving request) runs on one thread and skips the 0.6 ms
        # threadpoolctl costs.
        with serial_blas() if h.shape[0] > 1 else contextlib.nullcontext():
            return alsk.solve_rows(
                h.indptr,
                h.indices,
                self._confidence_values(h.data),
                self.item_factors,
                x,
                self.params["regularization"],
                0,
                G=np.asarray(self.gram),
                n_threads=self.n_threads,
                weighted=self.params["weighted_reg"],
            )

    def _weighted_reg(self) -> float:
        """regularization when the penalty is ALS-WR's (per positive event), else 0."""
        return float(self.params["regularization"]) if self.params["weighted_reg"] else 0.0

    def _gram32(self) -> np.ndarray:
        """YtY + reg I as the solve reads it (float32), converted once per gram."""
        cached = self.__dict__.get("_g32")
        if cached is None or cached[0] is not self.gram:
            cached = self._g32 = (self.gram, np.ascontiguousarray(self.gram, dtype=np.float32))
        return cached[1]

    def _score_users(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(self.user_factors[users] @ self.item_factors.T, np.float32)

    def _score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray(self.fold_in(history) @ self.item_factors.T, np.float32)

    def _item_vectors(self) -> np.ndarray:
        return self.item_factors

    def _user_queries(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(self.user_factors[users], np.float32)

    def _exact_user_matrix(self) -> np.ndarray:
        return self.user_factors

    def _history_queries(self, history: sp.csr_matrix) -> np.ndarray:
        return self.fold_in(history)

    def _similarity_vectors(self) -> np.ndarray:
        return self.item_factors

    def _contributions_many(self, history, items, user):
        # score(u, j) = y_j . A^-1 sum_i p_i c_i y_i: history item i contributes
        # p_i c_i y_j.A^-1 y_i. A depends on the history only: one solve for every j.
        # Only the rows involved are read (in float64), never the whole catalogue.
        # One kernel call: A's Cholesky with every item as a right-hand side.
        h = history.tocsr()
        return h.indices, alsk.contributions(
            np.asarray(h.indices, np.int32),
            self._confidence_values(h.data),
            np.ascontiguousarray(self.item_factors, np.float32),
            np.ascontiguousarray(self.gram, np.float64),
            np.asarray(items, np.int64),
            self._weighted_reg(),
        )

    def _learned_nothing(self, user: int) -> bool:
        # ALS solves a row without likes to exactly zero; a user without them but with
        # non-zero factors has them from elsewhere (Spark factors imported
        # without --data) and is served from them.
        return not np.asarray(self.user_factors[user]).any()

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "user_factors": self.user_factors,
            "item_factors": self.item_factors,
            "gram": self.gram,
            "value_scale": np.array([self.value_scale], np.float64),
            "value_median": np.array([self.value_median], np.float64),
            **self._index_arrays(),
        }

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.user_factors = arrays["user_factors"]
        self.item_factors = arrays["item_factors"]
        self.gram = arrays["gram"]
        if "value_scale" in arrays:  # bundles written before it was kept: 1.0
            self.value_scale = float(np.asarray(arrays["value_scale"])[0])
        if "value_median" in arrays:  # bundles written before the log scale: linear
            self.value_median = float(np.asarray(arrays["value_median"])[0])


def value_units(values: np.ndarray, mode: str) -> tuple[float, float]:
    """(value_median, value_scale) of ALS's confidence for training values and
    the `values` param: median 0 is the linear scale (unit: mean |value|); on the
    log scale (base.log_median) the unit is the mean of log1p(|value| / median).
    ml-100k with values 10^(rating-1): NDCG@20 0.392 linear, 0.409 log; on
    ratings "auto" stays linear."""
    median = log_median(values, mode, "als")
    if median == 0:
        return 0.0, value_unit(values)
    every = np.abs(np.asarray(values, np.float64))
    unit = float(np.log1p(every[np.isfinite(every)] / median).mean())
    return median, unit if np.isfinite(unit) and unit > 0 else 1.0


def rating_unit(ratings: np.ndarray) -> float:
    """The unit SGD fits ratings in: their standard deviation over STAR_SPREAD,
    the values past the 0.1th and 99.9th percentiles counted at them (one
    corrupt 1e30 would set it alone); 1.0 when they do not vary. The defaults
    (Surprise's) were tuned on 1-5 stars, where the unit is about 1; on 0-100
    ratings the default lr ran 20x too large (rmse 1.06 against 0.94 on the same
    ratings in stars) and on 1,000-5,000 it diverged (docs/algorithms.md,
    "Ratings on any scale")."""
    r = np.asarray(ratings)
    if r.size < 2:
        return 1.0
    if r.size > UNIT_SAMPLE:  # every step-th rating: a std to ~0.1% without n-sized copies
        r = r[:: r.size // UNIT_SAMPLE]
    r = r.astype(np.float64)
    lo, hi = np.quantile(r, [0.001, 0.999])
    unit = float(np.clip(r, lo, hi).std()) / STAR_SPREAD
    return unit if np.isfinite(unit) and unit > 0 else 1.0


def value_unit(values: np.ndarray) -> float:
    """The mean |value| of training data, the unit ALS's alpha applies to (1.0
    when there is none, or it is not a positive finite number). Values above
    the 99.9th percentile count at it: one corrupt 1e30 in a file of ratings
    set the unit to 1e26, and every other value weighed nothing."""
    if values.size == 0:
        return 1.0
    mags = np.abs(np.asarray(values, np.float64))
    top = float(np.quantile(mags, 0.999))
    unit = float(np.minimum(mags, top).mean())
    return unit if np.isfinite(unit) and unit > 0 else 1.0


@register
class BiasedMF(EmbeddingIndexMixin):
    """Explicit biased MF (Surprise's SVD): rating = mu + b_u + b_i + p_u . q_i.

    Trained by SGD (kernels.sgd), ratings grouped by user with the users in a
    seeded random order each epoch; one thread is deterministic, `hogwild=true`
    uses every thread. score() gives
    predicted ratings clipped to the training data's rating scale; ranking
    uses the unclipped predictions. A new user is folded in by the exact ridge
    solution of the same objective for (b_u, p_u) given the item parameters.
    A user's ranking is by b_i + p_u . q_i = [p_u, 1] . [q_i, b_i] (mu + b_u is
    the same for every item), an inner product: large catalogues rank through
    the item index as ALS's do (`index`), the constant added back to the scores.
    """

    batches_well = True

    rates_negatives = True  # values are ratings, on whatever scale
    algorithm = "svd"
    composed_items = True
    budget_param = "epochs"
    predicts_ratings = True
    params_spec: ClassVar[Mapping[str, Param]] = {
        "factors": Param(int, 100, "latent dimensions", min=1, max=1024, search=(5, 200), log=True),
        "epochs": Param(int, 20, "passes over the ratings", min=1, max=10_000, search=(5, 100)),
        "lr": Param(float, 0.005, "SGD learning rate", min=1e-9, search=(1e-3, 0.05), log=True),
        "reg": Param(float, 0.02, "L2 penalty per rating", min=0, search=(1e-3, 0.3), log=True),
        "init_std": Param(float, 0.1, "std of the initial factors", min=0),
        "seed": Param(int, 0, "random seed (initial factors, rating order)"),
        "hogwild": Param(bool, False, "parallel lock-free SGD (nondeterministic)"),
        **INDEX_PARAMS,
        "min_events": MIN_EVENTS,
        "min_history": MIN_HISTORY,
        "history_prior": HISTORY_PRIOR,
        "user_prior": USER_PRIOR,
    }

    def _fit(self, dataset: Dataset) -> None:
        self._sgd()
        self.build_index()

    def _sgd(self) -> None:
        """The SGD fit of mu, biases and factors on `user_items`."""
        assert self.user_items is not None
        p = self.params
        m = self.user_items.tocoo()
        users, items = m.row.astype(np.int32), m.col.astype(np.int32)
        ratings = m.data.astype(np.float32)
        rng = np.random.default_rng(p["seed"])
        f = p["factors"]
        self.scale = (float(ratings.min()), float(ratings.max()))
        # SGD runs on the ratings in units of their spread, so lr, reg and
        # init_std (Surprise's defaults, for 1-5 stars) mean the same on any
        # scale; the user's side takes the unit back afterwards (_in_units).
        unit = rating_unit(ratings)
        ratings = ratings / np.float32(unit)
        self.mu = float(ratings.mean())
        self.P = (rng.standard_normal((self.n_users, f)) * p["init_std"]).astype(np.float32)
        self.Q = (rng.standard_normal((self.n_items, f)) * p["init_std"]).astype(np.float32)
        self.bu = np.zeros(self.n_users, np.float32)
        self.bi = np.zeros(self.n_items, np.float32)
        threads = self.n_threads if p["hogwild"] else 1
        bar = tqdm(
            range(p["epochs"]), desc="svd", unit="epoch", file=sys.stderr, disable=None, leave=False
        )
        # Ratings are grouped by user (the user's row stays in cache, as in
        # Surprise); the order of the users is reshuffled every epoch.
        starts = self.user_items.indptr[:-1].astype(np.int64)
        lengths = np.diff(self.user_items.indptr).astype(np.int64)
        for epoch in bar:
            perm = rng.permutation(self.n_users)
            lens = lengths[perm]
            offsets = np.cumsum(lens) - lens
            order = np.repeat(starts[perm] - offsets, lens) + np.arange(ratings.size)
            sse = sgdk.svd_epoch(
                users,
                items,
                ratings,
                order,
                self.mu,
                self.bu,
                self.bi,
                self.P,
                self.Q,
                p["lr"],
                p["reg"],
                threads,
            )
            if not np.isfinite(sse):
                # SGD's steps grow with the ratings' spread: on ratings in the
                # hundreds the default lr overshoots. Refuse to publish NaNs.
                raise TrainingError(
                    f"{self.algorithm}: training diverged in epoch {epoch + 1} (ratings "
                    f"{self.scale[0]:g} to {self.scale[1]:g}, fitted in units of {unit:.3g}); "
                    f"lower lr (now {p['lr']:g})"
                )
            bar.set_postfix(rmse=f"{unit * np.sqrt(sse / max(ratings.size, 1)):.4g}")
        self._in_units(unit)

    def _in_units(self, unit: float) -> None:
        """Put the parameters fitted on ratings / unit back on the ratings' scale:
        mu, the biases and the user factors times the unit, the item factors as
        they are. Every prediction is then the unit times the fitted one, and a
        user's ridge problem (fold-in, newer events, the posterior; its design
        rows [1, q_i] unchanged) is the fitted one times the unit squared: the
        same solution times the unit, under the same reg."""
        if unit == 1.0:
            return
        u = np.float32(unit)
        self.mu = float(self.mu * unit)
        self.bu, self.bi, self.P = self.bu * u, self.bi * u, self.P * u

    def unrated(self, items: np.ndarray, values: np.ndarray) -> np.ndarray:
        """An item sent without a rating counts as rated what the model expects of
        it for a user it knows nothing of, mu + b_i (within the scale): seen, and
        no evidence either way. Taken as a 1 (the contract's default, a low
        rating on stars) it pushed the fold-in away from the items: ml-100k,
        150 held-out users folded in from 80% of their items, recall@10 of the
        rest rated >= 4 was 0.027 (svd) and 0.045 (bayes_mf), 0.080 and 0.092
        this way, against 0.098 and 0.109 with their real ratings."""
        miss = np.isnan(values)
        if miss.any():
            expected = self.mu + np.asarray(self.bi[items[miss]], np.float64)
            values[miss] = np.clip(expected, *self.scale)
        return values

    def _predict(self, p: np.ndarray, bu: np.ndarray) -> np.ndarray:
        # (mu + bu + bi) + p.Q, each sum in the inputs' own precision as before
        # (a fold-in's float64 rounds once, at the end), but the product is
        # added in place: two users x items temporaries instead of three.
        out = self.mu + bu[:, None] + self.bi[None, :]
        out += p @ self.Q.T
        return np.asarray(out, np.float32)

    def _score_users(self, users: np.ndarray) -> np.ndarray:
        return self._predict(self.P[users], self.bu[users])

    def recommend_user(
        self, user: int, k: int = 10, filter_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """One known user in one kernel call (topk_user with the per-item constant
        part as its bias, as ALS's call): dense_user's row, selected, without
        writing the row out and selecting it in a second call (31 -> 29 us for
        svd's 100 factors, 18 -> 15 us for bayes_mf's 20, over 2,500 items).
        Same answer as recommend([user], k) up to float rounding. With an item
        index, the index's search (the general path)."""
        if self.item_index is not None:
            return super().recommend_user(user, k, filter_seen)
        check_k(k)
        bias = self._user_bias(user)
        indptr, indices = self._csr_views()
        return topk.topk_user(
            self._vectors("P"), user, self._vectors("Q"), k, indptr, indices, filter_seen, bias
        )

    def dense_user(self, user: int, out: np.ndarray, filter_seen: bool = True) -> bool:
        """A known user's unclipped predictions mu + b_u + b_i + p_u . q_i into
        `out` (the per-item constant part added as the kernel's bias)."""
        return self._vector_row(user, out, filter_seen)

    def _user_vectors(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """P and Q, the per-item constant part as the bias (as dense_user); None
        with an item index (its ranking is not a dense row's top-k)."""
        if self.item_index is not None:
            return None
        return self._vectors("P"), self._vectors("Q"), self._user_bias(user)

    def _user_bias(self, user: int) -> np.ndarray:
        """mu + b_u + b_i for every item i (float32), a known user's constant part."""
        self._require_fitted()
        if not 0 <= user < self.n_users:
            raise IndexError(f"users: indices must be in [0, {self.n_users})")
        return (np.float32(self.mu) + self.bu[user]) + np.asarray(self.bi)

    def _vectors(self, name: str) -> np.ndarray:
        """P or Q as a C-contiguous float32 array (what the kernels read)."""
        v = getattr(self, name)
        if not (v.dtype == np.float32 and v.flags.c_contiguous):
            v = np.ascontiguousarray(v, np.float32)
            setattr(self, name, v)
        return v

    def _design(self, items: np.ndarray) -> np.ndarray:
        """Rows z_i = [1, q_i]: the features of a user's (b_u, p_u) regression."""
        return np.hstack([np.ones((items.size, 1)), np.asarray(self.Q[items], np.float64)])

    def _precision(self, z: np.ndarray) -> np.ndarray:
        """A = Z^T Z + reg * n I: the precision of (b_u, p_u) given n rated items."""
        return z.T @ z + self.params["reg"] * max(z.shape[0], 1) * np.eye(z.shape[1])

    def _posterior(self, row: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """(w, A) for one history row: w = [b_u, p_u] = A^-1 Z^T (r - mu - b_i), the
        minimiser of sum (r - mu - b_i - b_u - q_i.p)^2 + reg n (b_u^2 + |p|^2);
        for a known user's row (KnownUserRow), their trained w updated (_updated)."""
        z = self._design(row.indices)
        a = self._precision(z)
        known = known_user(row)
        if known >= 0:
            return self._updated(known, row.indices, row.data), a
        r = self._on_scale(row.data)
        w = np.linalg.solve(a, z.T @ (r - self.mu - np.asarray(self.bi[row.indices])))
        return w, a

    def _updated(self, user: int, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        """w = [b_u, p_u] of known `user` given the history row (items, ratings)
        that continues their training row: the trained w_u as the prior mean,
        with the training row's precision A_t, updated by what the row changes.
        It minimises (w - w_u)^T A_t (w - w_u) + J(w) - J_t(w), J and J_t the
        ridge objective (_posterior's) over the row and over the training row:
        w = A^-1 (Z^T t + A_t w_u - Z_t^T t_t). The training row alone gives
        w_u back; where w_u is J_t's minimiser, this is J's (the plain
        fold-in); SGD leaves w_u elsewhere, and folded in from nothing the
        user's top 10 changed by half on one event (docs/algorithms.md)."""
        own, own_r = self.training_row(user)
        q = self._vectors("Q")
        bi = self._bias32()
        reg = self.params["reg"]
        wu = np.empty(q.shape[1] + 1)
        wu[0], wu[1:] = self.bu[user], self.P[user]
        # A_t w_u - Z_t^T t_t, the training row's pull toward w_u
        pull = sgdk.ridge_pull(q, bi, self.mu, own, self._on_scale(own_r), wu, reg)
        ratings = self._on_scale(ratings)
        try:  # the fold-in's kernel with `pull` on its right-hand side
            return sgdk.ridge_user(q, bi, self.mu, np.asarray(items, np.int32), ratings, reg, pull)
        except ValueError:  # not positive definite (reg 0): least squares
            z = self._design(items)
            a = self._precision(z)
            t = ratings - self.mu - np.asarray(bi[items], np.float64)
            return np.linalg.lstsq(a, z.T @ t + pull, rcond=None)[0]

    def _contributions_many(self, history, items, user):
        # A user folded in from a history is w = A^-1 Z^T t (_posterior): item
        # j's score is mu + b_j + z_j . w, and history item i gives it
        # (z_j^T A^-1 z_i) t_i, t_i = r_i - mu - b_i: a rating above what the
        # item usually gets lifts the items the model puts near it, one below
        # lowers them. Exact for a history folded in; a known user's trained w
        # (or its update with recorded events) adds A^-1 times the training
        # row's pull, which no one history item gives and is left out.
        # Through the n x n dual system below f + 1 ratings (push-through:
        # Z A^-1 = (Z Z^T + s I)^-1 Z), as the fold-in solves it.
        h = history.tocsr()
        hist = np.asarray(h.indices, np.int32)
        if hist.size == 0 or items.size == 0:
            return hist, np.zeros((hist.size, items.size))
        z = self._design(hist)
        r = self._on_scale(h.data)
        t = r - self.mu - np.asarray(self.bi[hist], np.float64)
        # A rating within float32 rounding of mu + b_i (an item sent without one:
        # `unrated`) is no evidence, and explains nothing.
        t[np.abs(t) <= 4 * np.finfo(np.float32).eps * np.abs(r)] = 0.0
        zj = self._design(np.asarray(items, np.int64))
        n, f1 = z.shape
        shift = self.params["reg"] * n
        if shift > 0 and n < f1:
            k = z @ z.T
            k[np.diag_indices(n)] += shift
            c = np.linalg.solve(k, z @ zj.T)
        elif shift > 0:
            c = z @ np.linalg.solve(self._precision(z), zj.T)
        else:  # reg 0 (A may be singular): the least-squares solution's split
            c = z @ np.linalg.lstsq(self._precision(z), zj.T, rcond=None)[0]
        return hist, c * t[:, None]

    def _on_scale(self, ratings: np.ndarray) -> np.ndarray:
        """A history's ratings clipped to the training rating scale: a 50 (or
        1e30) sent on a 1-5 scale means the top of it, not a user vector 1e30
        long (whose predictions overflowed to inf)."""
        return np.clip(np.asarray(ratings, np.float64), *self.scale)

    def _posterior_mean(self, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        """w of _posterior without A. With fewer ratings n than parameters f + 1
        (a cold request's history) and reg > 0, through the n x n dual system
        w = Z^T (Z Z^T + reg n I)^-1 t, the same minimiser (push-through
        identity): a ten-item history with 100 factors solves a 10 x 10 system
        instead of a 101 x 101 one."""
        ratings = self._on_scale(ratings)
        try:  # the same two systems by Cholesky in one kernel call
            return sgdk.ridge_user(
                self._vectors("Q"),
                self._bias32(),
                self.mu,
                np.asarray(items, np.int32),
                ratings,
                self.params["reg"],
            )
        except ValueError:  # not positive definite (reg 0): numpy's solve says how
            pass
        z = self._design(items)
        t = ratings - self.mu - np.asarray(self.bi[items])
        n, f1 = z.shape
        shift = self.params["reg"] * max(n, 1)
        if shift > 0 and n < f1:
            k = z @ z.T
            k[np.diag_indices(n)] += shift
            return z.T @ np.linalg.solve(k, t)
        return np.linalg.solve(self._precision(z), z.T @ t)

    def _bias32(self) -> np.ndarray:
        """bi as a C-contiguous float32 array (what the fold-in kernel reads)."""
        b = self.bi
        if not (isinstance(b, np.ndarray) and b.dtype == np.float32 and b.flags.c_contiguous):
            b = self.bi = np.ascontiguousarray(b, np.float32)
        return b

    def fold_in(self, history: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """(p, b_u) per history row: the objective SGD optimises, solved exactly for
        the user given the items (empty rows get zeros); a known user's row
        (KnownUserRow) updates their trained parameters instead (_updated)."""
        h = history.tocsr()
        known = known_user(history)
        ps = np.zeros((h.shape[0], self.Q.shape[1]), np.float32)
        bs = np.zeros(h.shape[0], np.float32)
        for r in range(h.shape[0]):
            lo, hi = h.indptr[r], h.indptr[r + 1]
            if hi > lo:  # the row's arrays, not h[r]: scipy's row slice costs ~20 us
                items, ratings = h.indices[lo:hi], h.data[lo:hi]
                if known >= 0:  # a known user with newer events: their w updated
                    w = self._updated(known, items, ratings)
                else:
                    w = self._posterior_mean(items, ratings)
                bs[r], ps[r] = w[0], w[1:]
        return ps, bs

    def _score_history(self, history: sp.csr_matrix) -> np.ndarray:
        p, b = self.fold_in(history)
        return self._predict(p, b)

    def score(self, user: int, items) -> tuple[np.ndarray, np.ndarray | None]:
        """Predicted ratings clipped to the training rating scale; no std.
        Only the asked items are computed (the serving path asks for k)."""
        items = self._checked_items(items)
        if not 0 <= int(user) < self.n_users:
            raise IndexError(f"users: indices must be in [0, {self.n_users})")
        u = int(user)
        raw = (np.float32(self.mu) + self.bu[u]) + self.bi[items] + self.Q[items] @ self.P[u]
        return np.clip(np.asarray(raw, np.float32), *self.scale), None

    def score_history(self, history: sp.csr_matrix, items) -> tuple[np.ndarray, np.ndarray | None]:
        """score() for a user given only by a history row: clipped, no std."""
        raw, _ = super().score_history(history, items)
        return np.clip(raw, *self.scale), None

    # -- the item index: [p, 1] . [q, b_i], plus mu + b_u ---------------------------

    def _item_vectors(self) -> np.ndarray:
        return np.hstack([self.Q, np.asarray(self.bi)[:, None]]).astype(np.float32)

    def _user_queries(self, users: np.ndarray) -> np.ndarray:
        p = np.asarray(self._vectors("P")[users], np.float32)
        return with_one(p)

    def _similarity_vectors(self) -> np.ndarray:
        return self.Q

    def _rank(self, users, history, k, excl, cand):
        if self.item_index is None:
            return super()._rank(users, history, k, excl, cand)
        if users is not None:
            q, b = self._user_queries(users), np.asarray(self.bu)[users]
        else:
            p, b = self.fold_in(history)
            q = with_one(p)
        items, scores = self.item_index.search(q, k, excl, cand, self._search_config())
        # The user's constant part, as the dense path adds it (-inf padding stays).
        scores += (np.float32(self.mu) + np.asarray(b, np.float32))[:, None]
        return items, scores

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "P": self.P,
            "Q": self.Q,
            "bu": self.bu,
            "bi": self.bi,
            "stats": np.array([self.mu, *self.scale], np.float64),
            **self._index_arrays(),
        }

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.P, self.Q, self.bu, self.bi = (arrays[k] for k in ("P", "Q", "bu", "bi"))
        stats = np.asarray(arrays["stats"])
        self.mu, self.scale = float(stats[0]), (float(stats[1]), float(stats[2]))


@register
class BPR(EmbeddingIndexMixin):
    """Bayesian Personalized Ranking (Rendle et al. 2009) by SGD on sampled triples.

    Score p_u . q_i + b_i. Each epoch draws nnz (user, positive, negative)
    triples; the negative is never one of the user's positives. One thread is
    deterministic for a seed; more threads run Hogwild. A new user is folded in
    by the same SGD with the items frozen, from a seed derived from the history.
    """

    algorithm = "bpr"
    budget_param = "epochs"
    composed_items = True
    params_spec: ClassVar[Mapping[str, Param]] = {
        # Defaults: the study in docs/algorithms.md (first 64 / 0.01 / 0.01 / 100,
        # then 64 / 0.016 / 0.002 / 230).
        "factors": Param(int, 64, "latent dimensions", min=1, max=1024, search=(8, 256), log=True),
        "lr": Param(float, 0.025, "SGD learning rate", min=1e-9, search=(1e-3, 0.2), log=True),
        "reg": Param(float, 0.015, "L2 penalty", min=0, search=(1e-5, 0.1), log=True),
        "epochs": Param(
            int,
            300,
            "passes (nnz sampled triples each)",
            min=1,
            max=100_000,
            search=(20, 400),
            log=True,
        ),
        "fold_in_epochs": Param(int, 50, "SGD passes when folding in a new user", min=1),
        "fold_in_max_steps": Param(
            int,
            20_000,
            "most SGD steps of one fold-in (0: no limit): a history longer than "
            "max_steps / fold_in_epochs runs fewer passes, at least 3",
            min=0,
        ),
        "negatives": Param(
            str,
            "uniform",
            "negative sampling: uniform over items (redrawn while a positive), or "
            "popular (proportional to popularity, the step skipped when the draw "
            "is a positive: implicit's sampler)",
            choices=("uniform", "popular"),
            search_choices=("uniform", "popular"),
        ),
        "seed": Param(int, 0, "random seed (initial factors, sampling)"),
        **INDEX_PARAMS,
        "min_events": MIN_EVENTS,
        "min_history": MIN_HISTORY,
        "history_prior": HISTORY_PRIOR,
        "user_prior": USER_PRIOR,
    }

    def _fit(self, dataset: Dataset) -> None:
        assert self.user_items is not None
        p = self.params
        x = without_dislikes(self.user_items)  # a dislike is never a positive
        x.sort_indices()
        rng = np.random.default_rng(p["seed"])
        f = p["factors"]
        self.P = ((rng.random((self.n_users, f)) - 0.5) / f).astype(np.float32)
        self.Q = ((rng.random((self.n_items, f)) - 0.5) / f).astype(np.float32)
        self.bias = np.zeros(self.n_items, np.float32)
        bar = tqdm(
            total=p["epochs"], desc="bpr", unit="epoch", file=sys.stderr, disable=None, leave=False
        )

        def progress(epoch: int, correct: float) -> None:
            bar.update(1)
            bar.set_postfix(correct=f"{correct:.3f}")
            # Divergence reaches the biases within an epoch (every step reads
            # them): stop there, not after every remaining epoch; fit() checks
            # the factors too.
            self._require_finite({f"bias (epoch {epoch + 1})": self.bias})

        with bar:
            sgdk.bpr_epochs(
                x.indptr,
                x.indices,
                self.P,
                self.Q,
                self.bias,
                p["lr"],
                p["reg"],
                p["seed"],
                epochs=p["epochs"],
                n_threads=self.n_threads,
                popular_negatives=p["negatives"] == "popular",
                on_epoch=progress,
            )
        self.build_index()

    def _divergence_hint(self) -> str:
        return f"lower lr (now {self.params['lr']:g})"

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        """User factors for history rows: BPR SGD on the user's own triples, items
        frozen, negatives uniform (the row alone carries no item popularity);
        disliked items are not positives. A known user's row (KnownUserRow)
        continues from their trained factors (_continued)."""
        known = known_user(history)
        h = without_dislikes(history.tocsr())
        h.sort_indices()
        f = self.Q.shape[1]
        out = np.zeros((h.shape[0], f), np.float32)
        q = np.ascontiguousarray(self.Q, np.float32)
        b = np.ascontiguousarray(self.bias, np.float32)
        p = self.params
        for r in range(h.shape[0]):
            # The row's arrays, not h[r] (scipy's row slice costs ~20 us).
            items = np.asarray(h.indices[h.indptr[r] : h.indptr[r + 1]], np.int32)
            if items.size == 0:
                continue
            seed = int(np.uint64(int(items.sum(dtype=np.int64)) + 7919 * items.size))
            if known >= 0:
                out[r] = self._continued(known, items, q, b, seed)
            else:
                passes = self._fold_in_passes(items.size)
                out[r] = sgdk.bpr_fold_in(items, q, b, p["lr"], p["reg"], seed, passes)
        return out

    def _fold_in_passes(self, n: int) -> int:
        """Passes of a fold-in over n positives: fold_in_epochs, fewer where that
        exceeds fold_in_max_steps, at least 3. A step costs the same whatever
        the history, so 50 passes made a 1,000-item history cost 12 ms against
        als's 2; and a long history needs fewer passes: on ml-100k (random
        80/20, users with >= 150 training items, 227 on average) recall@10 of
        the folded-in users was 0.675 at 50 passes, 0.673 capped at 20,000
        steps, 0.665 at 3 passes (docs/algorithms.md)."""
        p = self.params
        cap = p["fold_in_max_steps"]
        if cap <= 0 or n <= 0:
            return p["fold_in_epochs"]
        return min(p["fold_in_epochs"], max(3, -(-cap // n)))

    def _continued(
        self, user: int, items: np.ndarray, q: np.ndarray, b: np.ndarray, seed: int
    ) -> np.ndarray:
        """Known `user`'s factors given their positives `items` (sorted int32: the
        training row with newer events): the fold-in's SGD started from the
        trained factors, for the fold-in's passes times the share of the row that
        changed (positives added or removed), at least 3 (a pass draws each
        positive once on average: a new one is then drawn with probability
        1 - e^-3, 95%); the trained factors themselves when nothing changed.
        Folded in from nothing instead, one recorded event replaced half of a
        quickstart user's top 10 (docs/algorithms.md); a row that is mostly
        new gets nearly the whole fold-in."""
        own_items, own_values = self.training_row(user)
        own = np.unique(own_items[own_values >= 0])
        changed = np.setxor1d(own, items).size
        start = np.array(self.P[user], np.float32)
        if changed == 0:
            return start
        p = self.params
        passes = min(
            self._fold_in_passes(items.size),
            max(3, -(-p["fold_in_epochs"] * changed // items.size)),
        )
        return sgdk.bpr_fold_in(items, q, b, p["lr"], p["reg"], seed, passes, start=start)

    def _score_users(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(self.P[users] @ self.Q.T + self.bias[None, :], np.float32)

    def _score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray(self.fold_in(history) @ self.Q.T + self.bias[None, :], np.float32)

    # score = [p, 1] . [q, b]: an inner product, so the item index serves BPR too.
    def _item_vectors(self) -> np.ndarray:
        return np.hstack([self.Q, np.asarray(self.bias)[:, None]]).astype(np.float32)

    def _user_queries(self, users: np.ndarray) -> np.ndarray:
        p = np.asarray(self.P[users], np.float32)
        return with_one(p)

    # Exact scoring needs no [p, 1] . [q, b] trick: q . p + b directly.
    def _exact_items(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.Q, self.bias

    def _exact_user_matrix(self) -> np.ndarray:
        return self.P

    def _history_queries(self, history: sp.csr_matrix) -> np.ndarray:
        p = self.fold_in(history)
        return with_one(p)

    def _similarity_vectors(self) -> np.ndarray:
        return self.Q

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"P": self.P, "Q": self.Q, "bias": self.bias, **self._index_arrays()}

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.P, self.Q, self.bias = arrays["P"], arrays["Q"], arrays["bias"]


@register
class BayesianMF(BiasedMF):
    """Biased MF with a Gaussian posterior per user: ratings with uncertainty.

    Item parameters (q_i, b_i) and the users' point estimates come from the
    biased MF fit (SGD approximates the MAP of the joint objective). Given the
    items, a user's (b_u, p_u) is a Bayesian linear regression of
    r - mu - b_i on z_i = [1, q_i] with prior precision reg * n_u; its
    covariance sigma^2 A^-1, A = Z^T Z + reg n_u I, gives the predictive
    standard deviation sigma * sqrt(1 + z^T A^-1 z) of a rating. sigma^2 is
    the error variance measured on a held-out `validation` fraction of the
    training ratings (training residuals would understate it and make the
    intervals overconfident). A folded-in user gets the conditional posterior
    mean (the ridge solution) and the same covariance from their history.
    Uncertainty in the item parameters is not modelled. On ml-100k (random
    80/20) 90.6% of held-out ratings fall in the central 90% interval, and
    89-91% on synthetic sets (tests/test_bayes_mf.py).
    """

    algorithm = "bayes_mf"
    uncertainty = True
    params_spec: ClassVar[Mapping[str, Param]] = {
        **BiasedMF.params_spec,
        "factors": Param(int, 20, "latent dimensions", min=1, max=256, search=(2, 100), log=True),
        "validation": Param(
            float, 0.1, "fraction of ratings that measures the noise", min=0.01, max=0.5
        ),
        "min_events": MIN_EVENTS,
        "min_history": MIN_HISTORY,
        "history_prior": HISTORY_PRIOR,
        "user_prior": USER_PRIOR,
    }

    def _fit(self, dataset: Dataset) -> None:
        assert self.user_items is not None
        full = self.user_items
        rng = np.random.default_rng(self.params["seed"] + 1)
        held = rng.random(full.nnz) < self.params["validation"]
        if held.sum() == 0 or held.all():
            raise ValueError(f"{dataset.name}: too few ratings to measure the noise variance")
        rows = np.repeat(np.arange(full.shape[0]), np.diff(full.indptr))
        keep = ~held
        part = sp.csr_matrix((full.data[keep], (rows[keep], full.indices[keep])), shape=full.shape)
        part.sort_indices()
        # 1. Noise variance: fit without the held-out ratings, then predict them.
        self.user_items = part
        self._sgd()  # no index: these factors only measure the noise
        u, i = rows[held], full.indices[held]
        pred = self.mu + self.bu[u] + self.bi[i] + np.einsum("ij,ij->i", self.P[u], self.Q[i])
        self.sigma = self._noise_std(part, u, i, full.data[held] - pred)
        # 2. The model itself, on every rating.
        self.user_items = full
        super()._fit(dataset)

    def _noise_std(
        self, part: sp.csr_matrix, users: np.ndarray, items: np.ndarray, resid: np.ndarray
    ) -> float:
        """sigma from held-out residuals. A held-out rating's predictive variance is
        sigma^2 (1 + z^T A^-1 z), the second term being the user posterior's own
        spread, so sigma^2 = mean(resid^2 / (1 + z^T A^-1 z)); the raw mean square
        would count that spread twice and widen every interval."""
        scaled = np.empty(resid.size)
        order = np.argsort(users, kind="stable")
        bounds = np.flatnonzero(np.diff(users[order])) + 1
        for group in np.split(order, bounds):
            u = int(users[group[0]])
            a = self._precision(self._design(part.indices[part.indptr[u] : part.indptr[u + 1]]))
            z = self._design(items[group])
            quad = np.einsum("ij,ji->i", z, np.linalg.solve(a, z.T))
            scaled[group] = resid[group] ** 2 / (1.0 + quad)
        return float(np.sqrt(scaled.mean()))

    def _predictive_std(self, a: np.ndarray, items: np.ndarray) -> np.ndarray:
        """sigma * sqrt(1 + z^T A^-1 z) for each item, given a user's precision A."""
        z = self._design(items)
        quad = np.einsum("ij,ji->i", z, np.linalg.solve(a, z.T))
        return (self.sigma * np.sqrt(1.0 + quad)).astype(np.float32)

    def posterior_std(self, history: sp.csr_matrix, items: np.ndarray) -> np.ndarray:
        """Predictive std of the ratings of `items` for the user of a history row."""
        return self._predictive_std(self._precision(self._design(history.indices)), items)

    def score(self, user: int, items) -> tuple[np.ndarray, np.ndarray | None]:
        """Predicted ratings (clipped to the scale) and their predictive std."""
        mean, _ = super().score(user, items)
        return mean, self.std_user(user, np.asarray(items, np.int64))

    def std_user(self, user: int, items: np.ndarray) -> np.ndarray:
        """A known user's predictive std of `items` (int64, in the catalogue):
        one kernel call, for every answer the serving path returns."""
        self._require_fitted()
        if not 0 <= int(user) < self.n_users:
            raise IndexError(f"users: indices must be in [0, {self.n_users})")
        indptr, indices = self._csr_views()
        return self._std_given(indices[indptr[int(user)] : indptr[int(user) + 1]], items)

    def std_history(self, history: sp.csr_matrix, items: np.ndarray) -> np.ndarray:
        """std_user for a user given by one history row (fold-in): the same
        posterior precision, from the row's items."""
        self._require_fitted()
        return self._std_given(np.asarray(history.tocsr().indices, np.int32), items)

    def _std_given(self, seen: np.ndarray, items: np.ndarray) -> np.ndarray:
        """sigma * sqrt(1 + z^T A^-1 z) for items given the rated items `seen`."""
        items = np.asarray(items, np.int64)
        try:
            quad = sgdk.predictive_quad(self._vectors("Q"), seen, items, self.params["reg"])
        except ValueError:  # A singular (reg 0): numpy's solve says how
            return self._predictive_std(self._precision(self._design(seen)), items)
        return (self.sigma * np.sqrt(1.0 + quad)).astype(np.float32)

    def score_history(self, history: sp.csr_matrix, items) -> tuple[np.ndarray, np.ndarray]:
        """score() for a user given only by a history row (fold-in), with std."""
        items = self._checked_items(items)
        w, a = self._posterior(history.tocsr())
        mean = self.mu + w[0] + self.bi[items] + self.Q[items] @ w[1:]
        return np.clip(mean, *self.scale).astype(np.float32), self._predictive_std(a, items)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {**super()._arrays(), "sigma": np.array([self.sigma], np.float64)}

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        super()._restore(arrays)
        self.sigma = float(np.asarray(arrays["sigma"])[0])
