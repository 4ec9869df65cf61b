"""Popularity as the floor: train and tune measure popularity on the same
held-out events and say when a model ranks clearly below it; tune searches only
what the data can support and skips an algorithm the data cannot fit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from recserve import tuning
from recserve.cli import main
from recserve.data import generate, load_dataset, write_csv
from recserve.evaluation import (
    POPULARITY_MARGIN,
    evaluate,
    make_split,
    popularity_gap,
)
from recserve.models import bundle, create


def head_only(path: Path, users: int = 600, items: int = 400, events: int = 20) -> Path:
    """user,item rows where every user draws from one Zipf(1.0) popularity and
    nothing else: no tastes to learn, no timestamps, no item features."""
    rng = np.random.default_rng(3)
    p = 1.0 / np.arange(1, items + 1)
    p /= p.sum()
    lines = ["user_id,item_id"]
    for u in range(users):
        lines += [f"u{u},i{i}" for i in rng.choice(items, size=events, p=p)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train(capsys, data: Path, models: Path, algo: str, *extra: str) -> dict:
    code = main(
        ["train", "--data", str(data), "--algo", algo, "--name", algo, "--models", str(models),
         "--threads", "1", "--k", "10,20", *extra]
    )  # fmt: skip
    out, _ = capsys.readouterr()
    assert code == 0
    return json.loads(out.strip().splitlines()[-1])


def popularity_ndcg(data: Path, k: int = 10) -> dict[str, float]:
    """Popularity's metrics on train's split, computed here on its own."""
    ds = load_dataset(str(data))
    return evaluate(create("popularity"), ds, ks=[10, 20], split=make_split(ds, "random"))[
        "metrics"
    ]


def test_train_says_when_a_model_ranks_below_popularity(tmp_path, capsys, caplog):
    data = head_only(tmp_path / "head.csv")
    floor = popularity_ndcg(data)
    with caplog.at_level(logging.INFO):
        out = train(capsys, data, tmp_path / "m", "als")
    offline = out["offline"]
    assert offline["metric"] == "ndcg@10" and offline["protocol"] == "random"
    assert offline["popularity"] == pytest.approx(floor["ndcg@10"], abs=1e-6)
    # ALS's defaults fit noise here: clearly below the head items.
    assert offline["value"] < POPULARITY_MARGIN * offline["popularity"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "of popularity's" in warned[0].getMessage()
    assert "als (als): ndcg@10" in warned[0].getMessage()
    doc = bundle.read_manifest(Path(out["path"]))
    assert doc["metrics"]["ndcg@10"] == offline["value"]
    assert doc["baseline"]["algorithm"] == "popularity"
    for name, value in floor.items():
        assert doc["baseline"]["metrics"][name] == pytest.approx(value, abs=1e-6)
    main(["models", "list", "--models", str(tmp_path / "m")])
    listed = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])["models"][0]
    assert listed["baseline"] == doc["baseline"]


def test_no_warning_when_a_model_learns_more_than_popularity(tmp_path, capsys, caplog):
    data = tmp_path / "synth"
    write_csv(generate(300, 150, 9_000, seed=5), data)
    with caplog.at_level(logging.INFO):
        for algo in ("itemknn", "als"):
            out = train(capsys, data, tmp_path / "m", algo)
            assert out["offline"]["value"] > out["offline"]["popularity"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # popularity is not measured against itself
    out = train(capsys, data, tmp_path / "m", "popularity")
    assert "popularity" not in out["offline"]
    assert "baseline" not in bundle.read_manifest(Path(out["path"]))


def test_no_figures_without_the_evaluation(tmp_path, capsys):
    out = train(capsys, head_only(tmp_path / "head.csv"), tmp_path / "m", "als", "--no-evaluate")
    assert "offline" not in out
    doc = bundle.read_manifest(Path(out["path"]))
    assert "baseline" not in doc and doc["metrics"] == {}


def test_the_gap_rule():
    assert popularity_gap("m", "als", "ndcg@10", 0.5, 0.5) is None  # a tie
    assert popularity_gap("m", "als", "ndcg@10", 0.46, 0.5) is None  # within the margin
    level, text = popularity_gap("m", "als", "ndcg@10", 0.2, 0.5)
    assert level == logging.WARNING and "0.40 of popularity's 0.5000" in text
    # content ranks by features, for cold items: said, not warned
    level, text = popularity_gap("m", "content", "ndcg@10", 0.2, 0.5)
    assert level == logging.INFO and "item features" in text
    assert popularity_gap("m", "popularity", "ndcg@10", 0.2, 0.5) is None
    # a rating model: what it is fitted for, and what ranks
    level, text = popularity_gap("m", "svd", "ndcg@10", 0.01, 0.5)
    assert level == logging.WARNING and "predict ratings" in text and "als" in text
    assert "predict ratings" not in popularity_gap("m", "bpr", "ndcg@10", 0.01, 0.5)[1]


def test_tune_records_popularity_on_the_held_out_test(tmp_path, caplog):
    data = head_only(tmp_path / "head.csv")
    ds = load_dataset(str(data))
    with caplog.at_level(logging.WARNING):
        out = tuning.tune(
            ds, ["als"], name="t", models_dir=tmp_path / "m", trials=2, seed=0,
            threads=1, progress=False, metric="ndcg@10",
        )  # fmt: skip
    outer, _ = tuning.splits(ds, "random", 0.2, 0, 1)
    want = tuning.score(create("popularity"), outer, "ndcg@10", 10, None)
    assert out["popularity_test"] == pytest.approx(want)
    record = bundle.read_manifest(Path(out["path"]))["tuning"]
    assert record["popularity_test"] == out["popularity_test"]
    below = out["test"] < POPULARITY_MARGIN * want
    warned = [r for r in caplog.records if "of popularity's" in r.getMessage()]
    assert bool(warned) == below
    if warned:
        assert "--algo als,popularity" in warned[0].getMessage()


def test_tune_popularity_without_timestamps_searches_no_time_decay(tmp_path):
    ds = load_dataset(str(head_only(tmp_path / "head.csv")))
    assert not ds.has_timestamps
    out = tuning.tune(
        ds, ["popularity"], name="p", models_dir=tmp_path / "m", trials=4, seed=0,
        progress=False,
    )  # fmt: skip
    assert out["params"]["half_life_days"] == 0.0
    record = bundle.read_manifest(Path(out["path"]))["tuning"]["algorithms"][0]
    assert [t["state"] for t in record["trials"]] == ["complete"] * 4
    assert all("half_life_days" not in t["params"] for t in record["trials"])


def test_tune_skips_an_algorithm_the_data_cannot_fit(tmp_path, caplog):
    ds = load_dataset(str(head_only(tmp_path / "head.csv")))
    with caplog.at_level(logging.ERROR):
        out = tuning.tune(
            ds, ["content", "popularity"], name="t", models_dir=tmp_path / "m", trials=3,
            seed=0, progress=False,
        )  # fmt: skip
    assert out["algorithm"] == "popularity"
    record = bundle.read_manifest(Path(out["path"]))["tuning"]["algorithms"]
    assert record[0]["algorithm"] == "content" and "item features" in record[0]["error"]
    assert record[0]["trials"] == [] and record[1]["error"] is None
    assert any("tune content: not searched" in r.getMessage() for r in caplog.records)
    # alone, it is the command's error
    with pytest.raises(ValueError, match="item features"):
        tuning.tune(ds, ["content"], name="c", models_dir=tmp_path / "m", trials=3, progress=False)
    assert not (tmp_path / "m" / "c").exists()


def test_tune_hybrid_records_popularity_on_the_validation_events(tmp_path, caplog):
    ds = load_dataset(str(head_only(tmp_path / "head.csv")))
    with caplog.at_level(logging.WARNING):
        out = tuning.tune_hybrid(
            ds, ["als", "bpr"], name="hy", models_dir=tmp_path / "m", trials=3, seed=0,
            metric="ndcg@10", threads=1, progress=False, prune=False,  # both, as searched
        )  # fmt: skip
    _, inner = tuning.splits(ds, "random", 0.2, 0, 1)
    want = tuning.score(create("popularity"), inner, "ndcg@10", 10, None)
    assert out["popularity_value"] == pytest.approx(want)
    assert tuning.read_hybrids(tmp_path / "m")["hy"]["popularity_value"] == out["popularity_value"]
    assert out["value"] < POPULARITY_MARGIN * want, (out["value"], want)  # both fit noise
    warned = [r for r in caplog.records if "of popularity's" in r.getMessage()]
    assert len(warned) == 1 and "hy (hybrid)" in warned[0].getMessage()
    assert "--compare als,bpr,popularity" in warned[0].getMessage()
