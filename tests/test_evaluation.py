"""Evaluation: splits keep every event exactly once; metrics match hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.data import load_dataset
from recserve.evaluation import (
    evaluate,
    ranking_metrics,
    rating_metrics,
    split_random,
    split_temporal,
    split_users,
)
from recserve.models import create


def test_metrics_hand_computed():
    # user 0: relevant {2, 5}, list [1, 2, 3] -> one hit at rank 2
    # user 1: relevant {0},    list [0, 4, -1] -> hit at rank 1, one empty slot
    recs = np.array([[1, 2, 3], [0, 4, -1]])
    test = sp.csr_matrix(np.array([[0, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0]], np.float32))
    m = ranking_metrics(recs, test, [1, 3], n_items=6)
    assert m["users"] == 2
    assert m["recall@1"] == pytest.approx((0 + 1) / 2)
    assert m["recall@3"] == pytest.approx((1 / 2 + 1 / 1) / 2)
    assert m["precision@3"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    ndcg0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg@3"] == pytest.approx((ndcg0 + 1.0) / 2)
    assert m["map@3"] == pytest.approx(((1 / 2) / 2 + 1.0) / 2)
    assert m["hit_rate@1"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["coverage@3"] == pytest.approx(5 / 6)  # items 0-4 appear


def test_users_without_relevant_items_are_skipped():
    recs = np.array([[0, 1], [0, 1]])
    test = sp.csr_matrix(np.array([[1, 0], [0, 0]], np.float32))
    assert ranking_metrics(recs, test, [2], 2)["users"] == 1


def test_rating_metrics():
    got = rating_metrics(np.array([3.0, 4.0, 5.0]), np.array([4.0, 4.0, 3.0]))
    assert got["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert got["mae"] == pytest.approx(1.0)


def _keys(m):
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist(), strict=True))


def test_random_split_partitions_each_user(small):
    s = split_random(small, 0.25, seed=1)
    all_keys, train, test = _keys(small.interactions), _keys(s.train.interactions), _keys(s.test)
    assert train | test == all_keys and not train & test
    n = np.diff(small.interactions.indptr)
    held = np.diff(s.test.indptr)
    np.testing.assert_array_equal(held, np.where(n >= 2, np.clip(np.rint(0.25 * n), 1, n - 1), 0))
    assert s.train.timestamps.size == s.train.nnz
    assert _keys(split_random(small, 0.25, seed=1).test) == test  # seeded


def test_temporal_split_holds_out_the_latest(small):
    s = split_temporal(small, n=2)
    m, ts = small.interactions, small.timestamps
    for u in range(0, small.n_users, 37):
        lo, hi = m.indptr[u], m.indptr[u + 1]
        latest = m.indices[lo:hi][np.lexsort((np.arange(hi - lo), ts[lo:hi]))][-2:]
        assert set(s.test[u].indices) == (set(latest) if hi - lo > 2 else set())


@pytest.mark.parametrize("value", [False, True])
def test_without_timestamps_the_temporal_split_holds_out_the_last_rows(tmp_path, value, caplog):
    # Rows come in an order unrelated to the ids' sort order: the last rows of
    # each user, not the items whose ids sort last, are held out. A repeated
    # pair counts at its last row, whether values are kept (last) or summed.
    rng = np.random.default_rng(4)
    rows = []
    for u in range(40):
        items = rng.choice(60, size=8, replace=False)
        rows += [(u, int(i)) for i in items]
    rng.shuffle(rows)
    rows += [rows[0]]  # a repeat: its pair's latest row is now the file's last
    body = "".join(
        f"u{u},i{i:02d}" + (f",{1 + (u + i) % 5}" if value else "") + "\n" for u, i in rows
    )
    path = tmp_path / "events.csv"
    path.write_text(("user,item,rating\n" if value else "user,item\n") + body)
    ds = load_dataset(str(path))
    assert not ds.has_timestamps
    last: dict[int, list[int]] = {}
    for u, i in rows:  # each user's items by the last row they appear on
        seq = last.setdefault(u, [])
        if i in seq:
            seq.remove(i)
        seq.append(i)
    with caplog.at_level("WARNING"):
        s = split_temporal(ds, n=2)
    assert "file order stands in for time" in caplog.text
    for u, seq in last.items():
        row = ds.users.index(np.array([f"u{u}".encode()], "S"))[0]
        held = {ds.items.array[j].decode() for j in s.test[row].indices}
        assert held == {f"i{i:02d}" for i in seq[-2:]}, u
    assert {f"i{i:02d}" for i in last[rows[0][0]][-2:]} >= {f"i{rows[0][1]:02d}"}


def test_user_split_hides_test_users_from_training(small):
    s = split_users(small, 0.2, seed=2)
    held = np.flatnonzero(np.diff(s.test.indptr))
    assert np.diff(s.train.interactions.indptr)[held].sum() == 0
    assert (np.diff(s.fold_in.indptr)[held] > 0).all()
    assert _keys(s.train.interactions) | _keys(s.test) | _keys(s.fold_in) == _keys(
        small.interactions
    )


def test_user_split_refuses_data_it_cannot_split_with_the_reason(tmp_path):
    def ds(rows):
        path = tmp_path / f"d{len(rows)}.csv"
        path.write_text("user,item,rating\n" + "".join(f"{u},{i},1\n" for u, i in rows))
        return load_dataset(str(path))

    # every user has one event: nothing to split into fold-in and test parts
    with pytest.raises(ValueError, match="no user has that many"):
        split_users(ds([(f"u{n}", f"i{n}") for n in range(20)]), 0.2)
    # one user: holding it out leaves nothing to train on
    with pytest.raises(ValueError, match="holds out 1 of 1 users with events"):
        split_users(ds([("u1", f"i{n}") for n in range(20)]), 0.2)
    # two users with events and one with a single event: the split is made
    s = split_users(ds([("a", "i1"), ("a", "i2"), ("b", "i1"), ("b", "i3"), ("c", "i2")]), 0.2)
    assert s.test.nnz > 0 and s.train.interactions.nnz > 0


def test_every_protocol_gives_bounded_monotone_metrics(small):
    """Metrics lie in [0, 1] and hit rate cannot fall as K grows."""
    for protocol in ("random", "temporal", "users"):
        r = evaluate(create("popularity"), small, protocol, (10, 20))
        for key, value in r["metrics"].items():
            if key != "users":
                assert 0.0 <= value <= 1.0, (protocol, key, value)
        assert r["metrics"]["hit_rate@20"] >= r["metrics"]["hit_rate@10"]
        assert r["metrics"]["users"] > 0


def numpy_popularity_recall(ds, k: int) -> float:
    """Independent reference: the same split, then plain numpy counting, sorting
    (ties by item index) and recall@k with min(k, relevant) in the denominator."""
    split = split_random(ds, 0.2, seed=0)
    train = split.train.interactions.toarray() > 0
    test = split.test.toarray() > 0
    counts = train.sum(axis=0).astype(float)
    recalls = []
    for u in range(train.shape[0]):
        if not test[u].any():
            continue
        scores = np.where(train[u], -np.inf, counts)
        top = sorted(range(scores.size), key=lambda j: (-scores[j], j))[:k]
        recalls.append(test[u, top].sum() / min(k, test[u].sum()))
    return float(np.mean(recalls))


def test_popularity_recall_matches_numpy_reference(small):
    got = evaluate(create("popularity"), small, "random", (20,), fraction=0.2, seed=0)
    want = numpy_popularity_recall(small, 20)
    assert got["metrics"]["recall@20"] == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_a_held_out_dislike_is_not_relevant(small):
    # A third of the events are dislikes (value -1): evaluate counts only the
    # held-out events with a positive value as relevant (it counted every one,
    # so a model was rewarded for recommending what the user disliked).
    import copy

    mixed = copy.deepcopy(small)
    rng = np.random.default_rng(3)
    mixed.interactions.data = np.where(rng.random(mixed.nnz) < 0.33, -1.0, 1.0).astype(np.float32)
    got = evaluate(create("popularity"), mixed, "random", (20,), fraction=0.2, seed=0)
    split = split_random(mixed, 0.2, seed=0)
    x = split.train.interactions
    seen = sp.csr_matrix((np.ones(x.nnz), x.indices, x.indptr), shape=x.shape).toarray() > 0
    counts = (x.toarray() > 0).sum(axis=0).astype(float)  # popularity counts no dislike
    liked = split.test.toarray() > 0
    recalls = []
    for u in range(seen.shape[0]):
        if not liked[u].any():
            continue  # only dislikes held out: not evaluated
        scores = np.where(seen[u], -np.inf, counts)
        top = sorted(range(scores.size), key=lambda j: (-scores[j], j))[:20]
        recalls.append(liked[u, top].sum() / min(20, liked[u].sum()))
    assert got["metrics"]["recall@20"] == pytest.approx(float(np.mean(recalls)), rel=1e-12)


def test_zero_values_are_not_relevant_unless_the_threshold_says_so(small, tmp_path, capsys):
    # Book-Crossing marks implicit events 0. With every held-out value 0 the
    # refusal said "no user has a relevant test item", after the fit, without
    # saying why; now it names the values and the threshold that counts them.
    import copy

    from recserve.cli import main

    zeros = copy.deepcopy(small)
    zeros.interactions.data = np.zeros(zeros.nnz, np.float32)
    fits = []

    class Counting(type(create("popularity"))):
        def _fit(self, dataset):
            fits.append(1)
            super()._fit(dataset)

    with pytest.raises(ValueError, match=r"no held-out value is positive \(they range 0 to 0\)"):
        evaluate(Counting(), zeros, "random", (10,))
    assert fits == []  # refused before the fit
    zeros.interactions.data[:] = -1  # all dislikes: no threshold helps
    with pytest.raises(ValueError, match=r"range -1 to -1.*dislikes, never relevant"):
        evaluate(Counting(), zeros, "random", (10,))
    zeros.interactions.data[:] = 0
    got = evaluate(create("popularity"), zeros, "random", (10,), threshold=0)
    split = split_random(zeros, 0.2, seed=0)
    assert got["metrics"]["users"] == np.count_nonzero(np.diff(split.test.indptr))
    path = tmp_path / "zeros.csv"
    path.write_text("user,item,rating\n" + "".join(f"u{i % 40},i{i % 23},0\n" for i in range(600)))
    assert main(["train", "--data", str(path), "--algo", "als", "--name", "z",
                 "--models", str(tmp_path / "m")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "count zeros as relevant with --threshold 0" in err and "--no-evaluate" in err


def test_ml100k_popularity_recall_matches_numpy_reference(ml100k_path):
    ds = load_dataset(ml100k_path)
    got = evaluate(create("popularity"), ds, "random", (20,), fraction=0.2, seed=0)
    want = numpy_popularity_recall(ds, 20)
    assert got["metrics"]["recall@20"] == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_compare_uses_one_split_and_equals_each_evaluation(small, monkeypatch):
    """compare() makes the split once and gives every model exactly the figures
    evaluate() gives it alone on the same seed (same held-out events)."""
    import recserve.evaluation as ev

    made = []
    real = ev.make_split
    monkeypatch.setattr(ev, "make_split", lambda *a, **k: made.append(1) or real(*a, **k))
    entries = [("pop", create("popularity")), ("knn", create("itemknn", k=20))]
    both = ev.compare(entries, small, "random", (10, 20), seed=3)
    assert len(made) == 1 and list(both) == ["pop", "knn"]
    for label, algo, params in (("pop", "popularity", {}), ("knn", "itemknn", {"k": 20})):
        alone = evaluate(create(algo, **params), small, "random", (10, 20), seed=3)
        assert both[label]["metrics"] == alone["metrics"]
    assert both["knn"]["metrics"]["recall@20"] > both["pop"]["metrics"]["recall@20"]


def test_a_threshold_no_held_out_value_reaches_is_named_before_fitting(small, monkeypatch):
    model = create("als", iterations=1)
    fitted = []
    monkeypatch.setattr(model, "fit", lambda ds: fitted.append(ds))
    hi = float(small.interactions.data.max())
    with pytest.raises(ValueError, match=rf"^threshold: no held-out value is >= {hi + 1:g} \("):
        evaluate(model, small, "random", (10,), fraction=0.2, threshold=hi + 1)
    assert fitted == []  # refused before the fit, which would have been wasted
    got = evaluate(create("popularity"), small, "random", (10,), fraction=0.2, threshold=hi)
    assert got["metrics"]["users"] >= 1


def test_a_given_test_file_is_held_out_on_the_training_ids(tmp_path):
    from recserve.evaluation import given_split

    train_csv = tmp_path / "train.csv"
    train_csv.write_text(
        "user,item,rating\nu1,i1,5\nu1,i2,3\nu2,i1,4\nu2,i3,2\nu3,i3,5\nu3,i4,1\nu4,i1,2\n"
    )
    test_csv = tmp_path / "test.csv"
    # i9 and u7 are not in training: they cannot be recommended to or for.
    test_csv.write_text("user,item,rating\nu1,i4,5\nu2,i9,3\nu7,i1,2\nu3,i2,4\nu4,i3,1\n")
    train, test = load_dataset(train_csv), load_dataset(test_csv)
    split, counts = given_split(train, test)
    assert counts == {"events": 5, "kept": 3, "unknown_users": 1, "unknown_items": 1}
    assert split.train is train
    m = split.test.tocoo()
    got = {
        (train.users.ids([r])[0], train.items.ids([c])[0]): float(v)
        for r, c, v in zip(m.row, m.col, m.data, strict=True)
    }
    assert got == {("u1", "i4"): 5.0, ("u3", "i2"): 4.0, ("u4", "i3"): 1.0}
    # Popularity by count (i1: 3, i3: 2, i2 and i4: 1, ties by index) with seen
    # items excluded: u1 gets i3 then i4, u3 i1 then i2, u4 i3 then i2.
    out = evaluate(create("popularity"), train, "random", (2,), split=split)
    assert out["metrics"]["users"] == 3
    assert out["metrics"]["recall@2"] == pytest.approx(1.0)
    unknown_only = tmp_path / "other.csv"
    unknown_only.write_text("user,item,rating\nx,i1,1\n")
    with pytest.raises(ValueError, match=r"^test: none of its 1 events"):
        given_split(train, load_dataset(unknown_only))
