"""BPR: the SGD step against numpy, the sampler, determinism, and ranking quality."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.evaluation import evaluate
from recserve.kernels import sgd
from recserve.models import create
from recserve.models.base import KnownUserRow


def test_bpr_step_equals_numpy():
    rng = np.random.default_rng(0)
    p = (rng.standard_normal((3, 4)) * 0.3).astype(np.float32)
    q = (rng.standard_normal((5, 4)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(5) * 0.1).astype(np.float32)
    u, i, j, lr, reg = 1, 2, 4, 0.05, 0.01
    pu, qi, qj = p[u].astype(float), q[i].astype(float), q[j].astype(float)
    z = 1.0 / (1.0 + np.exp(pu @ (qi - qj) + b[i] - b[j]))  # sigmoid(-(x_ui - x_uj))
    want_p = pu + lr * (z * (qi - qj) - reg * pu)
    want_qi = qi + lr * (z * pu - reg * qi)
    want_qj = qj + lr * (-z * pu - reg * qj)
    want_bi, want_bj = b[i] + lr * (z - reg * b[i]), b[j] + lr * (-z - reg * b[j])
    sgd.bpr_apply(
        np.array([u], np.int32), np.array([i], np.int32), np.array([j], np.int32), p, q, b, lr, reg
    )
    np.testing.assert_allclose(p[u], want_p, rtol=1e-5)
    np.testing.assert_allclose(q[i], want_qi, rtol=1e-5)
    np.testing.assert_allclose(q[j], want_qj, rtol=1e-5)
    np.testing.assert_allclose([b[i], b[j]], [want_bi, want_bj], rtol=1e-5)


def test_bpr_apply_checks_its_inputs():
    p, q, b = np.zeros((3, 4), np.float32), np.zeros((5, 4), np.float32), np.zeros(5, np.float32)

    def ids(*v):
        return np.array(v, np.int32)

    with pytest.raises(ValueError, match=r"users: ids must lie in \[0, 3\)"):
        sgd.bpr_apply(ids(3), ids(0), ids(1), p, q, b, 0.1, 0.0)
    with pytest.raises(ValueError, match=r"neg_items: ids must lie in \[0, 5\)"):
        sgd.bpr_apply(ids(0), ids(0), ids(-1), p, q, b, 0.1, 0.0)
    with pytest.raises(ValueError, match=r"pos_items: length 2, expected 1 \(users\)"):
        sgd.bpr_apply(ids(0), ids(0, 1), ids(1), p, q, b, 0.1, 0.0)
    with pytest.raises(ValueError, match="P and Q need the same factors"):
        sgd.bpr_apply(ids(0), ids(0), ids(1), p, q[:, :3].copy(), b, 0.1, 0.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        sgd.bpr_apply(ids(0), ids(0), ids(1), p, q, b, 0.0, 0.0)
    q.setflags(write=False)
    with pytest.raises(ValueError, match="Q: must be writeable"):
        sgd.bpr_apply(ids(0), ids(0), ids(1), p, q, b, 0.1, 0.0)


def test_sampler_never_picks_a_positive_and_covers_the_rest():
    x = sp.random(50, 30, density=0.3, random_state=1, format="lil", dtype=np.float32)
    x[7, :] = 1.0  # a user with every item: always skipped
    x = x.tocsr()
    x.sort_indices()
    triples = sgd.bpr_sample(x.indptr, x.indices, 30, 20_000, seed=3)
    drawn = triples[triples[:, 0] >= 0]
    dense = x.toarray() > 0
    assert drawn.shape[0] > 15_000
    assert dense[drawn[:, 0], drawn[:, 1]].all()  # i is a positive
    assert not dense[drawn[:, 0], drawn[:, 2]].any()  # j never is
    assert 7 not in set(drawn[:, 0])
    negatives = np.bincount(drawn[:, 2], minlength=30)
    assert (negatives > 0).all()  # every item can be a negative for someone
    # Popularity-proportional negatives: still never a positive, and popular
    # items are drawn more often than under uniform sampling.
    pop = sgd.bpr_sample(x.indptr, x.indices, 30, 20_000, seed=3, popular_negatives=True)
    pop = pop[pop[:, 0] >= 0]
    assert not dense[pop[:, 0], pop[:, 2]].any()
    counts = dense.sum(axis=0)
    top = np.argsort(-counts)[:5]
    share = lambda d: np.isin(d[:, 2], top).mean()  # noqa: E731
    assert share(pop) > share(drawn)


def test_one_thread_is_deterministic(small):
    a = create("bpr", factors=8, epochs=3)
    a.n_threads = 1
    b = create("bpr", factors=8, epochs=3)
    b.n_threads = 1
    np.testing.assert_array_equal(a.fit(small).Q, b.fit(small).Q)


def test_bpr_beats_popularity(small):
    pop = evaluate(create("popularity"), small, "random", (20,))["metrics"]["recall@20"]
    model = create("bpr", factors=32, epochs=60, lr=0.05)
    model.n_threads = 1
    bpr = evaluate(model, small, "random", (20,))["metrics"]["recall@20"]
    assert bpr > 1.1 * pop, (bpr, pop)


def _positives(n_users=400, n_items=64, seed=5):
    rng = np.random.default_rng(seed)
    x = sp.random(n_users, n_items, density=0.15, random_state=rng, format="csr", dtype=np.float32)
    x.sort_indices()
    return x


def test_threads_draw_independent_streams():
    # Each thread's stream starts from the seed and its id hashed together. The
    # old start (seed + thread * SplitMix64's increment) made thread 1's stream
    # thread 0's shifted by one draw: with popular negatives thread 1's j at
    # step k was always thread 0's i at step k + 1.
    x = _positives(2000, 500)
    t0 = sgd.bpr_sample(x.indptr, x.indices, 500, 20_000, seed=11, popular_negatives=True)
    t1 = sgd.bpr_sample(x.indptr, x.indices, 500, 20_000, seed=11, popular_negatives=True, thread=1)
    chance = np.square(np.bincount(x.indices, minlength=500) / x.nnz).sum()
    for lag in range(-3, 4):
        a, b = t0[max(lag, 0) : 20_000 + min(lag, 0)], t1[max(-lag, 0) : 20_000 - max(lag, 0)]
        for col_a, col_b in ((1, 2), (2, 1), (1, 1), (0, 0)):
            same = (a[:, col_a] == b[:, col_b]) & (a[:, col_a] >= 0)
            assert same.mean() < 5 * chance + 0.01, (lag, col_a, col_b, same.mean())


def test_parallel_steps_keep_their_own_triples():
    # One-hot item factors and no regularization: a step adds to P[u, i] and
    # subtracts from P[u, j], so P[u, a] > 0 only where a is one of u's
    # positives and < 0 only where it is not. A step that mixed one thread's
    # user with another thread's items (shared u, i, j: a race the kernel once
    # had) breaks that sign pattern.
    x = _positives()
    n_users, n_items = x.shape
    positive = x.toarray() > 0
    for negatives in (False, True):
        p = np.zeros((n_users, n_items), np.float32)
        q = np.eye(n_items, dtype=np.float32)
        b = np.zeros(n_items, np.float32)
        sgd.bpr_epochs(
            x.indptr,
            x.indices,
            p,
            q,
            b,
            0.05,
            0.0,
            seed=2,
            epochs=20,
            n_threads=2,
            update_items=False,
            popular_negatives=negatives,
        )
        assert (p[~positive] <= 0).all() and (p[positive] >= 0).all()
        assert (p[positive] > 0).mean() > 0.9  # the steps did run


def test_epochs_validates_and_reports_progress():
    x = _positives(50, 20)
    rng = np.random.default_rng(0)
    p = (rng.random((50, 8), dtype=np.float32) - 0.5) / 8
    q = (rng.random((20, 8), dtype=np.float32) - 0.5) / 8
    b = np.zeros(20, np.float32)
    seen = []
    last = sgd.bpr_epochs(
        x.indptr,
        x.indices,
        p,
        q,
        b,
        0.05,
        0.01,
        seed=0,
        epochs=30,
        on_epoch=lambda e, c: seen.append((e, c)),
    )
    assert [e for e, _ in seen] == list(range(30))
    assert last == seen[-1][1] and seen[-1][1] > seen[0][1]  # it learns to rank
    with pytest.raises(ValueError, match="epochs"):
        sgd.bpr_epochs(x.indptr, x.indices, p, q, b, 0.05, 0.01, seed=0, epochs=-1)
    with pytest.raises(ValueError, match="indptr"):
        sgd.bpr_epochs(x.indptr[:-1], x.indices, p, q, b, 0.05, 0.01, seed=0)


def test_fold_in_kernel_replays_the_sampled_steps_with_items_frozen():
    # One epoch: the triples bpr_sample draws for the row, applied by the BPR
    # step in numpy to the user only, from zero factors.
    rng = np.random.default_rng(2)
    q = (rng.standard_normal((40, 6)) * 0.4).astype(np.float32)
    b = (rng.standard_normal(40) * 0.2).astype(np.float32)
    items = np.sort(rng.choice(40, 9, replace=False)).astype(np.int32)
    lr, reg, seed = 0.05, 0.01, 77
    want = np.zeros(6)
    indptr = np.array([0, items.size], np.int64)
    for _, i, j in sgd.bpr_sample(indptr, items, 40, items.size, seed):
        assert j >= 0
        z = 1.0 / (1.0 + np.exp(want @ (q[i] - q[j]) + b[i] - b[j]))
        want = want + lr * (z * (q[i] - q[j]) - reg * want)
    got = sgd.bpr_fold_in(items, q, b, lr, reg, seed, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert got.any()


def test_fold_in_kernel_is_the_training_kernel_on_one_frozen_row():
    rng = np.random.default_rng(3)
    q = (rng.standard_normal((300, 16)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(300) * 0.1).astype(np.float32)
    q.setflags(write=False)  # a memory-mapped bundle's factors
    # Up to half the catalogue (150 of 300) and all of it; rows denser than
    # half draw their negatives from a pool (the next test).
    for n, seed in [(1, 0), (10, 5), (10, 2**63 + 11), (57, 9), (150, 1), (300, 2)]:
        items = np.sort(rng.choice(300, n, replace=False)).astype(np.int32)
        if n == 10:
            items[4] = items[3]  # a repeated positive counts twice in both
        p = np.zeros((1, 16), np.float32)
        sgd.bpr_epochs(
            np.array([0, n], np.int64), items, p, q, b, 0.03, 0.02, seed,
            epochs=20, n_threads=1, update_items=False,
        )  # fmt: skip
        np.testing.assert_array_equal(sgd.bpr_fold_in(items, q, b, 0.03, 0.02, seed, 20), p[0])
    empty = sgd.bpr_fold_in(np.zeros(0, np.int32), q, b, 0.03, 0.02, 0, 20)
    assert empty.shape == (16,) and not empty.any()


def test_a_fold_in_of_most_of_the_catalogue_draws_negatives_from_the_rest():
    """Past half the catalogue a fold-in draws each negative from the items
    that are not positives, at once: redrawing while a positive took ~n_items
    / n_rest tries a step (all but one of 2,500 items: 2.7 s). The draws
    (bpr_sample fold_in=True) are never positives and uniform over the rest;
    one epoch of bpr_fold_in is those triples applied by the BPR step in numpy."""
    rng = np.random.default_rng(12)
    q = (rng.standard_normal((300, 6)) * 0.4).astype(np.float32)
    b = (rng.standard_normal(300) * 0.2).astype(np.float32)
    for n in (151, 250, 299):
        items = np.sort(rng.choice(300, n, replace=False)).astype(np.int32)
        items[7] = items[6]  # a repeated positive: the pool is over distinct items
        rest = np.setdiff1d(np.arange(300), items)
        indptr = np.array([0, n], np.int64)
        draws = sgd.bpr_sample(indptr, items, 300, 30_000, 5, fold_in=True)
        counts = np.bincount(draws[:, 2], minlength=300)
        assert (draws[:, 2] >= 0).all() and counts[items].sum() == 0
        expect = 30_000 / rest.size
        assert np.abs(counts[rest] - expect).max() <= 5 * np.sqrt(expect) + 1
        lr, reg, seed = 0.05, 0.01, 31 + n
        want = np.zeros(6)
        for _, i, j in sgd.bpr_sample(indptr, items, 300, n, seed, fold_in=True):
            z = 1.0 / (1.0 + np.exp(want @ (q[i] - q[j]) + b[i] - b[j]))
            want = want + lr * (z * (q[i] - q[j]) - reg * want)
        got = sgd.bpr_fold_in(items, q, b, lr, reg, seed, 1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    every = np.arange(300, dtype=np.int32)  # no negative at all: no step
    assert not sgd.bpr_fold_in(every, q, b, 0.05, 0.01, 1, 3).any()
    assert (sgd.bpr_sample(np.array([0, 300], np.int64), every, 300, 50, 1, fold_in=True) < 0).all()
    with pytest.raises(ValueError, match="fold_in: one row"):
        sgd.bpr_sample(np.array([0, 1, 2], np.int64), every[:2], 300, 5, 1, fold_in=True)


def test_fold_in_kernel_continues_from_given_factors():
    # start=: the training kernel on one frozen row whose p holds those factors.
    rng = np.random.default_rng(4)
    q = (rng.standard_normal((120, 8)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(120) * 0.1).astype(np.float32)
    for n, seed in [(1, 3), (12, 8), (60, 2**62)]:
        items = np.sort(rng.choice(120, n, replace=False)).astype(np.int32)
        start = (rng.standard_normal(8) * 0.2).astype(np.float32)
        p = start[None, :].copy()
        sgd.bpr_epochs(
            np.array([0, n], np.int64), items, p, q, b, 0.03, 0.02, seed,
            epochs=4, n_threads=1, update_items=False,
        )  # fmt: skip
        got = sgd.bpr_fold_in(items, q, b, 0.03, 0.02, seed, 4, start=start)
        np.testing.assert_array_equal(got, p[0])
        assert not np.shares_memory(got, start) and not np.array_equal(got, start)
        unmoved = sgd.bpr_fold_in(items, q, b, 0.03, 0.02, seed, 0, start=start)
        np.testing.assert_array_equal(unmoved, start)
    with pytest.raises(ValueError, match="start: expected 8 factors, got 7"):
        sgd.bpr_fold_in(items, q, b, 0.03, 0.02, 0, 2, start=np.zeros(7, np.float32))
    with pytest.raises(TypeError, match="start: expected dtype float32"):
        sgd.bpr_fold_in(items, q, b, 0.03, 0.02, 0, 2, start=np.zeros(8))


def test_a_known_users_events_continue_from_their_trained_factors(small):
    # A known user's row with newer events (KnownUserRow): the fold-in's SGD from
    # their trained factors, for the fold-in's passes times the share of the
    # row's positives that changed, at least 3; nothing changed, no step.
    model = create("bpr", factors=8, epochs=5, fold_in_epochs=40).fit(small)
    q, b = np.ascontiguousarray(model.Q), np.ascontiguousarray(model.bias)
    lr, reg = model.params["lr"], model.params["reg"]
    rng = np.random.default_rng(6)

    def folded(u, items, values):
        row = KnownUserRow.of(model.history_matrix([items], [values]), u)
        return model.fold_in(row)[0]

    def continued(u, positives, passes):
        seed = int(np.uint64(int(positives.sum()) + 7919 * positives.size))
        start = np.array(model.P[u], np.float32)
        return sgd.bpr_fold_in(positives, q, b, lr, reg, seed, passes, start=start)

    for u in (1, 50, 700):
        own, own_v = model.training_row(u)
        n = own.size
        # Re-recorded with another positive value: the same positives.
        np.testing.assert_array_equal(folded(u, own, own_v + 1), model.P[u])
        # One new positive.
        new = rng.choice(np.setdiff1d(np.arange(small.n_items), own), 12, replace=False)
        items = np.sort(np.r_[own, new[:1]]).astype(np.int32)
        want = continued(u, items, max(3, -(-40 // (n + 1))))
        np.testing.assert_array_equal(folded(u, items, np.ones(n + 1)), want)
        # A training positive disliked now: one change, that item no positive.
        values = own_v.copy()
        values[0] = -1.0
        want = continued(u, np.delete(own, 0).astype(np.int32), max(3, -(-40 // (n - 1))))
        np.testing.assert_array_equal(folded(u, own, values), want)
        # Most positives changed (training ones gone, new ones in): nearly the
        # whole fold-in's passes.
        items = np.sort(np.r_[own[:2], new]).astype(np.int32)
        changed = (n - 2) + new.size
        want = continued(u, items, min(40, -(-40 * changed // items.size)))
        np.testing.assert_array_equal(folded(u, own[:2].tolist() + new.tolist(), None), want)


def test_a_long_history_runs_fewer_fold_in_passes(small):
    # fold_in_max_steps bounds a fold-in's steps (passes x positives): a
    # history longer than max_steps / fold_in_epochs runs ceil(max_steps / n)
    # passes, at least 3; 0 lifts the bound. A known user's continued SGD takes
    # the smaller of that and its own share of passes.
    model = create("bpr", factors=8, epochs=5, fold_in_epochs=40, fold_in_max_steps=400).fit(small)
    q, b = np.ascontiguousarray(model.Q), np.ascontiguousarray(model.bias)
    lr, reg = model.params["lr"], model.params["reg"]
    rng = np.random.default_rng(8)

    def kernel(items, passes, start=None):
        seed = int(np.uint64(int(items.sum()) + 7919 * items.size))
        return sgd.bpr_fold_in(items, q, b, lr, reg, seed, passes, start=start)

    for n, passes in ((5, 40), (10, 40), (11, 37), (60, 7), (150, 3), (290, 3)):
        items = np.sort(rng.choice(small.n_items, n, replace=False)).astype(np.int32)
        got = model.fold_in(model.history_matrix([items]))[0]
        np.testing.assert_array_equal(got, kernel(items, passes))
    model.params["fold_in_max_steps"] = 0
    unbounded = model.fold_in(model.history_matrix([items]))[0]
    np.testing.assert_array_equal(unbounded, kernel(items, 40))
    model.params["fold_in_max_steps"] = 400
    own, _ = model.training_row(3)
    others = np.setdiff1d(np.arange(small.n_items), own)
    items = np.sort(np.r_[own[:1], rng.choice(others, 99, replace=False)]).astype(np.int32)
    row = KnownUserRow.of(model.history_matrix([items]), 3)  # most changed: 40 passes by share
    want = kernel(items, 4, start=np.array(model.P[3], np.float32))  # ceil(400 / 100)
    np.testing.assert_array_equal(model.fold_in(row)[0], want)
    with pytest.raises(ValueError, match="fold_in_max_steps"):
        create("bpr", fold_in_max_steps=-1)


def test_fold_in_kernel_checks_its_inputs():
    q, b = np.zeros((5, 4), np.float32), np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"items: item ids must lie in \[0, 5\), got 5"):
        sgd.bpr_fold_in(np.array([1, 5], np.int32), q, b, 0.1, 0.0, 0, 3)
    with pytest.raises(ValueError, match="items: must be sorted"):
        sgd.bpr_fold_in(np.array([3, 1], np.int32), q, b, 0.1, 0.0, 0, 3)
    with pytest.raises(TypeError, match="items: expected dtype int32"):
        sgd.bpr_fold_in(np.array([1, 2], np.int64), q, b, 0.1, 0.0, 0, 3)
    with pytest.raises(ValueError, match="epochs"):
        sgd.bpr_fold_in(np.array([1], np.int32), q, b, 0.1, 0.0, 0, -1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        sgd.bpr_fold_in(np.array([1], np.int32), q, b, 0.0, 0.0, 0, 3)
    with pytest.raises(ValueError, match="bias one entry per item"):
        sgd.bpr_fold_in(np.array([1], np.int32), q, b[:4].copy(), 0.1, 0.0, 0, 3)


def test_a_learning_rate_that_diverges_stops_training_with_a_hint(small):
    # lr=5 left NaN factors: the model was published and answered nothing. The
    # first epoch's biases show it; fit stops there and names the parameter.
    from recserve.models.base import TrainingError

    model = create("bpr", factors=8, epochs=50, lr=5.0)
    with pytest.raises(
        TrainingError, match=r"^bpr: training diverged \(bias \(epoch 1\).*lower lr \(now 5\)"
    ):
        model.fit(small)
    create("bpr", factors=8, epochs=2).fit(small)  # the default lr trains
