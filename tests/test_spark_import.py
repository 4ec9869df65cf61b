"""`recserve import spark-als`: Spark ALSModel Parquet factors -> a bundle that ranks
exactly as numpy does over the same factors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recserve.cli import main
from recserve.config import Hybrid, ServerConfig
from recserve.evaluation import as_served
from recserve.feedback import OnlineState
from recserve.models import load_named
from recserve.serving import Catalog, RecQuery, Router


def write_spark(folder, ids, factors, parts=2):
    """Factors laid out as Spark writes them: a folder of part files, id + features."""
    folder.mkdir(parents=True)
    order = np.random.default_rng(0).permutation(len(ids))  # Spark's row order is arbitrary
    for p, chunk in enumerate(np.array_split(order, parts)):
        table = pa.table(
            {
                "id": pa.array([int(ids[i]) for i in chunk], pa.int32()),
                "features": pa.array([factors[i].tolist() for i in chunk], pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, folder / f"part-{p:05d}.snappy.parquet")


@pytest.fixture()
def spark(tmp_path):
    rng = np.random.default_rng(1)
    users, items = np.arange(1, 61), np.arange(1, 121) * 7  # Spark ids: ints, any values
    u = rng.standard_normal((60, 8)).astype(np.float32)
    y = rng.standard_normal((120, 8)).astype(np.float32)
    write_spark(tmp_path / "userFactors", users, u)
    write_spark(tmp_path / "itemFactors", items, y)
    return tmp_path, users, items, u, y


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("index", ["auto", "flat", "hnsw"])
def test_round_trip_ranks_like_numpy(spark, capsys, index):
    tmp, users, items, u, y = spark
    code, out, _ = run(
        capsys,
        "import",
        "spark-als",
        "--user-factors",
        tmp / "userFactors",
        "--item-factors",
        tmp / "itemFactors",
        "--name",
        "spark",
        "--models",
        tmp / "models",
        "--index",
        index,
    )
    assert code == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["users"], summary["items"], summary["factors"]) == (60, 120, 8)
    model = load_named(tmp / "models", "spark")
    for r in range(0, 60, 7):
        want = np.argsort(-(y @ u[r]), kind="stable")[:10]
        got, scores = model.recommend([model.users.get(str(users[r]))], k=10)
        assert model.items.ids(got[0]) == [str(items[i]) for i in want]
        np.testing.assert_allclose(scores[0], np.sort(y @ u[r])[::-1][:10], rtol=1e-5)


def test_seen_items_from_a_dataset_are_excluded(spark, capsys):
    tmp, users, items, u, y = spark
    data = tmp / "data"
    data.mkdir()
    top = [int(items[i]) for i in np.argsort(-(y @ u[0]))[:3]]
    lines = ["user_id,item_id,rating,timestamp"] + [f"{users[0]},{i},5,1" for i in top]
    (data / "interactions.csv").write_text("\n".join(lines) + "\n")
    code, out, _ = run(
        capsys,
        "import",
        "spark-als",
        "--user-factors",
        tmp / "userFactors",
        "--item-factors",
        tmp / "itemFactors",
        "--name",
        "spark",
        "--models",
        tmp / "models",
        "--data",
        data,
    )
    assert code == 0, out
    model = load_named(tmp / "models", "spark")
    got, _ = model.recommend([model.users.get(str(users[0]))], k=10)
    assert not set(model.items.ids(got[0])) & {str(i) for i in top}
    new, _ = model.recommend_from_history(model.items.index([str(items[5])]), k=5)
    assert len(new) == 5  # fold-in of a new user works from the imported factors


def test_bad_inputs_are_named(spark, capsys):
    tmp, _, items, _, _ = spark
    write_spark(tmp / "wrongRank", items, np.ones((120, 4), np.float32))
    code, _, err = run(
        capsys,
        "import",
        "spark-als",
        "--user-factors",
        tmp / "userFactors",
        "--item-factors",
        tmp / "wrongRank",
        "--name",
        "x",
        "--models",
        tmp / "models",
    )
    assert code == 2 and "rank 8" in err and "rank 4" in err
    code, _, err = run(
        capsys,
        "import",
        "spark-als",
        "--user-factors",
        tmp / "nope",
        "--item-factors",
        tmp / "itemFactors",
        "--name",
        "x",
        "--models",
        tmp / "models",
    )
    assert code == 2 and "user-factors" in err and "nope" in err


def _table(path, ids, features, id_type=None):
    pq.write_table(
        pa.table(
            {
                "id": pa.array(ids, id_type or pa.int32()),
                "features": pa.array(features, pa.list_(pa.float32())),
            }
        ),
        path,
    )


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "not found"),
        ("not_parquet", "is not Spark factor Parquet"),
        ("no_features", "has no 'features' column \\(columns: id\\)"),
        ("other_names", "has no 'id' column \\(columns: user, features\\)"),
        ("scalar_features", "features are double, not a list of numbers per row"),
        ("null_features", "row 1: features is null"),
        ("null_id", "row 0: id is null"),
        ("no_rows", "has no rows"),
        ("ragged", "have 2..3 features"),
        ("empty_vectors", "have 0..0 features"),
        ("nan", "NaN or inf"),
        ("repeated", "repeats ids"),
    ],
)
def test_each_malformed_factor_file_is_named(tmp_path, case, match):
    from recserve.importers import SparkImportError, read_factors

    path = tmp_path / "f.parquet"
    if case == "not_parquet":
        path.write_text("id,features\n1,2\n")
    elif case == "no_features":
        pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32())}), path)
    elif case == "other_names":
        pq.write_table(pa.table({"user": [1], "features": pa.array([[1.0]])}), path)
    elif case == "scalar_features":
        pq.write_table(pa.table({"id": [1, 2], "features": [1.0, 2.0]}), path)
    elif case == "null_features":  # it was a traceback, then "nan..nan features"
        _table(path, [1, 2], [[1.0, 2.0], None])
    elif case == "null_id":  # it was read as the user id "None"
        _table(path, [None, 2], [[1.0, 2.0], [1.0, 2.0]])
    elif case == "no_rows":
        _table(path, [], [])
    elif case == "ragged":
        _table(path, [1, 2], [[1.0, 2.0], [1.0, 2.0, 3.0]])
    elif case == "empty_vectors":
        _table(path, [1, 2], [[], []])
    elif case == "nan":
        _table(path, [1, 2], [[1.0, float("nan")], [1.0, 2.0]])
    elif case == "repeated":
        _table(path, [1, 1], [[1.0, 2.0], [1.0, 2.0]])
    with pytest.raises(SparkImportError, match=match) as info:
        read_factors(path, "item-factors")
    assert str(info.value).startswith("item-factors: ")
    if case != "missing":
        assert str(path) in str(info.value)


def test_ids_of_any_spark_type_read_as_strings(tmp_path):
    from recserve.importers import read_factors

    path = tmp_path / "f.parquet"
    _table(path, [7, 10**12], [[1.0, 2.0], [3.0, 4.0]], pa.int64())
    ids, factors = read_factors(path, "user-factors")
    assert ids == ["7", "1000000000000"]
    np.testing.assert_array_equal(factors, [[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize(
    "case, match",
    [
        ("file", "is not a folder"),
        ("no_items", "has no itemFactors: not a saved Spark ALSModel"),
        ("bad_metadata", "is not Spark metadata JSON"),
        ("other_class", "describes 'org.apache.spark.ml.feature.PCAModel', not ALSModel"),
    ],
)
def test_a_folder_that_is_no_saved_alsmodel_is_named(spark, case, match):
    from recserve.importers import SparkImportError, saved_model

    tmp = spark[0]
    folder = tmp / "model"
    if case == "file":
        folder.write_text("not a folder")
    else:
        (folder / "metadata").mkdir(parents=True)
        (tmp / "userFactors").rename(folder / "userFactors")
        if case != "no_items":
            (tmp / "itemFactors").rename(folder / "itemFactors")
        meta = folder / "metadata" / "part-00000"
        if case == "bad_metadata":
            meta.write_text("{not json\n")
        else:
            meta.write_text(json.dumps({"class": "org.apache.spark.ml.feature.PCAModel"}) + "\n")
    with pytest.raises(SparkImportError, match=match):
        saved_model(folder)


def test_priors_do_not_blend_a_popularity_without_counts(spark, capsys):
    """Imported without --data, a model has no training counts: a prior (a
    hybrid's, or the model's own) would blend a flat popularity, which adds
    weight to the first items by index. It does not apply: known users and new
    users' histories are answered as without it, in the router, as_served and
    the CLI."""
    tmp, users, items, u, y = spark
    models = tmp / "models"
    args = ["--user-factors", tmp / "userFactors", "--item-factors", tmp / "itemFactors"]
    code, out, _ = run(capsys, "import", "spark-als", *args, "--name", "spark", "--models", models)
    assert code == 0, out
    m = load_named(models, "spark")
    m.params |= {"history_prior": 2.0, "user_prior": 2.0}
    m.save(models, "spark_p")
    hybrids = {
        "h": Hybrid("h", {"spark": 1.0}, history_prior=2.0, user_prior=2.0),
        "h_dense": Hybrid("h_dense", {"spark": 0.5, "spark_p": 0.5}, history_prior=2.0),
    }
    cfg = ServerConfig(models=str(models), hybrids=hybrids)
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(60)
    try:
        router = Router(cfg, catalog, OnlineState())
        assert not catalog.get("spark").popularity_known()
        history = [(str(items[3]), 1.0), (str(items[40]), 1.0)]
        new = m.items.index([h for h, _ in history])
        fold, _ = m.recommend_from_history(new, k=10)
        want_new = m.items.ids(fold)
        for name in ("spark_p", "h", "h_dense"):
            for r in (0, 13, 59):
                uid = str(users[r])
                want = [str(items[i]) for i in np.argsort(-(y @ u[r]), kind="stable")[:10]]
                every = tuple(m.items.ids(np.arange(m.n_items)))
                # the plain path, with explanations, and the general one (candidates)
                for extra in ({}, {"explain": True}, {"candidates": every}):
                    got = router.recommend(RecQuery(user_id=uid, k=10, model=name, **extra))
                    assert got.item_ids == want, (name, uid, extra.keys())
            got = router.recommend(RecQuery(user_id="newcomer", history=history, k=10, model=name))
            assert got.item_ids == want_new, name
        user = m.users.get(str(users[0]))
        recs, scores = m.recommend([user], 10)
        assert (
            as_served(catalog.get("spark_p").model, recs, scores, users=np.array([user])) == recs
        ).all()
        cli = ["recommend", "--models", str(models), "--name", "spark_p", "--user", str(users[0])]
        assert main([*cli, "--k", "10"]) == 0
        line = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
        assert [x["item_id"] for x in line["items"]] == m.items.ids(recs[0])
    finally:
        catalog.close()


def test_a_dataset_whose_ids_the_factors_do_not_hold_is_warned_of(tmp_path, caplog):
    # --data of other ids (Spark's StringIndexer indices against raw ids, say)
    # left nothing seen without a word; half of the events matching or more is
    # a dataset that goes with the factors.
    from recserve.importers import spark_als

    _table(tmp_path / "u.parquet", [1, 2], [[1.0, 2.0], [3.0, 4.0]])
    _table(tmp_path / "i.parquet", [10, 11, 12], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    other = tmp_path / "other.csv"
    other.write_text("user,item\nu-a,sku-1\nu-b,sku-2\n1,10\n")
    with caplog.at_level("WARNING", logger="recserve.importers"):
        spark_als(tmp_path / "u.parquet", tmp_path / "i.parquet", "m", tmp_path / "m", other)
    (warned,) = [r.getMessage() for r in caplog.records]
    assert warned.startswith("--data: 1 of 3 events name a user and an item")
    assert "users matched: 1 of 3, items: 1 of 3" in warned
    caplog.clear()
    same = tmp_path / "same.csv"
    same.write_text("user,item\n1,10\n2,12\n2,99\n")
    with caplog.at_level("WARNING", logger="recserve.importers"):
        version = spark_als(
            tmp_path / "u.parquet", tmp_path / "i.parquet", "m", tmp_path / "m", same
        )
    assert not caplog.records and version.is_dir()
