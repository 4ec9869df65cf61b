"""Server CPU per call, by model: what one Recommend costs the server process
(user + system time from /proc/<pid>/stat around a closed loop, divided by the
calls answered), beside the health check's, on the quickstart setup.

    python bench/bench_cpu_per_call.py --workdir /tmp/qs
    python bench/bench_cpu_per_call.py --workdir /tmp/qs --models health,popularity,hybrid
    python bench/bench_cpu_per_call.py --workdir /tmp/qs --models als,als:cold  # cold users

Throughput ratios (bench_traffic.py) mix the server's cost with the client's,
which shares the machine's cores; this isolates the server's side. The load
client runs as its own process (`recserve bench`, concurrency 4, known users);
rounds alternate over the models. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_traffic import MODELS, serve, setup


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(pid: int, target: str, model: str, seconds: float) -> tuple[float, float]:
    """(calls per second, server CPU microseconds per call) of one closed loop."""
    name, _, shape = model.partition(":")
    rpc = ["--rpc", "health"] if name == "health" else ["--rpc", "recommend", "--model", name]
    if shape == "cold":  # unknown users, each with a 10-item history (folded in)
        rpc += ["--cold", "1", "--items", "1:2500"]
    elif shape:
        raise SystemExit(f"--models: unknown call shape {shape!r} in {model!r} (known: cold)")
    c0 = cpu_seconds(pid)
    out = subprocess.run(
        [sys.executable, "-m", "recserve.clients.bench", "--target", target, *rpc,
         "--concurrency", "4", "--duration", str(seconds), "--warmup", "0",
         "--users", "1:6000", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    used = cpu_seconds(pid) - c0
    r = json.loads(out.stdout)["result"]
    return r["requests"] / r["seconds"], 1e6 * used / r["requests"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="var/bench-traffic")
    ap.add_argument("--models", default=",".join(["health", *MODELS]))
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    config = setup(Path(args.workdir))
    proc, target = serve(config)
    try:
        time.sleep(1.0)
        seen: dict[str, list[float]] = {}
        print(f"{'model':12s} {'q/s':>7s}  server CPU per call")
        for rnd in range(args.rounds):
            for m in args.models.split(","):
                qps, us = measure(proc.pid, target, m, args.seconds)
                seen.setdefault(m, []).append(us)
                print(f"{m:12s} {qps:7.0f}  {us:6.0f} us   (round {rnd + 1})", flush=True)
        print("\nrange over the rounds, us per call:")
        for m, v in seen.items():
            print(f"  {m:12s} {min(v):6.0f}-{max(v):.0f}")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
