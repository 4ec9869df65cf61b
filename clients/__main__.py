"""`python -m recserve.clients`: call a recserve server from the shell, print JSON lines.

python -m recserve.clients --target localhost:50051 recommend --user 42 --k 10 [--model als]
python -m recserve.clients recommend --history 12,40,7 --k 5 --explain
python -m recserve.clients recommend --history '["sku 1,2", "Café"]'   # ids holding commas
python -m recserve.clients similar --item 12 --k 5
python -m recserve.clients record --user 42 --items 7,19 [--values 5,3.5]   # feedback
python -m recserve.clients predict --user 42 --items 1,2,5 --model bayes_mf   # ratings
python -m recserve.clients models
python -m recserve.clients reload     # switch to newly published bundles (Admin)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from recserve.clients.client import Event, RecommenderClient, RecserveError


class _Parser(argparse.ArgumentParser):
    """Never takes an abbreviated flag (sub-commands inherit the class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _positive_seconds(text: str) -> float:
    """argparse type for --deadline: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text!r}")
    return value


def item_ids(text: str) -> list[str]:
    """Item ids typed in a shell: comma-separated (each stripped, empties
    dropped), or a JSON array of strings, taken as they are, for ids that hold
    a comma or spaces. ValueError names what is wrong. `recserve recommend
    --history` reads its ids with this too."""
    if not text.lstrip().startswith("["):
        return [h.strip() for h in text.split(",") if h.strip()]
    try:
        ids = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON array: {exc}") from None
    if not isinstance(ids, list) or not all(isinstance(h, str) for h in ids):
        raise ValueError("a JSON array must hold item ids as strings")
    return ids


def _item_ids(text: str) -> list[str]:
    """argparse type for --history (item_ids, its errors as argparse's)."""
    try:
        return item_ids(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def item_values(text: str) -> list[float | None]:
    """Values typed in a shell, one per item id: comma-separated numbers; an
    empty entry ("5,,3") is an item without a value (each model's meaning: one
    event, or what a rating model expects of the item). ValueError names what
    is wrong. `recserve recommend --values` reads its values with this too."""
    out: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            out.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"not a number: {part!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"must be finite, got {part!r}")
        out.append(value)
    return out


def _values(text: str) -> list[float | None]:
    """argparse type for --values (item_values, its errors as argparse's)."""
    try:
        return item_values(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _events(
    ap: argparse.ArgumentParser, ids: list[str], values: list | None, what: str
) -> list[Event]:
    """Events of item ids with their --values (None: each sent without one);
    an argparse error when the counts differ."""
    if values is None:
        return [Event(i) for i in ids]
    if len(values) != len(ids):
        ap.error(f"--values: {len(values)} values for {len(ids)} item ids in {what}")
    return [Event(i, v) for i, v in zip(ids, values, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    ap = _Parser(prog="python -m recserve.clients", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--deadline", type=_positive_seconds, default=5.0, help="seconds (> 0)")
    ap.add_argument(
        "--token",
        default=os.environ.get("RECSERVE_ADMIN_TOKEN", ""),
        help="bearer token (the server's admin_token; default $RECSERVE_ADMIN_TOKEN): "
        "Admin calls from a non-loopback peer need it",
    )
    ap.add_argument("--tls-ca", default="", help="PEM CA of the server's certificate (TLS)")
    ap.add_argument("--tls-cert", default="", help="this client's PEM certificate (mutual TLS)")
    ap.add_argument("--tls-key", default="", help="this client's PEM private key (mutual TLS)")
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recommend", help="top k for a user or a history (Recommend)")
    rec.add_argument("--user", default="")
    rec.add_argument(
        "--history",
        type=_item_ids,
        default=[],
        help='comma-separated item ids, or a JSON array of them (["a,b", "c"]) for ids '
        "that hold commas",
    )
    rec.add_argument(
        "--values", type=_values, default=None, help="the history's values, as record --values"
    )
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--model", default="")
    rec.add_argument("--explain", action="store_true")
    sim = sub.add_parser("similar", help="the items most like one item (GetSimilarItems)")
    sim.add_argument("--item", required=True)
    sim.add_argument("--k", type=int, default=10)
    sim.add_argument("--model", default="")
    recd = sub.add_parser(
        "record",
        help="store feedback events for a user (RecordInteractions); exit 1 when the "
        "server rejected any",
    )
    recd.add_argument("--user", required=True)
    recd.add_argument(
        "--items", type=_item_ids, required=True, help="item ids, as recommend --history"
    )
    recd.add_argument(
        "--values",
        type=_values,
        default=None,
        help="comma-separated values, one per item (a rating, a play count); an empty "
        "entry or none at all sends an item without one",
    )
    pred = sub.add_parser("predict", help="predicted ratings with intervals (PredictRatings)")
    pred.add_argument("--items", type=_item_ids, required=True, help="the items to predict")
    pred.add_argument("--user", default="")
    pred.add_argument("--history", type=_item_ids, default=[], help="as recommend --history")
    pred.add_argument("--values", type=_values, default=None, help="the history's values")
    pred.add_argument("--model", default="")
    pred.add_argument("--interval", type=float, default=None, help="in (0, 1); default 0.95")
    sub.add_parser("models", help="every model the server knows, one JSON line each (Admin)")
    sub.add_parser(
        "reload",
        help="switch to newly published versions and the config as it is now; one line "
        "per model that changed, exit 1 when a version or the config was refused (the "
        "old one keeps serving)",
    )
    args = ap.parse_args(argv)
    sub_parser = sub.choices[args.command]
    if args.command in ("recommend", "predict"):
        if args.values is not None and not args.history:
            sub_parser.error("--values: give them with --history")
        history = _events(sub_parser, args.history, args.values, "--history")
    elif args.command == "record":
        if not args.items:
            sub_parser.error("--items: no item ids")
        events = _events(sub_parser, args.items, args.values, "--items")
    try:
        client = RecommenderClient(
            args.target,
            deadline=args.deadline,
            token=args.token,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except ValueError as exc:  # a TLS file that does not load, named
        ap.error(str(exc))
    with client as rc:
        try:
            if args.command == "recommend":
                out = rc.recommend(
                    args.user, args.k, history=history, model=args.model, explain=args.explain
                )
            elif args.command == "similar":
                out = rc.similar_items(args.item, args.k, args.model)
            elif args.command == "record":
                got = rc.record(args.user, events)
                print(json.dumps(got._asdict()))
                if got.rejected:
                    print(
                        f"error: {got.rejected} of {len(events)} event(s) rejected (an item no "
                        "model knows, or an id too long)",
                        file=sys.stderr,
                    )
                return 1 if got.rejected else 0
            elif args.command == "predict":
                ratings = rc.predict_ratings(
                    args.items,
                    args.user,
                    history=history,
                    model=args.model,
                    interval=args.interval,
                )
                print(
                    json.dumps(
                        {
                            "predictions": [dataclasses.asdict(r) for r in ratings],
                            "interval": ratings.interval,
                            "model": ratings.model,
                            "version": ratings.version,
                            "served_by": ratings.served_by,
                        }
                    )
                )
                return 0
            elif args.command == "reload":
                reloaded, refused = rc.reload()
                for outcome, models in (("reloaded", reloaded), ("refused", refused)):
                    for m in models:
                        print(json.dumps({"outcome": outcome, **dataclasses.asdict(m)}))
                versions = [m for m in refused if m.algorithm != "config"]
                if versions:
                    print(f"error: {len(versions)} version(s) refused", file=sys.stderr)
                for m in refused:
                    if m.algorithm == "config":
                        print(f"error: config refused: {m.error}", file=sys.stderr)
                return 1 if refused else 0
            else:
                for m in rc.models():
                    print(json.dumps(dataclasses.asdict(m)))
                return 0
        except RecserveError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(dataclasses.asdict(out)))
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """main() for a shell pipeline: a reader that stops early (`| head -1`) ends
    the command quietly, with 141 as a shell does for SIGPIPE, instead of a
    BrokenPipeError traceback (the Python docs' recipe: stdout goes to devnull so
    the interpreter's own final flush cannot raise again)."""
    try:
        code = main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(run())
