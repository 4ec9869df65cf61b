"""The client contract (proto/recserve/v1): structured errors (AIP-193), zero values
and presence, version pinning, model and version in every body, the unary
similar-items call, ListModels pages, idempotent feedback, the shipped service
config and connection ageing. Each test runs on both transports."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from recserve import contract
from recserve.clients.client import (
    Event,
    RecommenderClient,
    RecserveError,
    shipped_service_config,
)
from recserve.feedback import Event as StoredEvent
from recserve.feedback import FeedbackStore
from recserve.v1 import recommender_pb2 as pb
from tests.service_helpers import (
    bad_request,
    error_info,
    publish_models,
    running,
    status_details,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def published(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, publish_models(small, root)


@pytest.fixture(scope="module", params=["threads", "asyncio"])
def srv(request, published):
    root, _ = published
    with running(root, max_k=500, server=request.param) as s:
        yield s


def reason_of(err: grpc.RpcError) -> str:
    return error_info(status_details(err)).reason


def test_refusals_carry_a_status_with_reason_field_and_violations(srv):
    rec = srv.rec
    nan = float("nan")
    cases = [
        (rec.Recommend, pb.RecommendRequest(user_id="1", k=501), "K_OUT_OF_RANGE", ["k"]),
        (rec.Recommend, pb.RecommendRequest(k=5), "USER_OR_HISTORY_REQUIRED", ["user_id"]),
        (
            rec.RecommendStream,
            pb.RecommendRequest(k=5, history=[pb.Interaction(item_id="1", value=nan)]),
            "VALUE_NOT_FINITE",
            ["history[0].value"],
        ),
        (
            rec.Recommend,
            pb.RecommendRequest(
                k=5,
                history=[
                    pb.Interaction(item_id="1", value=1e30),  # the bound itself is a value
                    pb.Interaction(item_id="2", value=-3e38),
                ],
            ),
            "VALUE_OUT_OF_RANGE",
            ["history[1].value"],
        ),
        (rec.Recommend, pb.RecommendRequest(user_id="x" * 1025), "ID_TOO_LONG", ["user_id"]),
        (
            rec.Recommend,
            pb.RecommendRequest(user_id="1", exclude_item_ids=["1"] * 100_001),
            "TOO_MANY_IDS",
            ["exclude_item_ids"],
        ),
        (
            rec.PredictRatings,
            pb.PredictRatingsRequest(user_id="7", item_ids=["1"], interval=0.0),
            "INTERVAL_OUT_OF_RANGE",
            ["interval"],
        ),
        (
            rec.PredictRatings,
            pb.PredictRatingsRequest(user_id="7", item_ids=["1"], model="als"),
            "NOT_A_RATING_MODEL",
            ["model"],
        ),
        (rec.GetSimilarItems, pb.SimilarItemsRequest(k=3), "FIELD_EMPTY", ["item_id"]),
        (  # an empty or over-long id is malformed, not an item not found
            rec.PredictRatings,
            pb.PredictRatingsRequest(user_id="7", item_ids=["1", ""], model="bayes_mf"),
            "FIELD_EMPTY",
            ["item_ids[1]"],
        ),
        (
            rec.PredictRatings,
            pb.PredictRatingsRequest(user_id="7", item_ids=["x" * 1100], model="bayes_mf"),
            "ID_TOO_LONG",
            ["item_ids[0]"],
        ),
    ]
    for call, request, reason, fields in cases:
        err = srv.error(call, request)
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (reason, err.details())
        st = status_details(err)
        info = error_info(st)
        assert info.reason == reason and contract.REASONS[reason][0] == "INVALID_ARGUMENT"
        assert [f for f, _ in bad_request(st)] == fields
        assert info.metadata["field"] == fields[0]
        assert err.details().startswith(fields[0] + ":")
    # NOT_FOUND: a reason and what was not found; no BadRequest.
    for call, request, reason, key, value in (
        (
            rec.Recommend,
            pb.RecommendRequest(user_id="1", model="nope"),
            "UNKNOWN_MODEL",
            "model",
            "nope",
        ),
        (
            rec.GetSimilarItems,
            pb.SimilarItemsRequest(item_id="zzz"),
            "UNKNOWN_ITEM",
            "field",
            "item_id",
        ),
        (srv.admin.GetModel, pb.GetModelRequest(name="nope"), "UNKNOWN_MODEL", "model", "nope"),
    ):
        err = srv.error(call, request)
        assert err.code() is grpc.StatusCode.NOT_FOUND
        st = status_details(err)
        assert error_info(st).reason == reason and error_info(st).metadata[key] == value
        assert not [d for d in st.details if "BadRequest" in d.type_url]


def test_every_invalid_field_is_named_at_once(srv):
    req = pb.RecommendRequest(
        k=-3,
        history=[pb.Interaction(item_id="", value=float("inf")), pb.Interaction(item_id="2")],
        exclude_item_ids=["1"] * 100_001,
    )
    err = srv.error(srv.rec.Recommend, req)
    st = status_details(err)
    assert error_info(st).reason == "K_OUT_OF_RANGE"  # the first one found
    assert [f for f, _ in bad_request(st)] == [
        "k",
        "history[0].item_id",
        "history[0].value",
        "exclude_item_ids",
    ]


def test_a_malformed_request_is_invalid_with_a_reason(srv):
    method = srv.channel.unary_unary("/recserve.v1.Recommender/Recommend")
    with pytest.raises(grpc.RpcError) as e:
        method(b"\xff\xff\xff", timeout=10)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(e.value) == "MALFORMED_REQUEST"


def test_a_batch_answer_carries_the_same_google_rpc_status(srv):
    reqs = [
        pb.RecommendRequest(request_id="ok", user_id="7", k=3),
        pb.RecommendRequest(request_id="bad", user_id="7", k=-1),
    ]
    ok, bad = srv.rec.RecommendBatch(iter(reqs), timeout=10)
    assert ok.status.code == 0 and not ok.status.details
    assert bad.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error_info(bad.status).reason == "K_OUT_OF_RANGE"
    assert [f for f, _ in bad_request(bad.status)] == ["k"]


def test_k_omitted_means_ten(srv):
    items, _ = srv.recommend(user_id="7", k=0)
    assert len(items) == contract.DEFAULT_K == 10
    streamed, _ = srv.recommend_stream(user_id="7", k=0)
    assert len(streamed) == 10
    similar = srv.rec.GetSimilarItems(pb.SimilarItemsRequest(item_id="10"), timeout=10)
    assert len(similar.items) == 10


def test_get_similar_items_is_the_stream_in_one_message(srv):
    req = pb.SimilarItemsRequest(item_id="10", k=7, model="itemknn")
    one, call = srv.rec.GetSimilarItems.with_call(req, timeout=10)
    streamed = list(srv.rec.SimilarItems(req, timeout=10))
    version = srv.app.catalog.get("itemknn").version
    assert (one.model, one.version, one.served_by) == ("itemknn", version, "")
    assert dict(call.trailing_metadata())["x-recserve-version"] == version
    assert [(i.item_id, i.rank) for i in one.items] == [(i.item_id, i.rank) for i in streamed]
    np.testing.assert_allclose([i.score for i in one.items], [i.score for i in streamed])
    assert (streamed[0].model, streamed[0].version) == ("itemknn", version)


def test_a_pinned_version_answers_only_from_that_version(srv):
    version = srv.app.catalog.get("als").version
    pinned, _ = srv.recommend(user_id="7", k=5, model="als", version=version)
    plain, _ = srv.recommend(user_id="7", k=5, model="als")
    assert [i.item_id for i in pinned] == [i.item_id for i in plain]
    history = [pb.Interaction(item_id="3"), pb.Interaction(item_id="17")]
    folded, _ = srv.recommend(history=history, k=5, model="als", version=version)
    assert len(folded) == 5
    old = "19990101T000000000000Z"
    for call, request in (
        (srv.rec.Recommend, pb.RecommendRequest(user_id="7", model="als", version=old)),
        (srv.rec.RecommendStream, pb.RecommendRequest(user_id="7", model="als", version=old)),
        (srv.rec.GetSimilarItems, pb.SimilarItemsRequest(item_id="10", model="als", version=old)),
        (
            srv.rec.PredictRatings,
            pb.PredictRatingsRequest(user_id="7", item_ids=["1"], model="bayes_mf", version=old),
        ),
    ):
        err = srv.error(call, request)
        assert err.code() is grpc.StatusCode.NOT_FOUND and err.details().startswith("version:")
        info = error_info(status_details(err))
        assert info.reason == "VERSION_NOT_SERVED"
        served = srv.app.catalog.get(request.model).version
        assert info.metadata["served_version"] == served
    # A cold user answered by a fallback: pinning the asked model's version refuses it.
    err = srv.error(
        srv.rec.Recommend, pb.RecommendRequest(user_id="nobody", model="als", version=version)
    )
    assert reason_of(err) == "VERSION_NOT_SERVED"


def test_predictions_name_their_model_and_interval_presence_counts(srv):
    req = pb.PredictRatingsRequest(user_id="7", item_ids=["1", "2"], model="bayes_mf")
    out = srv.rec.PredictRatings(req, timeout=10)
    version = srv.app.catalog.get("bayes_mf").version
    assert (out.model, out.version, out.served_by) == ("bayes_mf", version, "")
    assert out.interval == pytest.approx(0.95)  # omitted: 0.95
    req.interval = 0.5
    half = srv.rec.PredictRatings(req, timeout=10)
    assert half.interval == pytest.approx(0.5)
    w95 = [p.upper - p.lower for p in out.predictions]
    w50 = [p.upper - p.lower for p in half.predictions]
    assert all(a < b for a, b in zip(w50, w95, strict=True))


def test_a_history_item_without_a_value_means_what_each_model_makes_of_it(srv, published):
    # Omitted is 1, one event, to a model that ranks from interactions (ALS);
    # a model that fits ratings takes it as rated what it expects of the item,
    # mu + b_i: a 1 was a low rating on stars, and the fold-in turned away from
    # the history. PredictRatings reads a history as Recommend does (it read an
    # omitted value as 0).
    _, models = published
    bmf = models["bayes_mf"]
    items = ["3", "17", "42", "8"]
    idx = bmf.items.index(items)
    expected = np.clip(bmf.mu + np.asarray(bmf.bi, np.float64)[idx], *bmf.scale)

    def history(values):
        return [
            pb.Interaction(item_id=i) if v is None else pb.Interaction(item_id=i, value=float(v))
            for i, v in zip(items, values, strict=True)
        ]

    def recommend(model, values):
        req = pb.RecommendRequest(history=history(values), k=20, model=model)
        out = srv.rec.Recommend(req, timeout=10)
        return [it.item_id for it in out.items], np.array([it.score for it in out.items])

    omitted = [None] * len(items)
    got = recommend("bayes_mf", omitted)
    want = recommend("bayes_mf", expected.astype(np.float32))
    assert got[0] == want[0] and not set(got[0]) & set(items)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    ones = recommend("bayes_mf", [1.0] * len(items))
    assert not np.allclose(ones[1], got[1], rtol=1e-3)  # not the low rating any more
    mixed = [None, 5.0, None, 2.0]
    got = recommend("bayes_mf", mixed)
    want = recommend("bayes_mf", [expected[0], 5.0, expected[2], 2.0])
    assert got[0] == want[0]
    # an item without a value is no evidence, so it explains nothing
    for values, rated in ((mixed, {"17", "8"}), (omitted, set())):
        req = pb.RecommendRequest(history=history(values), k=10, model="bayes_mf", explain=True)
        because = {b for it in srv.rec.Recommend(req, timeout=10).items for b in it.because}
        assert because <= rated and (because or not rated), because
    got, want = recommend("als", omitted), recommend("als", [1.0] * len(items))
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)

    def predict(values):
        req = pb.PredictRatingsRequest(
            history=history(values), item_ids=["1", "2", "5"], model="bayes_mf"
        )
        return np.array([p.rating for p in srv.rec.PredictRatings(req, timeout=10).predictions])

    np.testing.assert_allclose(predict(omitted), predict(expected.astype(np.float32)), rtol=1e-5)
    assert not np.allclose(predict(omitted), predict([0.0] * len(items)), rtol=1e-3)


def test_an_event_recorded_without_a_value_means_what_each_model_makes_of_it(srv, published):
    # As in a request's history: a recorded click is one event to ALS, and to a
    # model that fits ratings what it expects of the item (it was stored as a
    # 1, a low rating on stars, and the fold-in turned away from the clicks).
    _, models = published
    bmf = models["bayes_mf"]
    items = ["5", "23", "31"]
    expected = np.clip(
        bmf.mu + np.asarray(bmf.bi, np.float64)[bmf.items.index(items)], *bmf.scale
    ).astype(np.float32)
    clicks = [pb.Interaction(user_id="clicker", item_id=i) for i in items]
    summary = srv.rec.RecordInteractions(iter(clicks), timeout=10)
    assert (summary.accepted, summary.rejected) == (3, 0)

    def recommend(model, **kw):
        out = srv.rec.Recommend(pb.RecommendRequest(k=20, model=model, **kw), timeout=10)
        return [it.item_id for it in out.items], np.array([it.score for it in out.items])

    def inline(values):
        pairs = zip(items, values, strict=True)
        return [pb.Interaction(item_id=i, value=float(v)) for i, v in pairs]

    for model, values in (("bayes_mf", expected), ("als", [1.0] * 3)):
        got = recommend(model, user_id="clicker")
        want = recommend(model, history=inline(values))
        assert got[0] == want[0] and not set(got[0]) & set(items), model
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    ones = recommend("bayes_mf", history=inline([1.0] * 3))
    assert not np.allclose(ones[1], recommend("bayes_mf", user_id="clicker")[1], rtol=1e-3)

    def predict(**kw):
        req = pb.PredictRatingsRequest(item_ids=["1", "2", "7"], model="bayes_mf", **kw)
        return np.array([p.rating for p in srv.rec.PredictRatings(req, timeout=10).predictions])

    np.testing.assert_allclose(
        predict(user_id="clicker"), predict(history=inline(expected)), rtol=1e-5
    )


def test_list_models_pages_through_every_model(srv):
    everything = [m.name for m in srv.admin.ListModels(pb.ListModelsRequest()).models]
    assert everything == sorted(everything) and len(everything) == 4
    seen, token, pages = [], "", 0
    while True:
        page = srv.admin.ListModels(pb.ListModelsRequest(page_size=1, page_token=token))
        seen += [m.name for m in page.models]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == everything and pages == len(everything)
    for request, reason in (
        (pb.ListModelsRequest(page_token="not-a-token"), "INVALID_PAGE_TOKEN"),
        (pb.ListModelsRequest(page_size=1001), "PAGE_SIZE_OUT_OF_RANGE"),
        (pb.ListModelsRequest(page_size=-1), "PAGE_SIZE_OUT_OF_RANGE"),
    ):
        err = srv.error(srv.admin.ListModels, request)
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and reason_of(err) == reason


def test_explicit_zero_value_and_timestamp_are_kept(srv):
    store = srv.app.core.store
    before = {e.id for e in store.replay(0)}
    summary = srv.rec.RecordInteractions(
        iter(
            [
                pb.Interaction(user_id="zero-u", item_id="1", value=0.0, timestamp=0),
                pb.Interaction(user_id="zero-u", item_id="2"),
            ]
        ),
        timeout=10,
    )
    assert (summary.accepted, summary.rejected, summary.duplicates) == (2, 0, 0)
    new = [e for e in store.replay(0) if e.id not in before and e.user_id == "zero-u"]
    explicit, omitted = sorted(new, key=lambda e: e.item_id)
    assert (explicit.value, explicit.timestamp) == (0.0, 0)
    # omitted: each model's `unrated` (1 to ALS, mu + b_i to bayes_mf)
    assert math.isnan(omitted.value) and abs(omitted.timestamp - time.time()) < 60


def test_a_retried_stream_stores_each_event_once(srv):
    events = [
        pb.Interaction(user_id="retry-u", item_id=str(i), event_id=f"e{i}") for i in range(1, 6)
    ]
    first = srv.rec.RecordInteractions(iter(events[:3]), timeout=10)
    assert (first.accepted, first.duplicates) == (3, 0)
    # The "retry" resends everything (the client did not see the first summary).
    again = srv.rec.RecordInteractions(iter(events + events[:1]), timeout=10)
    assert (again.accepted, again.rejected, again.duplicates) == (2, 0, 4)
    stored = [e for e in srv.app.core.store.replay(0) if e.user_id == "retry-u"]
    assert sorted(e.event_id for e in stored) == [f"e{i}" for i in range(1, 6)]
    # The same event_id under another user is another event.
    other = pb.Interaction(user_id="retry-v", item_id="1", event_id="e1")
    assert srv.rec.RecordInteractions(iter([other]), timeout=10).accepted == 1
    too_long = pb.Interaction(user_id="retry-v", item_id="1", event_id="x" * 129)
    assert srv.rec.RecordInteractions(iter([too_long]), timeout=10).rejected == 1


def test_event_ids_survive_a_restart_of_the_sqlite_log(tmp_path):
    path = tmp_path / "feedback.sqlite"
    store = FeedbackStore(path)
    evs = [StoredEvent("u", str(i), 1.0, 5, event_id=f"id-{i}") for i in range(3)]
    assert store.append(evs) == 3
    store.close()
    store = FeedbackStore(path)  # a restarted server
    assert store.append([*evs, StoredEvent("u", "9", 1.0, 5, event_id="id-9")]) == 1
    assert store.append([StoredEvent("u", "1", 1.0, 5)]) == 1  # no event_id: always stored
    assert store.count() == 5
    store.close()


def test_a_log_from_before_event_ids_is_upgraded_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, user_id TEXT NOT NULL,"
        " item_id TEXT NOT NULL, value REAL NOT NULL, ts INTEGER NOT NULL)"
    )
    db.execute("INSERT INTO events (user_id, item_id, value, ts) VALUES ('u', '1', 2.0, 3)")
    db.commit()
    db.close()
    store = FeedbackStore(path)
    assert [(e.user_id, e.item_id, e.value, e.event_id) for e in store.replay(0)] == [
        ("u", "1", 2.0, "")
    ]
    assert store.append([StoredEvent("u", "1", 1.0, 4, event_id="a")] * 2) == 1
    store.close()


def test_the_python_client_reads_reasons_retry_delays_and_duplicates(published):
    root, _ = published
    from tests.test_service import hold_a_slot

    with (
        running(root, max_concurrency=1, overload_retry_ms=40) as s,
        RecommenderClient(s.target, service_config=None) as rc,
    ):
        release = hold_a_slot(s)
        with pytest.raises(RecserveError) as e:
            rc.recommend("7", 3)
        release()
        assert (e.value.code, e.value.reason) == ("UNAVAILABLE", "OVERLOADED")
        assert e.value.retry_delay == pytest.approx(0.04)
        evs = [Event("1", event_id="a"), Event("2", event_id="b")]
        assert rc.record("c-user", evs) == (2, 0, 0)
        assert rc.record("c-user", evs) == (0, 0, 2)
        ratings = rc.predict_ratings(["1"], "7", model="bayes_mf")
        assert ratings.model == "bayes_mf" and ratings.version and len(ratings) == 1
        sim = rc.similar_items("10", 4, model="itemknn")
        streamed = rc.similar_items("10", 4, model="itemknn", stream=True)
        assert sim.item_ids == streamed.item_ids and sim.version == streamed.version != ""


def test_the_shipped_config_retries_an_overloaded_call(published):
    """The shipped service config retries UNAVAILABLE after the server's pushback:
    a call refused while the only slot is held succeeds once the slot is free,
    where a client without the config gets the refusal."""
    from tests.test_service import hold_a_slot

    root, _ = published
    with running(root, max_concurrency=1, overload_retry_ms=400) as s:
        refused = s.app.core.metrics.rejected.labels("Recommend", "OVERLOADED")
        with RecommenderClient(s.target) as shipped:
            shipped.recommend("7", 3)  # connected
            release = hold_a_slot(s)

            def free_after_refusal() -> None:
                wait_for(lambda: refused._value.get() >= 1, what="a refusal")
                release()

            t = threading.Thread(target=free_after_refusal)
            t.start()
            rec = shipped.recommend("7", 3, deadline=10)
            t.join()
        assert len(rec.items) == 3 and refused._value.get() == 1
        release = hold_a_slot(s)
        with (
            RecommenderClient(s.target, service_config=None) as plain,
            pytest.raises(RecserveError) as e,
        ):
            plain.recommend("7", 3)
        release()
        assert e.value.reason == "OVERLOADED"


@pytest.mark.parametrize("server", ["threads", "asyncio"])
def test_ratings_with_no_rating_model_published_fail_as_a_state_to_fix(published, tmp_path, server):
    """PredictRatings where only ranking models are published is FAILED_PRECONDITION
    (NO_RATING_MODEL), which the shipped policy does not retry: waiting cannot
    help, publishing svd or bayes_mf does. While a rating model is still
    loading, it is UNAVAILABLE (MODEL_NOT_LOADED), which a retry can outlast."""
    import shutil

    from tests.service_helpers import Gate

    root, _ = published
    ranking = tmp_path / "ranking"
    for name in ("popularity", "itemknn", "als"):
        shutil.copytree(root / name, ranking / name)
    with running(ranking, server=server) as s, RecommenderClient(s.target) as rc:
        with pytest.raises(RecserveError) as e:
            rc.predict_ratings(["1"], "7")
        assert (e.value.code, e.value.reason) == ("FAILED_PRECONDITION", "NO_RATING_MODEL")
        assert "svd" in str(e.value) and e.value.retry_delay is None
        # A model named explicitly that only ranks stays the caller's mistake.
        with pytest.raises(RecserveError) as e:
            rc.predict_ratings(["1"], "7", model="als")
        assert e.value.reason == "NOT_A_RATING_MODEL"
    shutil.copytree(root / "bayes_mf", ranking / "bayes_mf")
    gate = Gate("bayes_mf")
    with running(ranking, loader=gate, wait=False, server=server) as s:
        wait_for(lambda: s.app.catalog.ready("popularity"), what="popularity serving")
        with RecommenderClient(s.target, service_config=None) as rc:
            with pytest.raises(RecserveError) as e:
                rc.predict_ratings(["1"], "7")
            assert (e.value.code, e.value.reason) == ("UNAVAILABLE", "MODEL_NOT_LOADED")
            gate.release("bayes_mf")
            wait_for(lambda: s.app.catalog.ready("bayes_mf"), what="bayes_mf serving")
            assert rc.predict_ratings(["1"], "7").served_by == "bayes_mf"


def test_the_shipped_config_names_real_methods_and_agrees_with_the_server():
    cfg = shipped_service_config()
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    services = {s.full_name: s for s in pb.DESCRIPTOR.services_by_name.values()}
    retried, configured = set(), set()
    for mc in cfg["methodConfig"]:
        for name in mc["name"]:
            assert name["method"] in services[name["service"]].methods_by_name
            configured.add(name["method"])
            if "retryPolicy" in mc:
                retried.add(name["method"])
                # Overload and draining are refused with a code the policy retries.
                codes = set(mc["retryPolicy"]["retryableStatusCodes"])
                assert {contract.REASONS[r][0] for r in ("OVERLOADED", "DRAINING")} <= codes
                # A state only publishing fixes is not retried.
                assert contract.REASONS["NO_RATING_MODEL"][0] not in codes
    every = {m for s in services.values() for m in s.methods_by_name}
    assert configured == every  # every method has a timeout
    # Writes are never retried by the channel (feedback retries use event_id).
    assert not retried & {"RecordInteractions", "ReloadModels"}
    assert json.loads(json.dumps(cfg)) == cfg


def test_connections_are_recycled_after_max_connection_age(published):
    """A server closes connections older than max_connection_age (GOAWAY); calls
    go on over a new connection without an error."""
    root, _ = published
    with running(root, max_connection_age_s=0.3, max_connection_age_grace_s=1) as s:
        states: list[grpc.ChannelConnectivity] = []
        with RecommenderClient(s.target) as rc:
            rc._channel.subscribe(states.append, try_to_connect=False)
            end = time.monotonic() + 2.0
            n = 0
            while time.monotonic() < end:
                assert len(rc.recommend("7", 3).items) == 3
                n += 1
                time.sleep(0.01)
        ready = [i for i, st in enumerate(states) if st is grpc.ChannelConnectivity.READY]
        assert n > 20 and len(ready) >= 2, states  # reconnected at least once


def test_every_reason_is_documented_and_an_unlisted_one_is_refused():
    from recserve.service.core import Code, Failure
    from recserve.serving import RequestError

    proto = (ROOT / "proto" / "recserve" / "v1" / "recommender.proto").read_text()
    docs = (ROOT / "docs" / "serving.md").read_text()
    for reason, (code, _) in contract.REASONS.items():
        assert re.search(rf"\b{reason}\b", proto), f"{reason} not in the proto's comments"
        assert re.search(rf"\b{reason}\b", docs), f"{reason} not in docs/serving.md"
        assert code in {c.name for c in grpc.StatusCode}
    # A reason is part of the contract: code cannot invent one on the fly.
    with pytest.raises(ValueError, match="unlisted"):
        RequestError("INVALID_ARGUMENT", "k", "bad", "K_TOO_BIG")
    with pytest.raises(ValueError, match="unlisted"):
        Failure(Code.UNAVAILABLE, "x", reason="BUSY")
