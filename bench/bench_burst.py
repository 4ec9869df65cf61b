"""A burst past what the loop can compute: how many calls the asyncio server
computes before accept-queue shedding refuses the rest, under each rule for
trusting the loop's quiet moments, alternating in one run.

    python bench/bench_burst.py                    # 2 busy processes, 4 rounds
    python bench/bench_burst.py --busy 0 --hogs 3  # the server starved on one CPU

Each round starts a fresh server (ALS on synthetic data) whose first Recommend
call holds the loop for `--settle` s while `--calls` more (deadline
`--deadline` s, sent at once by another process) queue in gRPC; each call then
computes `--spin-ms` holding the GIL, so the burst is twice its deadline's
worth of work. A call that waited past its allowance must be refused, not
computed: fewer computed calls and no DEADLINE_EXCEEDED is better. Rules:

- `current`: the server as shipped;
- `never`: no quiet moment trusted (a call's wait is judged by its deadline);
- `any-empty`: any select that found nothing counts, as before the fix of
  docs/performance.md, "Quiet moments that were not quiet";
- `unjudged`: as shipped, except that a late call does not judge the loop's
  probe window while the loop is still in one turn (docs/performance.md,
  "Calls handed over in one loop turn").

`--busy`: processes spinning on any CPU during the burst (the machine's other
work). `--hogs`: processes spinning on one CPU that the server's threads are
pinned to once the first call is held.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RULES = ("current", "never", "any-empty", "unjudged")

# Busy work for `seconds` (argv[1]), on one CPU (argv[2]) when given.
SPIN = """
import os, sys, time
if len(sys.argv) > 2:
    os.sched_setaffinity(0, {int(sys.argv[2])})
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


def send(target: str, n: int, timeout: float, user: str) -> dict[str, int]:
    """n Recommend calls (als, k=3) sent at once; their status codes."""
    import grpc

    from recserve.v1 import recommender_pb2 as pb
    from recserve.v1 import recommender_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        rec = pb_grpc.RecommenderStub(channel)
        req = pb.RecommendRequest(user_id=user, k=3, model="als")
        futures = [rec.Recommend.future(req, timeout=timeout) for _ in range(n)]
        codes: collections.Counter = collections.Counter()
        for f in futures:
            try:
                f.result()
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
    return dict(codes)


def serve_held(rule: str, spin_s: float, settle: float, marks: str, argv: list[str]) -> int:
    """Run `recserve serve` (child process) with the rule's quiet-moment settings
    and ALS's recommend_user held and slowed; each call appends a byte to `marks`.
    Once `marks`.go names a target and a burst, this process sends it itself
    and writes the codes to `marks`.codes (--client server)."""
    import recserve.service.grpc_aio as aio
    from recserve.cli import main
    from recserve.models.factorization import ALS

    if rule == "never":
        aio.QUIET_TRUST_WAIT = -1.0
    elif rule == "any-empty":
        aio.QUIET_SPAN = 0.0
        aio.QUIET_TRUST_PRESSURE = float("inf")
    elif rule == "unjudged":
        aio.AioTransport._judge_open_window = lambda self: None
    original = ALS.recommend_user
    held = []

    def slow(self, *a, **kw):
        with open(marks, "ab") as fh:
            fh.write(b".")
        if not held:  # the first call holds the loop while the rest queue in gRPC
            held.append(1)
            time.sleep(settle)
        end = time.perf_counter() + spin_s
        while time.perf_counter() < end:
            pass
        return original(self, *a, **kw)

    ALS.recommend_user = slow

    def client() -> None:
        go = Path(marks + ".go")
        while not go.exists():
            time.sleep(0.01)
        codes = send(*json.loads(go.read_text()))
        Path(marks + ".tmp").write_text(json.dumps(codes))
        os.replace(marks + ".tmp", marks + ".codes")

    threading.Thread(target=client, daemon=True).start()
    return main(argv)


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of process `pid` to `cpu`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread may have ended
            os.sched_setaffinity(int(tid), {cpu})


def burst(rule: str, models: Path, user: str, args: argparse.Namespace) -> tuple[dict, int]:
    """One round: the client's status codes and how many calls reached the model."""
    with tempfile.TemporaryDirectory() as tmp:
        marks = Path(tmp) / "marks"
        marks.touch()
        server = subprocess.Popen(
            [
                *(sys.executable, __file__, "--serve", rule, str(args.spin_ms / 1e3)),
                *(str(args.settle), str(marks), "serve", "--models", str(models)),
                *("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"),
                *("--feedback", "memory:", "--state-dir", tmp),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RECSERVE_SERVER": "asyncio", "RECSERVE_QUEUE_BUDGET_MS": "100"},
        )
        procs: list[subprocess.Popen] = [server]
        try:
            assert server.stderr is not None
            for line in server.stderr:
                m = re.search(r"listening on \S+:(\d+)", line)
                if m:
                    break
            else:
                raise SystemExit(f"the server did not start (rule {rule})")
            target = f"127.0.0.1:{m.group(1)}"
            wait_ready(target)
            seconds = str(args.deadline + args.settle + 30)
            procs += [
                subprocess.Popen([sys.executable, "-c", SPIN, seconds]) for _ in range(args.busy)
            ]
            spec = [target, args.calls, args.deadline, user]
            if args.client == "apart":
                client = subprocess.Popen(
                    [sys.executable, __file__, "--client", json.dumps(spec)],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    text=True,
                )  # started before any pinning: it keeps every CPU
                procs.append(client)
            else:
                Path(f"{marks}.go").write_text(json.dumps(spec))
            end = time.monotonic() + 30
            while not marks.stat().st_size and time.monotonic() < end:
                time.sleep(0.005)
            if args.hogs:
                cpu = min(os.sched_getaffinity(server.pid))
                procs += [
                    subprocess.Popen([sys.executable, "-c", SPIN, seconds, str(cpu)])
                    for _ in range(args.hogs)
                ]
                pin(server.pid, cpu)
            if args.client == "apart":
                out, _ = client.communicate(timeout=args.deadline + args.settle + 60)
            else:
                codes = Path(f"{marks}.codes")
                end = time.monotonic() + args.deadline + args.settle + 60
                while not codes.exists() and time.monotonic() < end:
                    time.sleep(0.05)
                out = codes.read_text()
            return json.loads(out), marks.stat().st_size
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(30)


def wait_ready(target: str) -> None:
    """Wait until the server reports model/als SERVING."""
    from recserve.clients.health import check

    end = time.monotonic() + 60
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            if check(target, "model/als", 1) == "SERVING":
                return
        time.sleep(0.05)
    raise SystemExit("the server's ALS model did not become ready")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        print(json.dumps(send(*json.loads(sys.argv[2]))))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        rule, spin_s, settle, marks = sys.argv[2:6]
        sys.exit(serve_held(rule, float(spin_s), float(settle), marks, sys.argv[6:]))
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds per rule (alternating)")
    ap.add_argument("--rules", default="current,never,any-empty", help=f"from {', '.join(RULES)}")
    ap.add_argument("--calls", type=int, default=300, help="calls in the burst")
    ap.add_argument("--deadline", type=float, default=3.0, help="each call's deadline, s")
    ap.add_argument("--spin-ms", type=float, default=20.0, help="compute per call, ms")
    ap.add_argument("--settle", type=float, default=0.3, help="how long the first call holds, s")
    ap.add_argument("--busy", type=int, default=2, help="busy processes on any CPU")
    ap.add_argument("--hogs", type=int, default=0, help="busy processes on the server's CPU")
    ap.add_argument(
        "--client",
        choices=("apart", "server"),
        default="apart",
        help="send the burst from its own process or from the server's (as the tests do)",
    )
    args = ap.parse_args()
    rules = args.rules.split(",")
    if unknown := set(rules) - set(RULES):
        ap.error(f"--rules: unknown {', '.join(sorted(unknown))}; choose from {', '.join(RULES)}")
    if args.hogs and not hasattr(os, "sched_setaffinity"):
        ap.error("--hogs needs CPU affinity (Linux)")
    if not os.path.exists("/proc/pressure/cpu"):
        print("note: no /proc/pressure/cpu here: `current` trusts no quiet moment", flush=True)

    from recserve.data import generate, to_dataset
    from recserve.models import create

    ds = to_dataset(generate(1000, 2000, 50_000, seed=0))
    user = ds.users.ids([0])[0]
    with tempfile.TemporaryDirectory() as tmp:
        create("als", factors=32, iterations=5).fit(ds).save(Path(tmp), "als")
        print(
            f"{args.calls} calls, {args.deadline:g} s deadlines, {args.spin_ms:g} ms each, "
            f"{args.busy} busy, {args.hogs} hogs on the server's CPU, client {args.client}",
            flush=True,
        )
        print(f"{'round':>5}  {'rule':<10}{'computed':>9}  codes", flush=True)
        computed: dict[str, list[int]] = collections.defaultdict(list)
        expired: dict[str, list[int]] = collections.defaultdict(list)
        for r in range(args.rounds):
            for rule in rules:
                codes, n = burst(rule, Path(tmp), user, args)
                computed[rule].append(n)
                expired[rule].append(codes.get("DEADLINE_EXCEEDED", 0))
                print(f"{r + 1:>5}  {rule:<10}{n:>9}  {codes}", flush=True)
        print()
        for rule in rules:
            c, e = computed[rule], expired[rule]
            print(f"{rule:<10} computed: median {statistics.median(c):g}, max {max(c)}; {c}")
            print(f"{'':<10} expired:  median {statistics.median(e):g}, max {max(e)}; {e}")


if __name__ == "__main__":
    main()
