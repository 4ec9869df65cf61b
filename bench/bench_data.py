"""Data-layer scale benchmark: synthesize N events, then load them back, from the
CSV and from the same events as Parquet (side by side, same run).

Each phase runs in a fresh subprocess so its peak resident memory (ru_maxrss)
is its own. Targets (issue: Foundation): 20M events synthesized in < 60 s,
loaded in < 30 s with < 3 GB peak on a 2-core machine.

    python bench/bench_data.py --interactions 20000000 --users 200000 --items 50000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = {
    "synth": (
        "from recserve.data import generate, write_csv\n"
        "s = generate({users}, {items}, {interactions}, seed=7)\n"
        "write_csv(s, {out!r})\n"
    ),
    "load": (
        "from recserve.data import load_dataset\n"
        "d = load_dataset({out!r})\n"
        "assert d.nnz == {interactions}, d.nnz\n"
    ),
    "to_parquet": (
        "import pyarrow as pa, pyarrow.csv as pacsv, pyarrow.parquet as pq\n"
        "ids = {{'user_id': pa.string(), 'item_id': pa.string()}}\n"
        "table = pacsv.read_csv({out!r} + '/interactions.csv', "
        "convert_options=pacsv.ConvertOptions(column_types=ids))\n"
        "pq.write_table(table, {out!r} + '/interactions.parquet', row_group_size=1 << 20)\n"
    ),
    "load_parquet": (
        "from recserve.data import load_dataset\n"
        "d = load_dataset({out!r} + '/interactions.parquet')\n"
        "assert d.nnz == {interactions}, d.nnz\n"
    ),
    "baseline": "import numpy, scipy.sparse, pyarrow.csv\n",
}


def run_phase(code: str) -> dict[str, float]:
    """Run `code` in a fresh interpreter; return wall seconds and peak RSS bytes."""
    wrapped = (
        "import resource, time, json\n"
        "t = time.perf_counter()\n"
        + code
        + "print(json.dumps({'seconds': time.perf_counter() - t, "
        "'peak_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapped],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--interactions", type=int, default=20_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--out", default=None, help="folder for the CSV (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        fmt = dict(users=args.users, items=args.items, interactions=args.interactions, out=out)
        rows = {}
        for phase, code in PHASES.items():
            rows[phase] = run_phase(code.format(**fmt))
        size = (Path(out) / "interactions.csv").stat().st_size
        psize = (Path(out) / "interactions.parquet").stat().st_size
    print(f"{'phase':<10}{'seconds':>10}{'peak MB':>10}   target")
    targets = {
        "synth": "< 60 s",
        "load": "< 30 s, < 3000 MB (CSV)",
        "to_parquet": "(convert the CSV once)",
        "load_parquet": "(the same events from Parquet)",
        "baseline": "(imports only)",
    }
    for phase, r in rows.items():
        print(f"{phase:<10}{r['seconds']:>10.1f}{r['peak_bytes'] / 1e6:>10.0f}   {targets[phase]}")
    print(
        f"{args.interactions:,} events, CSV {size / 1e6:.0f} MB, Parquet {psize / 1e6:.0f} MB; "
        f"load rate {args.interactions / rows['load']['seconds'] / 1e6:.2f} M rows/s (CSV), "
        f"{args.interactions / rows['load_parquet']['seconds'] / 1e6:.2f} M rows/s (Parquet); "
        f"Parquet / CSV load time {rows['load_parquet']['seconds'] / rows['load']['seconds']:.2f}"
    )
    print(
        json.dumps(
            {"interactions": args.interactions, "csv_bytes": size, "parquet_bytes": psize, **rows}
        )
    )


if __name__ == "__main__":
    main()
