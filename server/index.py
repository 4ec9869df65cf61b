"""FAISS retrieval over item vectors: maximum inner product search with exclusions.

Kinds (the `index` model parameter):

- `flat`: exact inner product (IndexFlatIP).
- `hnsw`: HNSW graph searched with the inner-product metric directly.
- `ivf`, `ivfpq`: inverted lists on the standard reduction of MIPS to
  nearest-neighbour search (Bachrach et al. 2014): items become
  [y, sqrt(M^2 - |y|^2)] and queries [q, 0], so the L2 order is the inner
  product order and k-means clusters are meaningful.

Which metric for which structure was measured, on ALS factors of the
synthetic set (3,000 items, 32 factors, recall@10 against exact with seen
items excluded): HNSW efSearch=128 reaches 0.9998 with the inner product and
0.917 on the L2 reduction (all augmented points sit on one sphere, where the
extra coordinate dominates and the graph navigates badly); IVF nprobe=32
reaches 0.9998 on the L2 reduction and 0.955 with the inner product (IP
k-means centroids favour large norms). Zero and near-zero item vectors are
never normalised (no NaN): with 20% zero vectors HNSW still reaches 0.9997.
Scores returned are always the exact inner products of the returned items,
recomputed from the item vectors. `ivfpq`'s codes are coarse, so it is asked
for PQ_REFINE times k and the exact scores choose the k (see PQ_REFINE).

Norm-ranging: for the reduced kinds the items of largest norm (HEAD_SHARE)
stay out of the FAISS index and are scored exactly with every search (see
HEAD_SHARE); the index holds the rest under their item ids.

Exclusions: one batched search over-fetches k + (most excluded in any row)
and drops excluded items; a row still short of min(k, eligible) is searched
again alone with an IDSelector excluding its items and a wider search, and if
that is short too, scored exactly. An allow-list (candidates) is scored
exactly: it is given explicitly and is small next to the catalogue. So
exactly min(k, eligible) items come back, always.

Search parameters (efSearch, nprobe) are passed per call as
SearchParameters objects, never set on the shared index, so concurrent
requests are safe. OpenMP threads are set per calling thread (an OpenMP ICV is
per thread): one thread for a single query (no team start-up), `n_threads`
for batches.

`similar` is a second index over the unit-normalised vectors (inner product =
cosine) for item-to-item similarity; zero vectors are left out of it (they have
no direction) and never returned.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.kernels import topk
from recserve.lazy import lazy_module

faiss = lazy_module("faiss")  # ~70 ms to import: only when an index is built or read

KINDS = ("flat", "hnsw", "ivf", "ivfpq")
REDUCED = ("ivf", "ivfpq")  # kinds searched on the MIPS -> L2 reduction
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 128
DEFAULT_NPROBE = 32


# IO_FLAG_MMAP_IFC maps the stored vectors / codes of flat, HNSW and IVF indexes
# (measured: loading a 200k x 64 index grows RSS by 0.7 MB for flat and 1.5 MB
# for IVF instead of ~52 MB, and by the 19.5 MB graph instead of 68 MB for HNSW).
def _mmap_flags() -> int:
    return faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


_NO_IDS = np.zeros(0, np.int64)
RETRY_WIDEN = 4  # second pass: efSearch / nprobe times this
# Product quantization keeps a few bits per vector (18 for ALS's default 18
# factors), so its order is coarse: an ivfpq search asks for this many times k,
# and the exact re-ranking every kind gets picks the k. ALS on the synthetic set
# (3,000 items), recall@10 asking for k / 8k / 16k: Recommend 0.72-0.97 /
# 0.996-0.999 / 0.998-1.0, SimilarItems 0.26-0.61 / 0.89-1.0 / 0.996-1.0 (18 and
# 32 factors); 0.02-0.03 ms more per query.
PQ_REFINE = 16
# Norm-ranging for the reduced kinds: the items of largest norm (HEAD_SHARE of
# the catalogue, at most HEAD_MAX) are kept out of the inverted lists; every
# search scores them in one product over their own block and re-ranks its
# best with FAISS's. Recommender factors' norms follow popularity: over a
# generated 1M-item log ALS's largest norm was 90, its median 0.05, and every
# user's exact top 10 lay among the 1,000 largest. The reduction's extra
# coordinate sqrt(M^2 - |y|^2) is then ~M for nearly every item, k-means
# spends its lists on the tail, and recall@10 was 0.37 at nprobe 32 and 0.83
# at 1,024. With the head out (the tail's own largest norm sets M), 1.000 at
# nprobe 8; on 300k items 0.955 -> 1.000 at 32, on a clustered 151k-item log
# 0.871 -> 0.998 at 32; 30-100 us more per query at a given nprobe, as the
# tail's balanced lists hold more vectors (docs/performance.md, "Norm-ranging").
HEAD_SHARE = 0.001
HEAD_MAX = 1024
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _wide(kind: str, k: int) -> int:
    """How many FAISS results to re-rank for k answers (PQ_REFINE for ivfpq)."""
    return k * PQ_REFINE if kind == "ivfpq" else k


@dataclass
class SearchConfig:
    """Per-call search settings (never stored on the index)."""

    ef_search: int = DEFAULT_EF_SEARCH
    nprobe: int = DEFAULT_NPROBE
    n_threads: int = 0  # batch searches; 0 = all cores
    # A single query runs on one thread: waking an OpenMP team costs more than
    # it saves at one query (bench/bench_index.py measures both).
    single_threads: int = 1

    def threads(self, n_queries: int) -> int:
        """OpenMP threads for a search of n_queries."""
        if n_queries == 1:
            return self.single_threads or CORES
        return self.n_threads or CORES


@contextlib.contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """OpenMP threads for FAISS calls made by this thread (an OpenMP setting is
    per thread), restored afterwards so later kernels in the thread are unaffected."""
    before = faiss.omp_get_max_threads()
    if before == n:  # already so (a serving thread's usual case): two SWIG calls saved
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _read(path: Path, expected: int, mmap: bool) -> faiss.Index:
    """A FAISS index file holding `expected` vectors (ValueError naming the file if not)."""
    try:
        index = faiss.read_index(str(path), _mmap_flags() if mmap else 0)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a readable FAISS index ({exc})") from None
    if index.ntotal != expected:
        raise ValueError(f"{path}: {index.ntotal} vectors, the model has {expected}")
    return index


def _norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def _augment_items(vectors: np.ndarray, max_norm: float) -> np.ndarray:
    extra = np.sqrt(np.maximum(max_norm**2 - _norms(vectors) ** 2, 0.0))
    return np.hstack([vectors, extra[:, None]]).astype(np.float32)


def _augment_queries(q: np.ndarray) -> np.ndarray:
    x = np.empty((q.shape[0], q.shape[1] + 1), np.float32)
    x[:, :-1] = q
    x[:, -1] = 0.0
    return x


def _factory(kind: str, n: int, d: int) -> tuple[str, int]:
    """FAISS factory string and metric for a kind and catalogue size."""
    if kind == "flat":
        return "Flat", faiss.METRIC_INNER_PRODUCT
    if kind == "hnsw":
        return f"HNSW{HNSW_M},Flat", faiss.METRIC_INNER_PRODUCT
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # >= 39 training points per list
    if kind == "ivf":
        return f"IVF{nlist},Flat", faiss.METRIC_L2
    if kind == "ivfpq":
        # The largest sub-quantizer count <= d/4 that divides d (d includes the
        # reduction's extra coordinate): >= 4 dims per code keeps training fast.
        m = next(m for m in range(max(d // 4, 1), 0, -1) if d % m == 0)
        # 2^bits codewords per sub-quantizer need >= 39 training points each.
        bits = max(1, min(8, int(math.log2(max(n // 39, 2)))))
        return f"IVF{nlist},PQ{m}x{bits}", faiss.METRIC_L2
    raise ValueError(f"index: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def head_size(kind: str, n: int) -> int:
    """How many items of largest norm a `kind` index over n items scores
    exactly beside its lists (HEAD_SHARE; none for the unreduced kinds)."""
    return min(HEAD_MAX, int(n * HEAD_SHARE)) if kind in REDUCED else 0


class ItemIndex:
    """A FAISS index over one model's item vectors (the vectors stay the model's).

    `head`: item ids kept out of the FAISS index and scored exactly by every
    search (norm-ranging, HEAD_SHARE); the index holds the others under their
    own ids."""

    def __init__(
        self,
        kind: str,
        index: faiss.Index,
        vectors: np.ndarray,
        max_norm: float,
        head: np.ndarray | None = None,
    ) -> None:
        self.kind = kind
        self.index = index
        self.vectors = vectors  # (n_items, d) float32, possibly memory-mapped
        self.max_norm = max_norm
        self.head = _NO_IDS if head is None else np.asarray(head, np.int64)

    @property
    def n_items(self) -> int:
        return int(self.vectors.shape[0])

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "flat", seed: int = 0) -> ItemIndex:
        """Build an index of `kind` over item vectors (n_items x d)."""
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[0] == 0:
            raise ValueError(f"index: need a non-empty 2-d array of item vectors, got {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError("index: item vectors contain NaN or inf")
        reduced = kind in REDUCED
        head, ids, max_norm = _NO_IDS, None, 0.0
        data = v
        if reduced:
            norms = _norms(v)
            h = head_size(kind, v.shape[0])
            if h:  # the h largest norms (ties by lower id), then the rest by id
                head = np.sort(np.lexsort((np.arange(v.shape[0]), -norms))[:h]).astype(np.int64)
                keep = np.ones(v.shape[0], bool)
                keep[head] = False
                ids = np.flatnonzero(keep).astype(np.int64)
                data = v[ids]
                norms = norms[ids]
            max_norm = float(norms.max())
            data = _augment_items(data, max_norm)
        n = data.shape[0]
        factory, metric = _factory(kind, n, data.shape[1])
        index = faiss.index_factory(data.shape[1], factory, metric)
        if kind == "hnsw":
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        if not index.is_trained:
            faiss.extract_index_ivf(index).cp.seed = seed
            rng = np.random.default_rng(seed)
            sample = data if n <= 256 * 1024 else data[rng.choice(n, 256 * 1024, replace=False)]
            index.train(sample)
        if ids is None:
            index.add(data)
        else:  # inverted lists keep each vector's item id
            index.add_with_ids(data, ids)
        return cls(kind, index, v, max_norm, head)

    # -- persistence ---------------------------------------------------------------

    def write(self, path: Path) -> None:
        """Write the FAISS index file (the vectors are stored by the model as .npy)."""
        faiss.write_index(self.index, str(path))

    @classmethod
    def read(
        cls,
        path: Path,
        kind: str,
        vectors: np.ndarray,
        max_norm: float,
        mmap: bool = True,
        head: np.ndarray | None = None,
    ) -> ItemIndex:
        """Read an index file, memory-mapped where FAISS can map the index type;
        `head` as built (none in bundles written before norm-ranging)."""
        n_head = 0 if head is None else len(head)
        index = _read(path, vectors.shape[0] - n_head, mmap)
        return cls(kind, index, vectors, max_norm, head)

    # -- search ------------------------------------------------------------------------

    def _params(self, cfg: SearchConfig, widen: int, sel: faiss.IDSelector | None):
        """FAISS search parameters; those without a selector are made once per
        setting and shared (FAISS only reads them during a search)."""
        if sel is None:
            key = (cfg.ef_search, cfg.nprobe, widen)
            cache = self.__dict__.setdefault("_param_cache", {})
            p = cache.get(key)
            if p is None:
                p = cache[key] = self._new_params(cfg, widen)
            return p
        p = self._new_params(cfg, widen)
        p.sel = sel
        return p

    def _new_params(self, cfg: SearchConfig, widen: int):
        if self.kind == "hnsw":
            p = faiss.SearchParametersHNSW()
            p.efSearch = cfg.ef_search * widen
        elif self.kind in ("ivf", "ivfpq"):
            p = faiss.SearchParametersIVF()
            p.nprobe = min(cfg.nprobe * widen, self.index.nlist)
        else:
            p = faiss.SearchParameters()
        return p

    def _raw(
        self, q: np.ndarray, k: int, cfg: SearchConfig, widen: int = 1, sel=None
    ) -> np.ndarray:
        """FAISS ids (n, k), -1 where it found fewer."""
        x = _augment_queries(q) if self.kind in REDUCED else q
        params = self._params(cfg, widen, sel)
        if self.kind == "hnsw" and params.efSearch < k:  # a fresh one: shared ones stay put
            params = self._new_params(cfg, widen)
            params.efSearch = k
            if sel is not None:
                params.sel = sel
        _, ids = self.index.search(x, k, params=params)
        return ids

    def search(
        self,
        queries: np.ndarray,
        k: int,
        excl: tuple[np.ndarray, np.ndarray] | None = None,
        cand: tuple[np.ndarray, np.ndarray] | None = None,
        cfg: SearchConfig | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by inner product per query row, never an excluded item.

        excl / cand: CSR (indptr, indices) per row; an empty candidate row means
        unrestricted. Returns (items int32, scores float32), (n, k), padded with
        -1 / -inf only where fewer than k items are eligible.
        """
        cfg = cfg or SearchConfig()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n = q.shape[0]
        out_i = np.full((n, k), -1, np.int32)
        out_s = np.full((n, k), -np.inf, np.float32)
        if n == 0:
            return out_i, out_s
        with _omp_threads(cfg.threads(n)):
            if n == 1 and cand is None:  # one request: no per-row bookkeeping
                banned = _NO_IDS if excl is None else excl[1][excl[0][0] : excl[0][1]]
                wide = _wide(self.kind, k) + banned.size
                ids = self._raw(q, min(self.n_items, wide), cfg)
                found = self._with_head(q, ids, wide)[0]
                self._rank_row(q, 0, found, banned, k, cfg, out_i, out_s)
                return out_i, out_s
            return self._search(q, k, excl, cand, cfg, out_i, out_s)

    def _search(self, q, k, excl, cand, cfg, out_i, out_s):
        n = q.shape[0]
        if excl is None:
            excl = (np.zeros(n + 1, np.int64), np.zeros(0, np.int64))
        ex_ptr, ex_idx = excl
        rows_excl = np.diff(ex_ptr)
        free = np.ones(n, bool)
        if cand is not None:
            has = np.diff(cand[0]) > 0
            for r in np.flatnonzero(has):
                allowed = cand[1][cand[0][r] : cand[0][r + 1]]
                self._exact_rows(
                    q[r : r + 1], k, ex_idx[ex_ptr[r] : ex_ptr[r + 1]], allowed, out_i[r], out_s[r]
                )
            free &= ~has
        rows = np.flatnonzero(free)
        if rows.size == 0:
            return out_i, out_s
        wide = _wide(self.kind, k) + int(rows_excl[rows].max(initial=0))
        ids = self._with_head(q[rows], self._raw(q[rows], min(self.n_items, wide), cfg), wide)
        for j, r in enumerate(rows):
            self._rank_row(q, r, ids[j], ex_idx[ex_ptr[r] : ex_ptr[r + 1]], k, cfg, out_i, out_s)
        return out_i, out_s

    def _rank_row(self, q, r, found, banned, k, cfg, out_i, out_s) -> None:
        """Row r's answer from FAISS's ids `found`: one kernel call drops the
        banned ids, scores the rest exactly and keeps the best k (numpy's isin /
        unique / lexsort cost ~3x FAISS's own search). Short of k eligible
        items: a wider search, then brute force."""
        vectors = self._vectors32()
        items, scores, kept, n_banned = topk.rank_found(vectors, q[r], found, banned, k)
        need = min(k, self.n_items - n_banned)
        if kept < need:
            # The retry's selector keeps banned ids out of FAISS's answer, but the
            # head's candidates come unfiltered: count what is left after the ban.
            got = self._retry(q[r : r + 1], k, banned, cfg)
            items, scores, kept, _ = topk.rank_found(vectors, q[r], got, banned, k)
            if kept < need:
                self._exact_rows(q[r : r + 1], k, banned, None, out_i[r], out_s[r])
                return
        out_i[r, : items.size] = items
        out_s[r, : items.size] = scores

    def _with_head(self, q: np.ndarray, ids: np.ndarray, wide: int) -> np.ndarray:
        """FAISS's ids per row with the head's candidates appended: its `wide`
        best items by inner product (plus a margin against float rounding at the
        cut), from one product over the head's own contiguous copy; enough for
        the k best eligible ones when `wide` is k plus the row's exclusions."""
        h = self.head.size
        if not h:
            return ids
        m = min(h, wide + RETRY_WIDEN)
        if m == h:
            best = np.broadcast_to(self.head, (q.shape[0], h))
        else:
            scores = q @ self._head_vectors().T
            best = self.head[np.argpartition(-scores, m - 1, axis=1)[:, :m]]
        # The kernel reads each row as C-contiguous, and np.concatenate of an
        # (n, 1) array and a broadcast one returns Fortran order.
        return np.ascontiguousarray(np.concatenate([ids, best], axis=1))

    def _head_vectors(self) -> np.ndarray:
        """The head's vectors, one contiguous (h, d) float32 block (made once):
        read from the model's array they are h scattered rows per query."""
        hv = self.__dict__.get("_head_block")
        if hv is None:
            hv = self._head_block = np.ascontiguousarray(self._vectors32()[self.head])
        return hv

    def _vectors32(self) -> np.ndarray:
        """The item vectors as a C-contiguous float32 array (what the kernels read;
        a view of the model's own array when it already is one)."""
        v = self.vectors
        if not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.flags.c_contiguous):
            v = self.vectors = np.ascontiguousarray(v, np.float32)
        return v

    def _retry(self, q: np.ndarray, k: int, banned: np.ndarray, cfg: SearchConfig) -> np.ndarray:
        """One query again, with an IDSelector and a wider search."""
        ids64 = np.ascontiguousarray(banned, dtype=np.int64)
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(ids64)) if ids64.size else None
        found = self._raw(q, min(_wide(self.kind, k), self.n_items), cfg, RETRY_WIDEN, sel)[0]
        found = found[found >= 0].astype(np.int64, copy=False)
        return np.concatenate([found, self.head]) if self.head.size else found

    def _fill(self, qv: np.ndarray, ids: np.ndarray, k: int, oi: np.ndarray, os_: np.ndarray):
        """Exact scores of found ids, best first (ties by id), first k."""
        ids = ids.astype(np.int64)
        scores = np.asarray(self.vectors[ids] @ qv, np.float32)
        order = np.lexsort((ids, -scores))[:k]
        oi[: order.size] = ids[order]
        os_[: order.size] = scores[order]

    def _exact_rows(self, q, k, banned, allowed, oi, os_) -> None:
        """Brute force for one query: over `allowed` only when given."""
        if allowed is not None:
            allowed = np.unique(allowed[(allowed >= 0) & (allowed < self.n_items)])
            if banned.size:
                allowed = allowed[~np.isin(allowed, banned)]
            self._fill(q[0], allowed, k, oi, os_)
            return
        scores = np.ascontiguousarray(np.asarray(q @ np.asarray(self.vectors).T, np.float32))
        ptr = np.array([0, banned.size], np.int64)
        i, s = topk.topk_dense(scores, k, ptr, banned.astype(np.int32), None, None, 1)
        oi[:], os_[:] = i[0], s[0]


def _zeros_at_cosine_zero(
    got_i: np.ndarray, got_s: np.ndarray, zeros: np.ndarray, me: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """A cosine answer with the zero-vector items merged in as exact cosine
    ranks them (cosine_similar, a model without an index): 0 with every item,
    so above negative cosines and past the positive ones; ties by lower id."""
    z = zeros[zeros != me][:k]
    all_i = np.concatenate([got_i.astype(np.int64), z])
    all_s = np.concatenate([got_s, np.zeros(z.size, np.float32)])
    order = np.lexsort((all_i, -all_s))[:k]
    return all_i[order].astype(np.int32), all_s[order]


class SimilarIndex:
    """Cosine item-item neighbours from an inner-product index over unit vectors.

    Zero vectors (items training never placed) are left out of the index. Exact
    cosine scores them 0 with everything, so they are merged back where an
    answer reaches past its positive cosines (k beyond them, or a short one)."""

    def __init__(self, kind: str, index: faiss.Index, ids: np.ndarray) -> None:
        self.kind = kind
        self.index = index
        self.ids = ids  # item index of each indexed vector (zero vectors left out)

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "hnsw", seed: int = 0) -> SimilarIndex:
        """Index the non-zero item vectors, normalised."""
        v = np.asarray(vectors, np.float32)
        norms = _norms(v)
        ids = np.flatnonzero(norms > 0).astype(np.int64)
        unit = (v[ids] / norms[ids, None]).astype(np.float32)
        factory, _ = _factory(kind, max(ids.size, 1), v.shape[1])
        index = faiss.index_factory(v.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if kind == "hnsw":
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        if not index.is_trained and ids.size:
            faiss.extract_index_ivf(index).cp.seed = seed
            index.train(unit)
        index.add(unit)
        return cls(kind, index, ids)

    def _zero_ids(self, n_items: int) -> np.ndarray:
        """The items not indexed (zero vectors), ascending; made once."""
        z = self.__dict__.get("_zeros")
        if z is None:
            keep = np.ones(n_items, bool)
            keep[self.ids] = False
            z = self._zeros = np.flatnonzero(keep).astype(np.int64)
        return z

    def write(self, path: Path) -> None:
        """Write the FAISS index file (ids are stored by the model as .npy)."""
        faiss.write_index(self.index, str(path))

    @classmethod
    def read(cls, path: Path, kind: str, ids: np.ndarray, mmap: bool = True) -> SimilarIndex:
        """Read an index file, memory-mapped where FAISS can map the index type."""
        return cls(kind, _read(path, ids.shape[0], mmap), ids)

    def similar(
        self, items: np.ndarray, vectors: np.ndarray, k: int, cfg: SearchConfig | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cosine neighbours of each item (never itself), padded with -1 / -inf."""
        cfg = cfg or SearchConfig()
        n = items.size
        out_i = np.full((n, k), -1, np.int32)
        out_s = np.full((n, k), -np.inf, np.float32)
        if n == 0:
            return out_i, out_s
        with _omp_threads(cfg.threads(n)):
            return self._similar(items, vectors, k, cfg, out_i, out_s)

    def _similar(self, items, vectors, k, cfg, out_i, out_s):
        n = items.size
        v = np.asarray(vectors[items], np.float32)
        norms = _norms(v)
        q = np.divide(v, norms[:, None], out=np.zeros_like(v), where=norms[:, None] > 0)
        q = q.astype(np.float32)
        if self.kind == "hnsw":
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(cfg.ef_search, k + 1)
        elif self.kind in ("ivf", "ivfpq"):
            p = faiss.SearchParametersIVF()
            p.nprobe = min(cfg.nprobe, self.index.nlist)
        else:
            p = faiss.SearchParameters()
        fetch = min(_wide(self.kind, k) + 1, self.ids.size)
        pos = self.index.search(q, fetch, params=p)[1] if fetch else np.zeros((n, 0), np.int64)
        n_items = vectors.shape[0]
        v32 = np.ascontiguousarray(vectors, np.float32)  # the model's own array, no copy
        for r in range(n):
            if norms[r] == 0:
                # No direction: cosine 0 with everything, ties by index (as the
                # exact cosine_similar does), so k neighbours still come back.
                others = np.arange(min(k + 1, n_items))
                others = others[others != items[r]][:k]
                out_i[r, : others.size], out_s[r, : others.size] = others, 0.0
                continue
            # One kernel call: the neighbours found, without the item itself,
            # by exact cosine, best k (ties by lower index).
            found = self.ids[pos[r][pos[r] >= 0]]
            me = items[r : r + 1]
            got_i, got_s, kept, _ = topk.rank_found(v32, q[r], found, me, k, cosine=True)
            if kept < min(k, self.ids.size - 1):  # ANN came back short: exact
                others = self.ids[self.ids != items[r]]
                got_i, got_s, _, _ = topk.rank_found(v32, q[r], others, me, k, cosine=True)
            zeros = self._zero_ids(n_items)
            if zeros.size and (got_i.size < k or got_s[-1] < 0):
                got_i, got_s = _zeros_at_cosine_zero(got_i, got_s, zeros, items[r], k)
            out_i[r, : got_i.size] = got_i
            out_s[r, : got_i.size] = got_s
        return out_i, out_s
