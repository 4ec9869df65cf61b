"""Start-up of `recserve serve`: seconds from process start to the server's health
SERVING and to each model's `model/<name>` SERVING, on ml-100k models and on a
5M-interaction synthetic set, with full sha256 verification and size-only.

    python bench/bench_startup.py                     # both datasets
    python bench/bench_startup.py --skip-ml100k --interactions 5000000

The reference run in the same table is a bare `python -c "import grpc, numpy,
scipy"`: the interpreter and library import floor no server can beat.
Models are trained once into a temporary folder (training time is printed too).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.data import generate, load_dataset, to_dataset
from recserve.models import bundle, create

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
MODELS = [
    ("popularity", "popularity", {}),
    ("itemknn", "itemknn", {"k": 100}),
    ("als", "als", {"factors": 64, "iterations": 10}),
]


def train(ds, root: Path) -> None:
    for name, algo, params in MODELS:
        t = time.perf_counter()
        path = create(algo, **params).fit(ds).save(root, name)
        size = bundle.bundle_bytes(bundle.read_manifest(path)) / 1e6
        print(f"  trained {name:<10} {time.perf_counter() - t:6.1f} s, bundle {size:7.1f} MB")


def floor_seconds() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import grpc, numpy, scipy"], check=True, cwd=ROOT)
    return time.perf_counter() - t


def startup(models: Path, verify: str) -> dict[str, float]:
    """Seconds from spawn to listening, overall SERVING and each model SERVING."""
    t0 = time.perf_counter()
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
            "0",
            "--feedback",
            "memory:",  # start-up of the models alone: no log to open or replay
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={"RECSERVE_VERIFY": verify, "PATH": "/usr/bin:/bin"},
    )
    port: list[int] = []
    listening: list[float] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(r"listening on \S+:(\d+)", line)
            if m:
                listening.append(time.perf_counter() - t0)
                port.append(int(m.group(1)))

    threading.Thread(target=read, daemon=True).start()
    while not port:
        if proc.poll() is not None:
            raise SystemExit("server exited during start-up")
        time.sleep(0.001)
    out = {"listening": listening[0]}
    names = ["", *(f"model/{n}" for n, _, _ in MODELS)]
    with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while len(out) < len(names) + 1 and time.perf_counter() - t0 < 120:
            for name in names:
                if name in out:
                    continue
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1)
                except grpc.RpcError:
                    continue
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    out[name] = time.perf_counter() - t0
            time.sleep(0.002)
    proc.terminate()
    proc.wait(30)
    return out


def report(label: str, models: Path, floor: float) -> None:
    names = ["", *(f"model/{n}" for n, _, _ in MODELS)]
    header = f"{'':<24}{'listening':>10}" + "".join(f"{n or 'SERVING':>18}" for n in names)
    print(header)
    for verify in ("full", "size"):
        r = startup(models, verify)
        cells = "".join(f"{r.get(n, float('nan')):>18.3f}" for n in names)
        print(f"{label + ' verify=' + verify:<24}{r['listening']:>10.3f}{cells}")
    print(f"{'import floor (reference)':<24}{floor:>10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--interactions", type=int, default=5_000_000)
    ap.add_argument("--skip-ml100k", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    args = ap.parse_args()
    floor = min(floor_seconds() for _ in range(3))
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_ml100k:
            if ML100K.exists():
                print(f"ml-100k ({ML100K}):")
                train(load_dataset(ML100K), Path(tmp) / "ml100k")
                report("ml-100k", Path(tmp) / "ml100k", floor)
            else:
                print(f"ml-100k skipped: {ML100K} not present")
        if not args.skip_synthetic:
            n = args.interactions
            print(f"synthetic {n:,} interactions ({n // 50:,} users x {n // 250:,} items):")
            ds = to_dataset(generate(n // 50, n // 250, n, seed=3))
            train(ds, Path(tmp) / "synth")
            del ds
            report(f"synth {n // 1_000_000}M", Path(tmp) / "synth", floor)


if __name__ == "__main__":
    main()
