"""Memory of one replica serving a large ALS catalogue through FAISS.

    python bench/bench_replica_memory.py --items 1000000 --index ivfpq

Random 64-d factors (a realistic spread for the index) are written as a Spark
ALSModel folder and imported with `recserve import spark-als`, which builds the
index; one `recserve serve` then answers `--requests` Recommend calls. Prints
the bundle size, the index build time, and the serving process's RSS and PSS
(/proc/PID/smaps_rollup): the figures docs/scaling.md extrapolates from.
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
import pyarrow as pa
import pyarrow.parquet as pq

from recserve.clients.client import RecommenderClient
from recserve.clients.health import check


def write_factors(folder: Path, n: int, d: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    x = rng.standard_normal((n, d)).astype(np.float32)
    features = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)
    schema = pa.schema([("id", pa.int32()), ("features", pa.list_(pa.float32()))])
    table = pa.table({"id": pa.array(np.arange(n), pa.int32()), "features": features})
    pq.write_table(table.cast(schema), folder / "part-00000.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--factors", type=int, default=64)
    ap.add_argument("--index", default="ivfpq", help="exact, flat, hnsw, ivf, ivfpq")
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-replica-"))
    try:
        rng = np.random.default_rng(0)
        write_factors(work / "spark" / "itemFactors", args.items, args.factors, rng)
        write_factors(work / "spark" / "userFactors", args.users, args.factors, rng)
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "recserve", "import", "spark-als", str(work / "spark"),
             "--name", "als", "--models", str(work / "models"), "--index", args.index],
            check=True, capture_output=True,
        )  # fmt: skip
        build_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in (work / "models").rglob("*") if f.is_file())
        proc = subprocess.Popen(
            [sys.executable, "-m", "recserve", "serve", "--models", str(work / "models"),
             "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--feedback", "memory:"],
            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            target = ""
            for line in proc.stderr:
                m = re.search(r"listening on \S+:(\d+)", line)
                if m:
                    target = f"127.0.0.1:{m.group(1)}"
                    break
            deadline = time.monotonic() + 120
            while check(target, "model/als", 1.0) != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.1)
            with RecommenderClient(target) as rc:
                for u in range(args.requests):
                    rc.recommend(str(u % args.users), 10, model="als")
            rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
            rss = int(re.search(r"^Rss:\s+(\d+)", rollup, re.M)[1]) * 1024
            pss = int(re.search(r"^Pss:\s+(\d+)", rollup, re.M)[1]) * 1024
        finally:
            proc.terminate()
            proc.wait(30)
        print(
            f"{args.items:,} items x {args.factors} factors, index {args.index}: bundle "
            f"{size / 1e6:.0f} MB (index built in {build_s:.0f} s); after {args.requests:,} "
            f"Recommend calls RSS {rss / 1e6:.0f} MB, PSS {pss / 1e6:.0f} MB"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
