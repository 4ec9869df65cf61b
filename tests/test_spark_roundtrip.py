"""A real Spark round trip: pyspark's ALS (local mode) trains on a synthetic log and
saves its model with `model.write().save(path)`; `recserve import spark-als`
takes that folder as it is; the served Recommend (include_seen) gives every one
of 50 users Spark's own `recommendForUserSubset` top 10, scores within 1e-4.

Needs Java (skipped with a message where it is missing) and pyspark (the
`spark` extra, which `make test` installs)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from recserve.cli import main
from recserve.data import generate, to_dataset
from recserve.v1 import recommender_pb2 as pb
from tests.service_helpers import running

if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Java is not installed: Spark cannot run here", allow_module_level=True)
pyspark = pytest.importorskip(
    "pyspark", reason="pyspark is not installed (pip install -e '.[spark]'; make test does)"
)

K = 10


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # loopback only
    session = (
        SparkSession.builder.master("local[2]")
        .appName("recserve-test")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "2")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_als_round_trip_serves_sparks_top_10(spark, tmp_path):
    from pyspark.ml.recommendation import ALS

    ds = to_dataset(generate(400, 250, 12_000, seed=11))
    m = ds.interactions.tocoo()
    users = np.array(ds.users.ids(m.row), dtype=np.int64)
    items = np.array(ds.items.ids(m.col), dtype=np.int64)
    rows = list(zip(users.tolist(), items.tolist(), m.data.astype(float).tolist(), strict=True))
    frame = spark.createDataFrame(rows, ["user", "item", "value"])
    als = ALS(
        rank=8,
        maxIter=5,
        regParam=0.05,
        implicitPrefs=True,
        alpha=2.0,
        seed=7,
        userCol="user",
        itemCol="item",
        ratingCol="value",
    )
    model = als.fit(frame)
    saved = tmp_path / "spark-als"
    model.write().save(str(saved))
    chosen = sorted(set(users.tolist()))[:50]
    subset = spark.createDataFrame([(u,) for u in chosen], ["user"])
    want = {
        r["user"]: [(int(x["item"]), float(x["rating"])) for x in r["recommendations"]]
        for r in model.recommendForUserSubset(subset, K).collect()
    }
    assert len(want) == 50

    models = tmp_path / "models"
    assert main(["import", "spark-als", str(saved), "--name", "als", "--models", str(models)]) == 0
    with running(models) as srv:
        for user in chosen:
            request = pb.RecommendRequest(user_id=str(user), k=K, model="als", include_seen=True)
            got = [(int(i.item_id), i.score) for i in srv.rec.Recommend(request, timeout=10).items]
            spark_items, spark_scores = zip(*want[user], strict=True)
            our_items, our_scores = zip(*got, strict=True)
            np.testing.assert_allclose(our_scores, spark_scores, rtol=1e-4, atol=1e-4)
            if our_items != spark_items:  # ties aside: only items of (nearly) equal score swap
                for ours, theirs, a, b in zip(
                    our_items, spark_items, our_scores, spark_scores, strict=True
                ):
                    assert ours == theirs or abs(a - b) <= 1e-4, (user, got, want[user])
                assert (
                    set(our_items) == set(spark_items)
                    or abs(our_scores[-1] - spark_scores[-1]) <= 1e-4
                )
