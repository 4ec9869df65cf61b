"""Scratch buffers of the serving path (one-user rows, score_one scratch,
popularity's mask, the router's hybrid rows) are pooled per call in progress,
not kept per thread: the thread-pool server has dozens of threads, and on a
large catalogue each buffer is megabytes. Calls from many threads get the
answers one thread gets."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from recserve.config import Hybrid, ServerConfig
from recserve.feedback import OnlineState
from recserve.models import create
from recserve.models.base import ScratchPool
from recserve.serving import Catalog, RecQuery, Router

THREADS = 12


def one_at_a_time(fn, calls: list) -> list:
    """Run calls from THREADS threads, never two at once (a lock): a per-thread
    buffer would be made THREADS times, a pooled one once."""
    lock = threading.Lock()
    out: list = [None] * len(calls)

    def work(t: int) -> None:
        for i in range(t, len(calls), THREADS):
            with lock:
                out[i] = fn(*calls[i])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def all_at_once(fn, calls: list) -> list:
    out: list = [None] * len(calls)
    errors: list = []

    def work(t: int) -> None:
        try:
            for i in range(t, len(calls), THREADS):
                out[i] = fn(*calls[i])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:1]
    return out


def test_a_pool_hands_out_distinct_buffers_and_reuses_returned_ones():
    made = []
    pool = ScratchPool(lambda: made.append(object()) or made[-1])
    a, b = pool.take(), pool.take()
    assert a is not b and len(made) == 2 and len(pool) == 0
    pool.give(a)
    assert pool.take() is a and len(made) == 2
    pool.give(a)
    pool.give(b)
    # Many threads taking and giving at once: never the same buffer twice at once.
    held: set[int] = set()
    clash: list[int] = []
    guard = threading.Lock()

    def work() -> None:
        for _ in range(2_000):
            x = pool.take()
            with guard:
                if id(x) in held:
                    clash.append(id(x))
                held.add(id(x))
            with guard:
                held.discard(id(x))
            pool.give(x)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not clash and len(pool) == len(made) <= 10


@pytest.fixture(scope="module")
def fitted(small):
    return {
        a: create(a).fit(small) for a in ("itemknn", "userknn", "ease", "popularity", "content")
    }


@pytest.mark.parametrize("algo", ["itemknn", "userknn", "ease", "popularity", "content"])
def test_one_user_calls_from_many_threads_make_one_buffer(fitted, small, algo):
    m = fitted[algo]
    users = [(u, 10) for u in range(0, small.n_users, 7)]
    want = [m.recommend_user(u, k) for u, k in users]
    got = one_at_a_time(m.recommend_user, users)
    for (gi, gs), (wi, ws) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gs, ws)
    pools = {
        "itemknn": lambda: m._one_cache[6],
        "userknn": lambda: m._one_cache[6],
        "content": lambda: m._one_cache[6],
        "ease": lambda: m._rows_free[1],
        "popularity": lambda: m._masks_free[1],
    }
    assert len(pools[algo]()) == 1
    # Unsynchronised threads: the same answers.
    got = all_at_once(m.recommend_user, users)
    for (gi, gs), (wi, ws) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gs, ws)


def test_similar_items_and_fold_in_from_many_threads_make_one_buffer(fitted, small):
    knn, users = fitted["itemknn"], fitted["userknn"]
    items = [(i, 10) for i in range(0, small.n_items, 5)]
    want = [knn.similar_items(i, k) for i, k in items]
    got = one_at_a_time(knn.similar_items, items)
    assert all(np.array_equal(g[0], w[0]) for g, w in zip(got, want, strict=True))
    assert len(knn._similar_cache[2]) == 1
    got = one_at_a_time(users.similar_items, items)
    assert len(users._item_users_cache[4]) == 1
    histories = [([i, (i * 7) % small.n_items, (i * 13) % small.n_items],) for i in range(60)]
    want = [users.recommend_from_history(h) for (h,) in histories]
    got = one_at_a_time(users.recommend_from_history, histories)
    assert all(np.array_equal(g[0], w[0]) for g, w in zip(got, want, strict=True))
    assert len(users._fold_cache[4]) == 1
    got = all_at_once(users.recommend_from_history, histories)
    assert all(np.array_equal(g[0], w[0]) for g, w in zip(got, want, strict=True))


def test_the_routers_rows_are_pooled_too(small, tmp_path):
    for algo in ("als", "itemknn", "content"):
        params = {"factors": 8, "iterations": 3} if algo == "als" else {}
        create(algo, **params).fit(small).save(tmp_path, algo, dataset=small)
    cfg = ServerConfig(
        models=str(tmp_path),
        hybrids={"mix": Hybrid("mix", {"als": 0.5, "itemknn": 0.3, "content": 0.2})},
    )
    catalog = Catalog(cfg.models)
    catalog.start()
    catalog.wait(60)
    try:
        router = Router(cfg, catalog, OnlineState())
        ids = small.users.ids(np.arange(0, small.n_users, 9))
        some = small.items.ids([1, 2, 3])
        queries = []
        for u in ids:
            queries.append((RecQuery(user_id=u, model="mix"),))  # the hybrid's rows
            queries.append((RecQuery(user_id=u, model="itemknn", exclude=some),))  # one row
            queries.append((RecQuery(user_id="new", model="als", history=[(some[0], 1.0)]),))
        want = [router.recommend(*q).item_ids for q in queries]
        got = one_at_a_time(router.recommend, queries)
        assert [g.item_ids for g in got] == want
        assert router._pools and all(len(p) == 1 for p in router._pools.values())
        got = all_at_once(router.recommend, queries)
        assert [g.item_ids for g in got] == want
    finally:
        catalog.close()
