"""FAISS retrieval (server/index.py) against brute-force numpy, and in the models."""

from __future__ import annotations

import copy
import threading

import faiss
import numpy as np
import pytest

from recserve import index as ix
from recserve.data import generate, to_dataset
from recserve.index import ItemIndex, SearchConfig, SimilarIndex
from recserve.models import bundle, create, embedding, load_named
from tests.service_helpers import flip_byte


def brute(q, y, k, banned=None, allowed=None):
    """Exact top-k by inner product, ties by lower index, as lists per row."""
    out = []
    for r in range(q.shape[0]):
        s = y.astype(np.float64) @ q[r].astype(np.float64)
        ok = np.ones(y.shape[0], bool)
        if banned is not None:
            ok[banned[r]] = False
        if allowed is not None and len(allowed[r]):
            mask = np.zeros_like(ok)
            mask[allowed[r]] = True
            ok &= mask
        idx = np.flatnonzero(ok)
        order = np.lexsort((idx, -s[idx]))[:k]
        out.append(idx[order].tolist())
    return out


def csr(lists):
    ptr = np.zeros(len(lists) + 1, np.int64)
    np.cumsum([len(x) for x in lists], out=ptr[1:])
    idx = np.concatenate([np.asarray(x, np.int32) for x in lists]) if ptr[-1] else np.zeros(0)
    return ptr, idx.astype(np.int32)


def valid(row):
    return [int(x) for x in row if x >= 0]


@pytest.fixture(scope="module")
def factors():
    """ALS factors of a synthetic long-tail dataset (3,000 items) and each user's seen items."""
    ds = to_dataset(generate(4_000, 3_000, 160_000, seed=11))
    m = create("als", factors=32, iterations=8, index="exact").fit(ds)
    seen = [m.user_items[u].indices for u in range(400)]
    return np.asarray(m.user_factors[:400]), np.asarray(m.item_factors), seen


def test_flat_equals_brute_force_with_exclusions_and_candidates():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((30, 16)).astype(np.float32)
    banned = [rng.choice(500, rng.integers(0, 60), replace=False) for _ in range(30)]
    allowed = [rng.choice(500, 25, replace=False) if r % 3 == 0 else [] for r in range(30)]
    index = ItemIndex.build(y, "flat")
    items, scores = index.search(q, 10, csr(banned), csr(allowed))
    assert [valid(r) for r in items] == brute(q, y, 10, banned, allowed)
    want = np.take_along_axis(q @ y.T, items.astype(np.int64), axis=1)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    one_i, _ = index.search(q[:1], 10, csr(banned[:1]))  # a single query, the 1-thread path
    assert valid(one_i[0]) == brute(q[:1], y, 10, banned[:1])[0]


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
@pytest.mark.parametrize("few_seen", [False, True])
def test_ann_recall_at_defaults(factors, kind, few_seen):
    users, items, seen = factors
    if few_seen:  # k + the exclusions is all FAISS is asked for: few exclusions, few asked
        seen = [s[:2] for s in seen]
    index = ItemIndex.build(items, kind)
    got, _ = index.search(users, 10, csr(seen))
    want = brute(users, items, 10, seen)
    recall = np.mean([len(set(valid(g)) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= (0.97 if kind == "ivfpq" else 0.98), recall
    one = [index.search(users[r : r + 1], 10, csr(seen[r : r + 1]))[0][0] for r in range(50)]
    recall = np.mean(
        [len(set(valid(g)) & set(w)) / 10 for g, w in zip(one, want[:50], strict=True)]
    )
    assert recall >= (0.97 if kind == "ivfpq" else 0.98), recall
    for r, row in enumerate(got):
        assert len(valid(row)) == 10 and not set(valid(row)) & set(seen[r].tolist())


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_exclusions_never_leak_and_never_shorten(factors, kind):
    users, items, _ = factors
    n = items.shape[0]
    rng = np.random.default_rng(5)
    # 97% of the catalogue excluded for some rows: ANN must still return k eligible items.
    banned = [rng.choice(n, int(n * f), replace=False) for f in (0.0, 0.5, 0.9, 0.97)]
    q = users[:4]
    index = ItemIndex.build(items, kind)
    got, scores = index.search(q, 50, csr(banned))
    for r in range(4):
        row = valid(got[r])
        assert len(row) == 50 and len(set(row)) == 50
        assert not set(row) & set(banned[r].tolist())
        assert np.all(np.diff(scores[r]) <= 1e-6)
    # Fewer eligible than k: exactly the eligible ones, then padding.
    almost = [np.setdiff1d(np.arange(n), [3, 7, 11])]
    got, _ = index.search(q[:1], 10, csr(almost))
    assert sorted(valid(got[0])) == [3, 7, 11] and (got[0][3:] == -1).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_zero_vectors_do_not_break_recall(factors, kind):
    users, items, seen = factors
    y = items.copy()
    zero = np.random.default_rng(1).choice(y.shape[0], y.shape[0] // 5, replace=False)
    y[zero] = 0.0
    y[zero[:10]] = 1e-30  # near-zero too
    index = ItemIndex.build(y, kind)
    got, scores = index.search(users, 10, csr(seen))
    assert np.isfinite(scores).all()
    want = brute(users, y, 10, seen)
    recall = np.mean([len(set(valid(g)) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= 0.98, recall


def test_concurrent_searches_with_different_parameters_agree_with_serial(factors):
    users, items, seen = factors
    index = ItemIndex.build(items, "hnsw")
    before = faiss.omp_get_max_threads()
    # ef_search 4 < k: such a search takes parameters of its own (the shared,
    # cached ones must not change under the other threads).
    cfgs = [SearchConfig(ef_search=ef) for ef in (4, 16, 64, 256)]
    serial = [
        np.vstack(
            [index.search(users[r : r + 1], 10, csr(seen[r : r + 1]), cfg=c)[0] for r in range(50)]
        )
        for c in cfgs
    ]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def run(j):
        try:
            start.wait(30)  # all eight search at once
            results[j] = [
                index.search(users[r : r + 1], 10, csr(seen[r : r + 1]), cfg=cfgs[j % 4])[0]
                for r in range(50)
            ]
        except BaseException as exc:  # reported below: a dead thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not [t for t in threads if t.is_alive()], "a search thread did not finish"
    assert not errors, errors
    assert sorted(results) == list(range(8))
    for j, rows in results.items():
        np.testing.assert_array_equal(np.vstack(rows), serial[j % 4])
    assert faiss.omp_get_max_threads() == before  # the main thread's setting is untouched


def test_shared_search_parameters_stay_as_configured(factors):
    # Parameters without a selector are made once per setting and shared by
    # every thread: a search asking for more than ef_search results, or with a
    # selector (the retry after exclusions), gets its own and changes none.
    users, items, seen = factors
    for kind, cfg in (("hnsw", SearchConfig(ef_search=4)), ("ivf", SearchConfig(nprobe=2))):
        index = ItemIndex.build(items, kind)
        index.search(users[:1], 3, cfg=cfg)
        shared = index._params(cfg, 1, None)
        index.search(users[:1], 50, csr(seen[:1]), cfg=cfg)
        index._retry(users[:1], 10, np.arange(400), cfg)
        assert index._params(cfg, 1, None) is shared
        if kind == "hnsw":
            assert shared.efSearch == 4
        else:
            assert shared.nprobe == 2 and shared.sel is None


@pytest.mark.parametrize("algo", ["als", "bpr", "svd", "bayes_mf"])
def test_models_rank_through_the_index_and_round_trip(tmp_path, algo):
    """Every inner-product model ranks through its index as it ranks exactly
    (biased MF's mu + b_u added back to the scores), and its bundle maps the
    index's item vectors from the file where they are composed ([q, b])."""
    ds = to_dataset(generate(1_500, 1_200, 60_000, seed=2))
    params = {"factors": 16, "iterations": 5} if algo == "als" else {"factors": 16, "epochs": 10}
    model = create(algo, **params, index="hnsw").fit(ds)
    exact = copy.copy(model)  # the same factors (BPR's Hogwild fit is not repeatable)
    exact.item_index = exact.similar_index = None
    users = np.arange(0, 1_500, 7)
    ei, es = exact.recommend(users, k=10)
    mi, ms = model.recommend(users, k=10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ei, mi, strict=True)])
    assert overlap >= 0.98
    same = (ei == mi).all(axis=1)
    assert same.mean() > 0.9
    np.testing.assert_allclose(ms[same], es[same], rtol=1e-5, atol=1e-5)
    hi, hs = model.recommend_from_history([1, 2, 3], k=10)
    he, hes = exact.recommend_from_history([1, 2, 3], k=10)
    assert len(set(hi) & set(he)) >= 9
    if list(hi) == list(he):
        np.testing.assert_allclose(hs, hes, rtol=1e-5, atol=1e-5)
    ui, us = model.recommend_user(int(users[3]), 10)
    np.testing.assert_array_equal(ui, mi[3])
    np.testing.assert_allclose(us, ms[3], rtol=1e-6)
    si, _ = model.similar_items(5, 10)
    se, _ = exact.similar_items(5, 10)
    assert 5 not in si and len(set(si) & set(se)) >= 9
    path = model.save(tmp_path, algo)
    doc = bundle.read_manifest(path)
    assert {"items.faiss", "similar.faiss"} <= set(doc["files"])
    assert ("index_vectors" in doc["arrays"]) == (algo != "als")  # ALS's are its factors
    loaded = load_named(tmp_path, algo)
    assert loaded.item_index is not None and loaded.item_index.kind == "hnsw"
    assert not loaded.item_index.vectors.flags.writeable  # mapped, not rebuilt
    np.testing.assert_array_equal(loaded.item_index.vectors, model.item_index.vectors)
    li, ls = loaded.recommend(users, k=10)
    np.testing.assert_array_equal(li, mi)
    np.testing.assert_allclose(ls, ms, rtol=1e-6)
    np.testing.assert_array_equal(loaded.similar_items(5, 10)[0], si)
    victim = path / "items.faiss"
    flip_byte(victim, victim.stat().st_size // 2)
    with pytest.raises(bundle.BundleError, match=r"items\.faiss"):
        load_named(tmp_path, algo)


def test_auto_picks_exact_for_small_catalogues():
    ds = to_dataset(generate(300, 200, 6_000, seed=1))
    m = create("als", factors=8, iterations=2).fit(ds)
    assert m.index_kind() == "exact" and m.item_index is None


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_index_file_round_trip_memory_mapped(factors, tmp_path, kind):
    users, items, seen = factors
    index = ItemIndex.build(items, kind)
    index.write(tmp_path / "i.faiss")
    loaded = ItemIndex.read(
        tmp_path / "i.faiss", kind, items, index.max_norm, mmap=True, head=index.head
    )
    a = index.search(users[:20], 10, csr(seen[:20]))
    b = loaded.search(users[:20], 10, csr(seen[:20]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="vectors"):
        ItemIndex.read(tmp_path / "i.faiss", kind, items[:-1], index.max_norm, head=index.head)


def brute_cosine(y: np.ndarray, item: int, k: int) -> tuple[list[int], np.ndarray]:
    """Exact cosine neighbours of one item (never itself), ties by lower index,
    as a model without an index answers: a zero vector has cosine 0 with every
    item, so it ranks below the positive cosines and above the negative ones."""
    norms = np.linalg.norm(y.astype(np.float64), axis=1)
    unit = np.divide(y, norms[:, None], out=np.zeros(y.shape), where=norms[:, None] > 0)
    s = unit @ unit[item]
    idx = np.flatnonzero(np.arange(y.shape[0]) != item)
    order = np.lexsort((idx, -s[idx]))[:k]
    return idx[order].tolist(), s[idx[order]]


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_similar_items_through_every_index_kind(factors, kind):
    """SimilarIndex against exact cosine: every neighbour it returns carries its
    exact cosine (re-ranked, never the index's approximation), recall at
    defaults; with k so large that the index comes back short (IVF probing one
    list), the exact answer; zero vectors answered, and returned only where
    exact cosine ranks them (score 0: past every positive cosine). With k past
    the catalogue, every other item, in the exact order."""
    _, items, _ = factors
    y = items.copy()
    rng = np.random.default_rng(4)
    zero = rng.choice(y.shape[0], 60, replace=False)
    y[zero] = 0.0
    index = SimilarIndex.build(y, kind, seed=0)
    asked = np.concatenate([rng.choice(y.shape[0], 40, replace=False), zero[:3]])
    got_i, got_s = index.similar(asked, y, 10)
    recalls = []
    for item, gi, gs in zip(asked, got_i, got_s, strict=True):
        want, want_s = brute_cosine(y, int(item), 10)
        assert int(item) not in gi.tolist()
        if item in zero:
            assert gi.tolist() == want and (gs == 0).all()
            continue
        assert not set(gi.tolist()) & set(zero.tolist())  # 10 positive cosines came first
        exact = {i: v for i, v in zip(*brute_cosine(y, int(item), y.shape[0]), strict=True)}
        np.testing.assert_allclose(gs, [exact[i] for i in gi.tolist()], rtol=1e-4, atol=1e-5)
        recalls.append(len(set(gi.tolist()) & set(want)) / 10)
    assert np.mean(recalls) >= 0.97, np.mean(recalls)
    n = y.shape[0]
    got_i, got_s = index.similar(asked[:5], y, n + 5)
    for item, gi, gs in zip(asked[:5], got_i, got_s, strict=True):
        want, want_s = brute_cosine(y, int(item), n + 5)
        assert sorted(valid(gi)) == sorted(want) and len(valid(gi)) == n - 1
        np.testing.assert_allclose(gs[: n - 1], want_s, rtol=1e-4, atol=1e-5)
    if kind == "hnsw":
        return  # a graph search returns as many as asked: never short
    # Far more neighbours than one probed list holds: the index comes back short
    # and the exact ranking answers instead.
    k = 1_500
    got_i, got_s = index.similar(asked[:3], y, k, SearchConfig(nprobe=1))
    for item, gi, gs in zip(asked[:3], got_i, got_s, strict=True):
        want, want_s = brute_cosine(y, int(item), k)
        np.testing.assert_allclose(gs, want_s, rtol=1e-4, atol=1e-5)
        assert len(set(gi.tolist()) & set(want)) >= k - 5  # ties at the cut may differ


def _recall_vs(exact, model, users):
    """recall@10 of `model`'s ranking against `exact`'s for `users`."""
    want, _ = exact.recommend(users, k=10)
    got, _ = model.recommend(users, k=10)
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)])


def test_calibration_widens_the_search_until_the_recall_target(tmp_path):
    """An IVF index asked to probe one list is widened at build until sampled
    users' recall@10 against exact retrieval reaches recall_target; the
    breadth found is what serving searches with, after a bundle round trip
    too. recall_target 0 leaves the configured breadth (and its recall)."""
    ds = to_dataset(generate(3_000, 4_000, 120_000, seed=5))
    params = {"factors": 32, "iterations": 4, "index": "ivf", "nprobe": 1}
    off = create("als", **params, recall_target=0).fit(ds)
    on = create("als", **params, recall_target=0.95).fit(ds)
    assert off.index_probes is None and on.index_probes is not None
    assert on.index_probes[0] > 1 and on.index_probes[1] > 1
    exact = copy.copy(on)
    exact.item_index = exact.similar_index = None
    users = np.arange(1, 3_000, 3)  # mostly users the calibration did not sample
    assert _recall_vs(exact, off, users) < 0.8
    assert _recall_vs(exact, on, users) >= 0.93
    items = np.arange(0, 4_000, 17)
    want = [exact.similar_items(int(i), 10)[0] for i in items]
    got = [on.similar_items(int(i), 10)[0] for i in items]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)]) >= 0.93
    on.save(tmp_path, "als")
    loaded = load_named(tmp_path, "als")
    assert loaded.index_probes == on.index_probes
    np.testing.assert_array_equal(loaded.recommend(users, 10)[0], on.recommend(users, 10)[0])


def test_an_auto_index_that_would_probe_most_lists_ranks_exactly(tmp_path, monkeypatch, caplog):
    """`auto` picks IVF from AUTO_ANN_ITEMS items; when the recall target needs
    more than a quarter of the lists, exact scoring is cheaper, so both
    indexes are dropped, the bundle stores none and says so (no warning about
    a missing index at load), and the model ranks exactly."""
    monkeypatch.setattr(embedding, "AUTO_ANN_ITEMS", 1_000)
    # Calibration that finds the target only at every list (the measurement
    # itself is tested above; this is the rule that acts on it).
    monkeypatch.setattr(embedding, "_breadth", lambda search, want, start, limit, t: (limit, t))
    ds = to_dataset(generate(2_000, 3_000, 80_000, seed=6))
    with caplog.at_level("INFO", logger="recserve.models.embedding"):
        model = create("svd", factors=24, epochs=5).fit(ds)
    assert model.index_kind() == "ivf"
    assert model.item_index is None and model.similar_index is None
    assert model.index_probes == (0, 0)
    assert caplog.text.count("scored exactly instead") == 2
    path = model.save(tmp_path, "svd")
    assert not {"items.faiss", "similar.faiss"} & set(bundle.read_manifest(path)["files"])
    caplog.clear()
    loaded = load_named(tmp_path, "svd")
    assert "no items.faiss" not in caplog.text
    assert loaded.item_index is None
    exact = create("svd", factors=24, epochs=5, index="exact").fit(ds)
    users = np.arange(0, 2_000, 9)
    np.testing.assert_array_equal(loaded.recommend(users, 10)[0], exact.recommend(users, 10)[0])


@pytest.mark.parametrize(
    ("start", "limit", "needed", "expect"),
    [
        (32, 1557, 64, 64),
        (32, 1557, 20, 32),
        (32, 1557, 3, 4),
        (32, 1557, 1, 1),
        (32, 100, 5_000, 100),
        (1, 8, 3, 4),
        (50, 8, 3, 4),
    ],
)
def test_breadth_doubles_or_halves_from_the_configured_one(start, limit, needed, expect):
    """_breadth: from start (clipped to 1..limit), doubled until the target is
    met (at most the limit), or halved while it still is; the narrowest that
    meets it, else the limit."""
    want = np.arange(10)[None, :]
    tried = []

    def search(probe):
        tried.append(probe)
        return want if probe >= needed else np.full_like(want, -1)

    probe, recall = embedding._breadth(search, want, start, limit, 0.95)
    assert probe == expect and recall == (1.0 if expect >= needed else 0.0)
    assert tried[0] == min(start, limit) and len(tried) == len(set(tried))
    assert min(tried) >= 1 and max(tried) <= limit


def test_breadth_narrows_only_while_nothing_is_lost():
    """Met at the configured breadth with recall 1.0, it halves while the
    sample's recall stays 1.0: a narrower breadth that still meets the target
    but loses items is not taken."""
    want = np.arange(100)[None, :]

    def search(probe):  # every item from 8 lists, 96 of 100 below
        return want if probe >= 8 else np.where(want < 96, want, -1)

    assert embedding._breadth(search, want, 32, 1557, 0.95) == (8, 1.0)


def test_norm_ranging_keeps_the_largest_norms_out_of_the_lists(monkeypatch):
    """Recommender factors' norms are heavy-tailed (they follow popularity),
    and the MIPS -> L2 reduction then gives nearly every item the same extra
    coordinate: IVF's lists serve the tail and miss the few large-norm items
    that fill the top 10. The reduced kinds keep the largest norms out of the
    lists and score them exactly: recall at a narrow nprobe, never an
    excluded item (head items included), exact scores."""
    rng = np.random.default_rng(0)
    y = rng.standard_normal((100_000, 32)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    y *= rng.lognormal(-2.5, 1.5, y.shape[0])[:, None].astype(np.float32)
    q = rng.standard_normal((200, 32)).astype(np.float32)
    norms = np.linalg.norm(y, axis=1)
    top = np.argsort(-norms)[:100]
    # Each query's own 5 best head items excluded (the head must reach past them).
    best_head = top[np.argsort(-(q @ y[top].T), axis=1)[:, :5]]
    banned = [np.concatenate([best_head[r], rng.choice(100_000, 20)]) for r in range(200)]
    want = brute(q, y, 10, banned)
    cfg = SearchConfig(nprobe=16)

    def recall(index):
        got, scores = index.search(q, 10, csr(banned), cfg=cfg)
        for r in range(len(got)):
            row = valid(got[r])
            assert len(set(row)) == 10 and not set(row) & set(banned[r].tolist())
            np.testing.assert_allclose(scores[r], y[row] @ q[r], rtol=1e-5, atol=1e-4)
        return np.mean([len(set(valid(g)) & set(w)) / 10 for g, w in zip(got, want, strict=True)])

    index = ItemIndex.build(y, "ivf")
    assert sorted(index.head.tolist()) == sorted(top.tolist())  # 0.1%: the 100 largest
    assert recall(index) >= 0.93
    monkeypatch.setattr(ix, "HEAD_SHARE", 0.0)
    flat_lists = ItemIndex.build(y, "ivf")
    assert flat_lists.head.size == 0 and recall(flat_lists) < 0.7


def test_a_retry_counts_the_head_after_the_ban_and_rows_stay_contiguous():
    """Found with the bugs fixed here: (1) a row whose first pass fell short was
    retried with FAISS told the banned ids, and the head's candidates appended
    unfiltered were counted as eligible, so a banned head item left the answer
    an item or three short; (2) several rows at k=1 without exclusions got their
    candidates in Fortran order (np.concatenate of an (n, 1) array and the
    broadcast head), which the kernel refuses (ValueError, an INTERNAL in the
    service). Every row: exactly min(k, eligible) items, none banned, none
    twice; at k=1 with every list probed, the brute-force answer."""
    rng = np.random.default_rng(5)
    y = rng.standard_normal((3_000, 16)).astype(np.float32)
    y *= rng.lognormal(0.0, 1.0, y.shape[0])[:, None].astype(np.float32)
    index = ItemIndex.build(y, "ivf")
    assert index.head.size == 3
    q = rng.standard_normal((300, 16)).astype(np.float32)
    short = []
    # Rows of 4, each with its own ban (the head's included); at k=10 and one
    # list probed, the retry finds 7-9 eligible ids for about a third of them.
    for lo in range(0, 300, 4):
        banned = [
            np.concatenate([index.head, rng.choice(3_000, 1_000, replace=False)]) for _ in range(4)
        ]
        got, _ = index.search(q[lo : lo + 4], 10, csr(banned), cfg=SearchConfig(nprobe=1))
        for r in range(4):
            row = valid(got[r])
            assert len(set(row)) == len(row) and not set(row) & set(banned[r].tolist())
            short.append(10 - len(row))
    assert max(short) == 0
    got, _ = index.search(q[:5], 1, cfg=SearchConfig(nprobe=10_000))  # every list
    assert [valid(g) for g in got] == brute(q[:5], y, 1)


@pytest.fixture(scope="module")
def three_k():
    """A generated long-tail log of 3,000 items: the reduced kinds keep a head of 3."""
    return to_dataset(generate(3_000, 3_000, 60_000, seed=2))


@pytest.mark.parametrize("algo", ["als", "bayes_mf"])
@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_index_served_models_keep_the_exact_contract_over_call_shapes(three_k, algo, kind):
    """Every call shape (several users; k from 1 to past the catalogue; no
    exclusions, one list for all or one per user; seen items kept or not;
    random candidates now and then) through an index-served model and the same
    model scoring exactly: the same number of items, each once, none banned,
    inside the candidates, best first, with the exact model's score for the
    same item. A longer scratch sweep of this kind found the two bugs fixed
    beside test_a_retry_counts_the_head_after_the_ban_and_rows_stay_contiguous;
    this one catches the first of them (k=1 rows in Fortran order), the
    crafted index there the second."""
    model = create(algo, factors=16, index=kind).fit(three_k)
    exact = copy.copy(model)
    exact.item_index = exact.similar_index = None
    n = three_k.n_items
    rng = np.random.default_rng(7)
    shapes = [
        (k, shape, seen_out)
        for k in (1, 5, 10, 50, 200, n - 3, n + 10)
        for shape in range(3)
        for seen_out in (True, False)
    ]
    for k, shape, seen_out in shapes:  # shape: no exclusions, one list for all, one per user
        users = rng.choice(three_k.n_users, rng.integers(2, 5), replace=False)
        shared = shape == 1
        if shape == 0:
            excl = None
        elif shared:
            excl = rng.choice(n, rng.integers(1_000, 2_900), replace=False)
        else:
            excl = [rng.choice(n, rng.integers(0, 50)) for _ in users]
        cand = rng.choice(n, rng.integers(1, 400), replace=False) if rng.random() < 0.25 else None
        args = dict(exclude=excl, filter_seen=seen_out, candidates=cand)
        got_i, got_s = model.recommend(users, k, **args)
        want_i, _ = exact.recommend(users, k, **args)
        for r, u in enumerate(users):
            got, want = valid(got_i[r]), valid(want_i[r])
            assert len(got) == len(want) and len(set(got)) == len(got)
            banned = set() if excl is None else set((excl if shared else excl[r]).tolist())
            if seen_out:
                banned |= set(model.user_items[u].indices.tolist())
            assert not set(got) & banned
            if cand is not None:
                assert set(got) <= set(cand.tolist())
            scores = got_s[r][: len(got)]
            assert np.all(np.diff(scores) <= 1e-5)
            all_i, all_s = exact.recommend([u], n, filter_seen=False)
            by_item = dict(zip(all_i[0].tolist(), all_s[0].tolist(), strict=True))
            np.testing.assert_allclose(scores, [by_item[i] for i in got], rtol=1e-4, atol=1e-4)
