"""Where Recommend's time goes on the server: the same server with its handler
swapped, each beside the health-check ceiling.

    python bench/bench_handler.py                  # ml-100k ALS (synthetic if absent)

Handlers: `empty` returns an empty RecommendResponse (gRPC's own cost of the
call), `ranking` only calls Router.recommend and builds the response (no
admission, deadlines or metrics), `full` is the real handler. Throughput ratio
against the ceiling, p50 difference and p99 ratio, medians of 3 alternating
runs at concurrency 1 and 8 (asyncio server, 1 worker, 2 client processes).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"


def serve_patched(mode: str, argv: list[str]) -> int:
    """Run `recserve serve` with the asyncio Recommend handler swapped (child process)."""
    from recserve.cli import main
    from recserve.service import convert
    from recserve.service.grpc_aio import Recommender as AioRecommender
    from recserve.v1 import recommender_pb2 as pb

    if mode == "empty":

        async def recommend(self, request, context):
            return pb.RecommendResponse()

        AioRecommender.Recommend = recommend
    elif mode == "ranking":

        async def recommend(self, request, context):
            r = self.core.router.recommend(convert.rec_query(request))
            return convert.response_bytes(request.request_id, r)

        AioRecommender.Recommend = recommend
    return main(argv)


def measure(mode: str, models: Path, users: list[str], duration: float) -> None:
    from recserve.clients.bench import Load, run
    from recserve.clients.health import check

    proc = subprocess.Popen(
        [
            *(sys.executable, __file__, "--serve", mode, "serve", "--models", str(models)),
            *("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--feedback", "memory:"),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={"RECSERVE_SERVER": "asyncio", "PATH": "/usr/bin:/bin"},
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on \S+:(\d+)", line)
        if m:
            target = f"127.0.0.1:{m.group(1)}"
            break
    else:
        raise SystemExit("server did not start")
    try:
        while True:
            try:
                if check(target, "model/als", 1) == "SERVING":
                    break
            except Exception:
                pass
            time.sleep(0.05)
        for conc in (1, 8):
            common = dict(
                target=target,
                model="als",
                k=10,
                concurrency=conc,
                duration=duration,
                warmup=1.0,
                users=users,
                items=["1"],
                processes=min(2, conc),
            )
            rows = []
            for _ in range(3):
                r, c = run(Load(rpc="recommend", **common)), run(Load(rpc="health", **common))
                rows.append(
                    (
                        r.qps / c.qps,
                        r.latency_ms["p50"] - c.latency_ms["p50"],
                        r.latency_ms["p99"] / c.latency_ms["p99"],
                    )
                )
            ratio, p50, p99 = np.median(np.array(rows), axis=0)
            lo, hi = min(x[0] for x in rows), max(x[0] for x in rows)
            print(
                f"{mode:>8}{conc:>6}{ratio:>11.2f}  {lo:.2f}-{hi:.2f}{p50:>10.2f}{p99:>11.2f}",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        sys.exit(serve_patched(sys.argv[2], sys.argv[3:]))
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--modes", default="empty,ranking,full")
    args = ap.parse_args()
    from recserve.data import generate, load_dataset, to_dataset
    from recserve.models import create

    ds = load_dataset(ML100K) if ML100K.exists() else to_dataset(generate(1000, 2000, 100_000))
    users = ds.users.ids(np.arange(ds.n_users))
    with tempfile.TemporaryDirectory() as tmp:
        create("als", factors=64, iterations=15).fit(ds).save(Path(tmp), "als")
        head = f"{'handler':>8}{'conc':>6}{'q/s ratio':>11}  {'range':<9}"
        print(head + f"{'p50 diff':>10}{'p99 ratio':>11}")
        for mode in args.modes.split(","):
            measure(mode, Path(tmp), users, args.duration)


if __name__ == "__main__":
    main()
