"""Dynamic batching (asyncio transport): concurrent plain Recommend calls to one
embedding model are scored in one batched call and answer exactly as the same
calls do unbatched (same items; scores within float rounding), with per-user
seen items and per-request exclusions honoured, errors and deadlines per call."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from recserve import index as ix
from recserve.config import ServerConfig
from recserve.metrics import Metrics
from recserve.models import create
from recserve.service.batching import Batcher
from recserve.service.core import Plan
from recserve.v1 import recommender_pb2 as pb
from tests.service_helpers import publish_models, running
from tests.test_service import assert_same_ranking


@pytest.fixture(scope="module")
def published(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    models = publish_models(small, root)
    # An IVF index (FAISS search) beside the exact ALS, on the same data.
    ivf = create("als", factors=16, iterations=5, index="ivf", nprobe=64).fit(small)
    ivf.save(root, "als_ivf", dataset=small)
    models["als_ivf"] = ivf
    # Biased MF through an index: mu + b_u added back per row of the batch.
    svd = create("svd", factors=16, epochs=5, index="ivf", nprobe=64).fit(small)
    svd.save(root, "svd_ivf", dataset=small)
    models["svd_ivf"] = svd
    # IVF with a head of norm-ranged items (three of the 300: the share raised,
    # since 0.1% of so small a catalogue is none). Coalesced k=1 calls with
    # include_seen searched several rows without exclusions, whose candidate
    # rows came in Fortran order: every such batch failed (INTERNAL).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ix, "HEAD_SHARE", 0.01)
        head = create("als", factors=16, iterations=5, index="ivf", nprobe=64).fit(small)
    assert head.item_index.head.size == 3
    head.save(root, "als_head", dataset=small)
    models["als_head"] = head
    # A known user's prior: blended per user on an exact model (never batched),
    # not applicable through an index (batched as without it).
    for name, index in (("als_prior", "exact"), ("ivf_prior", "ivf")):
        m = create("als", factors=16, iterations=5, index=index, nprobe=64, user_prior=4.0)
        models[name] = m.fit(small)
        m.save(root, name, dataset=small)
    return root, models


class Answer:
    def __init__(self, resp: pb.RecommendResponse) -> None:
        self.item_ids = [i.item_id for i in resp.items]
        self.scores = np.array([i.score for i in resp.items], np.float64)


def requests(small) -> list[pb.RecommendRequest]:
    """A mix: embedding models (two with a user_prior), several k and
    include_seen, some requests that are not plain (exclusions, history: never
    batched) and some users the models do not know (the chain answers)."""
    rng = np.random.default_rng(3)
    users = [small.users.ids(np.array([u]))[0] for u in rng.choice(small.n_users, 100)]
    out = []
    for n, user in enumerate(users):
        model = ("als", "als_ivf", "bayes_mf", "als_prior", "ivf_prior", "svd_ivf")[n % 6]
        k = (10, 10, 25)[n % 3 if n % 2 else 0]
        req = pb.RecommendRequest(
            user_id=user, k=k, model=model, include_seen=(n % 7 == 0), request_id=f"r{n}"
        )
        if n % 11 == 0:
            req.exclude_item_ids.extend(small.items.ids(np.arange(5)))
        out.append(req)
    for n, user in enumerate(users[:40]):  # the head-ranged IVF, k=1 with seen items kept
        k, keep = (1, True) if n % 4 else (10, False)
        out.append(
            pb.RecommendRequest(
                user_id=user, k=k, model="als_head", include_seen=keep, request_id=f"h{n}"
            )
        )
    out.append(pb.RecommendRequest(user_id="nobody-knows-me", k=10, model="als"))
    return out


def batches(s, model: str) -> tuple[float, float]:
    """(batches scored, calls in them) for `model`, read from the registry."""
    reg = s.app.core.metrics.registry
    count = reg.get_sample_value("recserve_batch_size_count", {"model": model}) or 0.0
    return count, reg.get_sample_value("recserve_batch_size_sum", {"model": model}) or 0.0


def answers(target_server, reqs: list[pb.RecommendRequest], threads: int) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda r: target_server.rec.Recommend(r, timeout=30), reqs * 3))


def test_batched_answers_equal_unbatched_answers(published, small):
    root, models = published
    reqs = requests(small)
    with running(root, server="asyncio", batch_delay_ms=0) as plain:
        reference = answers(plain, reqs, 1)
    # Every model batched (no cost floor), a long delay: batches surely form.
    with running(root, server="asyncio", batch_delay_ms=20, batch_min_ms=0) as s:
        got = answers(s, reqs, 16)
        batched = ("als", "als_ivf", "bayes_mf", "ivf_prior", "svd_ivf", "als_head")
        seen = {name: batches(s, name) for name in batched}
        assert batches(s, "als_prior") == (0, 0)  # each user's own blend
    for name, (count, calls) in seen.items():  # batches of more than one call were scored
        assert count and calls > count, (name, seen)
    for req, a, b in zip(reqs * 3, got, reference, strict=True):
        assert a.request_id == b.request_id and a.model == b.model
        assert_same_ranking(Answer(a), Answer(b))
        m = models.get(req.model)
        u = m.users.get(req.user_id) if m is not None else -1
        if u >= 0 and not req.include_seen:  # the user's own seen items, per request
            seen = set(m.items.ids(small.interactions[u].indices))
            assert not seen & {i.item_id for i in a.items}
        assert not set(req.exclude_item_ids) & {i.item_id for i in a.items}


def test_a_lone_call_never_waits_and_a_cheap_model_is_not_batched(published, small):
    """At concurrency 1 a call goes once no peer joined for a quarter of the
    delay (a batch of one; with a 1 s delay and a 0.9 s deadline, waiting the
    whole delay would fail it, while a quarter leaves a stalled machine time),
    and a model whose search costs less than batch_min_ms is answered at once,
    unbatched."""
    root, _ = published
    with running(root, server="asyncio", batch_delay_ms=1000, batch_min_ms=0) as s:
        req = pb.RecommendRequest(user_id="7", k=10, model="als")
        for _ in range(10):
            assert len(s.rec.Recommend(req, timeout=0.9).items) == 10
        assert batches(s, "als") == (9, 9)  # batches of one; the first call measures
    with running(root, server="asyncio", batch_delay_ms=50, batch_min_ms=1000) as s:
        answers(s, [pb.RecommendRequest(user_id="7", k=10, model="als")] * 20, 8)
        assert batches(s, "als") == (0, 0)


def test_a_failing_batch_fails_each_of_its_calls_and_the_server_goes_on(published, small):
    root, _ = published
    with running(root, server="asyncio", batch_delay_ms=20, batch_min_ms=0) as s:
        m = s.app.catalog.get("als").model
        original = m.recommend

        def broken(*a, **kw):
            raise RuntimeError("kernel exploded")

        m.recommend = broken
        try:
            reqs = [pb.RecommendRequest(user_id=str(u), k=5, model="als") for u in range(1, 30)]
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(s.rec.Recommend, r, timeout=10) for r in reqs]
                codes = set()
                for f in futures:
                    try:
                        f.result()
                        codes.add("OK")  # answered alone (the one-user kernel)
                    except grpc.RpcError as exc:
                        codes.add(exc.code().name)
            assert "INTERNAL" in codes and codes <= {"OK", "INTERNAL"}
        finally:
            m.recommend = original
        assert len(s.rec.Recommend(reqs[0], timeout=10).items) == 5


def test_a_caller_that_goes_away_is_not_scored_and_the_others_are_answered():
    """The Batcher on an event loop over a stand-in core: of three calls gathered
    into one batch, the one cancelled while waiting is left out of the batched
    search; the other two get their own rows."""
    scored: list[list[int]] = []

    class Model:
        def recommend(self, users, k, filter_seen=True):
            scored.append(list(users))
            items = np.array([[u, u + 1] for u in users], np.int32)
            return items, items.astype(np.float32)

    slot = SimpleNamespace(name="m", version="v1", model=Model())

    class StandIn:
        cfg = ServerConfig(batch_delay_ms=50, batch_min_ms=0)
        metrics = Metrics(CollectorRegistry())

        def batch_plan(self, s, request):
            return Plan(("m", "v1", 2, True), slot, None, request, {}, "")

        def plan_one(self, plan):
            raise AssertionError("a batch of two or more is scored in one call")

        def plan_answer(self, s, plan, items, scores, seconds):
            return list(items), None

    async def main():
        batcher = Batcher(StandIn())
        batcher.cost[("m", "v1")] = 1.0  # costly: batched
        calls = [asyncio.create_task(batcher.recommend(None, u)) for u in (10, 20, 30)]
        await asyncio.sleep(0)  # all three joined the batch
        calls[1].cancel()
        got = await asyncio.gather(*calls, return_exceptions=True)
        return got

    got = asyncio.run(main())
    assert scored == [[10, 30]]
    assert got[0] == ([10, 11], None) and got[2] == ([30, 31], None)
    assert isinstance(got[1], asyncio.CancelledError)
