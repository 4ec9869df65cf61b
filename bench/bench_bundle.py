"""Bundle load time: publish models trained on synthetic data, then load each in a
fresh process, with full sha256 verification and with size-only verification.

    python bench/bench_bundle.py --interactions 5000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recserve.data import generate, to_dataset
from recserve.models import bundle, create

LOAD = (
    "import time, json\n"
    "t0 = time.perf_counter()\n"
    "from recserve.models import load\n"
    "t1 = time.perf_counter()\n"
    "m = load({path!r}, verify={verify})\n"
    "m.recommend([0], 10)\n"
    "t2 = time.perf_counter()\n"
    "print(json.dumps({{'import_s': t1 - t0, 'load_and_first_call_s': t2 - t1}}))\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--interactions", type=int, default=5_000_000)
    args = ap.parse_args()
    n = args.interactions
    ds = to_dataset(generate(n // 50, max(2_000, n // 250), n, seed=3))
    root = Path(__file__).resolve().parents[1]
    print(
        f"{'model':<12}{'bundle MB':>10}{'verify=sha256 s':>17}{'verify=size s':>15}{'train s':>9}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for algo in ("popularity", "itemknn"):
            t = time.perf_counter()
            path = create(algo).fit(ds).save(tmp, algo)
            train_s = time.perf_counter() - t
            size = bundle.bundle_bytes(bundle.read_manifest(path))
            res = {}
            for verify in (True, False):
                out = subprocess.run(
                    [sys.executable, "-c", LOAD.format(path=str(path), verify=verify)],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=root,
                )
                res[verify] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{algo:<12}{size / 1e6:>10.1f}{res[True]['load_and_first_call_s']:>17.3f}"
                f"{res[False]['load_and_first_call_s']:>15.3f}{train_s:>9.2f}"
            )


if __name__ == "__main__":
    main()
