"""Bundles from factors trained elsewhere: Spark MLlib's ALS.

    recserve import spark-als SAVED_MODEL_DIR --name NAME --models DIR
    recserve import spark-als --user-factors PATH --item-factors PATH --name NAME --models DIR

`ALSModel.write().save(path)` leaves `metadata/` (JSON: rank, implicitPrefs,
alpha, ...), `userFactors` and `itemFactors` as Parquet (`id: int`,
`features: array<float>`), each a folder of part files; the saved folder is
taken as it is. They
become an `als` bundle: ids as strings, rows reordered to recserve's sorted id
maps, the Gram matrix for exact fold-in of new users, and the retrieval index
`index=auto` chooses for the catalogue size. An optional `--data` dataset
supplies the users' seen items (excluded from their recommendations); without
it nothing counts as seen.

Spark's `regParam` is scaled by each user's number of ratings (ALS-WR) while
recserve's `regularization` is not, so fold-in of new users uses the
`--regularization` given here (default 0.1); the served scores of known users
are Spark's own dot products either way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from recserve.data import Dataset, IdMap, load_dataset
from recserve.kernels import als as alsk
from recserve.models import create
from recserve.models.factorization import ALS

log = logging.getLogger(__name__)


class SparkImportError(ValueError):
    """The factor files are missing, malformed or inconsistent (the message says which)."""


def read_factors(path: str | Path, what: str) -> tuple[list[str], np.ndarray]:
    """(ids as strings, float32 factors) of a Spark factor Parquet file or folder."""
    try:
        names = pq.ParquetDataset(str(path)).schema.names
        missing = [c for c in ("id", "features") if c not in names]
        if missing:
            raise SparkImportError(
                f"{what}: {path} has no {' or '.join(repr(c) for c in missing)} column "
                f"(columns: {', '.join(names)}); Spark's factors are id, features"
            )
        table = pq.read_table(str(path), columns=["id", "features"])
    except FileNotFoundError:
        raise SparkImportError(f"{what}: {path} not found") from None
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, SparkImportError):
            raise
        raise SparkImportError(f"{what}: {path} is not Spark factor Parquet ({exc})") from None
    if table.num_rows == 0:
        raise SparkImportError(f"{what}: {path} has no rows")
    kind = table.schema.field("features").type
    listed = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (
        (listed or pa.types.is_fixed_size_list(kind))
        and (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type))
    ):
        raise SparkImportError(
            f"{what}: {path}'s features are {kind}, not a list of numbers per row"
        )
    for column in ("id", "features"):
        if table[column].null_count:
            row = int(np.flatnonzero(table[column].is_null().to_numpy(zero_copy_only=False))[0])
            raise SparkImportError(f"{what}: {path} row {row}: {column} is null")
    lengths = pc.list_value_length(table["features"]).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max() or lengths.min() == 0:
        raise SparkImportError(
            f"{what}: rows of {path} have {lengths.min()}..{lengths.max()} features"
        )
    flat = pc.list_flatten(table["features"]).to_numpy(zero_copy_only=False)
    factors = np.asarray(flat, dtype=np.float32).reshape(table.num_rows, int(lengths[0]))
    if not np.isfinite(factors).all():
        raise SparkImportError(f"{what}: {path} holds NaN or inf factors")
    ids = [str(x) for x in table["id"].to_pylist()]
    if len(set(ids)) != len(ids):
        raise SparkImportError(f"{what}: {path} repeats ids")
    return ids, factors


def saved_model(path: str | Path) -> tuple[Path, Path, dict]:
    """(userFactors, itemFactors, params) of a folder written by ALSModel.save."""
    folder = Path(path)
    if not folder.is_dir():
        raise SparkImportError(f"model: {folder} is not a folder (ALSModel.write().save(path))")
    parts = {name: folder / name for name in ("userFactors", "itemFactors")}
    missing = [name for name, p in parts.items() if not p.exists()]
    if missing:
        raise SparkImportError(
            f"model: {folder} has no {' or '.join(missing)}: not a saved Spark ALSModel"
        )
    params: dict = {}
    for meta in sorted((folder / "metadata").glob("part-*")):
        try:
            doc = json.loads(meta.read_text(encoding="utf-8").splitlines()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise SparkImportError(f"model: {meta} is not Spark metadata JSON ({exc})") from None
        if "ALSModel" not in str(doc.get("class", "")):
            raise SparkImportError(f"model: {meta} describes {doc.get('class')!r}, not ALSModel")
        params = {**doc.get("defaultParamMap", {}), **doc.get("paramMap", {})}
        if "rank" in doc:
            params["rank"] = doc["rank"]
    return parts["userFactors"], parts["itemFactors"], params


def _sorted(ids: list[str], factors: np.ndarray) -> tuple[IdMap, np.ndarray]:
    idmap = IdMap.from_ids(ids)
    rows = np.empty(len(ids), np.int64)
    rows[idmap.index(ids)] = np.arange(len(ids))
    return idmap, np.ascontiguousarray(factors[rows])


def spark_als(
    user_factors: str | Path,
    item_factors: str | Path,
    name: str,
    models_dir: str | Path,
    data: str | Path | None = None,
    regularization: float = 0.1,
    alpha: float = 1.0,
    index: str = "auto",
) -> Path:
    """Publish Spark ALS factors as an `als` bundle; returns the version folder."""
    u_ids, u = read_factors(user_factors, "user-factors")
    i_ids, y = read_factors(item_factors, "item-factors")
    if u.shape[1] != y.shape[1]:
        raise SparkImportError(
            f"user-factors have rank {u.shape[1]}, item-factors rank {y.shape[1]}: not one model"
        )
    users, u = _sorted(u_ids, u)
    items, y = _sorted(i_ids, y)
    model = create(
        "als",
        factors=u.shape[1],
        regularization=regularization,
        alpha=alpha,
        values="linear",  # Spark's confidence: 1 + alpha * value
        weighted_reg=True,  # Spark's penalty: regParam times the row's positive events
        index=index,
    )
    assert isinstance(model, ALS)
    seen = sp.csr_matrix((len(users), len(items)), dtype=np.float32)
    dataset = None
    if data is not None:
        dataset = load_dataset(data)
        seen = _align(dataset, users, items)
    model.users, model.items = users, items
    model.user_items = sp.csr_matrix(
        (seen.data.astype(np.float32), seen.indices.astype(np.int32), seen.indptr.astype(np.int64)),
        shape=seen.shape,
    )
    model.user_factors, model.item_factors = u, y
    model.gram = alsk.gram(y, regularization)
    model.build_index()
    return model.save(models_dir, name, dataset=dataset)


def _align(ds: Dataset, users: IdMap, items: IdMap) -> sp.csr_matrix:
    """The dataset's interactions re-indexed to the factor files' users and items."""
    m = ds.interactions.tocoo()
    u = users.index(ds.users.array[m.row])
    i = items.index(ds.items.array[m.col])
    keep = (u >= 0) & (i >= 0)
    if m.nnz and keep.mean() < 0.5:
        # Most likely ids of another kind (Spark's StringIndexer indices against
        # raw ids): the model would treat almost nothing as seen.
        log.warning(
            "--data: %d of %d events name a user and an item of the factor files "
            "(users matched: %d of %d, items: %d of %d); the rest count as unseen: "
            "are the ids the ones Spark was trained on?",
            int(keep.sum()),
            m.nnz,
            int(np.count_nonzero(users.index(ds.users.array) >= 0)),
            len(ds.users),
            int(np.count_nonzero(items.index(ds.items.array) >= 0)),
            len(ds.items),
        )
    out = sp.csr_matrix(
        (m.data[keep], (u[keep], i[keep])), shape=(len(users), len(items)), dtype=np.float32
    )
    out.sum_duplicates()
    return out
