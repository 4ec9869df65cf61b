"""The in-memory dataset: a users x items CSR matrix plus id maps and item metadata.

Ids are strings on the wire. Internally users and items are dense indices
assigned in sorted (UTF-8 byte) order of their ids, so an id map is just the
sorted id array: lookups are a binary search that works unchanged on a
memory-mapped array, with no dictionary to build at load time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from recserve.kernels import wire

# The largest |value| an interaction may carry, in training data and requests
# alike. Values are float32 (3.4e38 at most): a model sums many of them times its
# weights, and values near the float32 limit made every score +inf. 1e30 is
# beyond any count, rating, duration or amount, and leaves 8 orders of magnitude
# for those sums. As float32 (the wire's and the data's type), so that 1e30 itself passes.
MAX_VALUE = float(np.float32(1e30))


class IdMap:
    """External string id <-> dense index, backed by a sorted bytes array."""

    __slots__ = ("_ids", "_rows")

    def __init__(self, sorted_ids: np.ndarray) -> None:
        if sorted_ids.dtype.kind != "S" or sorted_ids.ndim != 1:
            raise TypeError(f"IdMap needs a 1-d bytes ('S') array, got {sorted_ids.dtype}")
        self._ids = sorted_ids
        self._rows: np.ndarray | None = None

    @classmethod
    def from_ids(cls, ids: Iterable[str]) -> IdMap:
        """Build from any ids (deduplicated and sorted here)."""
        arr = np.array([str(i).encode("utf-8") for i in ids], dtype="S")
        if arr.size == 0:
            arr = np.zeros(0, dtype="S1")
        return cls(np.unique(arr))

    @property
    def array(self) -> np.ndarray:
        """The sorted ids as stored in a bundle (bytes dtype)."""
        return self._ids

    @property
    def rows(self) -> np.ndarray:
        """The same ids as a 2-d uint8 view (one NUL-padded UTF-8 id per row, no
        copy): what kernels.wire encodes from."""
        if self._rows is None:
            ids = np.ascontiguousarray(self._ids)
            self._rows = ids.view(np.uint8).reshape(ids.shape[0], ids.dtype.itemsize)
        return self._rows

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def index(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Dense indices (int64) of `ids`; -1 for ids not in the map."""
        if not (isinstance(ids, np.ndarray) and ids.dtype.kind == "S"):
            # str ids: one binary search each over the fixed-width rows, in the
            # kernel (a numpy key array cost ~37 us for 10 ids, a request's history).
            return wire.lookup(self.rows, ids if isinstance(ids, Sequence) else list(ids))
        keys, valid = ids, None  # bytes keys (bundles, importers): numpy's search
        out = np.full(keys.shape[0], -1, dtype=np.int64)
        if keys.size == 0 or len(self) == 0:
            return out
        width = self._ids.dtype.itemsize
        if keys.dtype.itemsize > width:
            # Keys longer than every stored id never match; the rest are searched in
            # the map's own dtype (a wider key dtype would make searchsorted copy the
            # whole map to it first: O(n) per lookup).
            fits = np.fromiter((len(k) <= width for k in keys.tolist()), bool, keys.shape[0])
            keys = np.where(fits, keys, b"")
            valid = fits
        keys = keys.astype(self._ids.dtype, copy=False)
        pos = np.searchsorted(self._ids, keys)
        inside = pos < len(self)
        hit = np.zeros(keys.shape[0], dtype=bool)
        hit[inside] = self._ids[pos[inside]] == keys[inside]
        if valid is not None:
            hit &= valid
        out[hit] = pos[hit]
        return out

    def get(self, item_id: str) -> int:
        """Dense index of one id, or -1 (a scalar search: the serving path's lookup)."""
        return wire.lookup_one(self._rows if self._rows is not None else self.rows, item_id)

    def ids(self, indices: Iterable[int] | np.ndarray) -> list[str]:
        """External ids of dense indices."""
        idx = np.asarray(indices, dtype=np.int64)
        return [b.decode("utf-8") for b in self._ids[idx]]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and np.array_equal(self._ids, other._ids)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Dataset:
    """Interactions (users x items CSR, float32) with timestamps, id maps and item metadata.

    `timestamps` is aligned with `interactions.data` (same order), in Unix
    seconds. `item_features` is an items x features CSR (genres, tags) whose
    column names are `feature_names`.
    """

    interactions: sp.csr_matrix
    timestamps: np.ndarray
    users: IdMap
    items: IdMap
    item_titles: np.ndarray | None = None
    item_features: sp.csr_matrix | None = None
    feature_names: list[str] = field(default_factory=list)
    has_timestamps: bool = True
    name: str = "dataset"

    def __post_init__(self) -> None:
        m = self.interactions
        if m.shape != (len(self.users), len(self.items)):
            raise ValueError(
                f"interactions shape {m.shape} != (users {len(self.users)}, "
                f"items {len(self.items)})"
            )
        if self.timestamps.shape[0] != m.nnz:
            raise ValueError("timestamps must align with interactions.data")
        if self.item_features is not None and self.item_features.shape[0] != len(self.items):
            raise ValueError("item_features must have one row per item")

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def nnz(self) -> int:
        return int(self.interactions.nnz)

    def fingerprint(self) -> str:
        """sha256 over the interaction arrays and id maps: identifies the training data."""
        h = hashlib.sha256()
        m = self.interactions
        for arr in (m.indptr, m.indices, m.data, self.users.array, self.items.array):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def with_interactions(self, matrix: sp.csr_matrix, timestamps: np.ndarray) -> Dataset:
        """The same users, items and metadata with other interactions (a train split)."""
        return Dataset(
            interactions=matrix,
            timestamps=timestamps,
            users=self.users,
            items=self.items,
            item_titles=self.item_titles,
            item_features=self.item_features,
            feature_names=self.feature_names,
            has_timestamps=self.has_timestamps,
            name=self.name,
        )

    def summary(self) -> dict[str, object]:
        """Sizes and density for logs and manifests."""
        density = self.nnz / max(1, self.n_users * self.n_items)
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.nnz,
            "density": round(density, 6),
            "features": len(self.feature_names),
        }


def build_csr(
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    values: np.ndarray,
    timestamps: np.ndarray,
    n_users: int,
    n_items: int,
    duplicates: str = "last",
) -> tuple[sp.csr_matrix, np.ndarray]:
    """CSR (sorted column indices) from COO triples, resolving repeated (user, item) pairs.

    duplicates="last" keeps the latest event (by timestamp, then file order),
    which is right for ratings that were revised; "sum" adds values, right for
    counts such as plays. The kept timestamp is the latest either way.
    """
    if duplicates not in ("last", "sum"):
        raise ValueError(f"duplicates: expected 'last' or 'sum', got {duplicates!r}")
    user_idx = np.asarray(user_idx, dtype=np.int64)
    item_idx = np.asarray(item_idx, dtype=np.int64)
    key = user_idx * np.int64(max(n_items, 1)) + item_idx
    ts = np.asarray(timestamps, dtype=np.int64)
    # Sort by key, then timestamp, then file position (lexsort is stable).
    order = np.lexsort((ts, key))
    key = key[order]
    n = key.shape[0]
    if n:
        last = np.ones(n, dtype=bool)
        last[:-1] = key[1:] != key[:-1]
    else:
        last = np.zeros(0, dtype=bool)
    keep = order[last]
    if duplicates == "sum" and n:
        starts = np.flatnonzero(np.r_[True, last[:-1]])  # a run starts after a run's last
        vals = np.add.reduceat(np.asarray(values, dtype=np.float64)[order], starts)
        vals = vals.astype(np.float32)
    else:
        vals = np.asarray(values, dtype=np.float32)[keep]
    rows = user_idx[keep]
    cols = item_idx[keep].astype(np.int32)
    counts = np.bincount(rows, minlength=n_users)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    matrix = sp.csr_matrix((vals, cols, indptr), shape=(n_users, n_items))
    matrix.has_sorted_indices = True
    return matrix, ts[keep]


def features_matrix(
    item_tags: Sequence[Sequence[str]], weights: Sequence[Sequence[float]] | None = None
) -> tuple[sp.csr_matrix, list[str]]:
    """Items x features CSR from a list of per-item tag lists (optionally weighted)."""
    names = sorted({t for tags in item_tags for t in tags})
    col = {t: j for j, t in enumerate(names)}
    indptr = [0]
    indices: list[int] = []
    data: list[float] = []
    for i, tags in enumerate(item_tags):
        seen: dict[int, float] = {}
        for j, t in enumerate(tags):
            w = 1.0 if weights is None else float(weights[i][j])
            seen[col[t]] = seen.get(col[t], 0.0) + w
        for c in sorted(seen):
            indices.append(c)
            data.append(seen[c])
        indptr.append(len(indices))
    m = sp.csr_matrix(
        (np.array(data, np.float32), np.array(indices, np.int32), np.array(indptr, np.int64)),
        shape=(len(item_tags), len(names)),
    )
    return m, names
