"""This checkout's serving code against another revision's under overload, in
alternating rounds on the quickstart setup: each round starts a fresh server of
one code, measures the traffic mix's closed-loop maximum (4 s), then offers the
mix open loop at one fixed --rate with --deadline deadlines (5 s) and prints
OK/s, the codes and how fast refusals came back. The order of the two codes
alternates every round, so a slow minute of a shared machine hits both.

One fixed rate for both codes is the point: twice each run's own maximum
offers different loads to different runs, and a few hundred calls/s more can
be the difference between no call expiring and a collapse.

The other code is `server/` of --base (git archive), put first on PYTHONPATH;
the compiled kernels and the generated gRPC modules are this checkout's, so
the two revisions must agree on kernels/ and proto/ (checked).

    python bench/bench_overload_ab.py --base 5000cfb --rate 1840 --rounds 8 --workdir /tmp/qs

docs/performance.md "The overload result explained" has this comparison's
figures.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_traffic

from recserve.clients.bench import Load, run

ROOT = Path(__file__).resolve().parents[1]


def checkout(base: str, into: Path) -> Path:
    """`server/` of revision `base` as an importable `recserve` package under
    `into`, with this checkout's generated gRPC modules; returns `into`."""
    # Changes to comment lines alone (`//`, `#`) do not change what is compiled.
    differs = subprocess.run(
        ["git", "diff", "--quiet", "-I", r"^\s*(//|#)", base, "--", "kernels", "proto"],
        cwd=ROOT,
        check=False,
    )
    if differs.returncode == 1:
        raise SystemExit(f"--base {base}: its kernels/ or proto/ differ from this checkout's")
    if differs.returncode != 0:
        raise SystemExit(f"--base {base}: not a revision of this repository")
    archive = subprocess.run(
        ["git", "archive", base, "server"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "server").rename(into / "recserve")
    shutil.copytree(ROOT / "server" / "v1", into / "recserve" / "v1")
    return into


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", required=True, help="the revision to compare with, e.g. 5000cfb")
    ap.add_argument("--rate", type=float, required=True, help="calls/s offered to both codes")
    ap.add_argument("--rounds", type=int, default=4, help="rounds (each runs both codes)")
    ap.add_argument("--deadline", type=float, default=1.0, help="every call's deadline, seconds")
    ap.add_argument("--workdir", default=None, help="quickstart folder (default: a temporary one)")
    args = ap.parse_args()
    if args.rate <= 0 or args.rounds < 1 or args.deadline <= 0:
        ap.error("--rate and --deadline must be > 0 and --rounds >= 1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-overload-ab-"))
    other = checkout(args.base, Path(tempfile.mkdtemp(prefix="bench-overload-base-")))
    print(f"setting up {work}...", flush=True)
    config = bench_traffic.setup(work)
    codes = {"this": None, args.base: {"PYTHONPATH": str(other)}}
    base = dict(
        users=[str(i) for i in range(1, 6001)], items=[str(i) for i in range(1, 2501)], warmup=1.0
    )
    rows: dict[str, list[dict]] = {name: [] for name in codes}
    try:
        for r in range(args.rounds):
            order = list(codes) if r % 2 == 0 else list(codes)[::-1]
            for name in order:
                proc, target = bench_traffic.serve(config, codes[name])
                try:
                    top = run(
                        Load(rpc="traffic", concurrency=8, duration=4.0, target=target, **base)
                    )
                    over = run(
                        Load(
                            rpc="traffic",
                            rate=args.rate,
                            deadline=args.deadline,
                            duration=5.0,
                            target=target,
                            **base,
                        )
                    )
                finally:
                    proc.terminate()
                    proc.wait(30)
                ok = over.requests - sum(over.errors.values())
                rows[name].append({"max": top.qps, "ok_s": over.qps, **over.errors})
                print(
                    f"round {r + 1}, {name:>8}: maximum {top.qps:,.0f} q/s; at {args.rate:,.0f} "
                    f"q/s: OK {ok} ({over.qps:,.0f}/s = {over.qps / top.qps:.2f} of the maximum), "
                    f"refused or failed {dict(over.errors) or '-'}, refusals p50 "
                    f"{over.refusal_ms['p50']:.0f} ms",
                    flush=True,
                )
    finally:
        shutil.rmtree(other, ignore_errors=True)
    print(f"\n{'code':>10}{'OK/s median':>13}{'range':>15}{'expired per round':>20}")
    for name, got in rows.items():
        ok = [g["ok_s"] for g in got]
        expired = [g.get("DEADLINE_EXCEEDED", 0) for g in got]
        print(
            f"{name:>10}{statistics.median(ok):>13,.0f}{min(ok):>8,.0f}-{max(ok):<6,.0f}"
            f"{' ' * 6}{expired}"
        )


if __name__ == "__main__":
    main()
