"""The `recserve` command line (also `python -m recserve`).

    recserve data synth --users N --items M --interactions K --seed S --out DIR
    recserve data info --data PATH [--format F]
    recserve train --data PATH --algo NAME [--param key=value ...] --name NAME --models DIR
    recserve evaluate --data PATH --algo NAME --protocol random|temporal|users --k 10,20,50
    recserve models list|verify --models DIR
    recserve recommend --models DIR --name NAME (--user ID | --history ID,ID,...) [--k 10]
    recserve quickstart [--workdir var]   the embedded default: synthetic data + models
    recserve import spark-als --user-factors P --item-factors P --name NAME --models DIR
    recserve bench --target HOST:PORT [--concurrency 8 | --rate QPS] [--ceiling] [--json]
    recserve serve [--config FILE] [--models DIR] [--port 50051] [--metrics-port 9090] [--workers N]
                   [--feedback sqlite:///PATH|memory:] [--state-dir var]
                   [--feedback sqlite:///PATH|memory:] [--state-dir var]

Progress and logs go to stderr; results (JSON summaries, tables) to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from recserve import __version__
from recserve.config import LEARNED_HYBRIDS
from recserve.data import FORMATS, DataError, generate, write_csv
from recserve.evaluation import (
    PROTOCOLS,
    evaluate,
    make_split,
    popularity_baseline,
    popularity_gap,
)
from recserve.models import algorithms, bundle, create, load, parse_params
from recserve.models.base import (
    TrainingError,
    blend_popularity,
    fill_unreached,
    liked_counts,
    popular_order,
    prior_weight,
)

log = logging.getLogger("recserve")


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not ks or ks[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected positive cut-offs, got {text!r}")
    return ks


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= least (a clear usage error, not a traceback
    or an error naming a library parameter further down)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that never takes an abbreviated flag: `--feedback` must not
    quietly become `--feedback-db`. Sub-command parsers inherit the class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="recserve", description="Train and serve recommenders.")
    ap.add_argument("--version", action="version", version=f"recserve {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    synth = data.add_parser("synth", help="write a deterministic synthetic dataset (generic CSV)")
    synth.add_argument("--users", type=int, default=5_000)
    synth.add_argument("--items", type=int, default=2_000)
    synth.add_argument("--interactions", type=int, default=200_000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output folder")
    info = data.add_parser("info", help="read a dataset and print its sizes")
    _data_args(info)

    train = sub.add_parser("train", help="fit a model and publish it as a bundle")
    _data_args(train)
    _algo_args(train)
    train.add_argument("--name", required=True, help="model name in the models folder")
    train.add_argument("--models", required=True, help="models folder")
    train.add_argument(
        "--no-evaluate",
        dest="evaluate",
        action="store_false",
        help="skip the offline evaluation stored in the manifest",
    )
    train.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="random",
        help="protocol of the stored offline evaluation",
    )
    train.add_argument("--k", type=_ks, default=[10, 20], help="cut-offs, e.g. 10,20")

    ev = sub.add_parser("evaluate", help="offline evaluation of an algorithm on a dataset")
    _data_args(ev)
    _algo_args(ev, required=False)
    ev.add_argument(
        "--compare",
        default=None,
        metavar="ALGO[:KEY=VALUE...],...",
        help="several algorithms, or one with other parameters, on one split and in one table, "
        "e.g. als,als:factors=128:alpha=4,itemknn (instead of --algo)",
    )
    ev.add_argument("--k", type=_ks, default=[10, 20, 50], help="cut-offs, e.g. 10,20,50")
    _split_args(ev)
    ev.add_argument(
        "--test",
        default=None,
        metavar="FILE",
        help="held-out events from a file (e.g. MovieLens' u1.test with --data u1.base), "
        "read like --data, instead of a --protocol split of --data",
    )
    ev.add_argument("--out", default=None, help="also write the full results as JSON to this file")

    tn = sub.add_parser(
        "tune",
        help="search hyper-parameters (Optuna TPE) and publish the best model, "
        "or fit a hybrid's blend weights",
    )
    _data_args(tn)
    what = tn.add_mutually_exclusive_group(required=True)
    what.add_argument("--algo", help="algorithm(s) to search, comma-separated: the best wins")
    what.add_argument(
        "--hybrid",
        metavar="MODEL,MODEL,...",
        help="fit blend weights of these published models (or algorithms) instead, and how "
        "much popularity new and known users' answers take (one model: that alone)",
    )
    tn.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="fix a parameter"
    )
    tn.add_argument(
        "--keep-components",
        action="store_true",
        help="--hybrid: keep every component, even one the validation shows the blend does "
        "as well without (by default left out: each costs a dense row per served call)",
    )
    tn.add_argument("--trials", type=int, default=30, help="trials per algorithm (default 30)")
    tn.add_argument("--minutes", type=float, default=None, help="stop searching after this long")
    tn.add_argument(
        "--metric", default="ndcg@20", help="recall@K, ndcg@K, map@K, mrr, rmse, ... (ndcg@20)"
    )
    _split_args(tn)
    tn.add_argument(
        "--test",
        default=None,
        metavar="FILE",
        help="held-out events from a file (as evaluate --test): the tuned model's test "
        "score is measured on them; the search validates on a split of --data",
    )
    tn.add_argument("--name", required=True, help="model (or hybrid) name in the models folder")
    tn.add_argument("--models", required=True, help="models folder")
    tn.add_argument("--threads", type=_count(0), default=0, help="kernel threads (0 = all cores)")

    models = sub.add_parser("models", help="model bundles").add_subparsers(
        dest="action", required=True
    )
    for action, text in (
        ("list", "list models and versions"),
        ("verify", "check every file of every current bundle"),
        ("prune", "delete old versions: all but the current one and the --keep newest"),
        ("rollback", "point current at an older version (verified first); then reload"),
    ):
        p = models.add_parser(action, help=text)
        p.add_argument("--models", required=True, help="models folder")
        p.add_argument(
            "--name", default=None, required=action == "rollback", help="only this model"
        )
        if action == "prune":
            p.add_argument(
                "--keep",
                type=int,
                default=2,
                help="versions kept beside the current one, newest first (default 2)",
            )
            p.add_argument("--dry-run", action="store_true", help="say what would go")
        if action == "rollback":
            p.add_argument(
                "--version", default=None, help="default: the newest older than the current"
            )

    rec = sub.add_parser(
        "recommend",
        help="top-k from a bundle, without a server",
        description="One model's top-k for a user, ranked as the server ranks it; a user "
        "the model cannot rank (no events, or nothing in common with any item left) is "
        "refused with the reason, where the server would answer from its fallbacks.",
    )
    rec.add_argument("--models", required=True)
    rec.add_argument("--name", required=True)
    who = rec.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user id known to the model")
    who.add_argument(
        "--history",
        help='comma-separated item ids, or a JSON array of them (["a,b", "c"]) for ids that '
        "hold commas (fold-in of a new user)",
    )
    rec.add_argument(
        "--values",
        help="with --history: comma-separated values, one per item (an empty entry: "
        "that item without a value, as the server takes it)",
    )
    rec.add_argument("--k", type=int, default=10)
    qs = sub.add_parser("quickstart", help="make the embedded default dataset and models")
    qs.add_argument("--workdir", default="var", help="holds data/default and models/")

    sv = sub.add_parser(
        "serve",
        help="serve the models over gRPC",
        description="Serve every model under --models over gRPC. Settings come from --config "
        "(TOML), then RECSERVE_* environment variables, then these flags.",
    )
    sv.add_argument("--config", default=None, help="TOML config file (see server/config.py)")
    sv.add_argument("--models", default=None, help="models folder (default var/models)")
    sv.add_argument("--host", default=None, help="address to bind (default [::])")
    sv.add_argument("--port", type=int, default=None, help="gRPC port (default 50051; 0 = any)")
    sv.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus port (default 9090; 0 = off)"
    )
    sv.add_argument("--default-model", default=None, help="model for requests naming none")
    sv.add_argument(
        "--feedback",
        default=None,
        metavar="URL",
        help="where feedback is stored: sqlite:///PATH, redis://HOST:PORT/DB (shared by "
        "replicas) or memory: "
        "(default: a SQLite file in --state-dir)",
    )
    sv.add_argument(
        "--state-dir", default=None, help="writable state folder (default var/; never the models)"
    )
    sv.add_argument("--feedback-db", default=None, help="the older --feedback sqlite:///PATH")
    sv.add_argument(
        "--workers", type=int, default=None, help="processes sharing the port (default 1)"
    )

    imp = sub.add_parser("import", help="bundles from factors trained elsewhere").add_subparsers(
        dest="source", required=True
    )
    spark = imp.add_parser(
        "spark-als",
        help="a saved Spark MLlib ALSModel -> an als bundle",
        description="Turn a folder written by Spark's ALSModel.write().save(path) (or its "
        "userFactors / itemFactors Parquet) into an als bundle (see server/importers.py).",
    )
    spark.add_argument("model", nargs="?", default=None, help="the saved ALSModel folder")
    spark.add_argument("--user-factors", default=None, help="userFactors Parquet file or folder")
    spark.add_argument("--item-factors", default=None, help="itemFactors Parquet file or folder")
    spark.add_argument("--name", required=True, help="model name to publish as")
    spark.add_argument("--models", required=True, help="models folder")
    spark.add_argument("--data", default=None, help="dataset whose interactions count as seen")
    spark.add_argument(
        "--regularization",
        type=float,
        default=0.1,
        help="Spark's regParam (default: Spark's 0.1): the fold-in's L2 penalty, times the "
        "user's positive events as Spark's ALS-WR has it, so a folded-in user is Spark's",
    )
    spark.add_argument(
        "--alpha", type=float, default=None, help="fold-in confidence alpha (default: the model's)"
    )
    spark.add_argument("--index", default="auto", help="retrieval: auto, exact, flat, hnsw, ivf")

    # The bench client's own parser reads these arguments: importing it (and gRPC)
    # here would put gRPC in the process `serve --workers` forks from.
    bench = sub.add_parser(
        "bench",
        help="load-test a running server (recserve bench --help)",
        add_help=False,
        prefix_chars="\0",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return ap


def _split_args(p: argparse.ArgumentParser) -> None:
    """The split and relevance flags evaluate and tune share (tune validates on a
    split of evaluate's training part, so the two never overlap)."""
    # None until resolved (_resolve_split): a flag the user gave is told apart
    # from a default, so one that a given split would ignore is refused.
    p.add_argument("--protocol", choices=PROTOCOLS, default=None, help="default: random")
    p.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="held-out fraction (random: of each user's events; users: of users); default 0.2",
    )
    p.add_argument(
        "--leave-last",
        type=_count(1),
        default=None,
        help="temporal: events held out per user; default 1",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="held-out events count as relevant only if value >= this",
    )


SPLIT_DEFAULTS = {"protocol": "random", "fraction": 0.2, "leave_last": 1}


def _resolve_split(args: argparse.Namespace) -> None:
    """Fill in the split flags' defaults. With `--test FILE` the split is given, so
    --protocol, --fraction or --leave-last would be silently ignored: refused."""
    given = [f"--{k.replace('_', '-')}" for k in SPLIT_DEFAULTS if getattr(args, k) is not None]
    if getattr(args, "test", None) and given:
        raise ValueError(
            f"test: --test {args.test} is the held-out split, so {', '.join(given)} "
            "would be ignored; leave it out, or drop --test to split --data"
        )
    for key, default in SPLIT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder or ratings file")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: detect from path")
    p.add_argument(
        "--columns",
        default=None,
        metavar="ROLE=COLUMN,...",
        help="csv and parquet: which columns hold user, item, value, timestamp, e.g. "
        "user=uid,item=sku,value=qty,timestamp=ts (default: common names, any case)",
    )
    p.add_argument(
        "--duplicates",
        choices=("last", "sum"),
        default=None,
        help="a repeated (user, item) pair: keep the latest event, or add the values up "
        "(default: sum when there is no value column, each row one event; else last)",
    )


def _algo_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--algo", required=required, help=f"one of: {', '.join(algorithms())}")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyper-parameter (repeatable)",
    )
    p.add_argument("--threads", type=_count(0), default=0, help="kernel threads (0 = all cores)")


def _model(args: argparse.Namespace) -> Any:
    model = create(args.algo, **parse_params(args.param))
    model.n_threads = args.threads
    return model


def load_dataset(
    path: str, fmt: str | None = None, columns: str | None = None, duplicates: str | None = None
) -> Any:
    """recserve.data.load_dataset, imported when a command reads data (pyarrow is heavy)."""
    from recserve.data import load_dataset as load

    return load(path, fmt, duplicates=duplicates, columns=columns)


def cmd_data(args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "synth":
        t = time.perf_counter()
        log.info(
            "generating %s events for %s users x %s items (seed %s)",
            f"{args.interactions:,}",
            f"{args.users:,}",
            f"{args.items:,}",
            args.seed,
        )
        writable_dir("out", args.out)
        s = generate(args.users, args.items, args.interactions, seed=args.seed)
        out = write_csv(s, args.out)
        return {
            "out": str(out),
            "users": args.users,
            "items": args.items,
            "interactions": args.interactions,
            "seconds": round(time.perf_counter() - t, 2),
        }
    t = time.perf_counter()
    ds = load_dataset(args.data, args.format, args.columns, args.duplicates)
    return {
        **ds.summary(),
        "values": value_summary(ds),
        "seconds": round(time.perf_counter() - t, 2),
    }


def value_summary(ds: Any) -> dict[str, Any]:
    """What the models will make of the values: their range and quantiles,
    dislikes (< 0) and zeros, and whether `values=auto` weighs them on the log
    scale (heavy-tailed: counts) or as they are (ratings)."""
    from recserve.models.base import HEAVY_TAIL_RATIO, value_tail

    v = np.asarray(ds.interactions.data, np.float64)
    if v.size == 0:
        return {}
    found = value_tail(v)
    tail = None if found is None else found[1]
    return {
        "min": float(v.min()),
        "median": float(np.median(v)),
        "p99": float(np.quantile(v, 0.99)),
        "max": float(v.max()),
        "dislikes": int((v < 0).sum()),
        "zeros": int((v == 0).sum()),
        "tail_ratio": None if tail is None else round(tail, 2),
        "scale": "log" if tail is not None and tail > HEAVY_TAIL_RATIO else "linear",
        "log_scale_above_tail_ratio": HEAVY_TAIL_RATIO,
    }


def writable_dir(setting: str, folder: str | Path) -> None:
    """The folder a command writes into (`setting` names its flag) exists (made
    if missing) and this process may write there: checked before the work,
    which may take hours (a fit, a search), not at its end, where the error
    was a bare "[Errno 2] No such file or directory" naming no setting."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OSError(f"{setting}: {folder} is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{setting}: cannot create {folder} ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(f"{setting}: {folder} is not writable by this user")


def writable_file(setting: str, file: str | None) -> None:
    """writable_dir for a result file's folder, and the file no folder itself."""
    if file:
        if Path(file).is_dir():
            raise OSError(f"{setting}: {file} is a folder; give a file name")
        writable_dir(setting, Path(file).parent)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    bundle.check_name(args.name)
    t0 = time.perf_counter()
    model = _model(args)  # fail on bad params before reading data
    writable_dir("models", args.models)
    stages = ["read data", *(["evaluate"] if args.evaluate else []), "fit", "publish"]
    with tqdm(total=len(stages), desc="train", unit="stage", file=sys.stderr, disable=None) as bar:
        bar.set_postfix_str(stages[0])
        ds = load_dataset(args.data, args.format, args.columns, args.duplicates)
        log.info("data: %s", ds.summary())
        bar.update()
        metrics: dict[str, float] = {}
        baseline: dict[str, Any] | None = None
        offline: dict[str, Any] | None = None
        if args.evaluate:
            bar.set_postfix_str("evaluate")
            try:
                split = make_split(ds, args.protocol)
                result = evaluate(_model(args), ds, args.protocol, args.k, split=split)
                floor = (
                    None if args.algo == "popularity" else popularity_baseline(ds, split, args.k)
                )
            except TrainingError:  # the full fit would fail the same way
                raise
            except ValueError as exc:  # e.g. too few events to hold any out
                raise ValueError(
                    f"offline {args.protocol} evaluation: {exc} "
                    "(--no-evaluate fits and publishes without it)"
                ) from None
            metrics = {k: round(v, 6) for k, v in result["metrics"].items()}
            log.info(
                "offline %s: %s",
                args.protocol,
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "@" in k),
            )
            headline = f"ndcg@{min(args.k)}"
            offline = {"protocol": args.protocol, "metric": headline, "value": metrics[headline]}
            if floor is not None:
                baseline = {
                    "algorithm": "popularity",
                    "metrics": {k: round(v, 6) for k, v in floor.items()},
                }
                offline["popularity"] = baseline["metrics"][headline]
                gap = popularity_gap(
                    args.name, args.algo, headline, metrics[headline], offline["popularity"]
                )
                if gap is not None:
                    log.log(*gap)
            bar.update()
        bar.set_postfix_str("fit")
        t_fit = time.perf_counter()
        model.fit(ds)
        fit_s = time.perf_counter() - t_fit
        bar.update()
        bar.set_postfix_str("publish")
        path = model.save(args.models, args.name, metrics=metrics, dataset=ds, baseline=baseline)
        bar.update()
    doc = bundle.read_manifest(path)
    out = {
        "name": args.name,
        "version": doc["version"],
        "algorithm": args.algo,
        "path": str(path),
        "seconds": round(time.perf_counter() - t0, 3),
        "fit_seconds": round(fit_s, 3),
        "bytes": bundle.bundle_bytes(doc),
    }
    if offline is not None:
        out["offline"] = offline
    return out


def compare_entries(text: str, threads: int) -> list[tuple[str, Any]]:
    """`als,als:factors=128:alpha=4,itemknn` as (label, model) pairs; ValueError naming
    the bad entry or parameter."""
    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        algo, *params = entry.split(":")
        try:
            model = create(algo, **parse_params(params))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"compare: {entry!r}: {exc}") from None
        model.n_threads = threads
        out.append((entry, model))
    labels = [label for label, _ in out]
    if len(out) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"compare: give two or more different entries, got {text!r}")
    return out


def _split_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The split and relevance flags evaluate and --compare share."""
    return {
        "fraction": args.fraction,
        "seed": args.seed,
        "leave_last": args.leave_last,
        "threshold": args.threshold,
    }


def _write_json(path: str | None, payload: Any) -> None:
    """Write a result file where the user said (--out); nothing without it."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    from recserve.evaluation import compare

    if args.algo or args.param:
        raise ValueError("compare: give --compare or --algo/--param, not both")
    entries = compare_entries(args.compare, args.threads)
    ds = load_dataset(args.data, args.format, args.columns, args.duplicates)
    split = _given_split(args, ds)
    protocol = "given" if split is not None else args.protocol
    results = compare(entries, ds, protocol, args.k, **_split_settings(args), split=split)
    for r in results.values():
        r["test"] = args.test
    _write_json(args.out, results)
    fitted = [r for r in results.values() if "error" not in r]
    failed = [label for label, r in results.items() if "error" in r]
    if not fitted:
        raise ValueError("compare: no entry could be fitted (each error is logged above)")
    width = max(len(label) for label in results) + 2
    cols = [f"{m}@{k}" for k in args.k for m in ("recall", "ndcg")]
    users = int(fitted[0]["metrics"]["users"])
    print(f"{ds.name}, {_protocol(args)}, one split for all ({users} users)")
    print(f"{'model':<{width}}" + "".join(f"{c:>11}" for c in cols) + f"{'fit s':>9}")
    for label, r in results.items():
        if "error" in r:
            print(f"{label:<{width}}  not fitted: {r['error']}")
            continue
        m = r["metrics"]
        print(
            f"{label:<{width}}"
            + "".join(f"{m[c]:>11.4f}" for c in cols)
            + f"{r['fit_seconds']:>9.2f}"
        )
    if failed:  # the table is printed, but a script must not take it as complete
        sys.stdout.flush()
        raise SystemExit(1)
    return {"out": args.out} if args.out else None


def _given_split(args: argparse.Namespace, ds: Any) -> Any:
    """The split of `--test FILE` (read like --data), or None for a protocol split."""
    if not args.test:
        return None
    from recserve.evaluation import given_split

    split, n = given_split(ds, load_dataset(args.test, args.format, args.columns, args.duplicates))
    dropped = n["events"] - n["kept"]
    log.info(
        "test: %d of %d events held out%s",
        n["kept"],
        n["events"],
        f" ({n['unknown_users']} of users and {n['unknown_items']} of items not in --data "
        "dropped: they cannot be recommended)"
        if dropped
        else "",
    )
    return split


def _protocol(args: argparse.Namespace) -> str:
    return f"held out: {args.test}" if args.test else f"{args.protocol} protocol"


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    _resolve_split(args)
    writable_file("out", args.out)
    if args.compare:
        return cmd_compare(args)
    if not args.algo:
        raise ValueError("algo: give --algo (or --compare A,B,...)")
    ds = load_dataset(args.data, args.format, args.columns, args.duplicates)
    split = _given_split(args, ds)
    protocol = "given" if split is not None else args.protocol
    result = evaluate(_model(args), ds, protocol, args.k, **_split_settings(args), split=split)
    result["test"] = args.test
    _write_json(args.out, result)
    m = result["metrics"]
    names = ["recall", "ndcg", "precision", "map", "hit_rate", "coverage"]
    print(
        f"{args.algo} on {ds.name}, {_protocol(args)}, {int(m['users'])} users "
        f"(fit {result['fit_seconds']:.2f}s, recommend {result['recommend_seconds']:.2f}s)"
    )
    print(f"{'K':>5}" + "".join(f"{n:>11}" for n in names))
    for k in args.k:
        print(f"{k:>5}" + "".join(f"{m[f'{n}@{k}']:>11.4f}" for n in names))
    extra = {k: v for k, v in m.items() if k in ("mrr", "rmse", "mae", "interval90")}
    print("  ".join(f"{k}={v:.4f}" for k, v in extra.items()))
    return {"out": args.out} if args.out else None


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    from recserve import tuning

    _resolve_split(args)
    bundle.check_name(args.name)
    writable_dir("models", args.models)
    ds = load_dataset(args.data, args.format, args.columns, args.duplicates)
    common = {
        "name": args.name,
        "models_dir": args.models,
        "trials": args.trials,
        "metric": args.metric,
        "protocol": args.protocol,
        "fraction": args.fraction,
        "seed": args.seed,
        "leave_last": args.leave_last,
        "threads": args.threads,
    }
    if args.hybrid:
        if args.param or args.minutes is not None or args.threshold is not None or args.test:
            raise ValueError(
                "hybrid: --param, --minutes, --threshold and --test apply to --algo only"
            )
        parts = [c.strip() for c in args.hybrid.split(",") if c.strip()]
        return tuning.tune_hybrid(ds, parts, prune=not args.keep_components, **common)
    if args.keep_components:
        raise ValueError("keep-components: applies to --hybrid only")
    algos = [a.strip() for a in args.algo.split(",") if a.strip()]
    return tuning.tune(
        ds,
        algos,
        minutes=args.minutes,
        threshold=args.threshold,
        fixed=parse_params(args.param),
        split=_given_split(args, ds),
        **common,
    )


def cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    if not Path(args.models).is_dir():
        # A mistyped path must not list nothing and verify nothing successfully.
        raise FileNotFoundError(f"models: {args.models} is not a folder")
    entries = bundle.list_bundles(args.models)
    if args.name:
        entries = [e for e in entries if e["name"] == args.name]
        if not entries:
            raise bundle.BundleError(f"{args.models}: no model named {args.name!r}")
    if args.action == "list":
        return {"models": entries}
    if args.action == "rollback":
        out = bundle.rollback(args.models, args.name, args.version)
        log.info(
            "%s: current is now %s (was %s); reload the server to serve it",
            args.name,
            out["to"],
            out["from"],
        )
        return out
    if args.action == "prune":
        pruned = [
            bundle.prune(args.models, e["name"], args.keep, args.dry_run)
            for e in entries
            if e["current"]
        ]
        freed = sum(r["bytes"] for p in pruned for r in p["removed"])
        return {"models": pruned, "freed_bytes": freed, "dry_run": args.dry_run}
    failures = 0
    for e in entries:
        try:
            if not e.get("current"):
                raise bundle.BundleError(f"{e['name']}: no current version")
            bundle.verify(bundle.resolve(args.models, e["name"]), full=True)
            e["ok"] = True
        except bundle.BundleError as exc:
            e["ok"], e["error"] = False, str(exc)
            failures += 1
            log.error("%s", exc)
    if failures:
        raise SystemExit(_emit({"models": entries, "failed": failures}) or 1)
    return {"models": entries, "failed": 0}


def cmd_recommend(args: argparse.Namespace) -> dict[str, Any]:
    if args.values is not None and args.history is None:
        raise ValueError("values: give them with --history (a known user's are trained)")
    if not (Path(args.models) / bundle.check_name(args.name)).is_dir():
        published = [e["name"] for e in bundle.list_bundles(args.models) if e["current"]]
        raise ValueError(
            f"name: no model {args.name!r} published in {args.models} (published: "
            f"{', '.join(published) or 'none'}); hybrids and experiments are defined in "
            "recserve.toml and answered by `recserve serve`, not read from a bundle"
        )
    model = load(bundle.resolve(args.models, args.name))
    if args.user is not None:
        u = model.users.get(args.user)
        if u < 0:
            raise ValueError(
                f"user: {args.user!r} is not known to {args.name}; "
                "pass --history to fold in a new user"
            )
        if model.is_cold(u) and not model.serves_cold:
            raise ValueError(
                f"user: {args.user!r} has no training events in {args.name} (its ranking "
                "would be all zeros; the server answers it from its fallbacks); "
                "pass --history to fold it in"
            )
        _check_gate(model, args, "user", model.training_row(u)[1])
        items, scores = model.recommend([u], args.k)
        items, scores = items[0][items[0] >= 0], scores[0][: (items[0] >= 0).sum()]
        who: Any = u
        blended = _with_prior(model, u, items, scores, args.k)
        if blended is not None:  # as the server answers a known user under user_prior
            return _answer(model, args, *blended)
    else:
        from recserve.clients.__main__ import item_ids, item_values

        try:
            ids = item_ids(args.history)
        except ValueError as exc:
            raise ValueError(f"history: {exc}") from None
        given: list[float | None] = [None] * len(ids)
        if args.values is not None:
            try:
                given = item_values(args.values)
            except ValueError as exc:
                raise ValueError(f"values: {exc}") from None
            if len(given) != len(ids):
                raise ValueError(f"values: {len(given)} values for {len(ids)} history item ids")
            from recserve.data import MAX_VALUE

            far = [v for v in given if v is not None and abs(v) > MAX_VALUE]
            if far:
                raise ValueError(f"values: must be within +-{MAX_VALUE:g}, got {far[0]:g}")
        if not ids:  # `--history ""` or `,,`: every item would come back at score 0
            raise ValueError(
                f"history: no item ids in {args.history!r} (comma-separated ids, or a "
                "JSON array of them)"
            )
        idx = model.items.index(ids)
        unknown = [i for i, j in zip(ids, idx, strict=True) if j < 0]
        if unknown and len(unknown) == len(ids):
            # Nothing to fold in: the answer would be every item at score 0.
            raise ValueError(
                f"history: none of the item ids are known to {args.name} (e.g. {unknown[0]!r})"
            )
        if unknown:
            log.warning("history: ignoring unknown item ids %s", ", ".join(unknown[:10]))
        keep = idx >= 0
        known = idx[keep]
        # an id without a value as the server takes a history item sent without one
        values = np.array([np.nan if v is None else v for v in given], np.float32)[keep]
        values = model.unrated(known, values)
        who = model.history_matrix([known], [values])
        _check_gate(model, args, "history", who.data)
        items, scores = model.recommend_from_history(known, values, k=args.k)
        blended = _with_prior(model, who, items, scores, args.k)
        if blended is not None:  # as the server answers a new user under history_prior
            items, scores = blended
            return _answer(model, args, items, scores)
    if model.sparse_scores and scores.size and scores[-1] <= 0:
        items, scores = _as_served(model, args, items, scores, who)
    return _answer(model, args, items, scores)


def _answer(
    model: Any, args: argparse.Namespace, items: np.ndarray, scores: np.ndarray
) -> dict[str, Any]:
    return {
        "model": args.name,
        "version": model.manifest.get("version"),
        "items": [
            {"item_id": i, "score": float(s), "rank": r + 1}
            for r, (i, s) in enumerate(zip(model.items.ids(items), scores, strict=True))
        ],
    }


def _with_prior(
    model: Any, who: Any, items: np.ndarray, scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """An answer under the model's prior, blended with popularity as the
    router's _with_prior blends it: `who` a history row (`history_prior`) or
    a known user's index (`user_prior`); None without that prior, for an
    approximate index, or for a sparse model's row that reached nothing."""
    known = isinstance(who, int | np.integer)
    c = model.params.get("user_prior" if known else "history_prior", 0.0)
    if not c or model.serves_cold:
        return None
    if model.sparse_scores and not (scores > 0).any():
        return None
    rows = np.empty((2, model.n_items), np.float32)
    n = model.prior_row(rows[0], int(who)) if known else model.prior_row(rows[0], row=who)
    if n is None:
        return None
    counts = liked_counts(model.user_items)
    if not counts.any():
        return None  # no training counts: the router does not blend (Slot.popularity_known)
    return blend_popularity(rows, counts, prior_weight(c, n), k, model.sparse_scores)


def _check_gate(model: Any, args: argparse.Namespace, field: str, values: np.ndarray) -> None:
    """Refuse a user or history below the model's gate (`min_events`, or
    `min_history` for an inline history): the server answers it from its
    fallbacks, so this model's ranking is not what it gets."""
    known = field == "user"
    if model.too_little(np.asarray(values, np.float32), known):
        what = f"user {args.user!r}" if known else "history"
        gate = (
            f"min_events={model.params['min_events']}"
            if known
            else f"min_history={model.history_gate()}"
        )
        raise ValueError(
            f"{field}: the {what} has {model.evidence(np.asarray(values, np.float32))} "
            f"event(s), fewer than {args.name}'s {gate} "
            "(below it the model ranks worse than popularity); the server answers it "
            "from its fallbacks (popularity)"
        )


def _as_served(
    model: Any, args: argparse.Namespace, items: np.ndarray, scores: np.ndarray, who: Any
) -> tuple[np.ndarray, np.ndarray]:
    """A `sparse_scores` answer with items its evidence did not reach (score 0)
    as the server gives it: those are the most popular unreached items, not
    the first by index; a user reaching nothing is refused, as a user with no
    training events is (the server answers both from its fallbacks)."""
    row = np.empty(model.n_items, np.float32)
    if isinstance(who, (int, np.integer)):
        model.dense_user(who, row)
    else:
        model.dense_history(who, row)
    filled = fill_unreached(items, scores, row, popular_order(liked_counts(model.user_items)))
    if filled is None:
        field, what = (
            ("user", f"user {args.user!r}")
            if isinstance(who, (int, np.integer))
            else ("history", "history")
        )
        raise ValueError(
            f"{field}: the {what} shares no "
            f"evidence with any item left to rank in {args.name} (its ranking would be all "
            "zeros); the server answers it from its fallbacks (popularity)"
        )
    return filled


# The embedded default: a synthetic catalogue big enough to show real
# behaviour (long tail, collaborative signal) and small enough to train in seconds.
DEFAULT_DATA = {"users": 6_000, "items": 2_500, "interactions": 300_000, "seed": 42}
# ALS at the library's defaults (the tuning study's; the 64 factors set here
# before it ranked worse on this data and cost more per call); item-kNN with 100
# neighbours per item instead of 600: half the serving cost, 6% less of its recall
# (docs/algorithms.md, "The quickstart's models").
DEFAULT_MODELS = [
    ("popularity", "popularity", []),
    ("itemknn", "itemknn", ["k=100"]),
    ("content", "content", ["k=100"]),
    ("als", "als", []),
]
DEFAULT_HYBRID = ("als", "itemknn", "content")  # blended by the default model, "hybrid"


# The serving config quickstart writes next to the models: a hybrid as the default
# model (falling back to ALS, then popularity while models load) and an A/B
# experiment, so every feature of the service is live on the embedded default.
QUICKSTART_CONFIG = """\
# Written by `recserve quickstart`; edit freely (all settings: server/config.py).
[server]
models = "{models}"
default_model = "hybrid"
state_dir = "{state}"

[fallbacks]
hybrid = ["als", "itemknn"]

# The hybrid "hybrid" blends als, itemknn and content with weights learned on a
# validation split (`recserve tune --hybrid`, written to {models}/hybrids.json),
# less a component the validation shows it does as well without ("dropped" there).
# A [hybrids.hybrid] table here would replace them, e.g. als = 0.5, itemknn = 0.3.

[experiments.homepage]
arms = {{ hybrid = 0.5, als = 0.5 }}
"""


def cmd_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir)
    writable_dir("workdir", work)
    data, models = work / "data" / "default", work / "models"
    if not (data / "interactions.csv").is_file():
        cmd_data(argparse.Namespace(action="synth", out=str(data), **DEFAULT_DATA))
    else:
        log.info("default data already at %s", data)
    trained = []
    for name, algo, params in DEFAULT_MODELS:
        if (models / name / bundle.CURRENT).is_file():
            log.info("model %s already published in %s", name, models)
            continue
        ns = argparse.Namespace(
            data=str(data),
            format="csv",
            columns=None,
            duplicates=None,
            algo=algo,
            param=params,
            threads=0,
            name=name,
            models=str(models),
            evaluate=True,
            protocol="random",
            k=[10, 20],
        )
        trained.append(cmd_train(ns))
    hybrid = None
    if not (models / LEARNED_HYBRIDS).is_file():
        from recserve import tuning

        ds = load_dataset(str(data), "csv")
        hybrid = tuning.tune_hybrid(
            ds, list(DEFAULT_HYBRID), name="hybrid", models_dir=models, trials=30, seed=0
        )
        log.info(
            "hybrid weights learned: %s; history_prior %g (new users), user_prior %g",
            hybrid["weights"],
            hybrid["history_prior"],
            hybrid["user_prior"],
        )
    config = work / "recserve.toml"
    if not config.is_file():
        config.write_text(
            QUICKSTART_CONFIG.format(models=models, state=work),
            encoding="utf-8",
        )
    log.info("serve them: recserve serve --config %s", config)
    return {
        "data": str(data),
        "models": str(models),
        "config": str(config),
        "trained": trained,
        "hybrid": hybrid,
        "available": [e["name"] for e in bundle.list_bundles(models)],
    }


def cmd_serve(args: argparse.Namespace) -> None:
    from recserve.config import load_config
    from recserve.feedback import open_store  # light: no gRPC or metrics before a fork
    from recserve.launch import serve

    cfg = load_config(
        args.config,
        overrides={
            "models": args.models,
            "host": args.host,
            "port": args.port,
            "metrics_port": args.metrics_port,
            "default_model": args.default_model,
            "feedback": args.feedback,
            "state_dir": args.state_dir,
            "feedback_db": args.feedback_db,
            "workers": args.workers,
        },
    )
    if not Path(cfg.models).is_dir():
        raise FileNotFoundError(f"models: {cfg.models} is not a folder (run `make serve` first?)")
    target = cfg.feedback_target()
    if target.startswith(("redis://", "rediss://")):
        store = open_store(target)
        try:
            store.ping()
            log.info("feedback: Redis stream at %s", store.where())
        except OSError as exc:  # FeedbackUnavailable: served from the trained state meanwhile
            log.warning("%s; recording is refused until it answers", exc)
        finally:
            store.close()
    elif target:
        open_store(target).close()  # create it now: a bad path stops start-up, naming it
        log.info("feedback: SQLite log %s", target)
    else:
        log.warning(
            "feedback = memory: recorded interactions are lost at exit"
            + ("; with several workers each keeps its own" if cfg.workers > 1 else "")
        )
    serve(cfg)


def cmd_import(args: argparse.Namespace) -> dict[str, Any]:
    from recserve.importers import saved_model, spark_als

    t = time.perf_counter()
    bundle.check_name(args.name)
    writable_dir("models", args.models)
    alpha = args.alpha
    if args.model is not None:
        if args.user_factors or args.item_factors:
            raise ValueError("model: give the saved model folder or --user-factors/--item-factors")
        users, items, params = saved_model(args.model)
        if alpha is None and isinstance(params.get("alpha"), int | float):
            alpha = float(params["alpha"])
    elif args.user_factors and args.item_factors:
        users, items = args.user_factors, args.item_factors
    else:
        raise ValueError(
            "model: give the saved ALSModel folder (or both --user-factors and --item-factors)"
        )
    path = spark_als(
        users,
        items,
        args.name,
        args.models,
        data=args.data,
        regularization=args.regularization,
        alpha=1.0 if alpha is None else alpha,
        index=args.index,
    )
    doc = bundle.read_manifest(path)
    return {
        "name": args.name,
        "version": path.name,
        "path": str(path),
        "users": doc["n_users"],
        "items": doc["n_items"],
        "factors": doc["params"]["factors"],
        "index": doc["params"]["index"],
        "seconds": round(time.perf_counter() - t, 2),
    }


def cmd_bench(args: argparse.Namespace) -> None:
    from recserve.clients.bench import main as bench_main

    code = bench_main(args.bench_args)
    if code:
        raise SystemExit(code)


def _emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, separators=(",", ":"), default=str))


COMMANDS = {
    "data": cmd_data,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "tune": cmd_tune,
    "models": cmd_models,
    "recommend": cmd_recommend,
    "quickstart": cmd_quickstart,
    "serve": cmd_serve,
    "bench": cmd_bench,
    "import": cmd_import,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `recserve` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # FAISS's loader reports at INFO each SIMD build it tries; on a wheel
        # without them that is three "Could not load library ...
        # ModuleNotFoundError" records per process, which read as failures.
        logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        result = COMMANDS[args.command](args)
        if result is not None:
            _emit(result)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head -1`): quiet, as a shell's SIGPIPE
        # stdout goes to devnull so that the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (DataError, bundle.BundleError, ValueError, OSError) as exc:
        print(f"recserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (tune keeps the first); nothing half-written
        print("recserve: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
