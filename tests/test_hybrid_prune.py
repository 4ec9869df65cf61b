"""`tune --hybrid` leaves out a component the blend does as well without: where
the validation shows, at paired z >= 2, that leaving it out loses less than
0.5% of the metric for known users and for new users' histories alike (each
component costs the served call a dense row). A component that carries the
signal is kept, the blend is never emptied, and `--keep-components` keeps
them all."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recserve.cli import main
from recserve.config import load_config
from recserve.models import create
from recserve.tuning import (
    PRUNE_TOLERANCE,
    _bearable,
    candidates,
    learn_hybrid_prior,
    prunable,
    splits,
    tune_hybrid,
)
from tests.event_logs import cluster_events, events_dataset

ALS = {"factors": 16, "iterations": 5}


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """Users of 30 item clusters (event_logs.cluster_events): ALS finds the
    cluster, popularity only adds noise to a blend with it."""
    path = tmp_path_factory.mktemp("prune") / "clusters.csv"
    return events_dataset(path, cluster_events()), path


def test_a_loss_is_bearable_only_when_bounded_below_the_tolerance():
    rng = np.random.default_rng(0)
    full = rng.random(2000)
    assert _bearable(full, full.copy())  # nothing lost
    assert _bearable(full, full * (1 - PRUNE_TOLERANCE / 5))  # a small loss, surely small
    assert not _bearable(full, full * (1 - 2 * PRUNE_TOLERANCE))  # a loss past it
    # no loss on average, but too noisy to bound below the tolerance
    assert not _bearable(full, full + rng.normal(0, 0.3, full.size))
    assert not _bearable(np.zeros(0), np.zeros(0))


def test_the_component_that_carries_the_signal_is_kept(clusters):
    clusters, _ = clusters
    models = {"als": create("als", **ALS), "popularity": create("popularity")}
    _, inner = splits(clusters, "random", 0.2, 0, 1)
    cands = candidates(models, inner, 100)
    weights = {"als": 0.5, "popularity": 0.5}
    out, full = prunable(cands, weights, "ndcg@20", 20)
    assert out == ["popularity"]
    assert full.size == np.count_nonzero(np.diff(inner.test.tocsr().indptr))
    # two components that rank alike: one goes, never both
    twins = {"a": create("als", **ALS), "b": create("als", **ALS)}
    out, _ = prunable(candidates(twins, inner, 100), {"a": 0.5, "b": 0.5}, "ndcg@20", 20)
    assert out == ["a"]
    # new users' histories: popularity goes there too, ALS does not
    specs = {"als": ("als", ALS), "popularity": ("popularity", {})}
    got = learn_hybrid_prior(specs, weights, clusters, "ndcg@20", 20, prune=["popularity"])
    assert got["pruned"] == ["popularity"] and got["new_histories"] > 0
    assert got["new_value"] >= got["new_full_value"] * (1 - PRUNE_TOLERANCE)
    got = learn_hybrid_prior(specs, weights, clusters, "ndcg@20", 20, prune=["als"])
    assert got["pruned"] == []
    # without `prune`: nothing proposed, nothing pruned
    assert learn_hybrid_prior(specs, weights, clusters, "ndcg@20", 20)["pruned"] == []


def test_tune_leaves_the_component_out_and_serve_blends_the_rest(clusters, tmp_path, capsys):
    clusters, data = clusters
    models = tmp_path / "models"
    create("als", **ALS).fit(clusters).save(models, "als", dataset=clusters)
    out = tune_hybrid(clusters, ["als", "popularity"], name="h", models_dir=models, trials=8)
    assert out["weights"] == {"als": 1.0} and set(out["dropped"]) == {"popularity"}
    assert set(out["components"]) == {"als"}
    assert out["value"] >= out["full_value"] * (1 - PRUNE_TOLERANCE)
    doc = json.loads((models / "hybrids.json").read_text())["h"]
    assert doc["weights"] == {"als": 1.0} and "popularity" in doc["dropped"]
    assert load_config(overrides={"models": str(models)}).hybrids["h"].weights == {"als": 1.0}
    # a new search starts from the last weights, the dropped component at 0
    again = tune_hybrid(clusters, ["als", "popularity"], name="h", models_dir=models, trials=3)
    assert again["weights"] == {"als": 1.0}
    # --keep-components keeps both; the flag is for hybrids only
    argv = ["tune", "--data", str(data), "--trials", "3", "--models", str(models)]
    argv += ["--name", "k", "--hybrid", "als,popularity", "--keep-components"]
    assert main(argv) == 0
    kept = json.loads((models / "hybrids.json").read_text())["k"]
    assert set(kept["weights"]) == {"als", "popularity"} and kept["dropped"] == {}
    assert main(["tune", "--data", str(data), "--algo", "als", "--keep-components",
                 "--name", "x", "--models", str(models)]) == 2  # fmt: skip
    assert "keep-components: applies to --hybrid only" in capsys.readouterr().err
