"""`python -m recserve.clients`: call a recserve server from the shell, print JSON lines.

python -m recserve.clients --target localhost:50051 recommend --user 42 --k 10 [--model als]
python -m recserve.clients recommend --history 12,40,7 --k 5 --explain
python -m recserve.clients recommend --history '["sku 1,2", "Café"]'   # ids holding commas
python -m recserve.clients similar --item 12 --k 5
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

from recserve.clients.client import RecommenderClient, RecserveError


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
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recommend")
    rec.add_argument("--user", default="")
    rec.add_argument(
        "--history",
        type=_item_ids,
        default=[],
        help='comma-separated item ids, or a JSON array of them (["a,b", "c"]) for ids '
        "that hold commas",
    )
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--model", default="")
    rec.add_argument("--explain", action="store_true")
    sim = sub.add_parser("similar")
    sim.add_argument("--item", required=True)
    sim.add_argument("--k", type=int, default=10)
    sim.add_argument("--model", default="")
    sub.add_parser("models")
    sub.add_parser(
        "reload",
        help="switch to newly published versions; one line per model that changed, "
        "exit 1 when a version was refused (the old one keeps serving)",
    )
    args = ap.parse_args(argv)
    with RecommenderClient(args.target, deadline=args.deadline, token=args.token) as rc:
        try:
            if args.command == "recommend":
                out = rc.recommend(
                    args.user, args.k, history=args.history, model=args.model, explain=args.explain
                )
            elif args.command == "similar":
                out = rc.similar_items(args.item, args.k, args.model)
            elif args.command == "reload":
                reloaded, refused = rc.reload()
                for outcome, models in (("reloaded", reloaded), ("refused", refused)):
                    for m in models:
                        print(json.dumps({"outcome": outcome, **dataclasses.asdict(m)}))
                if refused:
                    print(f"error: {len(refused)} version(s) refused", file=sys.stderr)
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
