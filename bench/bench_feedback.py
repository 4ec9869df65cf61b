"""Feedback stores side by side: SQLite and Redis (AOF, appendfsync always).

    python bench/bench_feedback.py                 # needs redis-server on PATH
    python bench/bench_feedback.py --events 1000000 --calls 400

Prints, in one run on this machine:
- RecordInteractions of one event, p50 / p99, through a server on each store;
- with two replicas on one Redis: from A's acknowledgement to B's first answer
  without the recorded item (B polled as fast as it answers);
- Redis memory per million events, append throughput (batches of 1,000, one
  client) and replay throughput (what a starting replica catches up at).
The redis-server is this script's own, on a free loopback port, removed after.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ports import held_port

from recserve.clients.client import RecommenderClient
from recserve.clients.health import check
from recserve.data import generate, load_dataset, to_dataset
from recserve.feedback import Event, RedisFeedbackStore
from recserve.models import create

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"


def serve(models: Path, feedback: str, cwd: Path) -> tuple[subprocess.Popen, str]:
    """A `recserve serve` on a free loopback port; (process, target) once ALS serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "recserve", "serve", "--models", str(models), "--host",
         "127.0.0.1", "--port", "0", "--metrics-port", "0", "--feedback", feedback],
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on \S+:(\d+)", line)
        if m:
            target = f"127.0.0.1:{m.group(1)}"
            break
    else:
        raise SystemExit(f"server on {feedback} did not start")
    deadline = time.monotonic() + 60
    services = ["model/als"] + (["feedback"] if feedback.startswith("redis") else [])
    for service in services:
        while time.monotonic() < deadline:
            try:
                if check(target, service, 1.0) == "SERVING":
                    break
            except Exception:
                pass
            time.sleep(0.05)
    return proc, target


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(30)


def record_latency(target: str, calls: int) -> tuple[float, float]:
    """p50, p99 ms of RecordInteractions with one event (after 50 warm-up calls)."""
    out = []
    with RecommenderClient(target) as rc:
        for i in range(calls + 50):
            t = time.perf_counter()
            rc.record(f"bench-u{i % 50}", [str(1 + i % 1000)])
            if i >= 50:
                out.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(out, 50)), float(np.percentile(out, 99))


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400, help="RecordInteractions per store")
    ap.add_argument("--visibility", type=int, default=60, help="events timed across replicas")
    ap.add_argument("--events", type=int, default=1_000_000, help="events for Redis memory")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    import redis

    work = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    ds = load_dataset(ML100K) if ML100K.exists() else to_dataset(generate(2000, 1500, 80_000))
    create("als", factors=64).fit(ds).save(work / "models", "als", dataset=ds)
    users = ds.users.ids(np.arange(min(ds.n_users, 2 * args.visibility)))
    port = held_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis(port=port)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        rows = {}
        for name, feedback in (("sqlite", f"sqlite:///{work}/fb.sqlite"), ("redis", url)):
            proc, target = serve(work / "models", feedback, work)
            try:
                rows[name] = record_latency(target, args.calls)
            finally:
                stop(proc)
        print(f"RecordInteractions of one event ({args.calls} calls), ms:")
        for name, (p50, p99) in rows.items():
            print(f"  {name:<8} p50 {p50:6.2f}   p99 {p99:6.2f}")

        a, ta = serve(work / "models", url, work)
        b, tb = serve(work / "models", url, work)
        seen = []
        try:
            with RecommenderClient(ta) as ra, RecommenderClient(tb) as rb:
                for user in users[: args.visibility]:
                    top = rb.recommend(user, 1, model="als").item_ids[0]
                    ra.record(user, [top])
                    t = time.perf_counter()
                    while rb.recommend(user, 1, model="als").item_ids[0] == top:
                        pass
                    seen.append((time.perf_counter() - t) * 1000)
        finally:
            stop(a)
            stop(b)
        print(
            f"replica B answers without A's event ({len(seen)} events), ms: "
            f"p50 {np.percentile(seen, 50):.2f}   p99 {np.percentile(seen, 99):.2f}   "
            f"max {max(seen):.2f}"
        )

        client.delete("recserve:feedback")
        before = client.info("memory")["used_memory"]
        store = RedisFeedbackStore(url)
        rng = np.random.default_rng(0)
        batch = 1000
        t = time.perf_counter()
        for start in range(0, args.events, batch):
            store.append(
                Event(f"user{rng.integers(10**6)}", f"item{rng.integers(10**5)}", 1.0, start)
                for _ in range(batch)
            )
        write_s = time.perf_counter() - t
        grown = client.info("memory")["used_memory"] - before
        t = time.perf_counter()
        replayed = sum(1 for _ in store.replay("0-0"))
        read_s = time.perf_counter() - t
        store.close()
        per_million = 1e6 / args.events
        print(
            f"Redis, {args.events:,} events: memory +{grown * per_million / 1e6:.0f} MB per "
            f"million; append {args.events / write_s:,.0f} events/s (batches of {batch}, "
            f"fsync always); replay {replayed / read_s:,.0f} events/s "
            f"({1e6 / (replayed / read_s):.0f} s per million to catch up)"
        )
    finally:
        client.close()
        redis_proc.terminate()
        redis_proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
