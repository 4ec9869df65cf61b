"""The gRPC service over a real server on a loopback port, against the offline models."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import queue
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recserve.config import Experiment, Hybrid
from recserve.feedback import Event
from recserve.service import core as core_module
from recserve.service import grpc_aio as aio_module
from recserve.serving import RecQuery
from recserve.v1 import recommender_pb2 as pb
from recserve.v1 import recommender_pb2_grpc as pb_grpc
from tests.service_helpers import (
    Gate,
    error_info,
    flip_byte,
    publish_models,
    retry_info,
    running,
    status_details,
    wait_for,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def published(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, publish_models(small, root)


@pytest.fixture(scope="module")
def srv(published):
    root, _ = published
    with running(root, max_k=500) as s:
        yield s


def ids(items):
    return [i.item_id for i in items]


def test_order_ranks_and_k_unary_and_streamed(srv, published, small):
    _, models = published
    for name in ("popularity", "itemknn", "als"):
        items, md = srv.recommend(user_id="7", k=15, model=name, request_id="r-7")
        assert [i.rank for i in items] == list(range(1, 16))
        scores = [i.score for i in items]
        assert scores == sorted(scores, reverse=True)
        m = models[name]
        want, want_scores = m.recommend([small.users.get("7")], k=15)
        assert ids(items) == m.items.ids(want[0])
        np.testing.assert_allclose(scores, want_scores[0], rtol=1e-6)
        assert md["x-recserve-model"] == name
        assert md["x-recserve-version"] == srv.app.catalog.get(name).version
        assert "x-recserve-served-by" not in md
        # RecommendStream: the same ranking, one message per item, metadata first.
        streamed, smd = srv.recommend_stream(user_id="7", k=15, model=name)
        assert smd == md
        # The first item also names the model and version (typed clients drop metadata).
        assert (streamed[0].model, streamed[0].version) == (name, md["x-recserve-version"])
        assert not any(i.model or i.version for i in streamed[1:])
        streamed[0].model = streamed[0].version = ""
        assert streamed == items


def assert_same_ranking(a, b, tol: float = 1e-5) -> None:
    """Equal rankings up to float rounding: the one-user kernel and the batch
    path's BLAS add a dot product's terms in different orders, so scores agree
    to ~1e-7 and only items whose scores (nearly) tie may trade places."""
    assert len(a.item_ids) == len(b.item_ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=tol, atol=tol)
    where = {item: i for i, item in enumerate(b.item_ids)}
    for i, item in enumerate(a.item_ids):
        if item != b.item_ids[i]:
            j = where.get(item)
            other = b.scores[j] if j is not None else b.scores[-1]  # or just past b's last
            assert abs(a.scores[i] - other) <= tol * max(1.0, abs(other)), (i, item)


def test_plain_requests_answer_as_the_general_path(srv, published, small):
    """Router._plain (known user, nothing else) answers as the general path,
    reached here by excluding an id no model knows (dropped, so the ranking is
    the same)."""
    router = srv.app.router
    for name in ("popularity", "itemknn", "als", "bayes_mf"):
        for user in ("1", "7", "42", "300"):
            for include_seen in (False, True):
                q = RecQuery(user_id=user, k=12, model=name, include_seen=include_seen)
                general = RecQuery(
                    user_id=user, k=12, model=name, include_seen=include_seen, exclude=["zz-none"]
                )
                a, b = router.recommend(q), router.recommend(general)
                assert_same_ranking(a, b)
                assert (a.model, a.version, a.served_by, a.std) == (
                    b.model,
                    b.version,
                    b.served_by,
                    b.std,
                )
                assert set(a.stages) == {"resolve", "retrieve", "rank"}
                stages = {"resolve": 0.0, "retrieve": 0.0, "rank": 0.0}
                assert router._plain(q, time.perf_counter(), stages, lambda: None) is not None
                assert router._plain(general, time.perf_counter(), stages, lambda: None) is None


def test_seen_excluded_unless_include_seen_and_exclusions_never_shorten(srv, published, small):
    m = published[1]["als"]
    u = small.users.get("12")
    seen = set(m.items.ids(small.interactions[u].indices))
    items, _ = srv.recommend(user_id="12", k=20, model="als")
    assert len(items) == 20 and not set(ids(items)) & seen
    banned = ids(items)[:5]
    again, _ = srv.recommend(user_id="12", k=20, model="als", exclude_item_ids=banned)
    assert len(again) == 20 and not set(ids(again)) & set(banned)
    assert ids(again)[:15] == ids(items)[5:20]
    everything, _ = srv.recommend(user_id="12", k=300, model="als", include_seen=True)
    assert seen <= set(ids(everything))
    cands = ids(items)[3:6] + sorted(seen)[:2] + ["no-such-item"]
    got, _ = srv.recommend(user_id="12", k=10, model="als", candidate_item_ids=cands)
    assert ids(got) == ids(items)[3:6]  # only eligible candidates, in model order


@pytest.mark.parametrize("name", ["als", "itemknn", "popularity"])
def test_history_items_sent_with_value_zero_stay_excluded(srv, name):
    # An explicit 0 is a value, and the item is still seen: with exclusions (and
    # candidates) the seen set was once a sparse sum that dropped zero entries.
    hist = ["3", "17", "42"]
    history = [pb.Interaction(item_id=i, value=0.0) for i in hist]
    history.append(pb.Interaction(item_id="100", value=2.0))
    everything = [str(i) for i in range(1, 301)]
    for extra in (
        {},
        {"exclude_item_ids": ["5"]},
        {"candidate_item_ids": everything},
        {"exclude_item_ids": ["5"], "candidate_item_ids": everything},
    ):
        for user in ("brand-new", "12"):
            items, _ = srv.recommend(user_id=user, history=history, k=300, model=name, **extra)
            assert len(items) > 0
            assert not set(ids(items)) & {*hist, "100", *extra.get("exclude_item_ids", [])}


@pytest.mark.parametrize("name", ["als", "itemknn"])
def test_fold_in_equals_offline_recommend_from_history(srv, published, name):
    m = published[1][name]
    hist = ["3", "17", "42", "100", "150"]
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    want_i, want_s = m.recommend_from_history(m.items.index(hist), values, k=12)
    history = [pb.Interaction(item_id=i, value=v) for i, v in zip(hist, values, strict=True)]
    items, md = srv.recommend(user_id="brand-new", history=history, k=12, model=name)
    assert ids(items) == m.items.ids(want_i)
    np.testing.assert_allclose([i.score for i in items], want_s, rtol=1e-5, atol=1e-6)
    assert "x-recserve-served-by" not in md


def test_unknown_user_without_history_goes_down_the_chain(srv):
    items, md = srv.recommend(user_id="never-seen", k=5, model="als")
    assert md["x-recserve-served-by"] == "popularity"
    pop, _ = srv.recommend(user_id="never-seen", k=5, model="popularity")
    assert ids(items) == ids(pop) and len(items) == 5


def test_chain_without_a_cold_model_ends_in_builtin_popularity(published, small):
    root, _ = published
    with running(root, fallback=()) as s:
        items, md = s.recommend(user_id="never-seen", k=8, model="itemknn")
    # No model of itemknn's chain serves cold users: the most popular training items
    # of a loaded model answer (the first loaded, whichever that is).
    assert md["x-recserve-served-by"].startswith("builtin-popularity:")
    counts = np.bincount(small.interactions.indices, minlength=small.n_items)
    order = np.lexsort((np.arange(counts.size), -counts))[:8]
    assert ids(items) == small.items.ids(order)


def test_builtin_popularity_honours_exclusions_and_candidates(published, small):
    # The last resort of a chain answers with the same request filters as a model.
    root, _ = published
    counts = np.bincount(small.interactions.indices, minlength=small.n_items)
    top = small.items.ids(np.lexsort((np.arange(counts.size), -counts))[:12])
    exclude, candidates = [top[0], top[3]], top[2:10]
    with running(root, fallback=()) as s:
        items, md = s.recommend(
            user_id="never-seen",
            k=5,
            model="itemknn",
            exclude_item_ids=exclude,
            candidate_item_ids=candidates,
        )
    assert md["x-recserve-served-by"].startswith("builtin-popularity:")
    assert ids(items) == [i for i in candidates if i not in exclude][:5]


def test_explain_names_history_items(srv, published, small):
    items, _ = srv.recommend(user_id="5", k=5, model="itemknn", explain=True)
    m = published[1]["itemknn"]
    u = small.users.get("5")
    seen = set(m.items.ids(small.interactions[u].indices))
    for it in items:
        assert it.because and set(it.because) <= seen
        want, _ = m.explain(u, m.items.get(it.item_id), 3)
        assert list(it.because) == m.items.ids(want)


def test_score_std_from_a_bayesian_model(srv, published, small):
    m = published[1]["bayes_mf"]
    items, _ = srv.recommend(user_id="9", k=5, model="bayes_mf")
    _, std = m.score(small.users.get("9"), m.items.index(ids(items)))
    np.testing.assert_allclose([i.score_std for i in items], std, rtol=1e-5)
    assert all(i.score_std > 0 for i in items)
    # A folded-in user (inline history): the posterior from that history.
    hist = [("1", 5.0), ("2", 3.0), ("30", 4.0)]
    history = [pb.Interaction(item_id=i, value=v) for i, v in hist]
    items, _ = srv.recommend(user_id="new-9", history=history, k=5, model="bayes_mf")
    row = m.history_matrix([m.items.index([i for i, _ in hist])], [[v for _, v in hist]])
    _, std = m.score_history(row, m.items.index(ids(items)))
    np.testing.assert_allclose([i.score_std for i in items], std, rtol=1e-5)


def test_predict_ratings_mean_std_interval(srv, published, small):
    m = published[1]["bayes_mf"]
    want = ["1", "2", "30"]
    resp = srv.rec.PredictRatings(
        pb.PredictRatingsRequest(user_id="9", item_ids=want, model="bayes_mf", interval=0.9)
    )
    mean, std = m.score(small.users.get("9"), m.items.index(want))
    assert [p.item_id for p in resp.predictions] == want and resp.interval == pytest.approx(0.9)
    np.testing.assert_allclose([p.rating for p in resp.predictions], mean, rtol=1e-5)
    np.testing.assert_allclose([p.std for p in resp.predictions], std, rtol=1e-5)
    for p in resp.predictions:
        lo, hi = max(p.rating - 1.6448536 * p.std, 1.0), min(p.rating + 1.6448536 * p.std, 5.0)
        assert p.lower == pytest.approx(lo, rel=1e-4) and p.upper == pytest.approx(hi, rel=1e-4)
    # The default model (popularity) ranks only: a rating model is found for the caller.
    auto = srv.rec.PredictRatings(pb.PredictRatingsRequest(user_id="9", item_ids=want))
    assert [p.rating for p in auto.predictions] == [p.rating for p in resp.predictions]
    err = srv.error(
        srv.rec.PredictRatings, pb.PredictRatingsRequest(user_id="9", item_ids=want, model="als")
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "model" in err.details()


def test_similar_items(srv, published):
    m = published[1]["itemknn"]
    items = list(srv.rec.SimilarItems(pb.SimilarItemsRequest(item_id="10", k=7, model="itemknn")))
    want, _ = m.similar_items(m.items.get("10"), 7)
    assert ids(items) == m.items.ids(want) and "10" not in ids(items)
    assert [i.rank for i in items] == list(range(1, 8))


def test_status_codes_name_the_field(srv):
    rec = srv.rec.Recommend
    cases = [
        (pb.RecommendRequest(user_id="1", k=-1), "INVALID_ARGUMENT", "k"),
        (pb.RecommendRequest(user_id="1", k=501), "INVALID_ARGUMENT", "k"),
        (pb.RecommendRequest(k=5), "INVALID_ARGUMENT", "user_id"),
        (
            pb.RecommendRequest(k=5, history=[pb.Interaction(item_id="1", value=float("nan"))]),
            "INVALID_ARGUMENT",
            "history[0].value",
        ),
        (
            pb.RecommendRequest(
                k=5,
                model="als",
                history=[pb.Interaction(item_id="x1"), pb.Interaction(item_id="x2")],
            ),
            "INVALID_ARGUMENT",
            "history",
        ),
        (pb.RecommendRequest(user_id="1", k=5, model="nope"), "NOT_FOUND", "model"),
    ]
    for req, code, field in cases:
        err = srv.error(rec, req)
        assert err.code().name == code, (req, err.details())
        assert err.details().startswith(field + ":"), err.details()
    err = srv.error(srv.rec.SimilarItems, pb.SimilarItemsRequest(item_id="zzz", k=3))
    assert err.code() is grpc.StatusCode.NOT_FOUND and err.details().startswith("item_id:")
    err = srv.error(srv.admin.GetModel, pb.GetModelRequest(name="nope"))
    assert err.code() is grpc.StatusCode.NOT_FOUND


def test_unknown_history_items_within_tolerance_are_dropped(srv, published):
    m = published[1]["als"]
    hist = ["3", "17", "unknown-item"]  # 1 of 3 unknown: within the 50% default
    items, _ = srv.recommend(
        user_id="n", history=[pb.Interaction(item_id=i) for i in hist], k=5, model="als"
    )
    want, _ = m.recommend_from_history(m.items.index(hist[:2]), k=5)
    assert ids(items) == m.items.ids(want)


def test_recommend_batch_answers_each_request(srv, published, small):
    reqs = [
        pb.RecommendRequest(request_id="a", user_id="7", k=4, model="als"),
        pb.RecommendRequest(request_id="b", user_id="7", k=-1),
        pb.RecommendRequest(request_id="c", user_id="x", k=3, model="als"),
    ]
    out = list(srv.rec.RecommendBatch(iter(reqs), timeout=10))
    assert [r.request_id for r in out] == ["a", "b", "c"]
    single, _ = srv.recommend(user_id="7", k=4, model="als")
    assert ids(out[0].items) == ids(single) and out[0].status.code == 0
    assert out[1].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert out[1].status.message.startswith("k:") and not out[1].items
    assert out[2].served_by == "popularity" and len(out[2].items) == 3


@pytest.mark.parametrize("server", ["asyncio", "threads"])
def test_batch_stream_and_unary_answer_every_request_shape_alike(published, small, server):
    """Random requests (known and new users, histories with dislikes,
    exclusions, candidates, explain, k from 1 to 100, every model and an
    unknown one), each sent as a Recommend, a RecommendStream and one entry
    of a RecommendBatch: the same items, scores, explanations and model, and
    where the call fails, the same status code in the batch's entry."""
    rng = np.random.default_rng(11)
    users, items = small.users.ids(np.arange(small.n_users)), small.items.ids(np.arange(60))
    reqs = []
    for n in range(120):
        model = ("", "popularity", "itemknn", "als", "bayes_mf", "nosuch")[n % 6]
        req = pb.RecommendRequest(
            k=int(rng.choice([1, 5, 10, 100])),
            model=model,
            include_seen=bool(n % 5 == 0),
            explain=bool(n % 7 == 0),
            request_id=f"q{n}",
        )
        if n % 3:
            req.user_id = users[int(rng.integers(len(users)))]
        else:  # new (or anonymous) users with an inline history, dislikes included
            req.user_id = f"new{n}" if n % 9 else ""
            for i in rng.choice(items, rng.integers(0, 8), replace=False):
                req.history.add(item_id=str(i), value=float(rng.choice([1.0, 5.0, -1.0])))
        if n % 4 == 1:
            req.exclude_item_ids.extend(rng.choice(items, 20, replace=False).tolist())
        if n % 10 == 3:
            req.candidate_item_ids.extend(rng.choice(items, 12, replace=False).tolist())
        reqs.append(req)

    def same(items_a, items_b):
        a = [(i.item_id, list(i.because)) for i in items_a]
        b = [(i.item_id, list(i.because)) for i in items_b]
        sa, sb = [i.score for i in items_a], [i.score for i in items_b]
        return a == b and np.allclose(sa, sb, rtol=1e-6, atol=1e-6)

    with running(published[0], server=server) as s:
        batch = list(s.rec.RecommendBatch(iter(reqs), timeout=60))
        assert [b.request_id for b in batch] == [r.request_id for r in reqs]
        codes = set()
        for req, b in zip(reqs, batch, strict=True):
            try:
                unary, code = s.rec.Recommend(req, timeout=10), 0
            except grpc.RpcError as e:
                unary, code = None, e.code().value[0]
            try:
                streamed, scode = list(s.rec.RecommendStream(req, timeout=10)), 0
            except grpc.RpcError as e:
                streamed, scode = None, e.code().value[0]
            codes.add(code)
            assert (code, scode, b.status.code) == (code, code, code), req
            if unary is None:
                assert not b.items
                continue
            assert same(b.items, unary.items) and b.model == unary.model, req
            assert streamed is not None and same(streamed, unary.items), req
    assert {0, grpc.StatusCode.NOT_FOUND.value[0]} <= codes  # both kinds of answer were met


@pytest.mark.parametrize("server", ["asyncio", "threads"])
def test_a_long_batch_stream_is_answered_in_order_one_answer_per_request(published, server):
    """A batch of 53 requests: every one is answered, in request order, as a
    unary call answers it."""
    root, _ = published
    n = 53
    users = [str(1 + (7 * i) % 40) for i in range(n)]
    with running(root, server=server) as s:
        reqs = [
            pb.RecommendRequest(request_id=f"r{i}", user_id=u, k=4, model="als")
            for i, u in enumerate(users)
        ]
        out = list(s.rec.RecommendBatch(iter(reqs), timeout=30))
        assert [r.request_id for r in out] == [f"r{i}" for i in range(n)]
        for u, r in zip(users, out, strict=True):
            single, _ = s.recommend(user_id=u, k=4, model="als")
            assert r.status.code == 0 and ids(r.items) == ids(single)


@pytest.mark.parametrize("server", ["asyncio", "threads"])
def test_a_batch_whose_deadline_passes_mid_stream_ends_cleanly(published, server, caplog):
    """The deadline passes while a batch is being answered and its client still
    has requests to send: the call ends DEADLINE_EXCEEDED (or CANCELLED), the
    rest of the stream is dropped without an error logged, and the server
    answers the next call."""
    root, _ = published
    with running(root, server=server) as s:
        als = s.app.catalog.get("als").model
        original = als.recommend_user

        def slow(*a, **kw):
            time.sleep(0.05)
            return original(*a, **kw)

        als.recommend_user = slow
        try:
            reqs = [pb.RecommendRequest(user_id="7", k=3, model="als") for _ in range(60)]
            err = s.error(s.rec.RecommendBatch, iter(reqs), timeout=0.5)
            assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
        finally:
            als.recommend_user = original
        items, _ = s.recommend(user_id="7", k=3, model="als")
        assert len(items) == 3
        assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("server", ["asyncio", "threads"])
def test_a_batch_stream_interleaves_with_concurrent_unary_calls(published, server):
    """A long RecommendBatch never holds the server: while its 20 requests take
    40 ms each on the model (holding the GIL, on the asyncio loop), unary calls
    to another model keep being answered between them, each far sooner than
    the batch's remaining ~0.8 s."""
    root, _ = published
    with running(root, server=server) as s:
        als = s.app.catalog.get("als").model
        original = als.recommend_user

        entered = threading.Event()  # the batch's first request reached the model

        def slow(*a, **kw):
            entered.set()
            end = time.perf_counter() + 0.04
            while time.perf_counter() < end:
                pass
            return original(*a, **kw)

        als.recommend_user = slow
        try:
            reqs = [pb.RecommendRequest(user_id="7", k=3, model="als") for _ in range(20)]
            batch = s.rec.RecommendBatch(iter(reqs), timeout=30)
            took, done, answers = [], threading.Event(), []

            def read() -> None:
                answers.extend(batch)
                done.set()

            reader = threading.Thread(target=read)
            reader.start()
            assert entered.wait(10)
            while not done.is_set():
                t0 = time.perf_counter()
                items, _ = s.recommend(user_id="8", k=3, model="popularity")
                if not done.is_set():
                    took.append(time.perf_counter() - t0)
                assert len(items) == 3
            reader.join()
            assert len(answers) == 20 and all(len(a.items) == 3 for a in answers)
        finally:
            als.recommend_user = original
        # A batch computed in one go would hold the first unary call for the
        # rest of it (~0.76 s), and at most one would finish meanwhile.
        assert len(took) >= 4, took
        assert max(took) < 0.4, took


def test_admin_lists_models_with_state(srv):
    names = {m.name: m for m in srv.admin.ListModels(pb.ListModelsRequest()).models}
    assert set(names) == {"popularity", "itemknn", "als", "bayes_mf"}
    als = names["als"]
    assert als.state == pb.MODEL_STATE_SERVING and als.algorithm == "als"
    assert als.params["factors"] == "16" and als.bytes > 0 and als.n_items == 300
    assert srv.admin.GetModel(pb.GetModelRequest(name="itemknn")).algorithm == "itemknn"


def test_reflection_lists_the_services(srv):
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    resp = next(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"recserve.v1.Recommender", "recserve.v1.Admin", "grpc.health.v1.Health"} <= names


def test_reflection_alone_is_enough_to_call_every_method(srv):
    """What grpcurl, ghz or a dynamic client in any language does: build the
    types from the server's reflection (a fresh pool, none of recserve.v1's
    modules), send JSON, read the answer. Every method's types must resolve,
    with the googleapis files they import, or such a tool cannot call it."""
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(srv.channel))
    # The methods reflection describes are the compiled stubs', with the same types.
    for name in ("recserve.v1.Recommender", "recserve.v1.Admin"):
        want = pb.DESCRIPTOR.services_by_name[name.rsplit(".", 1)[1]].methods
        got = pool.FindServiceByName(name).methods
        assert [(m.name, m.input_type.full_name, m.output_type.full_name) for m in got] == [
            (m.name, m.input_type.full_name, m.output_type.full_name) for m in want
        ]
    assert pool.FindServiceByName("grpc.health.v1.Health").methods
    recommend = pool.FindMethodByName("recserve.v1.Recommender.Recommend")
    file = recommend.containing_service.file
    assert {d.name for d in file.dependencies} >= {
        "google/api/field_behavior.proto",
        "google/rpc/status.proto",
    }
    request_cls = message_factory.GetMessageClass(recommend.input_type)
    response_cls = message_factory.GetMessageClass(recommend.output_type)
    request = json_format.Parse('{"user_id": "7", "k": 5, "model": "als"}', request_cls())
    call = srv.channel.unary_unary(
        "/recserve.v1.Recommender/Recommend",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    answer = json_format.MessageToDict(call(request, timeout=10))
    items, _ = srv.recommend(user_id="7", k=5, model="als")
    assert [i["itemId"] for i in answer["items"]] == ids(items)
    assert answer["model"] == "als"
    # A streaming method through the same reflected types.
    similar = pool.FindMethodByName("recserve.v1.Recommender.SimilarItems")
    similar_cls = message_factory.GetMessageClass(similar.input_type)
    stream = srv.channel.unary_stream(
        "/recserve.v1.Recommender/SimilarItems",
        request_serializer=similar_cls.SerializeToString,
        response_deserializer=message_factory.GetMessageClass(similar.output_type).FromString,
    )
    seed = json.dumps({"item_id": ids(items)[0], "k": 4, "model": "itemknn"})
    got = [m.item_id for m in stream(json_format.Parse(seed, similar_cls()), timeout=10)]
    want = srv.rec.GetSimilarItems(
        pb.SimilarItemsRequest(item_id=ids(items)[0], k=4, model="itemknn"), timeout=10
    )
    assert got == [i.item_id for i in want.items] and len(got) == 4


def health(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_fallback_and_health_while_a_slow_model_loads(published):
    root, _ = published
    gate = Gate("als")
    hybrid = {"hybrid": Hybrid("hybrid", {"als": 0.6, "itemknn": 0.4}, 2.0, 0.5)}
    with running(
        root, loader=gate, wait=False, hybrids=hybrid, fallbacks={"hybrid": ("als",)}
    ) as s:
        assert wait_for(lambda: health(s.channel) == SERVING)
        assert wait_for(lambda: s.app.catalog.ready("itemknn"))
        assert health(s.channel, "model/popularity") == SERVING
        assert health(s.channel, "model/als") == NOT_SERVING
        assert health(s.channel, "model/hybrid") == NOT_SERVING
        info = s.admin.GetModel(pb.GetModelRequest(name="als"))
        assert info.state == pb.MODEL_STATE_LOADING
        items, md = s.recommend(user_id="7", k=5, model="hybrid")
        assert md["x-recserve-model"] == "hybrid" and md["x-recserve-served-by"] == "popularity"
        pop, _ = s.recommend(user_id="7", k=5, model="popularity")
        assert ids(items) == ids(pop)
        gate.release("als")
        assert wait_for(lambda: health(s.channel, "model/hybrid") == SERVING)
        assert health(s.channel, "model/als") == SERVING
        items, md = s.recommend(user_id="7", k=5, model="hybrid")
        assert "x-recserve-served-by" not in md
        assert md["x-recserve-version"].startswith("als@")
        info = s.admin.GetModel(pb.GetModelRequest(name="hybrid"))
        assert (info.algorithm, info.state) == ("hybrid", pb.MODEL_STATE_SERVING)
        want = {"als": "0.6", "itemknn": "0.4", "history_prior": "2.0", "user_prior": "0.5"}
        assert dict(info.params) == want


def test_hybrid_blends_normalized_scores(published, small):
    root, models = published
    hybrid = {"mix": Hybrid("mix", {"als": 0.6, "itemknn": 0.4})}
    with running(root, hybrids=hybrid) as s:
        items, md = s.recommend(user_id="21", k=10, model="mix")
    u = small.users.get("21")
    blend: dict[str, float] = {}
    for name, w in (("als", 0.6), ("itemknn", 0.4)):
        m = models[name]
        i, sc = m.recommend([u], k=100)
        sc = sc[0][i[0] >= 0]
        norm = (sc - sc.min()) / (sc.max() - sc.min())
        for item, v in zip(m.items.ids(i[0][i[0] >= 0]), norm, strict=True):
            blend[item] = blend.get(item, 0.0) + w * float(v)
    want = sorted(blend, key=lambda x: (-blend[x], x))[:10]
    assert ids(items) == want
    np.testing.assert_allclose([i.score for i in items], [blend[x] for x in want], rtol=1e-5)
    assert md["x-recserve-model"] == "mix"


def reference_arm(salt: str, user: str, arms: dict[str, float]) -> str:
    """The documented assignment, computed here independently of the server: the
    first 8 bytes of sha256(salt, NUL, user) as a fraction u of 2^64; the arm whose
    cumulative share (arms with weight > 0, in configured order) first exceeds u."""
    digest = hashlib.sha256(salt.encode() + b"\x00" + user.encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    live = {a: w for a, w in arms.items() if w > 0}
    total, acc = sum(live.values()), 0.0
    for arm, w in live.items():
        acc += w / total
        if u < acc:
            return arm
    return list(live)[-1]


def test_experiment_assigns_arms_deterministically(published):
    root, _ = published
    arms = {"als": 0.5, "itemknn": 0.5}
    exp = {"homepage": Experiment("homepage", arms, "s1")}
    with running(root, experiments=exp) as s:
        seen_arms = {}
        for user in [str(i) for i in range(1, 60)]:
            items, md = s.recommend(user_id=user, k=5, model="homepage")
            arm = md["x-recserve-arm"]
            assert arm == reference_arm("s1", user, arms)
            direct, _ = s.recommend(user_id=user, k=5, model=arm)
            assert ids(items) == ids(direct)
            seen_arms[user] = arm
        again = {
            u: s.recommend(user_id=u, k=5, model="homepage")[1]["x-recserve-arm"]
            for u in list(seen_arms)[:10]
        }
        assert all(seen_arms[u] == a for u, a in again.items())
        assert set(seen_arms.values()) == {"als", "itemknn"}
        metric = s.app.metrics.registry.get_sample_value(
            "recserve_requests_total",
            {"method": "Recommend", "model": "homepage", "served_by": "als", "arm": "als"},
        )
        assert metric == sum(1 for a in seen_arms.values() if a == "als") + sum(
            1 for a in again.values() if a == "als"
        )


def test_a_reload_reads_the_config_file_again(published, tmp_path, caplog, capsys):
    """ReloadModels (and SIGHUP) read the config file again, as nginx and
    Prometheus do: routing and request limits change at once, settings bound at
    start are named as needing a restart, and a file that no longer loads
    changes nothing (logged, and the reload metric goes to 0)."""
    root, _ = published
    path = tmp_path / "recserve.toml"
    path.write_text(
        '[server]\ndefault_model = "als"\nmax_k = 50\n'
        "[hybrids.mix]\nals = 1.0\nitemknn = 0.5\n"
        "[experiments.ab]\narms = { als = 1.0 }\n"
    )
    reload = pb.ReloadModelsRequest()

    def served(**request) -> str:
        return srv.recommend(user_id="7", k=5, **request)[1]["x-recserve-model"]

    def arm() -> str:
        return srv.recommend(user_id="7", k=5, model="ab")[1]["x-recserve-arm"]

    def reload_ok() -> float | None:
        return srv.app.metrics.registry.get_sample_value("recserve_config_last_reload_successful")

    with caplog.at_level("INFO", logger="recserve.service"), running(root, config=path) as srv:
        assert served() == "als" and arm() == "als" and reload_ok() == 1
        assert srv.error(srv.rec.Recommend, pb.RecommendRequest(user_id="7", k=60)).code() == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        path.write_text(
            '[server]\ndefault_model = "itemknn"\nmax_k = 100\nport = 1\nmax_concurrency = 3\n'
            "workers = 2\n"
            "[hybrids.mix2]\nals = 0.5\nitemknn = 0.5\n"
            "[experiments.ab]\narms = { itemknn = 1.0 }\n"
        )
        out = srv.admin.ReloadModels(reload, timeout=30)
        assert sorted((m.name, m.algorithm) for m in out.reloaded) == [
            ("ab", "experiment"),
            ("mix2", "hybrid"),
        ]
        assert served() == "itemknn" and arm() == "itemknn"
        assert served(model="mix2") == "mix2"
        assert len(srv.recommend(user_id="7", k=60)[0]) == 60
        err = srv.error(srv.rec.Recommend, pb.RecommendRequest(user_id="7", model="mix"))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert health(srv.channel, "model/mix") == NOT_SERVING
        assert health(srv.channel, "model/mix2") == SERVING
        # The port is a flag here, and flags still win over the file.
        assert "max_concurrency, workers changed; restart to apply" in caplog.text
        assert srv.app.core.cfg.max_concurrency == 64 and srv.app.core.cfg.workers == 1
        assert reload_ok() == 1
        path.write_text('[server]\ndefault_model = "als"\nmax_k = [\n')  # a half-written file
        out = srv.admin.ReloadModels(reload, timeout=30)
        assert not out.reloaded
        assert "unreadable TOML" in caplog.text and reload_ok() == 0
        # the caller hears of it too (it was answered as a reload with nothing new)
        ((name, algo, state, error),) = [
            (m.name, m.algorithm, m.state, m.error) for m in out.refused
        ]
        assert (name, algo, state) == ("config", "config", pb.MODEL_STATE_FAILED)
        assert str(path) in error and "unreadable TOML" in error
        from recserve.clients.__main__ import main

        assert main(["--target", srv.target, "reload"]) == 1  # the shell client: exit 1
        out_text, err_text = capsys.readouterr()
        assert json.loads(out_text)["name"] == "config" and "config refused" in err_text
        assert served() == "itemknn" and served(model="mix2") == "mix2"
        path.write_text('[server]\ndefault_model = "als"\n[fallbacks]\nals = "popularty"\n')
        out = srv.admin.ReloadModels(reload, timeout=30)
        assert [m.name for m in out.reloaded] == [] and reload_ok() == 1
        assert served() == "als" and "fallbacks.als: 'popularty' is no model" in caplog.text
        err = srv.error(srv.rec.Recommend, pb.RecommendRequest(user_id="7", model="ab"))
        assert err.code() == grpc.StatusCode.NOT_FOUND  # removed with the file's table


def test_names_the_config_uses_but_nothing_serves_are_warned_at_start(published, caplog):
    """A typo in an experiment's arm, a hybrid's component or a fallback chain is
    named at start (its requests would quietly go down the fallback chain)."""
    root, _ = published
    exp = {"homepage": Experiment("homepage", {"als": 0.5, "alss": 0.5}, "s1")}
    hy = {"blend": Hybrid("blend", {"als": 0.5, "itemknm": 0.5})}
    with (
        caplog.at_level("WARNING", logger="recserve.service"),
        running(root, experiments=exp, hybrids=hy, fallbacks={"als": ("popularty",)}) as s,
    ):
        warned = [r.getMessage() for r in caplog.records if "is no model" in r.getMessage()]
        assert len(warned) == 3, warned
        assert any(w.startswith("experiments.homepage: 'alss'") for w in warned)
        assert any(w.startswith("hybrids.blend: 'itemknm'") for w in warned)
        assert any(w.startswith("fallbacks.als: 'popularty'") for w in warned)
        # still answered: the arm goes on down its chain to the global fallback
        for user in [str(i) for i in range(1, 30)]:
            items, md = s.recommend(user_id=user, k=3, model="homepage")
            assert len(items) == 3 and md["x-recserve-arm"] in ("als", "alss")
    caplog.clear()
    with (
        caplog.at_level("WARNING", logger="recserve.service"),
        running(root, default_model="hybird") as s,
    ):
        (warned,) = [r.getMessage() for r in caplog.records if "is no model" in r.getMessage()]
        assert warned.startswith("default_model: 'hybird'") and "fallback chain" in warned
        # The client named no model: the default's chain answers (it was
        # NOT_FOUND, every default request refused over a typo in the config)
        items, md = s.recommend(user_id="7", k=3)
        assert len(items) == 3 and md["x-recserve-served-by"] == "popularity"
        assert md["x-recserve-model"] == "hybird"
        sim = s.rec.GetSimilarItems(pb.SimilarItemsRequest(item_id="10", k=3), timeout=10)
        assert len(sim.items) == 3 and sim.served_by
        pred = s.rec.PredictRatings(
            pb.PredictRatingsRequest(user_id="7", item_ids=["1", "2"]), timeout=10
        )
        assert pred.served_by == "bayes_mf" and len(pred.predictions) == 2
        # A client naming the unknown model itself is still told so.
        err = s.error(s.rec.Recommend, pb.RecommendRequest(user_id="7", k=3, model="hybird"))
        assert err.code() is grpc.StatusCode.NOT_FOUND and "hybird" in err.details()
    caplog.clear()
    with (
        caplog.at_level("WARNING", logger="recserve.service"),
        running(root, experiments={"e": Experiment("e", {"als": 1.0}, "s")}),
    ):
        assert not [r for r in caplog.records if "is no model" in r.getMessage()]


def test_experiment_split_follows_uneven_weights_and_skips_zero(published):
    """A 0.2 / 0.8 split with a zero-weight arm: every user gets the reference arm,
    the shares over 2,000 users are within 3 sigma of the weights, and the arm of
    weight 0 is never assigned."""
    root, _ = published
    arms = {"popularity": 0.0, "als": 0.2, "itemknn": 0.8}
    exp = {"split": Experiment("split", arms, "salt-2")}
    n = 2000
    users = [f"user-{i}" for i in range(n)]
    with running(root, experiments=exp) as s:
        requests = [pb.RecommendRequest(user_id=u, k=1, model="split") for u in users]
        answers = list(s.rec.RecommendBatch(iter(requests), timeout=120))
    assert [a.status.code for a in answers] == [0] * n
    got = [a.arm for a in answers]
    assert got == [reference_arm("salt-2", u, arms) for u in users]
    assert "popularity" not in got
    share = got.count("als") / n
    sigma = math.sqrt(0.2 * 0.8 / n)
    assert abs(share - 0.2) <= 3 * sigma, share


def hold_a_slot(s):
    """A call at work until released: a RecordInteractions stream whose commit
    waits in the feedback store (an open stream that only waits for its client
    holds no slot: test_idle_streams_hold_no_admission_slot)."""
    store, gate, entered = s.app.store, threading.Event(), threading.Event()

    def held(events):
        entered.set()
        gate.wait(30)
        return type(store).append(store, events)

    store.append = held  # this server's store only
    done = s.rec.RecordInteractions.future(
        iter([pb.Interaction(user_id="7", item_id="100")]), timeout=30
    )
    assert entered.wait(10)  # admitted and committing

    def release():
        gate.set()
        assert done.result(10).accepted == 1
        del store.append

    return release


def test_idle_streams_hold_no_admission_slot(published):
    """Feedback and batch streams left open between messages (a client keeping
    one per app instance) are not calls in flight: with max_concurrency 4,
    eight of each idle before let every unary call in, and still answer after.
    Counted in flight, four of them refused every other call. On the
    thread-pool server an open stream holds a worker thread, so it holds its
    slot: a call beyond them is refused at once, not queued for a thread."""
    root, _ = published
    if os.environ.get("RECSERVE_TEST_SERVER", "threads") == "threads":
        with running(root, max_concurrency=4) as s:
            feeds = [queue.Queue() for _ in range(4)]
            streams = [s.rec.RecommendBatch(iter(q.get, None), timeout=30) for q in feeds]
            for n, (q, answers) in enumerate(zip(feeds, streams, strict=True)):
                q.put(pb.RecommendRequest(request_id=f"b{n}", user_id="7", k=2))
                assert next(answers).request_id == f"b{n}"
            t = time.monotonic()
            err = s.error(s.rec.Recommend, pb.RecommendRequest(user_id="7", k=3))
            assert err.code() is grpc.StatusCode.UNAVAILABLE and time.monotonic() - t < 5
            for q, answers in zip(feeds, streams, strict=True):
                q.put(None)
                assert list(answers) == []
            assert len(s.recommend(user_id="7", k=3)[0]) == 3
        return
    with running(root, max_concurrency=4) as s:
        feeds, answers, sums = [], [], []
        for n in range(8):
            q1: queue.Queue = queue.Queue()
            q2: queue.Queue = queue.Queue()
            feeds += [q1, q2]
            sums.append(s.rec.RecordInteractions.future(iter(q1.get, None), timeout=30))
            answers.append(s.rec.RecommendBatch(iter(q2.get, None), timeout=30))
            q2.put(pb.RecommendRequest(request_id=f"b{n}", user_id="7", k=2))
            assert next(answers[-1]).request_id == f"b{n}"  # answered, then idle
        for _ in range(20):
            items, _ = s.recommend(user_id="7", k=3)
            assert len(items) == 3
        assert s.app.core.active == 0  # nothing at work
        for n in range(8):
            feeds[2 * n].put(pb.Interaction(user_id=f"idle{n}", item_id="100"))
            feeds[2 * n + 1].put(pb.RecommendRequest(request_id=f"c{n}", user_id="8", k=2))
            assert next(answers[n]).request_id == f"c{n}"
        for q in feeds:
            q.put(None)
        assert [f.result(10).accepted for f in sums] == [1] * 8
        assert all(list(a) == [] for a in answers)
        assert s.app.core.active == 0
        with running(root, max_concurrency=1) as t:  # a call at work still counts
            release = hold_a_slot(t)
            err = t.error(t.rec.Recommend, pb.RecommendRequest(user_id="7", k=3))
            assert err.code() is grpc.StatusCode.UNAVAILABLE and t.app.core.active == 1
            release()
            assert t.app.core.active == 0


def test_commits_waiting_for_a_thread_hold_no_admission_slot(published):
    """asyncio: 60 RecordInteractions streams whose commits are slow (a busy
    disk) against max_concurrency 40. A commit at work holds its stream's
    slot; one queued behind the others for an executor thread (at most 32
    run) does not. Counted while queued, the writers took all 40 slots:
    20 of them and every Recommend were refused (a burst of 512 writers
    refused 12% of a concurrent read load). Now reads are answered and, once
    the disk catches up, every write is stored."""
    root, _ = published
    with running(root, server="asyncio", max_concurrency=40) as s:
        store, gate, entered = s.app.store, threading.Event(), []

        def slow(events):
            entered.append(1)
            gate.wait(30)
            return type(store).append(store, events)

        store.append = slow
        try:
            writes = [
                s.rec.RecordInteractions.future(
                    iter([pb.Interaction(user_id=f"w{n}", item_id="100")]), timeout=30
                )
                for n in range(60)
            ]
            wait_for(lambda: entered, what="a commit to start")
            time.sleep(0.5)  # the rest reach the server and queue for a thread
            # only the commits on a thread hold a slot (before: 41, against 6 running)
            wait_for(lambda: s.app.core.active == len(entered), timeout=10, what="slots")
            assert len(entered) <= 32
            for _ in range(5):
                items, _ = s.recommend(user_id="7", k=3)
                assert len(items) == 3
        finally:
            gate.set()
        assert [w.result(10).accepted for w in writes] == [1] * 60
        # A client gone while its commit runs: the commit finishes (the event
        # is stored) and gives its slot back; the cancelled call holds none.
        gate.clear()
        entered.clear()
        late = s.rec.RecordInteractions.future(
            iter([pb.Interaction(user_id="late", item_id="100", event_id="e1")]), timeout=2
        )
        wait_for(lambda: entered, what="the commit to start")
        assert s.app.core.active == 1
        with pytest.raises(grpc.RpcError) as info:
            late.result(10)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        wait_for(lambda: s.app.core.active == 0, what="the commit's slot back")
        del store.append
        assert s.app.store.append([Event("late", "100", 1.0, 0, event_id="e1")]) == 0  # stored once


def test_a_refused_batch_is_unavailable_even_while_the_client_still_writes(published):
    """A RecommendBatch refused at admission is UNAVAILABLE for a grpc.aio client
    that is still writing its requests (the server reads them before the status;
    without that, such clients reported INTERNAL "Internal error from Core")."""
    import asyncio
    from collections import Counter

    root, _ = published

    async def refused(target: str) -> Counter:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.RecommenderStub(ch)

            async def one() -> str:
                reqs = [pb.RecommendRequest(user_id="7", k=3) for _ in range(16)]
                try:
                    async for _ in stub.RecommendBatch(iter(reqs), timeout=10):
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                return "OK"

            return Counter(await asyncio.gather(*(one() for _ in range(30))))

    with running(root, max_concurrency=1) as s:
        release = hold_a_slot(s)
        try:
            assert asyncio.run(refused(s.target)) == Counter({"UNAVAILABLE": 30})
        finally:
            release()


def test_overload_is_unavailable_with_a_retry_delay(published):
    """At the concurrency cap a call is refused at once with UNAVAILABLE (retryable,
    AIP-194), reason OVERLOADED, a RetryInfo delay and gRPC's retry pushback."""
    root, _ = published
    with running(root, max_concurrency=1, overload_retry_ms=75) as s:
        release = hold_a_slot(s)
        err = s.error(s.rec.Recommend, pb.RecommendRequest(user_id="7", k=3))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert "max_concurrency" in err.details()
        st = status_details(err)
        assert error_info(st).reason == "OVERLOADED"
        assert retry_info(st).retry_delay.ToMilliseconds() == 75
        assert dict(err.trailing_metadata())["grpc-retry-pushback-ms"] == "75"
        assert health(s.channel) == SERVING  # health is never refused
        release()
        items, _ = s.recommend(user_id="7", k=3)
        assert len(items) == 3


def test_deadline_stops_work_and_cancel_stops_the_stream(published):
    root, _ = published
    hybrid = {"mix": Hybrid("mix", {"als": 0.5, "itemknn": 0.5})}
    with running(root, hybrids=hybrid) as s:
        als = s.app.catalog.get("als").model
        knn = s.app.catalog.get("itemknn").model
        calls = []
        original_als, original_user = als.recommend, als.recommend_user
        original_knn, original_knn_user = knn.recommend, knn.recommend_user
        entered = threading.Event()  # set when a call reaches the slowed model

        def slow(*a, **kw):
            entered.set()
            time.sleep(1.2)  # the slowed model
            return original_als(*a, **kw)

        def slow_user(*a, **kw):  # the plain path's one-user call
            entered.set()
            time.sleep(1.2)  # the slowed model
            return original_user(*a, **kw)

        def counted(*a, **kw):
            calls.append(1)
            return original_knn(*a, **kw)

        def counted_user(*a, **kw):  # hybrid components take the one-user call too
            calls.append(1)
            return original_knn_user(*a, **kw)

        original_dense, original_knn_dense = als.dense_user, knn.dense_user

        def slow_dense(*a, **kw):  # the hybrid's dense path scores rows
            entered.set()
            time.sleep(1.2)
            return original_dense(*a, **kw)

        def counted_dense(*a, **kw):
            calls.append(1)
            return original_knn_dense(*a, **kw)

        als.recommend, als.recommend_user, als.dense_user = slow, slow_user, slow_dense
        knn.recommend, knn.recommend_user, knn.dense_user = counted, counted_user, counted_dense
        err = s.error(
            s.rec.Recommend, pb.RecommendRequest(user_id="7", k=3, model="mix"), timeout=0.5
        )
        assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        # the call reached the slowed model (one whose deadline passes before it
        # reaches the server, on a stalled machine, is never counted)
        assert entered.is_set()
        reg = s.app.metrics.registry

        def count(code):
            return reg.get_sample_value(
                "recserve_rpc_duration_seconds_count", {"method": "Recommend", "code": code}
            )

        assert wait_for(lambda: count("DEADLINE_EXCEEDED") == 1)
        assert calls == []  # the second component never ran: work stopped at the deadline

        entered.clear()
        fut = s.rec.Recommend.future(pb.RecommendRequest(user_id="7", k=3, model="als"))
        assert entered.wait(10)  # the call is in the model: cancel it there
        assert fut.cancel() and fut.cancelled()
        if s.app.cfg.server == "threads":
            assert wait_for(lambda: count("CANCELLED") == 1)
        else:
            # grpc.aio computes on the loop, which sees the cancel only after the
            # answer is built: the call is then recorded as answered (the client
            # still sees CANCELLED). Either way it is recorded exactly once.
            assert wait_for(lambda: (count("CANCELLED") or 0) + (count("OK") or 0) == 1)

        entered.clear()
        call = s.rec.RecommendStream(pb.RecommendRequest(user_id="7", k=3, model="als"))
        assert entered.wait(10)  # the stream's ranking is being computed: cancel it
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() is grpc.StatusCode.CANCELLED
        assert wait_for(
            lambda: (
                reg.get_sample_value(
                    "recserve_rpc_duration_seconds_count",
                    {"method": "RecommendStream", "code": "CANCELLED"},
                )
                == 1
            )
        )
        answered = reg.get_sample_value(
            "recserve_requests_total",
            {"method": "RecommendStream", "model": "als", "served_by": "als", "arm": ""},
        )
        # The ranking was computed (the model was entered) but never streamed: the
        # call counts as cancelled, not as an answered request, with no items.
        assert answered is None
        returned = reg.get_sample_value(
            "recserve_returned_items_total", {"method": "RecommendStream"}
        )
        assert not returned


def test_draining_refuses_new_calls_with_unavailable(published):
    root, _ = published
    with running(root) as s:
        s.app.draining = True
        err = s.error(s.rec.Recommend, pb.RecommendRequest(user_id="7", k=3))
        assert err.code() is grpc.StatusCode.UNAVAILABLE and "draining" in err.details()
        s.app.draining = False


@pytest.mark.parametrize("server", ["threads", "asyncio"])
def test_drain_closes_the_store_only_after_a_commit_in_progress_returned(published, server):
    """drain(grace=0) with a RecordInteractions commit still inside the store:
    gRPC's stop returns once the call is cancelled, while the thread running the
    handler is still in the commit. The store must not be closed under it (on
    the threads server it was: drain went straight on to store.close())."""
    root, _ = published
    entered, gate = threading.Event(), threading.Event()
    order: list[str] = []
    with running(root, server=server) as s:
        store = s.app.core.store
        append, close = store.append, store.close

        def slow_append(events):
            entered.set()
            gate.wait(10)
            out = append(events)
            order.append("append returned")
            return out

        def traced_close():
            order.append("close")
            close()

        store.append, store.close = slow_append, traced_close
        call = s.rec.RecordInteractions.future(
            iter([pb.Interaction(user_id="u1", item_id="1")]), timeout=10
        )
        assert entered.wait(10)
        drain = threading.Thread(target=s.app.drain, kwargs={"grace": 0})
        drain.start()
        time.sleep(0.5)
        assert order == []  # drain waits for the commit
        gate.set()
        drain.join(15)
        assert not drain.is_alive()
        assert order == ["append returned", "close"]
        with contextlib.suppress(grpc.RpcError):
            call.result()


def test_feedback_is_applied_and_survives_a_restart(published, small, tmp_path):
    root, models = published
    db = tmp_path / "feedback.sqlite"
    m = models["als"]
    u = small.users.get("33")
    new = ["1", "2", "3", "4"]
    row = small.interactions[u]
    hist_i = np.concatenate([row.indices, m.items.index(new)])
    hist_v = np.concatenate([row.data, np.full(4, 5.0, np.float32)])
    want, _ = m.recommend_from_history(hist_i, hist_v, k=10)
    with running(root, feedback_db=str(db)) as s:
        before, _ = s.recommend(user_id="33", k=10, model="als")
        events = [pb.Interaction(user_id="33", item_id=i, value=5.0) for i in new]
        events += [
            pb.Interaction(user_id="33", item_id="no-such-item"),
            pb.Interaction(user_id="", item_id="1"),
            pb.Interaction(user_id="33", item_id="1", value=float("inf")),
            pb.Interaction(user_id="33", item_id="1", value=3e38),  # beyond MAX_VALUE
        ]
        summary = s.rec.RecordInteractions(iter(events), timeout=10)
        assert (summary.accepted, summary.rejected) == (4, 4)
        after, _ = s.recommend(user_id="33", k=10, model="als")
        assert ids(after) == m.items.ids(want) and ids(after) != ids(before)
        assert not set(ids(after)) & set(new)  # recorded items now count as seen
    with running(root, feedback_db=str(db)) as s:
        again, _ = s.recommend(user_id="33", k=10, model="als")
    assert ids(again) == ids(after)


def test_a_long_record_stream_is_committed_batch_by_batch(published, small):
    # 2,500 events: two full commits mid-stream and the rest at its end, with
    # rejected events among them; the same events again are duplicates.
    root, _ = published
    rng = np.random.default_rng(5)
    items = small.items.ids(np.arange(small.n_items))
    events = [
        pb.Interaction(
            user_id=f"rec-{i % 700}", item_id=items[rng.integers(len(items))], event_id=f"e{i}"
        )
        for i in range(2_500)
    ]
    for i in (10, 1_500, 2_499):
        events[i] = pb.Interaction(user_id="rec-1", item_id="no-such-item", event_id=f"bad{i}")
    with running(root) as s:
        summary = s.rec.RecordInteractions(iter(events), timeout=30)
        assert (summary.accepted, summary.rejected, summary.duplicates) == (2_497, 3, 0)
        again = s.rec.RecordInteractions(iter(events[:1_200]), timeout=30)
        assert (again.accepted, again.rejected, again.duplicates) == (0, 1, 1_199)
        for user in ("rec-5", "rec-699"):  # recorded in the first batch / the last
            seen = {e.item_id for e in events if e.user_id == user}
            got, _ = s.recommend(user_id=user, k=100, model="popularity")
            assert len(got) == 100 and not set(ids(got)) & seen


def test_reload_switches_versions_and_refuses_corrupt_ones(published, small, tmp_path):
    import shutil

    root = tmp_path / "models"
    shutil.copytree(published[0], root)
    with running(root) as s:
        old = s.app.catalog.get("popularity").version
        reloaded = s.admin.ReloadModels(pb.ReloadModelsRequest())
        assert not reloaded.reloaded and not reloaded.refused
        published[1]["popularity"].save(root, "popularity")
        bad = published[1]["itemknn"].save(root, "itemknn")
        victim = next(p for p in bad.iterdir() if p.suffix == ".npy")
        flip_byte(victim)  # same size, other bytes
        out = s.admin.ReloadModels(pb.ReloadModelsRequest())
        assert [m.name for m in out.reloaded] == ["popularity"]
        assert out.reloaded[0].version != old
        assert [m.name for m in out.refused] == ["itemknn"] and "sha256" in out.refused[0].error
        items, md = s.recommend(user_id="7", k=3, model="itemknn")
        assert len(items) == 3 and "x-recserve-served-by" not in md  # old version serves
        assert md["x-recserve-version"] != bad.name


def test_unavailable_while_nothing_is_loaded(published):
    root, _ = published
    gate = Gate(*published[1])
    with running(root, loader=gate, wait=False) as s:
        err = s.error(s.rec.Recommend, pb.RecommendRequest(user_id="7", k=3))
        assert err.code() is grpc.StatusCode.UNAVAILABLE and err.details().startswith("model:")
        assert health(s.channel) == NOT_SERVING
        gate.release("popularity")
        assert wait_for(lambda: health(s.channel) == SERVING)
        items, md = s.recommend(user_id="7", k=3, model="als")
        assert md["x-recserve-served-by"] == "popularity" and len(items) == 3
        for name in gate.events:
            gate.release(name)


class SlowModel:
    """Makes a served model's plain Recommend take `seconds` longer (0: as it was),
    counting its calls, until the with block ends."""

    def __init__(self, model, seconds: float = 0.0) -> None:
        self.model, self.original, self.calls, self.seconds = model, None, 0, seconds

    def __enter__(self) -> SlowModel:
        self.original = self.model.recommend_user
        self.model.recommend_user = self
        return self

    def __exit__(self, *exc) -> None:
        self.model.recommend_user = self.original

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.seconds:
            time.sleep(self.seconds)
        return self.original(*a, **kw)


def test_a_call_whose_deadline_cannot_be_met_is_refused_uncomputed(published):
    """Deadline-aware shedding: once Recommend takes ~0.6 s, a call with 0.3 s left
    is refused at once (UNAVAILABLE, OVERLOADED, cause deadline, pushback -1: a
    retry cannot help) and never reaches the model; one with time enough is answered."""
    root, _ = published
    with running(root) as s, SlowModel(s.app.catalog.get("als").model, 0.6) as slow:
        req = pb.RecommendRequest(user_id="7", k=3, model="als")
        for _ in range(core_module.PACE_MIN):  # the pace: ~0.6 s
            s.recommend(user_id="7", k=3, model="als")
        before = slow.calls
        t0 = time.perf_counter()
        err = s.error(s.rec.Recommend, req, timeout=0.3)
        took = time.perf_counter() - t0
        assert err.code() is grpc.StatusCode.UNAVAILABLE and took < 0.3
        info = error_info(status_details(err))
        assert info.reason == "OVERLOADED" and info.metadata["cause"] == "deadline"
        assert dict(err.trailing_metadata())["grpc-retry-pushback-ms"] == "-1"
        assert slow.calls == before  # never computed
        rejected = s.app.core.metrics.rejected.labels("Recommend", "DEADLINE")._value.get()
        assert rejected == 1
        items, _ = s.recommend(user_id="7", k=3, model="als")  # 10 s: answered
        assert len(items) == 3


def test_one_heavy_call_does_not_refuse_the_short_deadlines_after_it(published):
    """The pace is a low quantile of recent answers, not their average: one call
    of 4 s among quick ones (a k=1000 request with explanations, say) leaves
    calls with 0.3 s deadlines answered. With an average (weight 0.1 for the
    newest) it rose to ~0.4 s, and every such call after it was refused."""
    root, _ = published
    with running(root) as s, SlowModel(s.app.catalog.get("als").model) as slow:
        req = pb.RecommendRequest(user_id="7", k=3, model="als")
        for _ in range(2 * core_module.PACE_MIN):
            assert len(s.rec.Recommend(req, timeout=10).items) == 3
        slow.seconds = 4.0
        assert len(s.rec.Recommend(req, timeout=10).items) == 3
        slow.seconds = 0.0
        for _ in range(20):
            assert len(s.rec.Recommend(req, timeout=0.3).items) == 3
        assert s.app.core.metrics.rejected.labels("Recommend", "DEADLINE")._value.get() == 0


def test_a_pace_no_answer_renews_stops_refusing(published):
    """Refused calls add no answers, so a pace from a slow spell would refuse a
    client with short deadlines for good once the model is fast again (with an
    average it did: every such call refused, without end). A pace not renewed
    for PACE_STALE_S (or 4x the pace) is dropped: the calls are answered again,
    and their quick answers make the new pace."""
    root, _ = published
    with running(root) as s, SlowModel(s.app.catalog.get("als").model, 0.6) as slow:
        req = pb.RecommendRequest(user_id="7", k=3, model="als")
        for _ in range(core_module.PACE_MIN):
            assert len(s.rec.Recommend(req, timeout=10).items) == 3
        slow.seconds = 0.0  # fast again, but only short-deadline calls come
        err = s.error(s.rec.Recommend, req, timeout=0.3)
        assert error_info(status_details(err)).metadata["cause"] == "deadline"

        def answered() -> bool:
            try:
                return len(s.rec.Recommend(req, timeout=0.3).items) == 3
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE
                return False

        t0 = time.monotonic()
        wait_for(answered, timeout=10, what="a short-deadline call answered")
        assert time.monotonic() - t0 >= core_module.PACE_STALE_S - 0.1  # not at once
        for _ in range(20):  # and from then on
            assert len(s.rec.Recommend(req, timeout=0.3).items) == 3


def test_a_pace_is_a_low_quantile_of_recent_answers_and_expires():
    pace = core_module.Pace()
    for i, took in enumerate([0.001] * (core_module.PACE_MIN - 1)):
        pace.add(took, 10.0 + i * 0.01)
    assert pace.now(10.1) == 0.0  # too few answers to trust
    pace.add(0.001, 10.05)
    assert pace.now(10.1) == pytest.approx(0.001)
    for t in range(5):
        pace.add(2.0, 10.1 + t * 0.01)  # a few heavy answers among 32 recent ones
    assert pace.now(10.2) == pytest.approx(0.001)
    for t in range(core_module.PACE_SAMPLES):
        pace.add(0.5, 10.2 + t * 0.01)  # the method slowed down: every recent answer
    last = 10.2 + (core_module.PACE_SAMPLES - 1) * 0.01
    assert pace.now(last) == pytest.approx(0.5)
    assert pace.now(last + 1.9) == pytest.approx(0.5)  # renewed within 4x the pace
    assert pace.now(last + 2.1) == 0.0  # stale: dropped
    pace.add(0.002, last + 2.1)  # a new spell starts from its own answers
    assert pace.now(last + 2.2) == 0.0
    for i in range(core_module.PACE_MIN - 1):
        pace.add(0.002, last + 2.2 + i * 0.01)
    assert pace.now(last + 2.3) == pytest.approx(0.002)


def test_calls_are_refused_while_the_queue_wait_stays_over_its_budget(published):
    """Queue-time admission: work waiting for the loop longer than queue_budget_ms
    for at least that long refuses new calls at once (OVERLOADED, cause queue,
    RetryInfo); one late probe alone is forgiven, and a short wait re-admits."""
    root, _ = published
    with running(root, server="threads", queue_budget_ms=50) as s:  # no probe: fed here
        core = s.app.core
        req = pb.RecommendRequest(user_id="7", k=3, model="als")
        core.note_wait(0.2)  # a backlog just began: not yet refused
        assert len(s.rec.Recommend(req, timeout=10).items) == 3
        time.sleep(0.06)
        core.note_wait(0.2)  # still over the budget a budget's length later
        err = s.error(s.rec.Recommend, req)
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        info = error_info(status_details(err))
        assert info.reason == "OVERLOADED" and info.metadata["cause"] == "queue"
        assert s.app.core.metrics.rejected.labels("Recommend", "QUEUE")._value.get() == 1
        core.note_wait(0.001)  # the backlog drained
        assert len(s.rec.Recommend(req, timeout=10).items) == 3
        core.note_wait(0.2, busy=0.05)  # late, but the loop was off the CPU:
        time.sleep(0.06)
        core.note_wait(0.2, busy=0.05)  # held back by others, not by calls
        assert len(s.rec.Recommend(req, timeout=10).items) == 3


@pytest.mark.parametrize("server", ["threads", "asyncio"])
def test_a_request_stream_broken_off_is_the_caller_gone_not_an_error(published, server, caplog):
    """A client that cancels a RecommendBatch or RecordInteractions while still
    streaming requests, or whose deadline passes then, is never counted INTERNAL
    with a logged traceback (found under overload on the thread-pool server). A
    passed deadline counts DEADLINE_EXCEEDED or CANCELLED, a cancel CANCELLED;
    either may end the request stream before gRPC reports why, and then the
    part answered counts OK."""
    root, _ = published
    gone = {"CANCELLED", "OK"}
    with running(root, server=server) as s:
        reg = s.app.core.metrics.registry

        def codes(method: str) -> dict[str, float]:
            name = "recserve_rpc_duration_seconds_count"
            samples = [x for metric in reg.collect() for x in metric.samples if x.name == name]
            return {
                x.labels["code"]: x.value
                for x in samples
                if x.labels["method"] == method and x.value
            }

        def stalled(first, seconds: float = 1.5):  # one request, then nothing for a while
            yield first
            time.sleep(seconds)

        req = pb.RecommendRequest(user_id="7", k=3, model="als")
        call = s.rec.RecommendBatch(stalled(req), timeout=30)
        assert len(next(call).items) == 3
        call.cancel()
        got = wait_for(lambda: codes("RecommendBatch"), what="the cancelled batch's end")
        assert set(got) <= gone and sum(got.values()) == 1, got
        # The first answer shows the server has the call (one whose deadline passes
        # before it reaches the server, on a stalled machine, is never counted: a
        # fresh-clone CI run failed so with a 0.5 s deadline); then the deadline
        # passes while the server waits for the next request.
        call = s.rec.RecommendBatch(stalled(req, 4.0), timeout=2.0)
        assert len(next(call).items) == 3
        with pytest.raises(grpc.RpcError) as late_err:
            next(call)
        assert late_err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        try:
            wait_for(lambda: sum(codes("RecommendBatch").values()) == 2, what="the late batch")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; counted: {codes('RecommendBatch')}") from None
        late = codes("RecommendBatch")
        assert set(late) <= gone | {"DEADLINE_EXCEEDED"}, late
        event = pb.Interaction(user_id="7", item_id="1", event_id="e-broken-1")
        fut = s.rec.RecordInteractions.future(stalled(event), timeout=30)
        time.sleep(0.3)
        fut.cancel()
        got = wait_for(lambda: codes("RecordInteractions"), what="the cancelled record's end")
        assert set(got) <= gone, got
        assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_shorter_deadline_is_not_taken_for_a_wait_when_the_loop_was_just_idle(
    published, monkeypatch
):
    """A peer's 30 s call, then its 2 s one: the 2 s call has 28 s less left,
    which accept-queue shedding reads as a wait while the loop is saturated. A
    pause of the loop (a collection) marked it saturated once, and such a fresh
    call was refused as ~28 s late (a make test run). A loop that found nothing
    to do moments ago had taken in every call gRPC held: the call cannot have
    waited longer than since then, and is answered. Without that bound (the
    thread-pool server keeps no such clock) the same call is refused.

    The machine is made calm for the loop (no CPU pressure, its thread never
    waiting for a CPU): quiet moments are trusted only then (see
    test_quiet_moments_are_not_trusted_while_the_machine_keeps_threads_waiting),
    and on a loaded machine none came within 30 s when this test ran after others."""
    root, _ = published
    monkeypatch.setattr(aio_module, "cpu_pressure", lambda: 0.0)
    monkeypatch.setattr(aio_module, "run_queue_wait", lambda: 0.0)
    with running(root, server="asyncio", queue_budget_ms=50) as s:
        core = s.app.core
        req = pb.RecommendRequest(user_id="7", k=3, model="als")
        assert s.rec.Recommend(req, timeout=30).items  # the peer's best: ~30 s left
        wait_for(lambda: core.quiet_at() > 0, what="the loop to wait for events")
        core._saturated_until = time.monotonic() + 60  # as after a pause of the loop
        created = core.created
        core.created -= 60  # a server up for a minute: its age bounds no wait here
        assert s.rec.Recommend(req, timeout=2).items
        bound = core.quiet_at
        core.quiet_at = None
        with pytest.raises(grpc.RpcError) as refused:
            s.rec.Recommend(req, timeout=2)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "to be accepted" in refused.value.details()
        # A server younger than the supposed wait: no call waited that long
        # (the machine's pressure kept the quiet moments untrusted in a
        # fresh-clone CI run, and such a call was refused as ~28 s late).
        core.created = created
        assert s.rec.Recommend(req, timeout=2).items
        core.quiet_at = bound
        assert s.rec.Recommend(req, timeout=2).items


def test_a_wait_right_after_events_is_not_a_quiet_moment(monkeypatch):
    """The bound above trusts a select that found nothing only once the loop has
    found no events for QUIET_SPAN: the call gRPC matches when the loop asks for
    the next one comes through gRPC's own threads, and a wait just after events
    can end before it arrives."""
    monkeypatch.setattr(aio_module, "QUIET_SPAN", 0.3)
    sel, (a, b) = aio_module.TimedSelector(), socket.socketpair()
    try:
        sel.register(a, selectors.EVENT_READ)
        b.send(b"x")
        assert sel.select(5.0) and sel.quiet_at == 0.0  # events: not quiet
        a.recv(1)
        assert sel.select(0.001) == [] and sel.quiet_at == 0.0  # empty, but just after them
        time.sleep(0.3)
        assert sel.select(0.001) == [] and sel.quiet_at > sel.events_at + 0.3
        assert sel.select(0) == [] and sel.idle > 0  # a poll neither waits nor is quiet
    finally:
        sel.close()
        a.close()
        b.close()


@pytest.mark.parametrize("pressure", ["contended", "unknown"])
def test_quiet_moments_are_not_trusted_while_the_machine_keeps_threads_waiting(
    published, monkeypatch, pressure
):
    """A select finds nothing while gRPC holds calls when gRPC's threads, which hand
    them to the loop, wait for a CPU, and the calls are then admitted as if they had
    not waited (with two busy processes: 39-51 of a 300-call burst computed, not
    17-20; suspected in two fresh-clone CI runs that computed 101 and 109). The loop's quiet
    moments count only from windows in which no thread on the machine waited for
    a CPU more than QUIET_TRUST_PRESSURE of the time (Linux PSI), and none where
    that is unknown; a calm window does not adopt the moments judged before it,
    only its own."""
    root, _ = published
    state = {"mode": pressure, "total": 0.0, "t": time.monotonic()}

    def fake_pressure() -> float | None:
        now = time.monotonic()
        if state["mode"] == "contended":  # a thread waits for a CPU half the time
            state["total"] += 0.5 * (now - state["t"])
        state["t"] = now
        return None if state["mode"] == "unknown" else state["total"]

    monkeypatch.setattr(aio_module, "cpu_pressure", fake_pressure)
    with running(root, server="asyncio", queue_budget_ms=50) as s:
        core = s.app.core
        assert s.rec.Recommend(pb.RecommendRequest(user_id="7", k=3, model="als")).items
        time.sleep(0.3)  # idle: a hundred empty selects, fifteen windows
        assert s.app.transport.selector.quiet_at > 0  # the loop did find nothing
        assert core.quiet_at() == 0.0  # but none of those moments is trusted
        monkeypatch.setattr(aio_module, "QUIET_SPAN", 1e9)  # no new quiet moment
        time.sleep(0.05)  # the windows with the last ones end, still contended
        state["mode"] = "calm"
        time.sleep(0.1)  # calm windows: the moments judged before stay untrusted
        assert core.quiet_at() == 0.0
        monkeypatch.setattr(aio_module, "QUIET_SPAN", 0.01)
        wait_for(lambda: core.quiet_at() > 0, what="a quiet moment of a calm window")


class LoopCall:
    """A call as the core sees it, with fixed time left, for admissions made on
    the loop by hand."""

    def __init__(self, remaining: float, peer: str) -> None:
        self.remaining, self._peer = remaining, peer

    def time_remaining(self) -> float:
        return self.remaining

    def cancelled(self) -> bool:
        return False

    def invocation_metadata(self) -> list:
        return []

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize("judged", [True, False])
def test_calls_admitted_late_in_one_loop_turn_see_the_saturation_of_that_turn(
    published, monkeypatch, judged
):
    """The loop runs, in one turn, the callbacks of every call gRPC handed over at
    once; the probe is a timer and waits for the next turn. Calls computed back to
    back in such a turn were all admitted, however late, because the saturation
    last judged was from before it (a starved 300-call burst: 16-22 computed,
    but 25-34 in 5 rounds of 100, bench/bench_burst.py, and 53 in one run of
    test_overload_on_a_starved_machine_is_refused_fast_too). A late call now
    judges the probe's window itself once it has outlasted its length, as the
    probe would. The reference: without that judgement it is admitted."""
    root, _ = published
    with running(root, server="asyncio", queue_budget_ms=50) as s:
        core, loop = s.app.core, s.app.transport.loop
        if not judged:
            monkeypatch.setattr(core, "judge_open_window", None)
        outcome: list[str] = []

        def turn() -> None:
            peer = "ipv4:127.0.0.1:9"
            with core.session("Recommend", LoopCall(2.0, peer)):
                pass  # the peer's best: 2 s left, on an idle loop
            # Computing: no select, no probe meanwhile. Long against the up to
            # ~20 ms of idle loop the open window began with (a 0.4 s turn left
            # it just over SATURATED_IDLE once in a full run: admitted).
            end = time.perf_counter() + 1.0
            while time.perf_counter() < end:
                pass
            try:
                with core.session("Recommend", LoopCall(1.0, peer)):  # lost ~1 s
                    outcome.append("admitted")
            except core_module.Failure as f:
                outcome.append(f.info.get("cause", f.reason))

        loop.call_soon_threadsafe(turn)
        wait_for(lambda: outcome, what="the turn")
        assert outcome == (["accept-queue"] if judged else ["admitted"])


def test_calls_that_waited_in_grpcs_queue_are_refused_while_the_loop_is_saturated(
    published, monkeypatch
):
    """Accept-queue shedding: while the loop is saturated (no idle moment, its
    thread busy), a call that lost more than queue_budget_ms, and more than a
    quarter of its deadline, before admission (against the best lately of its
    peer's calls to that method) is refused uncomputed (OVERLOADED, cause
    accept-queue, RetryInfo), also for SATURATION_HOLD_S after the last
    saturated window. Unsaturated since, or held back by other threads, or
    without a deadline, the same call is answered. A loop starved by the machine
    (runnable, waiting for a CPU) is saturated."""
    root, _ = published
    monkeypatch.setattr(core_module, "SATURATION_HOLD_S", 1.0)  # outlasts a slow machine's calls
    with running(root, server="threads", queue_budget_ms=50) as s:  # no probe: fed here
        core = s.app.core
        core.created -= 600  # up for ten minutes: the waits below are faked by deadlines
        als = s.app.catalog.get("als").model
        original, calls = als.recommend_user, []
        als.recommend_user = lambda *a, **kw: (calls.append(1), original(*a, **kw))[1]
        req = pb.RecommendRequest(user_id="7", k=3, model="als")
        try:
            core.note_idle(0.0, busy=1.0)  # saturated
            assert len(s.rec.Recommend(req, timeout=30).items) == 3  # the peer's best: ~30 s
            before = len(calls)
            err = s.error(s.rec.Recommend, req, timeout=10)  # looks ~20 s late: refused
            assert err.code() is grpc.StatusCode.UNAVAILABLE
            info = error_info(status_details(err))
            assert info.reason == "OVERLOADED" and info.metadata["cause"] == "accept-queue"
            assert int(info.metadata["waited_ms"]) > 19_000
            # a quarter of ~30 s left, which the wire may carry rounded up by up to
            # TIMEOUT_ROUNDING (a 30 s timeout arrived as 30.099 s, measured)
            quarter = 0.25 * 30_000 * (1 + core_module.TIMEOUT_ROUNDING)
            assert 7400 < int(info.metadata["allowed_ms"]) <= quarter
            delay = retry_info(status_details(err)).retry_delay.ToMilliseconds()
            assert delay == s.app.cfg.overload_retry_ms
            assert len(calls) == before  # never computed
            assert core.metrics.rejected.labels("Recommend", "ACCEPT_QUEUE")._value.get() == 1
            # the same peer's other methods have deadlines of their own: not compared
            assert len(list(s.rec.RecommendStream(req, timeout=10))) == 3
            assert len(s.rec.Recommend(req).items) == 3  # no deadline: nothing to tell
            assert len(s.rec.Recommend(req, timeout=23).items) == 3  # 7 s: within a quarter
            assert s.error(s.rec.Recommend, req, timeout=10).code() is grpc.StatusCode.UNAVAILABLE
            core.note_idle(0.5, busy=1.0)  # an idle moment: still saturated for a while
            assert s.error(s.rec.Recommend, req, timeout=10).code() is grpc.StatusCode.UNAVAILABLE
            time.sleep(1.05)  # no saturated window for SATURATION_HOLD_S
            assert len(s.rec.Recommend(req, timeout=10).items) == 3
            core.note_idle(0.0, busy=0.1)  # not idle, but off the CPU: held back or blocked
            assert len(s.rec.Recommend(req, timeout=10).items) == 3
            core.note_idle(0.0, busy=0.1, waiting=0.6)  # runnable, the machine busy elsewhere:
            # a starved loop, and calls queue behind it all the same
            assert s.error(s.rec.Recommend, req, timeout=10).code() is grpc.StatusCode.UNAVAILABLE
        finally:
            als.recommend_user = original


def test_a_peer_with_deadlines_of_different_lengths_is_not_taken_for_a_queue(
    published, monkeypatch
):
    """A 10 s Recommend after the same peer's 30 s ones looks ~20 s late to
    accept-queue shedding; on a saturated loop it was refused (a clean fuzz run
    failed so: 10 s calls, then 30 s ones, then 10 s ones). A call admitted
    while the loop is not saturated did not wait, so its time left is its
    deadline; a later call with DEADLINE_CLASSES times more shows the peer
    gives the method deadlines of different lengths (queueing never adds
    time), and its calls are not judged by their deadlines for a while. A
    peer with one deadline still is. (A peer whose first calls are the long
    ones is not told apart: docs/serving.md.)"""
    root, _ = published
    monkeypatch.setattr(core_module, "SATURATION_HOLD_S", 30.0)
    own = [("grpc.use_local_subchannel_pool", 1)]  # its own connection: its own peer
    req = pb.RecommendRequest(user_id="7", k=3, model="als")
    with running(root, server="threads", queue_budget_ms=50) as s:  # no probe: fed here
        core = s.app.core
        core.created -= 600  # up for ten minutes: the waits below are faked by deadlines
        assert len(s.rec.Recommend(req, timeout=10).items) == 3  # calm: its deadline
        core.note_idle(0.0, busy=1.0)  # saturated from here on
        assert len(s.rec.Recommend(req, timeout=30).items) == 3  # three times as long
        for timeout in (10, 2, 30, 10):
            assert len(s.rec.Recommend(req, timeout=timeout).items) == 3
        assert core.metrics.rejected.labels("Recommend", "ACCEPT_QUEUE")._value.get() == 0
        with grpc.insecure_channel(s.target, options=own) as ch:  # one deadline
            other = pb_grpc.RecommenderStub(ch)
            assert len(other.Recommend(req, timeout=30).items) == 3
            with pytest.raises(grpc.RpcError) as info:
                other.Recommend(req, timeout=10)  # looks ~20 s late: refused
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert core.metrics.rejected.labels("Recommend", "ACCEPT_QUEUE")._value.get() == 1


def test_bulk_calls_are_shed_first_while_the_server_sheds(published, monkeypatch):
    """While other calls are being shed (an accept-queue refusal of a Recommend
    in the last SHED_HEAVY_S), a RecommendBatch is refused at once (OVERLOADED, cause heavy,
    RetryInfo) and never computed, while a Recommend that did not wait is still
    answered. Before any shedding, on a saturated loop, and once SHED_HEAVY_S has
    passed, the same batch is answered in full."""
    root, _ = published
    monkeypatch.setattr(core_module, "SATURATION_HOLD_S", 30.0)
    monkeypatch.setattr(core_module, "SHED_HEAVY_S", 1.0)
    with running(root, server="threads", queue_budget_ms=50) as s:  # no probe: fed here
        core = s.app.core
        core.created -= 600  # up for ten minutes: the waits below are faked by deadlines
        als = s.app.catalog.get("als").model
        original, calls = als.recommend_user, []
        als.recommend_user = lambda *a, **kw: (calls.append(1), original(*a, **kw))[1]
        req = pb.RecommendRequest(user_id="7", k=3, model="als")
        batch = [pb.RecommendRequest(user_id=str(u), k=3, model="als") for u in (7, 8, 9)]
        try:
            core.note_idle(0.0, busy=1.0)  # saturated, nothing shed yet
            assert [len(r.items) for r in s.rec.RecommendBatch(iter(batch), timeout=30)] == [3] * 3
            # a batch's own accept-queue refusal does not start shedding bulk calls:
            # a load of batches alone is shed by the queue rules
            err = s.error(s.rec.RecommendBatch, iter(batch), timeout=10)
            assert error_info(status_details(err)).metadata["cause"] == "accept-queue"
            assert [len(r.items) for r in s.rec.RecommendBatch(iter(batch), timeout=30)] == [3] * 3
            assert len(s.rec.Recommend(req, timeout=30).items) == 3  # the peer's best: ~30 s
            err = s.error(s.rec.Recommend, req, timeout=10)  # looks ~20 s late: shed
            assert error_info(status_details(err)).metadata["cause"] == "accept-queue"
            before = len(calls)
            err = s.error(s.rec.RecommendBatch, iter(batch), timeout=30)
            assert err.code() is grpc.StatusCode.UNAVAILABLE
            info = error_info(status_details(err))
            assert info.reason == "OVERLOADED" and info.metadata["cause"] == "heavy"
            assert "RecommendBatch" in err.details()
            delay = retry_info(status_details(err)).retry_delay.ToMilliseconds()
            assert delay == s.app.cfg.overload_retry_ms
            assert len(calls) == before  # never computed
            assert core.metrics.rejected.labels("RecommendBatch", "HEAVY")._value.get() == 1
            assert len(s.rec.Recommend(req, timeout=30).items) == 3  # a cheap call: answered
            time.sleep(1.05)  # no refusal for SHED_HEAVY_S
            assert [len(r.items) for r in s.rec.RecommendBatch(iter(batch), timeout=30)] == [3] * 3
        finally:
            als.recommend_user = original


# Busy work on one CPU (argv[1]), as the machine's other processes are; ends within 30 s.
HOG = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
end = time.monotonic() + 30
while time.monotonic() < end:
    pass
"""


@contextlib.contextmanager
def starved(hogs: int):
    """This process's threads share one CPU with `hogs` busy processes: each
    runnable thread of ours gets about 1 / (hogs + 1) of it."""
    if not hogs:
        yield
        return
    cpu = min(os.sched_getaffinity(0))
    tasks = {int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}
    procs = [subprocess.Popen([sys.executable, "-c", HOG, str(cpu)]) for _ in range(hogs)]
    try:
        for tid in tasks:
            with contextlib.suppress(OSError):  # a thread may have ended
                os.sched_setaffinity(tid, {cpu})
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(30)
        for tid in (int(t) for t in os.listdir("/proc/self/task")):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, tasks.get(tid, tasks[min(tasks)]))


# n Recommend calls (als, `timeout` s deadlines) from another process; prints their codes.
BURST_CLIENT = """
import json, sys
import grpc
from recserve.v1 import recommender_pb2_grpc as pb_grpc
from tests.test_service import _burst_codes
target, n, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rec = pb_grpc.RecommenderStub(grpc.insecure_channel(target))
print(json.dumps(_burst_codes(rec, n, timeout)))
"""


def _burst_codes(rec, n: int, timeout: float, before_results=None) -> collections.Counter:
    """n Recommend calls (als) sent at once through stub `rec`; their status
    codes. `before_results` runs between sending and reading the answers."""
    req = pb.RecommendRequest(user_id="7", k=3, model="als")
    futures = [rec.Recommend.future(req, timeout=timeout) for _ in range(n)]
    if before_results is not None:
        before_results()
    codes: collections.Counter = collections.Counter()
    for f in futures:
        try:
            f.result()
            codes["OK"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
    return codes


def _held_burst(
    s, n: int, timeout: float, settle: float, spin_s: float = 0.0, hogs: int = 0
) -> tuple[collections.Counter, int]:
    """n Recommend calls (als) queued behind a first one held until `settle` s
    after it reached the model, each then computed for `spin_s` more on the
    server (holding the GIL). The status codes, and how many calls reached the
    model. `hogs`: busy processes the server's process shares one CPU with
    meanwhile; the calls then come from another process, as a server's clients
    do (from this one, their callbacks took the starved CPU and the GIL from
    the loop: 16-46 calls computed and once 54 expired, against 16-22 and none)."""
    als = s.app.catalog.get("als").model
    original, calls, gate = als.recommend_user, [], threading.Event()

    def slow(*a, **kw):
        calls.append(1)
        gate.wait(timeout + 10)  # the first call holds the server while the rest queue
        end = time.perf_counter() + spin_s
        while time.perf_counter() < end:
            pass
        return original(*a, **kw)

    als.recommend_user = slow
    try:
        if hogs:
            args = [s.target, str(n), str(timeout)]
            client = subprocess.Popen(
                [sys.executable, "-c", BURST_CLIENT, *args],
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parents[1],  # `tests` importable
            )  # started before the pinning: it keeps every CPU
            try:
                wait_for(lambda: calls, what="the first call to reach the model")
                with starved(hogs):
                    time.sleep(settle)  # the rest reach the server and wait in gRPC's queue
                    gate.set()
                    out, _ = client.communicate(timeout=timeout + 60)
            finally:
                client.kill()
            return collections.Counter(json.loads(out)), len(calls)

        def release() -> None:
            wait_for(lambda: calls, what="the first call to reach the model")
            time.sleep(settle)  # the rest reach the server and wait in gRPC's queue
            gate.set()

        with starved(hogs):
            codes = _burst_codes(s.rec, n, timeout, release)
    finally:
        als.recommend_user = original
        gate.set()
    return codes, len(calls)


def _burst_on_a_busy_loop(
    root, monkeypatch, shedding: bool, hogs: int = 0
) -> tuple[collections.Counter, int]:
    """300 Recommend calls (3 s deadlines) queued behind a held first one, then
    computed at 20 ms each on the loop (holding the GIL): twice the deadline's
    worth of work. The status codes, and how many calls reached the model.
    `hogs`: busy processes this process shares one CPU with meanwhile."""
    if not shedding:
        monkeypatch.setattr(core_module, "SATURATED_IDLE", -1.0)
    with running(root, server="asyncio", queue_budget_ms=100) as s:
        return _held_burst(s, 300, timeout=3, settle=0.3, spin_s=0.02, hogs=hogs)


def test_overload_on_the_loop_is_refused_fast_not_left_to_expire(published, monkeypatch):
    """Accept-queue shedding end to end: past what the loop can compute, the calls
    gRPC holds are refused once they waited past queue_budget_ms (the probe sees
    the saturated loop), so none is left to expire and the refused are never
    computed. The same burst without it: calls expire in gRPC's queue."""
    root, _ = published
    codes, computed = _burst_on_a_busy_loop(root, monkeypatch, shedding=True)
    assert codes["DEADLINE_EXCEEDED"] == 0, codes
    assert codes["OK"] >= 1 and codes["UNAVAILABLE"] >= 100, codes
    assert computed == codes["OK"]
    monkeypatch.undo()
    codes, computed = _burst_on_a_busy_loop(root, monkeypatch, shedding=False)
    assert codes["DEADLINE_EXCEEDED"] >= 50, codes  # the reference: they wait and expire


# The starved burst on a server alone in its process; prints [codes, computed].
STARVED_BURST = """
import json, sys
from pathlib import Path
from tests.test_service import _burst_on_a_busy_loop
codes, computed = _burst_on_a_busy_loop(Path(sys.argv[1]), None, shedding=True, hogs=3)
print(json.dumps([codes, computed]))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_overload_on_a_starved_machine_is_refused_fast_too(published):
    """The same burst while this process shares one CPU with three busy ones:
    the loop's thread runs a quarter of each window at most and waits for the
    CPU the rest, so the loop is saturated and the calls that waited are
    refused, not computed (found by a CI run: 96 computed, 16 expired). Failed
    4 of 4 runs before, and with either half of the fix alone: a loop off the
    CPU counted as held back, and a probe window spanning ten 20 ms calls, all
    computed whenever a hold ran out before saturation was seen again.

    The server runs alone in a process of its own, as in production: another
    grpc.aio server alive in the same process (this module's `srv`, idle) shares
    gRPC's process-wide completion queue and changed the loop's timing, 17 calls
    computed on average becoming 31-35 with one or two idle ones beside it and 56
    in a fresh-clone CI run."""
    root, _ = published
    out = subprocess.run(
        [sys.executable, "-c", STARVED_BURST, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],  # `tests` importable
    )
    assert out.returncode == 0, out.stderr
    got, computed = json.loads(out.stdout.splitlines()[-1])
    codes = collections.Counter(got)
    # the calls that waited are refused, not computed (the old code: 85-89 of 300)
    assert computed <= 50 and codes["UNAVAILABLE"] >= 200, (codes, computed)
    # and so they are answered, not left to expire (the old code: 212-215 expired;
    # a refusal needs the CPU too, which a process starved harder may not get)
    assert codes["DEADLINE_EXCEEDED"] <= 30, codes


@pytest.mark.parametrize("server", ["asyncio", "threads"])
def test_thousands_of_calls_in_flight_are_served_not_cancelled_by_grpc_core(published, server):
    """2,500 Recommend calls with time to spare (30 s deadlines) queued behind a
    held first one: more than gRPC core's default 1,000 pending calls, past
    which core cancels new calls at random (CANCELLED, and clients of streams
    INTERNAL) before recserve's admission sees them. max_pending_calls (10,000
    by default) leaves the queue to recserve: every call is answered. A closed
    loop of 4,096 clients had 29,103 calls CANCELLED in 8 s before
    (docs/performance.md, "Thousands of calls in flight")."""
    root, _ = published
    with running(root, server=server) as s:
        codes, _ = _held_burst(s, 2500, timeout=30, settle=1.0)
    if server == "asyncio":  # the loop was held: all 2,500 waited in gRPC's queue
        assert codes == {"OK": 2500}, codes  # the old limit: 427 CANCELLED
    else:  # 64 threads held (max_concurrency): the rest refused as the contract says
        assert set(codes) <= {"OK", "UNAVAILABLE"} and codes["OK"] >= 64, codes


def test_a_loop_held_back_by_another_thread_is_not_a_queue(published):
    """The asyncio probe sees the loop late while another thread holds the GIL
    (a model loading, the machine's other work): the loop's thread is off the CPU,
    so no call is refused for it (found by CI: an idle server refused a lone
    RecordInteractions on a starved machine)."""
    root, _ = published
    with running(root, server="asyncio", queue_budget_ms=10) as s:
        core, seen = s.app.core, []
        note = core.note_wait
        core.note_wait = lambda seconds, busy=1.0: (seen.append(seconds), note(seconds, busy))
        stop, old = threading.Event(), sys.getswitchinterval()
        sys.setswitchinterval(0.05)  # the spinner keeps the GIL 50 ms at a time

        def spin() -> None:
            while not stop.is_set():
                pass

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        try:
            req = pb.RecommendRequest(user_id="7", k=3, model="als")
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                assert len(s.rec.Recommend(req, timeout=10).items) == 3
        finally:
            stop.set()
            spinner.join()
            sys.setswitchinterval(old)
            core.note_wait = note
        assert max(seen) > 0.02  # the probe did see the loop late
        assert core.metrics.rejected.labels("Recommend", "QUEUE")._value.get() == 0
        assert core.metrics.rejected.labels("Recommend", "ACCEPT_QUEUE")._value.get() == 0


def test_a_server_over_an_empty_models_folder_says_so_and_serves_after_a_reload(small, tmp_path):
    # "unknown model 'popularity' (available: )" told a first-time user nothing:
    # the refusal names the folder and what to do; a reload then serves.
    from recserve.models import create

    root = tmp_path / "models"
    root.mkdir()
    with running(root, wait=False) as s:
        # The default names nothing yet: UNAVAILABLE (retry), which it is
        # until a model is published, not NOT_FOUND (the client asked for none)
        for call, request in (
            (s.rec.Recommend, pb.RecommendRequest(user_id="7", k=3)),
            (s.rec.GetSimilarItems, pb.SimilarItemsRequest(item_id="7", k=3)),
            (s.rec.PredictRatings, pb.PredictRatingsRequest(user_id="7", item_ids=["1"])),
        ):
            err = s.error(call, request)
            assert err.code() is grpc.StatusCode.UNAVAILABLE
            assert f"no model is published under {root} yet" in err.details()
        err = s.error(s.rec.Recommend, pb.RecommendRequest(user_id="7", k=3, model="als"))
        assert err.code() is grpc.StatusCode.NOT_FOUND  # a name the client chose
        assert f"no model is published under {root} yet" in err.details()
        create("popularity").fit(small).save(root, "popularity")
        out = s.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=30)
        assert [m.name for m in out.reloaded] == ["popularity"]
        items, md = s.recommend(user_id="7", k=3)
        assert len(items) == 3 and md["x-recserve-model"] == "popularity"


def test_anonymous_requests_split_over_an_experiments_arms(published):
    # The arm was sha256(salt, user_id): every anonymous request (history only)
    # hashed "" and went to one arm whatever the fractions. Its history's item
    # ids are the key now: the same history keeps its arm, different ones split.
    from recserve.serving.router import arm_key

    root, _ = published
    arms = {"als": 0.5, "itemknn": 0.5}
    exp = {"homepage": Experiment("homepage", arms, "s1")}
    rng = np.random.default_rng(7)
    histories = [
        [str(i) for i in rng.choice(np.arange(1, 200), 5, replace=False)] for _ in range(40)
    ]
    with running(root, experiments=exp) as s:
        got = []
        for items in histories:
            history = [pb.Interaction(item_id=i) for i in items]
            _, md = s.recommend(history=history, k=5, model="homepage")
            q = RecQuery(user_id="", history=[(i, 1.0) for i in items], k=5)
            assert md["x-recserve-arm"] == reference_arm("s1", arm_key(q), arms)
            _, again = s.recommend(history=history, k=5, model="homepage")
            assert again["x-recserve-arm"] == md["x-recserve-arm"]
            got.append(md["x-recserve-arm"])
        assert 8 <= got.count("als") <= 32, got  # 40 draws at 0.5: far from all-or-nothing
