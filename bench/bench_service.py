"""The service under load: `recserve bench` against `recserve serve`, beside the
health-check ceiling on the same server with the same settings.

    python bench/bench_service.py                       # ml-100k ALS + 1M-item synthetic ALS
    python bench/bench_service.py --skip-synthetic --duration 5
    python bench/bench_service.py --server asyncio --workers 1 --batching 0,0.5  # batching

For each dataset, server kind (thread pool, asyncio), workers (1, 2) and
concurrency (1, 8, 32): Recommend k=10
QPS and p50/p99 next to the ceiling's, and the ratios the service targets are
stated in (throughput / ceiling, p50 - ceiling p50, p99 / ceiling p99): medians
over `--rounds` alternating runs, with the range of the throughput ratio. Client
and server share this machine's cores, so the ratios are the figures to quote.
Also prints the server processes' summed RSS and PSS with 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from recserve.clients.bench import Load, Result, run
from recserve.clients.health import check
from recserve.data import generate, load_dataset, to_dataset
from recserve.models import create

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"


def start(
    models: Path, workers: int, metrics_port: int, kind: str, batch: str = ""
) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recserve",
            "serve",
            "--models",
            str(models),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            str(metrics_port),
            "--workers",
            str(workers),
            "--feedback",
            "memory:",  # no state shared between runs, nothing written in the tree
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "RECSERVE_SERVER": kind,
            **({"RECSERVE_BATCH_DELAY_MS": batch} if batch else {}),
        },
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on \S+:(\d+)", line)
        if m:
            target = f"127.0.0.1:{m.group(1)}"
            break
    else:
        raise SystemExit("server did not start")
    for _ in range(600):
        try:
            if check(target, "model/als", 1) == "SERVING":
                break
        except Exception:
            pass
        time.sleep(0.05)
    return proc, target


def memory(metrics_port: int) -> tuple[float, float]:
    time.sleep(6)  # one memory sampling period
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    rss = float(re.search(r"^recserve_process_resident_memory_bytes (\S+)", text, re.M)[1])
    pss = float(re.search(r"^recserve_process_proportional_memory_bytes (\S+)", text, re.M)[1])
    return rss, pss


def _median(results: list[Result]) -> Result:
    """Per-figure medians of several runs of one load (as one Result)."""

    def mid(values: list[float]) -> float:
        return float(np.median(values))

    first = results[0]
    return Result(
        first.rpc,
        sum(x.requests for x in results),
        sum(x.seconds for x in results),
        mid([x.qps for x in results]),
        {q: mid([x.latency_ms[q] for x in results]) for q in first.latency_ms},
        {q: mid([x.first_item_ms[q] for x in results]) for q in first.first_item_ms},
        dict(sum((Counter(x.errors) for x in results), Counter())),
        first.concurrency,
        first.rate,
        first.processes,
    )


def bench(label: str, models: Path, n_users: int, n_items: int, args) -> None:
    users = [str(i) for i in range(1, n_users + 1)]
    items = [str(i) for i in range(1, n_items + 1)]
    print(f"\n{label}")
    print(
        f"{'server':>8}{'workers':>8}{'batch':>6}{'conc':>6}{'q/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'ceil q/s':>10}{'ceil p50':>10}{'ceil p99':>10}"
        f"{'q/s ratio':>11}{'p50 diff':>10}{'p99 ratio':>11}  ratio range"
    )
    setups = [
        (k, int(w), b)
        for k in args.server.split(",")
        for w in args.workers.split(",")
        for b in args.batching.split(",")
    ]
    for kind, workers, batch in setups:
        proc, target = start(models, workers, args.metrics_port, kind, batch)
        try:
            rss, pss = memory(args.metrics_port)
            for conc in [int(c) for c in args.concurrency.split(",")]:
                common = dict(
                    target=target,
                    model="als",
                    k=10,
                    concurrency=conc,
                    duration=args.duration,
                    warmup=args.warmup,
                    users=users,
                    items=items,
                    processes=min(2, conc),
                )
                # Alternate Recommend and ceiling rounds and take medians: this VM's
                # speed drifts by 20-30% over seconds, which one pair of runs shows
                # as a ratio swing of the same size.
                rs, cs = [], []
                for _ in range(args.rounds):
                    rs.append(run(Load(rpc=args.rpc, **common)))
                    cs.append(run(Load(rpc="health", **common)))
                r = _median(rs)
                c = _median(cs)
                ratios = sorted(a.qps / b.qps for a, b in zip(rs, cs, strict=True))
                errors = r.errors
                print(
                    f"{kind:>8}{workers:>8}{batch or '-':>6}{conc:>6}{r.qps:>9,.0f}"
                    f"{r.latency_ms['p50']:>9.2f}"
                    f"{r.latency_ms['p99']:>9.2f}{c.qps:>10,.0f}{c.latency_ms['p50']:>10.2f}"
                    f"{c.latency_ms['p99']:>10.2f}{r.qps / c.qps:>11.2f}"
                    f"{r.latency_ms['p50'] - c.latency_ms['p50']:>10.2f}"
                    f"{r.latency_ms['p99'] / c.latency_ms['p99']:>11.2f}"
                    f"  {ratios[0]:.2f}-{ratios[-1]:.2f}"
                    + (f"  errors {errors}" if errors else ""),
                    flush=True,
                )
            print(
                f"{'':>8}memory with {workers} {kind} worker(s): RSS {rss / 1e6:.0f} MB, "
                f"PSS {pss / 1e6:.0f} MB (summed over workers)"
            )
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating Recommend/ceiling runs")
    ap.add_argument("--rpc", default="recommend", help="recommend (unary) or stream")
    ap.add_argument("--metrics-port", type=int, default=9464)
    ap.add_argument("--skip-ml100k", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--synthetic-items", type=int, default=1_000_000)
    ap.add_argument("--server", default="threads,asyncio", help="server kinds to compare")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare")
    ap.add_argument("--concurrency", default="1,8,32", help="client concurrencies")
    ap.add_argument(
        "--batching",
        default="",
        help="batch_delay_ms values to compare, e.g. 0,0.5 (asyncio; default: the server's)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_ml100k and ML100K.exists():
            ds = load_dataset(ML100K)
            create("als", factors=64, iterations=15).fit(ds).save(Path(tmp) / "ml", "als")
            bench(
                "ml-100k, ALS 64 factors (exact scoring)",
                Path(tmp) / "ml",
                ds.n_users,
                ds.n_items,
                args,
            )
        if not args.skip_synthetic:
            n = args.synthetic_items
            t = time.perf_counter()
            ds = to_dataset(generate(n // 5, n, 5 * n, seed=5))
            m = create("als", factors=64, iterations=5).fit(ds)
            m.save(Path(tmp) / "syn", "als")
            print(
                f"\n(synthetic: {ds.n_users:,} users x {ds.n_items:,} items x {ds.nnz:,} events;"
                f" ALS + {m.index_kind()} index in {time.perf_counter() - t:.0f} s)"
            )
            bench(
                f"synthetic {n:,} items, ALS 64 factors ({m.index_kind()} index)",
                Path(tmp) / "syn",
                ds.n_users,
                ds.n_items,
                args,
            )


if __name__ == "__main__":
    main()
