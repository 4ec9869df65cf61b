"""Load generator for a recserve server (`python -m recserve.clients.bench`, also `recserve bench`).

    recserve bench --target localhost:50051 --model als --k 10 --concurrency 8 --duration 10
    recserve bench --rate 500 --duration 10                 # open loop: 500 requests/s
    recserve bench --rpc similar --ceiling --json           # + a health-check ceiling run

`--rpc` picks the call: recommend (unary Recommend), stream (RecommendStream,
one message per item), batch (RecommendBatch), similar, predict, health,
mixed (80% recommend, 10% similar, 10% batch), or traffic (the mix of real
traffic: 64% recommend for known users, 16% recommend for cold users with a
10-item history, 10% similar, 10% batch of 16). Mixed runs report latency per
call kind too; every run reports how fast refusals come back. `--deadline`
sets every call's deadline (seconds). `--tls-ca` (with `--tls-cert` and
`--tls-key` for mutual TLS) connects over TLS; `--token` sends a bearer token
with every call (a server with `token_for_all`).

Closed loop: `concurrency` requests in flight, each sent when the previous one
ends. Open loop: requests start on a fixed schedule whatever the server does,
and latency counts from the scheduled start (no coordinated omission). Several
client processes (`--processes`, default 2) each run an asyncio gRPC client, so
the client is not the bottleneck, over `--connections` TCP connections (default
4), so a server with several workers gets load on each. `--ceiling` runs the
same load against the no-op grpc.health.v1 Check on the same server and prints
our throughput and latency beside it: on a machine where client and server share the cores, the
ratio is the meaningful figure, not the absolute one.

User ids are drawn uniformly or Zipf-distributed from `--users` (a range
`1:943` or a file with one id per line; default: 1..n_users of the model,
which fits MovieLens and recserve's synthetic data). A `--cold` fraction of
requests sends an unknown user id with an inline history drawn from `--items`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.clients.health import channel_credentials
from recserve.v1 import recommender_pb2 as pb
from recserve.v1 import recommender_pb2_grpc as pb_grpc

RPCS = ("recommend", "stream", "batch", "similar", "predict", "health", "mixed", "traffic")
MIXES = {
    "mixed": (("recommend", 0.8), ("similar", 0.1), ("batch", 0.1)),
    # Real traffic: known users, cold users with an inline history, similar items
    # and batches (the shape issue reports and bench/bench_traffic.py use).
    "traffic": (("recommend", 0.64), ("cold", 0.16), ("similar", 0.1), ("batch", 0.1)),
}
MIX = MIXES["mixed"]


@dataclass
class Load:
    """What to send, how hard, for how long."""

    target: str = "localhost:50051"
    rpc: str = "recommend"
    model: str = ""
    k: int = 10
    concurrency: int = 8
    rate: float = 0.0  # > 0: open loop at this many requests/s (all processes together)
    duration: float = 10.0
    requests: int = 0  # > 0: stop after this many (all processes together)
    warmup: float = 2.0
    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    zipf: float = 0.0  # > 1: Zipf exponent for user draws; else uniform
    cold: float = 0.0
    history: int = 10
    batch: int = 16  # requests per RecommendBatch stream
    processes: int = 2
    connections: int = 4  # TCP connections per client process (spread over --workers)
    deadline: float = 10.0
    seed: int = 0
    explain: bool = False  # ask for explanations (the history items behind each item)
    token: str = field(default="", repr=False)  # bearer token sent with every call
    tls_ca: str = ""  # PEM CA of the server's certificate: connect over TLS
    tls_cert: str = ""  # this client's certificate and key (mutual TLS)
    tls_key: str = ""

    def __post_init__(self) -> None:
        """Refuse settings that would crash or hang a run (zero processes, no end),
        naming the field; k is left to the server, which refuses bad values itself."""
        if self.rpc not in RPCS:
            raise ValueError(f"rpc: must be one of {', '.join(RPCS)}, got {self.rpc!r}")
        for name in ("concurrency", "processes", "connections", "batch", "history"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.requests < 0:
            raise ValueError(f"requests: must be >= 0 (0: run for duration), got {self.requests}")
        if not (self.duration > 0 or self.requests > 0) or not math.isfinite(self.duration):
            raise ValueError(
                f"duration: must be > 0 seconds (or give requests), got {self.duration}"
            )
        checks = (
            ("rate", self.rate >= 0, ">= 0 requests/s (0: closed loop)"),
            ("warmup", self.warmup >= 0, ">= 0 seconds"),
            ("deadline", self.deadline > 0, "> 0 seconds"),
            ("cold", 0 <= self.cold <= 1, "a fraction in [0, 1]"),
            ("zipf", self.zipf == 0 or self.zipf > 1, "0 (uniform) or an exponent > 1"),
        )
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise ValueError(f"{name}: must be {rule}, got {value}")
        self.credentials()  # a TLS file that does not load: named now, not per process

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials when a TLS file is given, else None (plaintext); a file
        that does not load is a ValueError naming it."""
        if not (self.tls_ca or self.tls_cert or self.tls_key):
            return None
        return channel_credentials(self.tls_ca, self.tls_cert, self.tls_key)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Every call's metadata: the bearer token, when there is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


@dataclass
class Result:
    """Aggregated outcome of one run."""

    rpc: str
    requests: int
    seconds: float
    qps: float
    latency_ms: dict[str, float]
    first_item_ms: dict[str, float]
    errors: dict[str, int]
    concurrency: int
    rate: float
    processes: int
    refusal_ms: dict[str, float] = field(default_factory=dict)  # non-OK answers' latency
    by_rpc: dict[str, dict] = field(default_factory=dict)  # mixes: per call kind


def _pick_users(load: Load, rng: np.random.Generator, n: int) -> np.ndarray:
    m = len(load.users)
    if load.zipf > 1:  # rank r has weight ~ r^-a; ranks beyond m wrap around
        return (rng.zipf(load.zipf, n) - 1) % m
    return rng.integers(0, m, n)


class _Sender:
    """One process's requests: builds messages, sends them, records timings."""

    def __init__(self, load: Load, seed: int) -> None:
        self.load = load
        self.share = 1.0  # this process's part of the load
        self.rng = np.random.default_rng(seed)
        self.lat: list[float] = []
        self.ttfi: list[float] = []
        self.refused: list[float] = []
        self.codes: Counter[str] = Counter()
        self.kinds: dict[str, dict] = {}  # per call kind: latencies and codes
        self._drawn: list[int] = []  # user indices drawn ahead, in blocks
        self.md = load.metadata()

    def _user(self) -> str:
        # One numpy draw per 4096 requests rather than per request: the client
        # shares the cores with the server it measures.
        if not self._drawn:
            self._drawn = _pick_users(self.load, self.rng, 4096).tolist()
        return self.load.users[self._drawn.pop()]

    def _request(self, cold: bool = False) -> pb.RecommendRequest:
        load = self.load
        if (cold or (load.cold > 0 and self.rng.random() < load.cold)) and load.items:
            picks = self.rng.integers(0, len(load.items), load.history)
            hist = [pb.Interaction(item_id=load.items[int(i)]) for i in picks]
            uid = f"bench-cold-{int(self.rng.integers(1 << 62))}"
            return pb.RecommendRequest(
                user_id=uid, history=hist, k=load.k, model=load.model, explain=load.explain
            )
        uid = self._user()
        return pb.RecommendRequest(user_id=uid, k=load.k, model=load.model, explain=load.explain)

    async def one(self, stubs, started: float, record: bool) -> None:
        load = self.load
        first = None
        code = "OK"
        rpc = load.rpc
        if rpc in MIXES:
            mix = MIXES[rpc]
            rpc = mix[int(np.searchsorted(np.cumsum([w for _, w in mix]), self.rng.random()))][0]
        try:
            if rpc in ("recommend", "cold"):
                req = self._request(cold=rpc == "cold")
                await stubs["rec"].Recommend(req, timeout=load.deadline, metadata=self.md)
                first = time.perf_counter()
            elif rpc == "stream":
                async for _ in stubs["rec"].RecommendStream(
                    self._request(), timeout=load.deadline, metadata=self.md
                ):
                    if first is None:
                        first = time.perf_counter()
            elif rpc == "batch":
                reqs = [self._request() for _ in range(load.batch)]
                async for _ in stubs["rec"].RecommendBatch(
                    iter(reqs), timeout=load.deadline, metadata=self.md
                ):
                    if first is None:
                        first = time.perf_counter()
            elif rpc == "similar":
                item = load.items[int(self.rng.integers(0, len(load.items)))]
                req = pb.SimilarItemsRequest(item_id=item, k=load.k, model=load.model)
                async for _ in stubs["rec"].SimilarItems(
                    req, timeout=load.deadline, metadata=self.md
                ):
                    if first is None:
                        first = time.perf_counter()
            elif rpc == "predict":
                r = self._request()
                items = [load.items[int(i)] for i in self.rng.integers(0, len(load.items), load.k)]
                req = pb.PredictRatingsRequest(
                    user_id=r.user_id, history=r.history, item_ids=items, model=load.model
                )
                await stubs["rec"].PredictRatings(req, timeout=load.deadline, metadata=self.md)
            else:
                await stubs["health"].Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=load.deadline,
                    metadata=self.md,
                )
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        end = time.perf_counter()
        if record:
            self.codes[code] += 1
            kind = self.kinds.setdefault(rpc, {"lat": [], "codes": Counter()})
            kind["codes"][code] += 1
            if code == "OK":
                self.lat.append(end - started)
                self.ttfi.append((first or end) - started)
                kind["lat"].append(end - started)
            else:
                self.refused.append(end - started)


async def _phase(sender: _Sender, conns: list, seconds: float, limit: int, record: bool) -> float:
    """Send for `seconds` (or `limit` requests when > 0); returns the elapsed time."""
    load = sender.load
    t0 = time.perf_counter()
    stop_at = t0 + seconds if seconds > 0 and not limit else float("inf")
    state = {"sent": 0}

    def more() -> bool:
        return state["sent"] < limit if limit else time.perf_counter() < stop_at

    if load.rate > 0:  # open loop on a fixed schedule
        interval = 1.0 / (load.rate * sender.share)
        tasks = set()
        while more():
            due = t0 + state["sent"] * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stubs = conns[state["sent"] % len(conns)]
            task = asyncio.create_task(sender.one(stubs, due, record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            state["sent"] += 1
        if tasks:
            await asyncio.gather(*tasks)
    else:  # closed loop: each worker sends when its previous request ends

        async def loop(stubs) -> None:
            while more():
                state["sent"] += 1
                await sender.one(stubs, time.perf_counter(), record)

        workers = max(1, round(load.concurrency * sender.share))
        await asyncio.gather(*(loop(conns[i % len(conns)]) for i in range(workers)))
    return time.perf_counter() - t0


async def _run(load: Load, seed: int, share: float) -> dict:
    """One process: warm up, then measure; returns raw samples."""
    sender = _Sender(load, seed)
    sender.share = share
    # Each channel its own subchannel pool, hence its own TCP connection: with
    # `recserve serve --workers N` the kernel spreads connections (not calls) over
    # the workers sharing the port, so one connection would load one worker.
    opts = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    in_flight = max(1, round(load.concurrency * share)) if load.rate <= 0 else load.connections
    n = max(1, min(load.connections, in_flight))
    creds = load.credentials()
    channels = [
        grpc.aio.secure_channel(load.target, creds, options=opts)
        if creds
        else grpc.aio.insecure_channel(load.target, options=opts)
        for _ in range(n)
    ]
    try:
        conns = [
            {"rec": pb_grpc.RecommenderStub(ch), "health": health_pb2_grpc.HealthStub(ch)}
            for ch in channels
        ]
        if load.warmup > 0:
            await _phase(sender, conns, load.warmup, 0, record=False)
        limit = max(1, round(load.requests * share)) if load.requests else 0
        elapsed = await _phase(sender, conns, load.duration, limit, record=True)
    finally:
        for ch in channels:
            await ch.close()
    return {
        "lat": sender.lat,
        "ttfi": sender.ttfi,
        "refused": sender.refused,
        "codes": dict(sender.codes),
        "kinds": {k: {"lat": v["lat"], "codes": dict(v["codes"])} for k, v in sender.kinds.items()},
        "elapsed": elapsed,
    }


def _process(args: tuple[Load, int, float]) -> dict:
    load, seed, share = args
    return asyncio.run(_run(load, seed, share))


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {k: float("nan") for k in ("p50", "p90", "p99", "p99.9", "mean")}
    a = np.asarray(values) * 1e3
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "p99.9": float(np.percentile(a, 99.9)),
        "mean": float(a.mean()),
    }


def run(load: Load) -> Result:
    """Run the load from `load.processes` client processes and aggregate."""
    procs = max(1, load.processes)
    if procs > 1 and load.rate <= 0 and load.concurrency < procs:
        procs = load.concurrency  # every process keeps at least one request in flight
    shares = [1.0 / procs] * procs
    jobs = [(load, load.seed * 1000 + i, shares[i]) for i in range(procs)]
    if procs == 1:
        parts = [_process(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(procs) as pool:
            parts = pool.map(_process, jobs)
    lat = [x for p in parts for x in p["lat"]]
    ttfi = [x for p in parts for x in p["ttfi"]]
    codes: Counter[str] = Counter()
    for p in parts:
        codes.update(p["codes"])
    seconds = max(p["elapsed"] for p in parts)
    total = sum(codes.values())
    by_rpc: dict[str, dict] = {}
    if load.rpc in MIXES:
        for kind in sorted({k for p in parts for k in p["kinds"]}):
            lat_k = [x for p in parts for x in p["kinds"].get(kind, {}).get("lat", [])]
            codes_k: Counter[str] = Counter()
            for p in parts:
                codes_k.update(p["kinds"].get(kind, {}).get("codes", {}))
            by_rpc[kind] = {
                "requests": sum(codes_k.values()),
                "ok": codes_k.get("OK", 0),
                "latency_ms": _pcts(lat_k),
                "errors": {c: n for c, n in codes_k.items() if c != "OK"},
            }
    return Result(
        rpc=load.rpc,
        requests=total,
        seconds=seconds,
        qps=codes.get("OK", 0) / seconds if seconds > 0 else 0.0,
        latency_ms=_pcts(lat),
        first_item_ms=_pcts(ttfi),
        errors={k: v for k, v in codes.items() if k != "OK"},
        concurrency=load.concurrency,
        rate=load.rate,
        processes=procs,
        refusal_ms=_pcts([x for p in parts for x in p["refused"]]),
        by_rpc=by_rpc,
    )


def _ids(spec: str, name: str = "users") -> list[str]:
    """Ids from a range lo:hi (inclusive) or a file of one id per line; ValueError
    naming the option when the file cannot be read or holds no id."""
    if ":" in spec and spec.replace(":", "").isdigit():
        lo, hi = (int(x) for x in spec.split(":"))
        ids = [str(i) for i in range(lo, hi + 1)]
    else:
        try:
            with open(spec, encoding="utf-8") as fh:
                ids = [line.strip() for line in fh if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{name}: cannot read {spec!r} ({exc})") from None
    if not ids:
        raise ValueError(f"{name}: no ids in {spec!r} (a range lo:hi with lo <= hi, or a file)")
    return ids


def _defaults_from_server(load: Load) -> None:
    """n_users / n_items of the model (or the first model) -> id ranges 1..n."""
    creds = load.credentials()
    with (
        grpc.secure_channel(load.target, creds) if creds else grpc.insecure_channel(load.target)
    ) as ch:
        admin = pb_grpc.AdminStub(ch)
        listed = admin.ListModels(pb.ListModelsRequest(), timeout=10, metadata=load.metadata())
    models = listed.models
    real = [m for m in models if m.n_items > 0]
    pick = next((m for m in real if m.name == load.model), real[0] if real else None)
    if pick is None:
        raise SystemExit("bench: the server lists no loaded model; pass --users and --items")
    if not load.users:
        load.users = [str(i) for i in range(1, pick.n_users + 1)]
    if not load.items:
        load.items = [str(i) for i in range(1, pick.n_items + 1)]


def table(results: Sequence[Result], ceiling: Result | None = None) -> str:
    """A terminal table (and the ratios to the ceiling, when there is one)."""
    head = (
        f"{'rpc':<10}{'req':>8}{'q/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'p99.9 ms':>10}{'ttfi p50':>10}  errors"
    )
    lines = [head]
    for r in [*results, *([ceiling] if ceiling else [])]:
        lat = r.latency_ms
        lines.append(
            f"{r.rpc:<10}{r.requests:>8}{r.qps:>10,.0f}{lat['p50']:>9.2f}{lat['p90']:>9.2f}"
            f"{lat['p99']:>9.2f}{lat['p99.9']:>10.2f}{r.first_item_ms['p50']:>10.2f}  "
            + (", ".join(f"{k}={v}" for k, v in sorted(r.errors.items())) or "-")
        )
    for r in results:
        for kind, k in r.by_rpc.items():
            lat = k["latency_ms"]
            lines.append(
                f"  {kind:<8}{k['requests']:>8}{'':>10}{lat['p50']:>9.2f}{lat['p90']:>9.2f}"
                f"{lat['p99']:>9.2f}{lat['p99.9']:>10.2f}{'':>10}  "
                + (", ".join(f"{c}={n}" for c, n in sorted(k["errors"].items())) or "-")
            )
        if r.errors:
            ref = r.refusal_ms
            lines.append(f"  refusals answered in p50 {ref['p50']:.2f} ms, p99 {ref['p99']:.2f} ms")
    if ceiling is not None:
        for r in results:
            lines.append(
                f"{r.rpc} vs health ceiling: throughput {r.qps / ceiling.qps:.2f}x, "
                f"p50 +{r.latency_ms['p50'] - ceiling.latency_ms['p50']:.3f} ms, "
                f"p99 {r.latency_ms['p99'] / ceiling.latency_ms['p99']:.2f}x"
            )
    return "\n".join(lines)


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The bench options (shared by `recserve bench`)."""
    ap = ap or argparse.ArgumentParser(
        prog="recserve bench", allow_abbrev=False, description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--rpc", choices=RPCS, default="recommend")
    ap.add_argument("--model", default="")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight")
    ap.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s (0 = closed)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    ap.add_argument("--requests", type=int, default=0, help="stop after N (instead of duration)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    ap.add_argument("--users", default="", help="id range lo:hi or a file (default 1..n_users)")
    ap.add_argument("--items", default="", help="id range or file (default 1..n_items)")
    ap.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent > 1 (0 = uniform)")
    ap.add_argument("--cold", type=float, default=0.0, help="fraction of cold users with history")
    ap.add_argument("--history", type=int, default=10, help="items in a cold user's history")
    ap.add_argument("--batch", type=int, default=16, help="requests per RecommendBatch stream")
    ap.add_argument("--processes", type=int, default=2, help="client processes")
    ap.add_argument("--connections", type=int, default=4, help="TCP connections per client process")
    ap.add_argument("--ceiling", action="store_true", help="also measure the health-check ceiling")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--deadline", type=float, default=10.0, help="every call's deadline, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--explain", action="store_true", help="ask for explanations with every recommendation"
    )
    ap.add_argument(
        "--token",
        default=os.environ.get("RECSERVE_ADMIN_TOKEN", ""),
        help="bearer token sent with every call (a server with token_for_all; its Admin "
        "ListModels, which fills --users/--items, from a non-loopback peer); default "
        "$RECSERVE_ADMIN_TOKEN",
    )
    ap.add_argument("--tls-ca", default="", help="PEM CA of the server's certificate (TLS)")
    ap.add_argument("--tls-cert", default="", help="this client's PEM certificate (mutual TLS)")
    ap.add_argument("--tls-key", default="", help="this client's PEM private key (mutual TLS)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m recserve.clients.bench` and `recserve bench`."""
    args = build_parser().parse_args(argv)
    return run_cli(args)


def _load(args: argparse.Namespace) -> Load:
    """The Load of parsed arguments (ValueError naming a bad setting)."""
    return Load(
        target=args.target,
        rpc=args.rpc,
        model=args.model,
        k=args.k,
        concurrency=args.concurrency,
        rate=args.rate,
        duration=args.duration,
        requests=args.requests,
        warmup=args.warmup,
        users=_ids(args.users, "users") if args.users else [],
        items=_ids(args.items, "items") if args.items else [],
        zipf=args.zipf,
        cold=args.cold,
        history=args.history,
        batch=args.batch,
        processes=args.processes,
        connections=args.connections,
        deadline=args.deadline,
        seed=args.seed,
        explain=args.explain,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run from parsed arguments; prints a table or JSON."""
    try:
        load = _load(args)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if load.rpc != "health" and (not load.users or not load.items):
        try:
            _defaults_from_server(load)
        except grpc.RpcError as exc:
            what = f"{exc.code().name}: {exc.details()}"
            print(f"bench: cannot list {load.target}'s models ({what})", file=sys.stderr)
            return 2
    result = run(load)
    ceiling = None
    if args.ceiling:
        ceiling = run(Load(**{**asdict(load), "rpc": "health"}))
    if args.json:
        print(
            json.dumps({"result": asdict(result), "ceiling": asdict(ceiling) if ceiling else None})
        )
    else:
        print(table([result], ceiling))
    return 0 if result.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
