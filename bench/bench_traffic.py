"""Serving under real traffic, on the out-of-the-box setup (`recserve quickstart`
data, models and config; its default model is the learned hybrid), one run:

1. the health-check ceiling (closed loop, concurrency 8);
2. every model's Recommend (k=10, known users) as a ratio of the ceiling,
   measured again after each model (the mean of the runs around it);
3. the traffic mix's closed-loop maximum (64% Recommend, 16% cold users with a
   10-item history, 10% SimilarItems, 10% RecommendBatch of 16), the median of
   three runs (steps 4 and 5 are set from it);
4. Recommend's p99 alone vs inside the mix, open loop at half the mix's maximum
   (alternating rounds, --rounds, the median printed);
5. the mix at twice its maximum with 1 s deadlines: status codes, goodput
   (OK per second against the mean of the maximum and one measured right
   after the round: the machine's speed drifts) and how fast refusals come back;
6. what a refusal costs against a mix call, and so the best goodput an
   admission policy serving the mix as it comes could reach at twice the
   maximum on this machine (shedding batches first can pass it).

Client and server share this machine's cores: the ratios are the figures to
quote, not the absolute rates. The targets (issue "Serving under real traffic")
are printed beside each figure.

    python bench/bench_traffic.py                     # about 4 minutes
    python bench/bench_traffic.py --duration 5 --workdir /tmp/qs
    python bench/bench_traffic.py --duration 5 --workdir /tmp/qs --overload-rounds 5
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from recserve.clients.bench import Load, run
from recserve.clients.health import check
from recserve.service.core import SHED_HEAVY_S

ROOT = Path(__file__).resolve().parents[1]
# After an overload round, the wait before the maximum is measured again: the
# server sheds RecommendBatch first for SHED_HEAVY_S after its last refusal.
SHED_SETTLE_S = SHED_HEAVY_S + 1.0
EXTRA = [  # models quickstart does not train, so every algorithm is measured
    ("userknn", "userknn", ["k=100"]),
    ("rp3beta", "rp3beta", []),
    ("ease", "ease", []),
    ("bpr", "bpr", ["epochs=20"]),
    ("svd", "svd", []),
    ("bayes_mf", "bayes_mf", []),
]
MODELS = ["popularity", "als", "itemknn", "content", "hybrid"] + [n for n, _, _ in EXTRA]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "recserve", *args], check=True, capture_output=True)


def setup(work: Path) -> Path:
    """quickstart, plus the other algorithms on the same data; returns the config."""
    cli("quickstart", "--workdir", str(work))
    data, models = work / "data" / "default", work / "models"
    for name, algo, params in EXTRA:
        if not (models / name / "CURRENT").exists() and not (models / name).exists():
            args = ["train", "--data", str(data), "--algo", algo, "--name", name]
            args += ["--models", str(models), "--no-evaluate"]
            for p in params:
                args += ["--param", p]
            cli(*args)
    return work / "recserve.toml"


def serve(config: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recserve",
            "serve",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--feedback",
            "memory:",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on \S+:(\d+)", line)
        if m:
            target = f"127.0.0.1:{m.group(1)}"
            break
    else:
        raise SystemExit("server did not start")
    # Keep reading its log: a pipe nobody reads fills up, and the server's next
    # log lines would then block it.
    threading.Thread(target=proc.stderr.read, name="server-log", daemon=True).start()
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            if check(target, "model/hybrid", 2.0) == "SERVING":
                break
        except Exception:  # not answering yet
            pass
        time.sleep(0.2)
    return proc, target


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default=None, help="quickstart folder (default: a temporary one)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    ap.add_argument(
        "--models-only", action="store_true", help="stop after the per-model ratios (1 and 2)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of step 4 (Recommend alone, then the mix, at half load)",
    )
    ap.add_argument(
        "--model-rounds",
        type=int,
        default=1,
        help="rounds of step 2 (every model between ceiling runs); above 1 the median is printed",
    )
    ap.add_argument(
        "--overload-rounds",
        type=int,
        default=1,
        help="rounds of step 5 (the mix at twice its maximum), each printed with its codes per"
        " call kind; above 1 the median goodput is printed",
    )
    args = ap.parse_args()
    if args.overload_rounds < 1:
        ap.error("--overload-rounds: must be at least 1")
    if args.rounds < 1:
        ap.error("--rounds: must be at least 1")
    if args.model_rounds < 1:
        ap.error("--model-rounds: must be at least 1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-traffic-"))
    print(f"setting up {work} (quickstart + {len(EXTRA)} more models)...", flush=True)
    proc, target = serve(setup(work))
    users = [str(i) for i in range(1, 6001)]
    items = [str(i) for i in range(1, 2501)]
    base = dict(target=target, duration=args.duration, warmup=1.0, users=users, items=items)
    try:
        ceiling = run(Load(rpc="health", concurrency=8, **base))
        print(f"\nhealth-check ceiling, concurrency 8: {ceiling.qps:,.0f} q/s")
        # Each model's run sits between two ceiling runs and is divided by their
        # mean: this machine's speed drifts over minutes, so one ceiling measured
        # at the start would credit or blame later models for the drift.
        print(
            f"\n{'model':<12}{'q/s':>9}{'ceiling':>9}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}"
            "   target >= 0.70 (ceiling: the mean of the runs just before and after)"
        )
        before = ceiling
        ratios_of: dict[str, list[float]] = {m: [] for m in MODELS}
        for rnd in range(args.model_rounds):
            if args.model_rounds > 1:
                print(f"round {rnd + 1} of {args.model_rounds}")
            for model in MODELS:
                r = run(Load(rpc="recommend", model=model, concurrency=8, **base))
                after = run(Load(rpc="health", concurrency=8, **base))
                around = (before.qps + after.qps) / 2
                ratio = r.qps / around
                ratios_of[model].append(ratio)
                print(
                    f"{model:<12}{r.qps:>9,.0f}{around:>9,.0f}{ratio:>8.2f}"
                    f"{r.latency_ms['p50']:>9.2f}{r.latency_ms['p99']:>9.2f}   "
                    f"{'ok' if ratio >= 0.7 else 'BELOW'}"
                    + (f"  errors {r.errors}" if r.errors else ""),
                    flush=True,
                )
                before = after
        if args.model_rounds > 1:
            # One 5-8 s run moves by about 0.1 on this shared machine; the median
            # of the rounds is the figure to compare with the target.
            print(f"\n{'model':<12}{'median':>8}{'range':>14}   target >= 0.70")
            for model, got in ratios_of.items():
                med = statistics.median(got)
                print(
                    f"{model:<12}{med:>8.2f}{min(got):>8.2f}-{max(got):.2f}   "
                    f"{'ok' if med >= 0.7 else 'BELOW'}"
                )
        if args.models_only:
            return
        # Every later step is set from this figure: the median of three runs, so
        # that one run slowed by the machine's neighbours does not set them.
        runs = sorted(
            (run(Load(rpc="traffic", concurrency=8, **base)) for _ in range(3)),
            key=lambda r: r.qps,
        )
        mix = runs[1]
        print(
            f"\ntraffic mix, closed-loop maximum: {mix.qps:,.0f} q/s, median of 3 "
            f"({runs[0].qps:,.0f}-{runs[2].qps:,.0f}; errors {mix.errors or '-'})"
        )
        half = mix.qps / 2
        # A p99 of a few thousand calls moves from run to run on a shared machine:
        # alone and mixed alternate, and the median round is the figure.
        ratios = []
        for i in range(args.rounds):
            alone = run(Load(rpc="recommend", rate=half * 0.64, **base))
            mixed = run(Load(rpc="traffic", rate=half, **base))
            p_alone = alone.latency_ms["p99"]
            recommend = mixed.by_rpc.get("recommend", {}).get("latency_ms", {})
            p_mixed = recommend.get("p99", float("nan"))
            ratios.append(p_mixed / p_alone)
            print(
                f"open loop at half the maximum, round {i + 1}: Recommend p99 alone "
                f"{p_alone:.2f} ms (at {half * 0.64:,.0f} q/s), in the mix {p_mixed:.2f} ms: "
                f"{ratios[-1]:.2f}x",
                flush=True,
            )
        print(
            f"  median of {len(ratios)} rounds {statistics.median(ratios):.2f}x "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}x; target <= 2x); the last round's calls:"
        )
        for kind, k in mixed.by_rpc.items():
            p50, p99 = k["latency_ms"]["p50"], k["latency_ms"]["p99"]
            print(f"  {kind:<10}{k['requests']:>7} calls  p50 {p50:.2f}  p99 {p99:.2f} ms")
        # At twice the maximum one 5 s run lands anywhere between collapse and
        # full goodput on this shared machine: --overload-rounds repeats it. The
        # machine's speed also drifts between the maximum and the round (a
        # maximum measured in a slow minute makes "twice" a milder overload):
        # each round is followed by the maximum again, and goodput is against
        # the mean of the two maxima around it, as each model's ratio is.
        goodputs = []
        for i in range(args.overload_rounds):
            over = run(
                Load(rpc="traffic", rate=2 * mix.qps, deadline=1.0, **{**base, "duration": 5.0})
            )
            time.sleep(SHED_SETTLE_S)  # the server's shedding state lapses first
            after = run(Load(rpc="traffic", concurrency=8, **base))
            around = (mix.qps + after.qps) / 2
            goodputs.append(over.qps / around)
            codes = {"OK": over.requests - sum(over.errors.values()), **over.errors}
            label = f", round {i + 1}" if args.overload_rounds > 1 else ""
            refusal, errors = over.refusal_ms, over.errors
            print(
                f"\ntwice the maximum ({2 * mix.qps:,.0f} q/s), 1 s deadlines, 5 s{label}: "
                f"{codes}\n  maximum right after: {after.qps:,.0f} q/s, so the offered rate was "
                f"{2 * mix.qps / around:.2f}x the mean maximum around it"
                f"\n  goodput {over.qps:,.0f} OK/s = {goodputs[-1]:.2f} of that mean "
                f"({over.qps / mix.qps:.2f} of the maximum before) "
                f"(target >= 0.8); refusals p50 {refusal['p50']:.1f} ms, p99 "
                f"{refusal['p99']:.1f} ms (target <= 10 ms); DEADLINE_EXCEEDED "
                f"{errors.get('DEADLINE_EXCEEDED', 0)}, CANCELLED {errors.get('CANCELLED', 0)}"
                " (target 0)",
                flush=True,
            )
            for kind, k in over.by_rpc.items():
                print(f"  {kind:<10} OK {k['ok']:>5}  refused or failed {k['errors'] or '-'}")
        if args.overload_rounds > 1:
            print(
                f"  median goodput of {len(goodputs)} rounds {statistics.median(goodputs):.2f} "
                f"(range {min(goodputs):.2f}-{max(goodputs):.2f}; target >= 0.8)"
            )
    finally:
        proc.terminate()
        proc.wait(30)
    refusal_bound(work / "recserve.toml", base, mix.qps)


def refusal_bound(config: Path, base: dict, mix_max: float) -> None:
    """6. What a refusal costs, closed loop, against a server that refuses every
    Recommend at admission (a token required, none sent: the first admission
    check, answered with a google.rpc.Status like an OVERLOADED refusal; an
    idle stream no longer holds a slot to refuse against). With a refusal
    costing r of an average mix call (r = mix maximum / refusals per s), no
    admission policy that serves the mix as it comes gets more than
    (1 - 2r) / (1 - r) of the maximum as goodput at twice the maximum: the
    refusals alone use 2r of the machine. Shedding RecommendBatch first (a
    dozen Recommends' work, counted as one call) changes what is served, so
    OK/s may pass this bound."""
    env = {"RECSERVE_ADMIN_TOKEN": "bench-refusals", "RECSERVE_TOKEN_FOR_ALL": "true"}
    proc, target = serve(config, env)
    try:
        r = run(Load(rpc="recommend", concurrency=8, **{**base, "target": target}))
    finally:
        proc.terminate()
        proc.wait(30)
    if not r.errors:
        raise SystemExit("refusal cost: the server answered calls it should refuse")
    refused = sum(r.errors.values()) / r.seconds
    ratio = mix_max / refused
    bound = max(0.0, (1 - 2 * ratio) / (1 - ratio))
    print(
        f"\nrefusal cost: {refused:,.0f} refusals/s closed loop (p50 {r.refusal_ms['p50']:.1f} ms)"
        f" against the mix's {mix_max:,.0f} calls/s: a refusal costs {ratio:.2f} of a mix call,"
        f" so goodput at 2x can be at most {bound:.2f} of the maximum on this machine"
        " if the calls served are the mix's own (shedding batches first serves cheaper ones)"
    )


if __name__ == "__main__":
    main()
