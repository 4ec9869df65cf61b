"""The typed client: dataclasses out, RecserveError with the status name on failure."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recserve.clients.client import Event, Item, Recommendation, RecommenderClient, RecserveError
from tests.service_helpers import flip_byte, publish_models, running

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("client-models")
    models = publish_models(small, root)
    with running(root) as srv:
        yield srv, models


def test_recommend_returns_plain_dataclasses(served, small):
    srv, models = served
    with RecommenderClient(srv.target, deadline=5) as rc:
        rec = rc.recommend("7", 5, model="als", explain=True)
        assert isinstance(rec, Recommendation) and all(isinstance(i, Item) for i in rec.items)
        m = models["als"]
        want, _ = m.recommend([small.users.get("7")], k=5)
        assert rec.item_ids == m.items.ids(want[0])
        assert [i.rank for i in rec.items] == [1, 2, 3, 4, 5]
        assert rec.model == "als" and rec.version and rec.served_by == ""
        new = rc.recommend(history=[Event("3", 5.0), "17"], k=4, model="als")
        want, _ = m.recommend_from_history(m.items.index(["3", "17"]), [5.0, 1.0], k=4)
        assert new.item_ids == m.items.ids(want)
        assert rc.recommend("nobody", 3, model="als").served_by == "popularity"
        sim = rc.similar_items("10", 3, model="itemknn")
        assert len(sim.items) == 3 and "10" not in sim.item_ids
        streamed = list(rc.recommend_stream("7", 5, model="als", explain=True))
        assert streamed == rec.items


def test_errors_carry_the_status_name_reason_and_violations(served):
    srv, _ = served
    with RecommenderClient(srv.target) as rc:
        with pytest.raises(RecserveError) as info:
            rc.recommend("7", -1)
        err = info.value
        assert err.code == "INVALID_ARGUMENT" and err.message.startswith("k:")
        assert err.reason == "K_OUT_OF_RANGE" and err.retry_delay is None
        assert err.field_violations == [("k", "must be in [1, 1000], got -1")]
        with pytest.raises(RecserveError) as info:
            list(rc.recommend_stream("7", -1))
        assert info.value.code == "INVALID_ARGUMENT" and info.value.reason == "K_OUT_OF_RANGE"
        with pytest.raises(RecserveError) as info:
            rc.model("nope")
        assert info.value.code == "NOT_FOUND" and info.value.reason == "UNKNOWN_MODEL"
        assert info.value.metadata["model"] == "nope"
        with pytest.raises(RecserveError) as info:
            rc.recommend("7", 3, model="als", version="no-such-version")
        assert info.value.reason == "VERSION_NOT_SERVED"
        assert info.value.metadata["served_version"] == srv.app.catalog.get("als").version
        # k omitted on the wire (0) means 10
        assert len(rc.recommend("7", 0).items) == 10


def test_batch_predict_record_and_admin(served, small):
    srv, models = served
    with RecommenderClient(srv.target) as rc:
        out = list(
            rc.recommend_batch(
                [{"request_id": "a", "user_id": "7", "k": 3}, {"request_id": "b", "k": 3}]
            )
        )
        assert [r.request_id for r in out] == ["a", "b"]
        assert out[0].error is None and len(out[0].items) == 3
        assert out[1].error is not None and out[1].error.code == "INVALID_ARGUMENT"
        ratings = rc.predict_ratings(["1", "2"], "9", model="bayes_mf", interval=0.8)
        m = models["bayes_mf"]
        mean, _ = m.score(small.users.get("9"), m.items.index(["1", "2"]))
        assert [r.item_id for r in ratings] == ["1", "2"]
        np.testing.assert_allclose([r.rating for r in ratings], mean, 1e-5)
        assert all(r.lower <= r.rating <= r.upper for r in ratings)
        assert rc.record("client-user", ["1", "no-such-item"]) == (1, 1, 0)
        names = {m.name: m for m in rc.models()}
        assert names["als"].state == "serving" and names["als"].n_items == small.n_items
        assert rc.reload() == ([], [])


def test_clients_import_only_the_stubs():
    """clients/ imports of the project only the stubs (recserve.v1), the wire's
    shared names (recserve.contract) and itself (the architecture's direction)."""
    allowed = ("recserve.v1", "recserve.contract", "recserve.clients")
    for path in (ROOT / "clients").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # relative: within clients/
            ours = [n for n in names if n.split(".")[0] in ("recserve", "server", "kernels")]
            assert all(n.startswith(allowed) for n in ours), (path, ours)


def test_one_string_where_a_list_of_ids_goes_is_refused(served):
    # list("12") is ["1", "2"]: real ids in a catalogue numbered 1..n, so one
    # string sent as a history, exclusions, candidates or events would quietly
    # mean other items (record() would store events nobody made).
    srv, _ = served
    with RecommenderClient(srv.target, deadline=5) as rc:
        before = srv.app.online.history("u-strings")
        for call, name in [
            (lambda: rc.recommend(history="12", model="als"), "history"),
            (lambda: rc.recommend("7", exclude="12", model="als"), "exclude"),
            (lambda: rc.recommend("7", candidates="12", model="als"), "candidates"),
            (lambda: rc.predict_ratings("12", "7", model="svd"), "item_ids"),
            (lambda: rc.record("u-strings", "12"), "events"),
            (lambda: list(rc.recommend_batch([{"user_id": "7", "exclude": "12"}])), "exclude"),
            (lambda: list(rc.recommend_batch([{"history": b"12"}])), "history"),
        ]:
            what = "item ids or Events" if name in ("history", "events") else "item ids"
            with pytest.raises(TypeError, match=f"^{name}: expected a list of {what}, got"):
                call()
        assert srv.app.online.history("u-strings") == before
        # The same as lists are what they say.
        rec = rc.recommend("7", 5, exclude=["12"], model="als")
        assert "12" not in rec.item_ids and len(rec.items) == 5
        assert rc.record("u-strings", ["12"]).accepted == 1
        batch = list(rc.recommend_batch([{"user_id": "7", "k": 3, "exclude": ["12"]}]))
        assert len(batch) == 1 and batch[0].error is None and len(batch[0].items) == 3


def test_a_deadline_that_has_already_passed_is_refused_before_any_call(served, capsys):
    # gRPC answers timeout=0, a negative, NaN or even infinite one with
    # DEADLINE_EXCEEDED without asking the server: the caller would read that as
    # a slow server. The client refuses such a deadline, per call or as its default.
    from recserve.clients.__main__ import main

    srv, _ = served
    bad = [0, -1, 0.0, float("nan"), float("inf"), -float("inf")]
    for value in bad:
        with pytest.raises(ValueError, match=r"^deadline: must be a finite number of seconds > 0"):
            RecommenderClient(srv.target, deadline=value)
    for value in ["5", None, True]:
        with pytest.raises(TypeError, match=r"^deadline: expected seconds as a number"):
            RecommenderClient(srv.target, deadline=value)
    with RecommenderClient(srv.target, deadline=5) as rc:
        for value in bad:
            with pytest.raises(ValueError, match=r"^deadline: must be"):
                rc.recommend("7", 3, model="als", deadline=value)
            with pytest.raises(ValueError, match=r"^deadline: must be"):
                rc.models(deadline=value)
        # A small but positive deadline is sent as it is.
        assert len(rc.recommend("7", 3, model="als", deadline=2.5).items) == 3
    for flag in ["0", "-2", "nan", "inf", "soon"]:
        with pytest.raises(SystemExit) as e:
            main(["--target", srv.target, "--deadline", flag, "models"])
        assert e.value.code == 2
        assert "--deadline" in capsys.readouterr().err
    argv = ["--target", srv.target, "--deadline", "3", "recommend", "--user", "7", "--k", "2"]
    assert main([*argv, "--model", "als"]) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 2


def test_the_shell_client_takes_a_history_of_ids_that_hold_commas(served, capsys):
    # `--history a,b` splits at commas, so an id such as "sku 1,2" could not be
    # sent: a JSON array of strings is taken as it is.
    from recserve.clients.__main__ import main

    srv, _ = served
    argv = ["--target", srv.target, "recommend", "--k", "3", "--model", "als", "--history"]
    assert main([*argv, "12,40"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert main([*argv, '["12", "40"]']) == 0
    assert json.loads(capsys.readouterr().out) == split and len(split["items"]) == 3
    # One id with a comma reaches the server whole: it names it as unknown.
    assert main([*argv, '["12,40"]']) == 1
    assert "'12,40'" in capsys.readouterr().err
    for bad in ["[12, 40]", '["12", 40]', "[oops", ' ["12"']:
        with pytest.raises(SystemExit) as e:
            main([*argv, bad])
        assert e.value.code == 2
        assert "--history" in capsys.readouterr().err


def test_the_shell_client_records_feedback_and_predicts_ratings(served, capsys):
    # `record` sends events (an empty --values entry: that item without a
    # value) and exits 1 when the server rejected any; `predict` prints
    # PredictRatings' answer; `recommend --values` gives the history's values.
    from recserve.clients.__main__ import main

    srv, _ = served
    t = ["--target", srv.target]
    assert main([*t, "record", "--user", "shell-u", "--items", "3,17", "--values", "5,"]) == 0
    assert json.loads(capsys.readouterr().out) == {"accepted": 2, "rejected": 0, "duplicates": 0}
    with RecommenderClient(srv.target, deadline=5) as rc:
        hist = [Event("3", 5.0), Event("17")]
        for model in ("als", "bayes_mf"):
            want = rc.recommend(history=hist, k=5, model=model)
            assert rc.recommend("shell-u", 5, model=model).item_ids == want.item_ids, model
        want_r = rc.predict_ratings(["1", "2"], "shell-u", model="bayes_mf", interval=0.8)
        want_h = rc.recommend(history=[Event("3", 2.0), Event("40")], k=4, model="bayes_mf")
    argv = [*t, "predict", "--user", "shell-u", "--items", "1,2", "--model", "bayes_mf"]
    assert main([*argv, "--interval", "0.8"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(p["item_id"], p["rating"], p["lower"]) for p in got["predictions"]] == [
        (r.item_id, r.rating, r.lower) for r in want_r
    ]
    assert (got["model"], got["version"], got["interval"]) == ("bayes_mf", want_r.version, 0.8)
    argv = [*t, "recommend", "--history", "3,40", "--values", "2,", "--k", "4"]
    assert main([*argv, "--model", "bayes_mf"]) == 0
    assert [i["item_id"] for i in json.loads(capsys.readouterr().out)["items"]] == want_h.item_ids
    # refused by the server: exit 1, the reason on stderr
    assert main([*t, "record", "--user", "shell-u", "--items", "3,no-such-item"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["rejected"] == 1 and "1 of 2 event(s) rejected" in err
    assert main([*t, "predict", "--items", "no-such-item", "--user", "shell-u"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    # refused here: exit 2 naming the flag
    for bad in (
        ["record", "--user", "u", "--items", "3,17", "--values", "5"],
        ["record", "--user", "u", "--items", "3", "--values", "five"],
        ["record", "--user", "u", "--items", "3", "--values", "nan"],
        ["record", "--user", "u", "--items", ","],
        ["recommend", "--values", "5"],
        ["predict", "--items", "1", "--history", "3", "--values", "1,2"],
    ):
        with pytest.raises(SystemExit) as e:
            main([*t, *bad])
        assert e.value.code == 2 and "--" in capsys.readouterr().err, bad


def test_a_wrong_type_is_a_type_error_naming_the_argument(served):
    # protobuf said "bad argument type for built-in operation" (an int user
    # id), "'str' object cannot be interpreted as an integer" (k "5") or
    # "'int' object has no attribute 'user_id'" (an int in a history).
    srv, _ = served
    with RecommenderClient(srv.target, deadline=5) as rc:
        for call, says in (
            (lambda: rc.recommend(7, 5), "user_id: expected a string (ids are strings: str(42))"),
            (lambda: rc.recommend("7", "5"), "k: expected an integer, got str '5'"),
            (lambda: rc.recommend("7", 5, explain="yes"), "explain: expected True or False"),
            (lambda: rc.recommend("7", 5, exclude=[1, 2]), "exclude: expected a list of strings"),
            (lambda: rc.recommend(history=[3, 17]), "history[0]: expected an item id"),
            (lambda: rc.recommend(history=["3", Event("17", "5")]), "history[1].value: expected"),
            (lambda: list(rc.recommend_stream("7", 2.5)), "k: expected an integer"),
            (lambda: list(rc.recommend_batch([{"user_id": 7}])), "user_id: expected a string"),
            (lambda: rc.similar_items(10, 3), "item_id: expected a string"),
            (lambda: rc.predict_ratings([1], "7"), "item_ids: expected a list of strings"),
            (lambda: rc.predict_ratings(["1"], "7", interval="x"), "interval: expected a number"),
            (lambda: rc.record(7, ["3"]), "user_id: expected a string"),
            (lambda: rc.record("7", ["3", 17]), "events[1]: expected an item id"),
        ):  # fmt: skip
            with pytest.raises(TypeError) as info:
                call()
            assert str(info.value).startswith(says), str(info.value)
        # the right types still go through
        assert len(rc.recommend("7", 3, history=[Event("3", 5.0), "17"]).items) == 3


def test_the_shell_client_ends_quietly_when_its_reader_stops_early(served):
    # `python -m recserve.clients models | head -1` printed a BrokenPipeError
    # traceback: the command now ends with 141, as a shell reports SIGPIPE.
    srv, _ = served
    argv = [sys.executable, "-m", "recserve.clients", "--target", srv.target, "models"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    # The same command with its reader present answers as before.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert [json.loads(line)["name"] for line in done.stdout.splitlines()]


def test_the_shell_client_reloads_and_reports_refused_versions(served, tmp_path, capsys):
    # `python -m recserve.clients reload` after publishing: one JSON line per
    # model that changed, exit 1 when a version was refused (the old one serves).
    from recserve.clients.__main__ import main

    _, models = served
    root = tmp_path / "models"
    for name in ("popularity", "itemknn"):
        models[name].save(root, name)
    with running(root) as srv:
        argv = ["--target", srv.target, "reload"]
        assert main(argv) == 0 and capsys.readouterr().out == ""  # nothing new
        new = models["popularity"].save(root, "popularity")
        bad = models["itemknn"].save(root, "itemknn")
        flip_byte(next(p for p in bad.iterdir() if p.suffix == ".npy"))
        assert main(argv) == 1
        out, err = capsys.readouterr()
        lines = [json.loads(line) for line in out.splitlines()]
        assert [(m["outcome"], m["name"]) for m in lines] == [
            ("reloaded", "popularity"),
            ("refused", "itemknn"),
        ]
        assert lines[0]["version"] == new.name and "sha256" in lines[1]["error"]
        assert "1 version(s) refused" in err
        with RecommenderClient(srv.target, deadline=5) as rc:
            served_now = {m.name: m.version for m in rc.models()}
        assert served_now["popularity"] == new.name and served_now["itemknn"] != bad.name


def test_the_package_exports_the_client_and_loads_it_on_first_use():
    # `from recserve.clients import RecommenderClient` was an ImportError; the
    # documented path was recserve.clients.client.
    import recserve.clients as pkg
    from recserve.clients import client

    for name in pkg.__all__:
        assert getattr(pkg, name) is getattr(client, name)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pkg.Nope  # noqa: B018
    code = (
        "import sys, recserve.clients; "
        "assert 'recserve.clients.client' not in sys.modules; "
        "from recserve.clients import RecommenderClient; "
        "assert 'recserve.clients.client' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
