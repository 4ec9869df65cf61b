"""The bench client against a real server: closed and open loop, errors by code, ceiling."""

from __future__ import annotations

import json

import pytest

from recserve.cli import main
from recserve.clients.bench import Load, run, table
from tests.service_helpers import publish_models, running


@pytest.fixture(scope="module")
def srv(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-models")
    publish_models(small, root)
    with running(root) as s:
        yield s


@pytest.mark.parametrize("rpc", ["recommend", "stream"])
def test_closed_loop_counts_every_request(srv, rpc):
    reg = srv.app.metrics.registry
    method = {"recommend": "Recommend", "stream": "RecommendStream"}[rpc]
    labels = {"method": method, "code": "OK"}
    before = reg.get_sample_value("recserve_rpc_duration_seconds_count", labels) or 0
    folded = reg.get_sample_value("recserve_fold_ins_total", {"model": "als"}) or 0
    users = [str(i) for i in range(1, 200)]
    load = Load(
        rpc=rpc,
        target=srv.target,
        model="als",
        concurrency=4,
        requests=120,
        warmup=0,
        users=users,
        items=[str(i) for i in range(1, 300)],
        processes=1,
        cold=0.3,
    )
    r = run(load)
    assert r.requests == 120 and not r.errors and r.qps > 0
    assert 0 < r.first_item_ms["p50"] <= r.latency_ms["p50"] <= r.latency_ms["p99"]
    assert reg.get_sample_value("recserve_rpc_duration_seconds_count", labels) - before == 120
    served = reg.get_sample_value("recserve_fold_ins_total", {"model": "als"}) - folded
    assert 20 <= served <= 60  # ~30% of 120 were cold users with a history


def test_open_loop_keeps_the_schedule_and_errors_are_counted(srv):
    load = Load(
        target=srv.target,
        model="als",
        rate=100,
        duration=1.0,
        warmup=0,
        users=["1"],
        items=["1"],
        processes=1,
        k=-1,
    )  # k=-1: every call refused
    r = run(load)
    assert 80 <= r.requests <= 120  # 100/s for 1 s
    assert r.errors == {"INVALID_ARGUMENT": r.requests} and r.qps == 0


def test_recserve_bench_json_with_ceiling(srv, capsys):
    code = main(
        [
            "bench",
            "--target",
            srv.target,
            "--model",
            "popularity",
            "--requests",
            "60",
            "--warmup",
            "0",
            "--concurrency",
            "2",
            "--processes",
            "2",
            "--ceiling",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["result"]["requests"] == 60 and out["ceiling"]["rpc"] == "health"
    assert out["ceiling"]["requests"] == 60 and out["result"]["processes"] == 2


def test_table_prints_ratios():
    from recserve.clients.bench import Result

    pct = {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p99.9": 4.0, "mean": 1.5}
    a = Result("recommend", 10, 1.0, 10.0, pct, pct, {}, 1, 0.0, 1)
    b = Result("health", 20, 1.0, 20.0, {**pct, "p50": 0.5, "p99": 1.5}, pct, {}, 1, 0.0, 1)
    text = table([a], b)
    assert "throughput 0.50x" in text and "p50 +0.500 ms" in text and "p99 2.00x" in text


def test_user_draws_uniform_and_zipf():
    """Users drawn ahead in blocks still follow the asked distribution: uniform
    covers every id about equally; Zipf puts the most weight on the first id."""
    from collections import Counter

    from recserve.clients.bench import _Sender

    users = [f"u{i}" for i in range(50)]
    uniform = _Sender(Load(users=users), seed=1)
    counts = Counter(uniform._user() for _ in range(10_000))
    assert set(counts) == set(users)
    assert max(counts.values()) < 2 * min(counts.values())

    zipf = _Sender(Load(users=users, zipf=1.5), seed=1)
    counts = Counter(zipf._user() for _ in range(10_000))
    top = [u for u, _ in counts.most_common(3)]
    assert top[0] == "u0" and counts["u0"] > 0.3 * 10_000
    assert counts["u0"] > 2 * counts["u1"] > 2 * counts["u10"]


def test_explain_asks_every_recommendation_for_its_explanations(srv, capsys):
    from recserve.clients.bench import _Sender

    sender = _Sender(Load(users=["1", "2"], items=["1", "2", "3"], cold=0.5, explain=True), seed=2)
    reqs = [sender._request() for _ in range(40)]
    assert all(r.explain for r in reqs) and any(r.history for r in reqs)
    assert not any(r.explain for r in (_Sender(Load(users=["1"]), seed=2)._request(),))
    args = ["bench", "--target", srv.target, "--model", "itemknn", "--requests", "30"]
    args += ["--warmup", "0", "--processes", "1", "--users", "1:100", "--items", "1:200"]
    assert main([*args, "--explain", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["result"]
    assert out["requests"] == 30 and not out["errors"]


def test_the_traffic_mix_reports_each_call_kind_and_the_refusals(srv):
    reg = srv.app.metrics.registry

    def count(method):
        labels = {"method": method, "code": "OK"}
        return reg.get_sample_value("recserve_rpc_duration_seconds_count", labels) or 0

    before = {m: count(m) for m in ("Recommend", "SimilarItems", "RecommendBatch")}
    load = Load(
        rpc="traffic",
        target=srv.target,
        model="itemknn",
        concurrency=4,
        requests=200,
        warmup=0,
        users=[str(i) for i in range(1, 200)],
        items=[str(i) for i in range(1, 300)],
        processes=1,
        batch=4,
        deadline=5.0,
    )
    r = run(load)
    assert r.requests == 200 and not r.errors
    assert set(r.by_rpc) == {"recommend", "cold", "similar", "batch"}
    assert sum(k["requests"] for k in r.by_rpc.values()) == 200
    assert 90 <= r.by_rpc["recommend"]["requests"] <= 165  # 64% of 200
    # Each kind reached the server as its own RPC (cold users are Recommend calls).
    got = {m: count(m) - before[m] for m in before}
    assert got["Recommend"] == r.by_rpc["recommend"]["ok"] + r.by_rpc["cold"]["ok"]
    assert got["SimilarItems"] == r.by_rpc["similar"]["ok"]
    assert got["RecommendBatch"] == r.by_rpc["batch"]["ok"]
    text = table([r])
    assert "  cold" in text and "  batch" in text
    refused = run(Load(**{**load.__dict__, "k": -1, "rpc": "recommend", "requests": 20}))
    assert refused.errors == {"INVALID_ARGUMENT": 20}
    assert 0 < refused.refusal_ms["p50"] <= refused.refusal_ms["p99"]
    assert "refusals answered in" in table([refused])


BAD_LOADS = [
    ("concurrency", {"concurrency": 0}),  # was a ZeroDivisionError
    ("processes", {"processes": 0}),
    ("connections", {"connections": 0}),
    ("batch", {"batch": 0}),
    ("duration", {"duration": 0}),  # was a run that never ended
    ("duration", {"duration": float("inf")}),
    ("requests", {"requests": -1}),
    ("rate", {"rate": -5}),
    ("deadline", {"deadline": 0}),
    ("deadline", {"deadline": -1}),
    ("warmup", {"warmup": -1}),
    ("cold", {"cold": 1.5}),
    ("zipf", {"zipf": 0.5}),
    ("rpc", {"rpc": "nosuch"}),
]


@pytest.mark.parametrize(
    ("field", "bad"), BAD_LOADS, ids=[f"{f}={v}" for f, d in BAD_LOADS for v in d.values()]
)
def test_settings_that_would_crash_or_hang_a_run_are_refused(field, bad):
    with pytest.raises(ValueError, match=f"^{field}: must be"):
        Load(**bad)
    Load(duration=0, requests=10)  # a request count instead of a duration is fine


def test_recserve_bench_refuses_bad_settings_before_connecting(tmp_path, capsys):
    # Nothing listens on port 1: each refusal comes before any connection.
    for argv, message in [
        (["--concurrency", "0"], "bench: concurrency: must be at least 1"),
        (["--duration", "0"], "bench: duration: must be > 0"),
        (["--deadline", "-1"], "bench: deadline: must be > 0"),
        (["--users", str(tmp_path / "missing.txt")], "bench: users: cannot read"),
        (["--items", "5:1"], "bench: items: no ids in '5:1'"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "--target", "127.0.0.1:1", *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
