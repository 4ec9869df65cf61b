"""/metrics of a real server after real calls: every family, sensible values."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recserve.config import Experiment, Hybrid
from recserve.service import convert
from recserve.v1 import recommender_pb2 as pb
from tests.service_helpers import free_port, publish_models, running, wait_for


def scrape(port: int) -> dict[str, list]:
    """family name -> samples, parsed by prometheus_client's own parser."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(fams, family, sample=None, **labels):
    for s in fams[family]:
        if (sample is None or s.name == sample) and all(
            s.labels.get(k) == v for k, v in labels.items()
        ):
            return s.value
    return None


@pytest.fixture(scope="module")
def published(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-models")
    publish_models(small, root)
    return root


def test_every_family_after_real_calls(published):
    # Resident bytes are read from this process's mappings: a server an earlier
    # test drained maps the same files until the collector frees its cycles.
    import gc

    gc.collect()
    port = free_port()
    exp = {"ab": Experiment("ab", {"als": 0.5, "itemknn": 0.5}, "x")}
    hy = {"mix": Hybrid("mix", {"als": 0.5, "itemknn": 0.5})}
    with running(published, metrics_port=port, experiments=exp, hybrids=hy) as s:
        s.recommend(user_id="7", k=5, model="als")
        s.recommend(user_id="new", k=4, model="als", history=[pb.Interaction(item_id="3")])
        s.recommend(user_id="nobody", k=3, model="als")  # falls back to popularity
        for u in range(10):
            s.recommend(user_id=str(u + 1), k=2, model="ab")
        s.recommend(user_id="7", k=5, model="mix", explain=True)
        list(s.rec.SimilarItems(pb.SimilarItemsRequest(item_id="10", k=3, model="itemknn")))
        s.rec.RecordInteractions(iter([pb.Interaction(user_id="7", item_id="1")]))
        s.error(s.rec.Recommend, pb.RecommendRequest(user_id="7", k=-1))
        s.app.sample_memory()
        fams = scrape(port)
    rpc = "recserve_rpc_duration_seconds"
    assert value(fams, rpc, rpc + "_count", method="Recommend", code="OK") == 14
    assert value(fams, rpc, rpc + "_count", method="Recommend", code="INVALID_ARGUMENT") == 1
    assert value(fams, rpc, rpc + "_count", method="SimilarItems", code="OK") == 1
    ttfi = "recserve_time_to_first_item_seconds"
    assert value(fams, ttfi, ttfi + "_count", method="Recommend") == 14
    stage = "recserve_stage_duration_seconds"
    for name in ("resolve", "retrieve", "rank"):
        assert value(fams, stage, stage + "_count", method="Recommend", stage=name) == 14
        assert value(fams, stage, stage + "_sum", method="Recommend", stage=name) > 0
    assert value(fams, "recserve_returned_items", method="Recommend") == 5 + 4 + 3 + 20 + 5
    assert value(fams, "recserve_fallbacks", from_model="als", to_model="popularity") == 1
    assert value(fams, "recserve_fold_ins", model="als") == 1
    arms = [s for s in fams["recserve_experiment_assignments"] if s.name.endswith("_total")]
    assert sum(s.value for s in arms) == 10 and {s.labels["experiment"] for s in arms} == {"ab"}
    assert value(fams, "recserve_requests", model="mix", served_by="mix") == 1
    assert value(fams, "recserve_feedback_events", outcome="accepted") == 1
    assert value(fams, "recserve_inflight_requests") == 0
    assert value(fams, "recserve_model_serving", model="als") == 1
    info = [s for s in fams["recserve_model_info"] if s.labels["model"] == "als"]
    assert len(info) == 1 and info[0].labels["algorithm"] == "als" and info[0].labels["version"]
    assert value(fams, "recserve_model_load_seconds", model="als") > 0
    mapped = value(
        fams, "recserve_model_bytes", model="als", component="item_factors", kind="mapped"
    )
    resident = value(
        fams, "recserve_model_bytes", model="als", component="item_factors", kind="resident"
    )
    assert (
        mapped
        == (published / "als" / info[0].labels["version"] / "item_factors.npy").stat().st_size
    )
    assert 0 < resident <= mapped + 4096  # touched by the calls above: resident
    assert value(fams, "recserve_process_resident_memory_bytes") > 50e6
    assert value(fams, "recserve_process_proportional_memory_bytes") > 0
    assert not [s for f in fams.values() for s in f if "user" in s.labels or "item" in s.labels]


def test_stream_duration_covers_the_whole_stream(published, monkeypatch):
    """A stream whose items come DELAY apart (a slowed model): its duration counts
    every item, its time to first item only the first. Asserted as relations that
    the delays guarantee, not as wall-clock limits."""
    port = free_port()
    slow_items = convert.ranked_items
    delay, k = 0.05, 8

    def slow(r, first=False):
        for item in slow_items(r, first):
            time.sleep(delay)  # the slowed model
            yield item

    rpc = "recserve_rpc_duration_seconds"
    ttfi = "recserve_time_to_first_item_seconds"
    with running(published, metrics_port=port) as s:
        monkeypatch.setattr(convert, "ranked_items", slow)
        items, _ = s.recommend_stream(user_id="7", k=k, model="popularity")
        # The server records the call after its last item is sent: poll for it.
        fams = wait_for(
            lambda: (
                (f := scrape(port))
                and value(f, rpc, rpc + "_count", method="RecommendStream", code="OK") == 1
                and f
            ),
            what="the stream's duration recorded",
        )
    assert [i.rank for i in items] == list(range(1, k + 1))
    duration = value(fams, rpc, rpc + "_sum", method="RecommendStream", code="OK")
    first = value(fams, ttfi, ttfi + "_sum", method="RecommendStream")
    assert value(fams, ttfi, ttfi + "_count", method="RecommendStream") == 1
    assert duration >= k * delay  # every item's delay is inside the call
    assert first >= delay  # the first item waited for one delay ...
    assert duration - first >= (k - 1) * delay  # ... and the other k - 1 came after it


def test_overload_is_counted(published):
    from tests.test_service import hold_a_slot

    port = free_port()
    with running(published, metrics_port=port, max_concurrency=1) as s:
        release = hold_a_slot(s)
        assert s.error(s.rec.Recommend, pb.RecommendRequest(user_id="7", k=3)).code() is (
            grpc.StatusCode.UNAVAILABLE
        )
        assert value(scrape(port), "recserve_inflight_requests") == 1
        release()
        fams = scrape(port)
    assert value(fams, "recserve_inflight_requests") == 0
    assert value(fams, "recserve_rejected_requests", method="Recommend", reason="OVERLOADED") == 1


def test_queued_updates_equal_direct_ones():
    """Per-request updates go through a queue applied in aggregate (observe_many
    writes each bucket once): the exposition equals prometheus_client's own
    per-value observe()/inc(), values on bucket bounds and past the last one
    included, and a scrape sees queued updates without an explicit flush."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from recserve.metrics import LATENCY_BUCKETS, Metrics

    values = [0.0, 0.0001, 0.00010001, 0.0003, 0.0025, 0.0025, 0.7, 10.0, 42.0, 1e-9] * 3
    direct_reg = CollectorRegistry()
    hist = Histogram(
        "recserve_stage_duration_seconds",
        "h",
        ["method", "stage"],
        buckets=LATENCY_BUCKETS,
        registry=direct_reg,
    )
    req = Counter(
        "recserve_requests", "c", ["method", "model", "served_by", "arm"], registry=direct_reg
    )
    m = Metrics(CollectorRegistry())
    for i, v in enumerate(values):
        stage = ("resolve", "retrieve")[i % 2]
        hist.labels("Recommend", stage).observe(v)
        m.stage_seconds.labels("Recommend", stage).observe(v)
        req.labels("Recommend", "als", "als", "").inc(i % 3)
        m.requests.labels("Recommend", "als", "als", "").inc(i % 3)
    assert len(m.pending) == 2 * len(values)

    def families(registry, names):
        text = generate_latest(registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if f.name in names and not s.name.endswith("_created")
        }

    names = {"recserve_stage_duration_seconds", "recserve_requests"}
    direct = families(direct_reg, names)
    assert len(direct) == 2 * (len(LATENCY_BUCKETS) + 3) + 1  # buckets, +Inf, count, sum
    assert families(m.registry, names) == direct  # the scrape flushed the queue
    assert len(m.pending) == 0
    with pytest.raises(ValueError, match="non-negative"):
        m.requests.labels("Recommend", "als", "als", "").inc(-1)


def test_observe_many_without_value_objects_falls_back():
    """A histogram child without prometheus_client's value objects still gets
    every observation, one observe() each."""
    from recserve.metrics import observe_many

    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, v: float) -> None:
            self.seen.append(v)

    child = Plain()
    observe_many(child, [0.5, 0.25])
    assert child.seen == [0.5, 0.25]


def test_recorded_events_beyond_online_max_events_drop_the_least_recently_active_user(
    published,
):
    """Memory for recorded events is bounded: past online_max_events the user
    whose last event is oldest is dropped (and answered as the cold user it
    is again); the gauges say how many are held and dropped."""
    port = free_port()
    with running(published, metrics_port=port, online_max_events=3) as s:
        for user, items in (("u1", ["1"]), ("u2", ["2", "3"]), ("u3", ["4"])):
            events = [pb.Interaction(user_id=user, item_id=i, value=1.0) for i in items]
            assert s.rec.RecordInteractions(iter(events), timeout=10).accepted == len(items)
        assert [s.app.online.history(u) for u in ("u1", "u2", "u3")] == [
            [],
            [("2", 1.0), ("3", 1.0)],
            [("4", 1.0)],
        ]
        _, md = s.recommend(user_id="u2", k=3, model="als")
        assert "x-recserve-served-by" not in md  # folded in from its recorded events
        _, md = s.recommend(user_id="u1", k=3, model="als")
        assert md["x-recserve-served-by"] == "popularity"  # dropped: cold again
        s.app.sample_memory()
        fams = scrape(port)
    assert value(fams, "recserve_online_users") == 2
    assert value(fams, "recserve_online_events") == 3
    assert value(fams, "recserve_online_evicted_users") == 1


def test_a_drained_server_lets_go_of_its_models(published):
    """After drain nothing holds the App, so its bundles are unmapped. On the
    asyncio server the loop was never closed: the idle thread that had
    committed recorded events kept the loop, the App and every mapped model
    alive, and the next server in the process counted its files resident twice."""
    import gc
    import weakref

    with running(published) as s:
        events = [pb.Interaction(user_id="u1", item_id="1")]
        assert s.rec.RecordInteractions(iter(events), timeout=10).accepted == 1
        app = weakref.ref(s.app)
    del s
    # gRPC lets go of the stopped server's last objects shortly after stop
    # returned, with no Python thread left running: one collection right after
    # drain still found them reachable 5 times in 100 on a loaded machine (a
    # second one freed them). A holder that never lets go, as the loop did,
    # keeps the App past any wait.
    end = time.monotonic() + 5.0
    gc.collect()
    while app() is not None and time.monotonic() < end:
        time.sleep(0.05)
        gc.collect()
    assert app() is None
