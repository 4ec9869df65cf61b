"""The recserve command line, run in-process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.cli import main
from recserve.models import create
from tests.service_helpers import flip_byte


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def small_synth(capsys, tmp_path):
    """A 200-user, 80-item synthetic dataset folder under tmp_path."""
    data = tmp_path / "data"
    synth = ("--users", 200, "--items", 80, "--interactions", 4000)
    run(capsys, "data", "synth", *synth, "--out", data)
    return data


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_synth_train_list_verify_recommend(tmp_path, capsys):
    data, models = tmp_path / "data", tmp_path / "models"
    code, out, _ = run(
        capsys,
        "data",
        "synth",
        "--users",
        300,
        "--items",
        120,
        "--interactions",
        6000,
        "--seed",
        1,
        "--out",
        data,
    )
    assert code == 0 and last_json(out)["interactions"] == 6000
    code, out, _ = run(
        capsys,
        "train",
        "--data",
        data,
        "--algo",
        "popularity",
        "--param",
        "weighting=value",
        "--name",
        "pop",
        "--models",
        models,
    )
    summary = last_json(out)
    assert code == 0 and summary["name"] == "pop" and summary["bytes"] > 0
    assert set(summary) >= {"name", "version", "seconds", "bytes"}
    code, out, _ = run(capsys, "models", "list", "--models", models)
    entry = last_json(out)["models"][0]
    assert entry["current"] == summary["version"] and "recall@10" in entry["metrics"]
    code, out, _ = run(capsys, "models", "verify", "--models", models)
    assert code == 0 and last_json(out)["failed"] == 0
    code, out, _ = run(
        capsys, "recommend", "--models", models, "--name", "pop", "--user", "5", "--k", 4
    )
    items = last_json(out)["items"]
    assert code == 0 and [i["rank"] for i in items] == [1, 2, 3, 4]
    code, out, _ = run(
        capsys, "recommend", "--models", models, "--name", "pop", "--history", "1,2,nope", "--k", 3
    )
    assert code == 0 and not {"1", "2"} & {i["item_id"] for i in last_json(out)["items"]}
    # Only unknown ids: nothing to fold in, an error rather than every item at 0.
    code, out, err = run(
        capsys, "recommend", "--models", models, "--name", "pop", "--history", "nope,nada"
    )
    assert code != 0 and "none of the item ids are known to pop" in err and out == ""


def test_verify_fails_on_a_tampered_bundle(tmp_path, capsys):
    data, models = tmp_path / "data", tmp_path / "models"
    run(
        capsys,
        "data",
        "synth",
        "--users",
        100,
        "--items",
        50,
        "--interactions",
        1000,
        "--out",
        data,
    )
    run(
        capsys,
        "train",
        "--data",
        data,
        "--algo",
        "popularity",
        "--name",
        "p",
        "--models",
        models,
        "--no-evaluate",
    )
    scores = next(models.glob("p/*/scores.npy"))
    flip_byte(scores)
    with pytest.raises(SystemExit) as info:
        run(capsys, "models", "verify", "--models", models)
    assert info.value.code == 1
    assert "scores.npy: sha256 differs" in capsys.readouterr().out


@pytest.mark.parametrize("action", ["list", "verify"])
def test_models_on_a_missing_folder_is_an_error_not_an_empty_success(tmp_path, capsys, action):
    # A deploy check `recserve models verify --models <typo>` once passed with
    # nothing verified.
    missing = tmp_path / "no-such-models"
    code, out, err = run(capsys, "models", action, "--models", missing)
    assert code != 0
    assert f"{missing} is not a folder" in err and out == ""


def test_evaluate_prints_a_table_and_writes_json(tmp_path, capsys):
    data = small_synth(capsys, tmp_path)
    out_file = tmp_path / "e.json"
    code, out, _ = run(
        capsys,
        "evaluate",
        "--data",
        data,
        "--algo",
        "popularity",
        "--protocol",
        "temporal",
        "--k",
        "5,10",
        "--out",
        out_file,
    )
    assert code == 0 and "recall" in out and "temporal" in out
    result = json.loads(out_file.read_text())
    assert result["protocol"] == "temporal" and "ndcg@5" in result["metrics"]


def test_evaluate_writes_no_file_unless_asked(tmp_path, capsys, monkeypatch):
    data = small_synth(capsys, tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, _ = run(capsys, "evaluate", "--data", data, "--algo", "popularity", "--k", "5")
    assert code == 0 and "recall" in out
    assert list(work.iterdir()) == []  # nothing left in the working directory


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--data", "{d}", "--algo", "nope", "--name", "x", "--models", "{m}"],
            "unknown algorithm 'nope'",
        ),
        (
            [
                "train",
                "--data",
                "{d}",
                "--algo",
                "popularity",
                "--param",
                "bad",
                "--name",
                "x",
                "--models",
                "{m}",
            ],
            "expected key=value",
        ),
        (
            [
                "train",
                "--data",
                "{d}",
                "--algo",
                "popularity",
                "--param",
                "weighting=max",
                "--name",
                "x",
                "--models",
                "{m}",
            ],
            "weighting: expected one of count, value",
        ),
        (
            ["train", "--data", "{d}", "--algo", "popularity", "--name", "../x", "--models", "{m}"],
            "model name",
        ),
        (
            [
                "train",
                "--data",
                "{d}/missing",
                "--algo",
                "popularity",
                "--name",
                "x",
                "--models",
                "{m}",
            ],
            "no such file",
        ),
        (["recommend", "--models", "{m}", "--name", "x", "--user", "1"], "no model 'x' published"),
    ],
)
def test_errors_exit_2_with_a_message(tmp_path, capsys, argv, message):
    argv = [a.format(d=tmp_path, m=tmp_path / "models") for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_quickstart_is_idempotent(tmp_path, capsys, monkeypatch):
    import recserve.cli as cli

    monkeypatch.setattr(
        cli, "DEFAULT_DATA", {"users": 200, "items": 90, "interactions": 3000, "seed": 1}
    )
    code, out, _ = run(capsys, "quickstart", "--workdir", tmp_path)
    first = last_json(out)
    names = [t["name"] for t in first["trained"]]
    assert code == 0 and names == ["popularity", "itemknn", "content", "als"]
    code, out, _ = run(capsys, "quickstart", "--workdir", tmp_path)
    again = last_json(out)
    assert code == 0 and again["trained"] == [] and again["available"] == sorted(names)


def test_quickstart_config_serves_the_hybrid_default(tmp_path, capsys, monkeypatch):
    """`make serve`'s second step: the config quickstart writes starts a server whose
    default model is the hybrid, with the experiment live."""
    from dataclasses import replace

    from prometheus_client import CollectorRegistry

    import recserve.cli as cli
    from recserve.clients.client import RecommenderClient
    from recserve.config import load_config
    from recserve.service import App

    monkeypatch.setattr(
        cli, "DEFAULT_DATA", {"users": 200, "items": 90, "interactions": 3000, "seed": 1}
    )
    code, out, _ = run(capsys, "quickstart", "--workdir", tmp_path)
    assert code == 0
    summary = last_json(out)
    cfg = load_config(summary["config"], env={})
    blended = set(summary["hybrid"]["weights"])  # less any the validation did as well without
    assert blended | set(summary["hybrid"]["dropped"]) == {"als", "itemknn", "content"}
    app = App(replace(cfg, host="127.0.0.1", port=0, metrics_port=0), registry=CollectorRegistry())
    app.start()
    try:
        assert app.catalog.wait(30)
        with RecommenderClient(f"127.0.0.1:{app.port}") as rc:
            rec = rc.recommend("1", 5)
            assert rec.model == "hybrid" and rec.served_by == "" and len(rec.items) == 5
            assert rec.version.count("@") == len(blended)  # each component blended
            arm = rc.recommend("1", 5, model="homepage").arm
            assert arm in ("hybrid", "als")
    finally:
        app.drain(grace=0)


def test_evaluate_compare_prints_one_table(tmp_path, capsys):
    data = tmp_path / "data"
    synth = ("--users", 200, "--items", 80, "--interactions", 4000)
    run(capsys, "data", "synth", *synth, "--out", data)
    out_file = tmp_path / "cmp.json"
    code, out, _ = run(
        capsys,
        "evaluate",
        "--data",
        data,
        "--compare",
        "popularity,itemknn,itemknn:k=10:shrink=5",
        "--k",
        "10",
        "--out",
        out_file,
    )
    assert code == 0, out
    lines = out.splitlines()
    assert "one split for all" in lines[0] and "recall@10" in lines[1]
    assert [ln.split()[0] for ln in lines[2:5]] == [
        "popularity",
        "itemknn",
        "itemknn:k=10:shrink=5",
    ]
    result = json.loads(out_file.read_text())
    assert result["itemknn:k=10:shrink=5"]["params"]["shrink"] == 5.0
    for bad, needle in (
        ("popularity", "two or more different entries"),
        ("popularity,nope", "compare: 'nope'"),
        ("itemknn,itemknn:k=zero", "compare: 'itemknn:k=zero'"),
    ):
        code, _, err = run(capsys, "evaluate", "--data", data, "--compare", bad)
        assert code == 2 and needle in err, err
    code, _, err = run(capsys, "evaluate", "--data", data)
    assert code == 2 and "give --algo (or --compare" in err


def test_a_compare_keeps_the_figures_of_the_models_that_fit(tmp_path, capsys):
    # One entry that cannot be fitted on this data (here EASE over its memory
    # bound) ended the whole comparison with that entry's error, the others'
    # figures lost. Now its row says why, the rest are measured, and the exit
    # status is 1, so that a script does not take the table as complete.
    data = small_synth(capsys, tmp_path)
    out_file = tmp_path / "cmp.json"
    entries = "popularity,ease:max_memory_gb=0,itemknn"
    args = ("evaluate", "--data", data, "--k", "10", "--compare", entries)
    with pytest.raises(SystemExit) as info:
        run(capsys, *args, "--out", out_file)
    out, err = capsys.readouterr()
    assert info.value.code == 1
    rows = {ln.split()[0]: ln for ln in out.splitlines()[2:]}
    assert list(rows) == ["popularity", "ease:max_memory_gb=0", "itemknn"]
    assert "not fitted: ease: 80 items need" in rows["ease:max_memory_gb=0"]
    assert float(rows["itemknn"].split()[1]) > 0
    result = json.loads(out_file.read_text())
    assert "max_memory_gb=0" in result["ease:max_memory_gb=0"]["error"]
    assert result["itemknn"]["metrics"]["recall@10"] > 0
    alone = tmp_path / "alone.json"
    run(capsys, "evaluate", "--data", data, "--k", "10", "--algo", "itemknn", "--out", alone)
    assert json.loads(alone.read_text())["metrics"] == result["itemknn"]["metrics"]  # same split
    # What is wrong for every entry still stops before any fit.
    code, _, err = run(capsys, *args, "--threshold", "99")
    assert code == 2 and "threshold: no held-out value is >= 99" in err
    code, _, err = run(capsys, *args[:-1], "ease:max_memory_gb=0,ease:max_memory_gb=0:l2=1")
    assert code == 2 and "no entry could be fitted" in err


def test_train_on_too_few_events_to_evaluate_names_the_way_out(tmp_path, capsys):
    data = tmp_path / "one.csv"
    data.write_text("user,item,rating\n1,a,5\n2,a,4\n")
    models = tmp_path / "models"
    train = ["train", "--data", data, "--algo", "als", "--name", "x", "--models", models]
    code, _, err = run(capsys, *train)
    assert code == 2
    assert "offline random evaluation: no user has a relevant test item" in err
    assert "--no-evaluate" in err and not (models / "x").exists()
    code, out, _ = run(capsys, *train, "--no-evaluate")
    assert code == 0 and last_json(out)["name"] == "x"
    code, out, _ = run(capsys, "recommend", "--models", models, "--name", "x", "--user", "2")
    assert code == 0 and last_json(out)["items"] == []  # the one item is seen


def test_recommend_for_a_user_without_training_events_says_so(small, tmp_path, capsys):
    # A bundle fitted on a split (the library's fit, then save): user 0 has no
    # training events; its ranking would be all zeros in index order.
    x = small.interactions
    keep = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)) != 0
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[keep]
    train = sp.csr_matrix((x.data[keep], (rows, x.indices[keep])), shape=x.shape)
    split = small.with_interactions(train, small.timestamps[keep])
    models = tmp_path / "models"
    for algo in ("als", "popularity"):
        create(algo).fit(split).save(models, algo, dataset=split)
    uid = small.users.ids([0])[0]
    code, _, err = run(capsys, "recommend", "--models", models, "--name", "als", "--user", uid)
    assert code == 2 and "has no training events in als" in err and "--history" in err
    code, out, _ = run(
        capsys, "recommend", "--models", models, "--name", "popularity", "--user", uid
    )
    assert code == 0 and len(last_json(out)["items"]) == 10
    other = small.users.ids([1])[0]
    code, out, _ = run(capsys, "recommend", "--models", models, "--name", "als", "--user", other)
    assert code == 0 and len(last_json(out)["items"]) == 10


@pytest.mark.parametrize("history", ["", ",", " , ,", "[]", " [ ] "])
def test_recommend_with_an_empty_history_is_refused(tmp_path, capsys, history):
    models = tmp_path / "models"
    data = tmp_path / "d.csv"
    data.write_text("user,item,rating\n" + "".join(f"u{i % 7},i{i % 11},1\n" for i in range(60)))
    train = ["train", "--data", data, "--algo", "itemknn", "--name", "x", "--models", models]
    assert run(capsys, *train, "--no-evaluate")[0] == 0
    ask = ["recommend", "--models", models, "--name", "x", "--history"]
    code, out, err = run(capsys, *ask, history)
    assert code == 2 and "history: no item ids" in err and out.strip() == ""
    code, out, _ = run(capsys, *ask, "i1,i2")
    assert code == 0 and len(last_json(out)["items"]) == 9  # 11 items, 2 seen


def test_recommend_takes_a_json_history_for_ids_that_hold_commas(tmp_path, capsys):
    # `--history a,b` splits at commas: an item id "i,1" (a quoted CSV field)
    # is sent whole as a JSON array, the same answer as a comma list otherwise.
    models, data = tmp_path / "models", tmp_path / "d.csv"
    rows = "".join(f'u{i % 7},"i,{i % 11}",1\n' for i in range(60))
    data.write_text("user,item,rating\n" + rows)
    train = ["train", "--data", data, "--algo", "itemknn", "--name", "x", "--models", models]
    assert run(capsys, *train, "--no-evaluate")[0] == 0
    ask = ["recommend", "--models", models, "--name", "x", "--history"]
    code, out, _ = run(capsys, *ask, '["i,1", "i,2"]')
    items = [i["item_id"] for i in last_json(out)["items"]]
    assert code == 0 and len(items) == 9 and not {"i,1", "i,2"} & set(items)
    code, out, err = run(capsys, *ask, "i,1")  # split: "i" and "1", both unknown
    assert code == 2 and "none of the item ids are known" in err and out == ""
    for bad in ["[1]", "[oops"]:
        code, out, err = run(capsys, *ask, bad)
        assert code == 2 and "history: " in err and out == ""


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--leave-last", "0", "argument --leave-last: expected an integer >= 1, got 0"),
        ("--threads", "-1", "argument --threads: expected an integer >= 0, got -1"),
        ("--threads", "two", "argument --threads: expected an integer, got 'two'"),
    ],
)
def test_evaluate_refuses_bad_counts_as_usage_errors(tmp_path, capsys, flag, value, message):
    # --leave-last 0 was an error naming the library's `n`; --threads -1 was taken.
    data = tmp_path / "d.csv"
    data.write_text("user,item,rating\n" + "".join(f"u{i % 7},i{i % 11},1\n" for i in range(60)))
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--data", str(data), "--algo", "popularity", flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_and_compare_on_a_given_test_file(tmp_path, capsys):
    train = tmp_path / "u1.base"  # MovieLens 100k's split layout: tab separated, no header
    test = tmp_path / "u1.test"
    rng = np.random.default_rng(0)
    pairs = {(int(u), int(i)) for u, i in rng.integers(1, 30, (400, 2))}
    rows = [f"{u}\t{i}\t{1 + (u * i) % 5}\t{880000000 + n}\n" for n, (u, i) in enumerate(pairs)]
    train.write_text("".join(rows[:300]))
    test.write_text("".join(rows[300:]) + "999\t1\t5\t890000000\n")  # an unknown user
    out_json = tmp_path / "r.json"
    code, out, _ = run(
        capsys, "evaluate", "--data", train, "--test", test, "--algo", "itemknn", "--out", out_json
    )
    assert code == 0 and "held out: " in out
    saved = json.loads(out_json.read_text())
    assert saved["protocol"] == "given" and saved["test"] == str(test)
    code, out, _ = run(
        capsys, "evaluate", "--data", train, "--test", test, "--compare", "popularity,itemknn"
    )
    assert code == 0 and "held out: " in out and "itemknn" in out
    code, _, err = run(
        capsys, "evaluate", "--data", train, "--test", tmp_path / "no.csv", "--algo", "popularity"
    )
    assert code == 2 and "no.csv" in err

    # A split flag next to --test would be ignored without a word: refused, before
    # anything is read or fitted; the defaults still apply without --test.
    for flag in (["--protocol", "temporal"], ["--fraction", "0.5"], ["--leave-last", "2"]):
        for how in (["--algo", "popularity"], ["--compare", "popularity,itemknn"]):
            code, out, err = run(capsys, "evaluate", "--data", train, "--test", test, *how, *flag)
            assert code == 2 and out == "", (flag, how)
            assert f"test: --test {test} is the held-out split, so {flag[0]} would" in err
    code, out, _ = run(
        capsys, "evaluate", "--data", train, "--algo", "popularity", "--out", out_json
    )
    assert code == 0 and "random protocol" in out
    assert json.loads(out_json.read_text())["protocol"] == "random"


def test_data_info_says_how_the_values_will_weigh(tmp_path, capsys):
    ratings = tmp_path / "r.csv"
    ratings.write_text(
        "user,item,rating\n" + "".join(f"u{i},i{i % 9},{1 + i % 5}\n" for i in range(50))
    )
    code, out, _ = run(capsys, "data", "info", "--data", ratings)
    values = last_json(out)["values"]
    assert code == 0 and values["scale"] == "linear" and values["tail_ratio"] <= 4
    assert (values["min"], values["max"], values["dislikes"], values["zeros"]) == (1, 5, 0, 0)
    plays = tmp_path / "p.csv"
    counts = [1, 2, 3, 1, 2, 900, 4, 1, 2, 3] * 10 + [-1, 0]
    plays.write_text(
        "user,item,plays\n" + "".join(f"u{i},i{i % 9},{c}\n" for i, c in enumerate(counts))
    )
    code, out, _ = run(capsys, "data", "info", "--data", plays)
    values = last_json(out)["values"]
    assert values["scale"] == "log" and values["tail_ratio"] > 4
    assert (values["dislikes"], values["zeros"], values["max"]) == (1, 1, 900)


def test_duplicates_flag_reaches_the_data(tmp_path, capsys):
    # 200 click rows over 77 (user, item) pairs: without a value column the
    # repeats are counted (up to 3), with --duplicates last they are not.
    from recserve.models import load_named

    data = tmp_path / "clicks.csv"
    data.write_text("user,item\n" + "".join(f"u{i % 7},i{i % 11}\n" for i in range(200)))
    counts = []
    for n, flag in enumerate(([], ["--duplicates", "last"])):
        args = ["train", "--data", data, "--algo", "popularity", "--name", f"p{n}"]
        assert run(capsys, *args, "--no-evaluate", "--models", tmp_path / "m", *flag)[0] == 0
        model = load_named(tmp_path / "m", f"p{n}")
        assert model.user_items.nnz == 77
        counts.append(float(model.user_items.data.max()))
    assert counts == [3.0, 1.0]
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--data", str(data), "--algo", "popularity", "--duplicates", "max"])
    assert exit_.value.code == 2 and "--duplicates" in capsys.readouterr().err


def test_recommend_names_what_is_published_when_the_name_is_not(tmp_path, capsys):
    # A hybrid from recserve.toml is the usual case: it has no bundle folder.
    models = tmp_path / "models"
    data = tmp_path / "d.csv"
    data.write_text("user,item,rating\n" + "".join(f"u{i % 7},i{i % 11},1\n" for i in range(60)))
    for algo in ("itemknn", "popularity"):
        train = ["train", "--data", data, "--algo", algo, "--name", algo, "--models", models]
        assert run(capsys, *train, "--no-evaluate")[0] == 0
    code, _, err = run(capsys, "recommend", "--models", models, "--name", "hybrid", "--user", "u1")
    assert code == 2
    assert "no model 'hybrid' published" in err and "(published: itemknn, popularity)" in err
    assert "recserve.toml" in err


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    # `recserve models list | head -1`: the pipe's reader is gone before the
    # answer is written. The command ends with 141 (as a shell reports SIGPIPE)
    # and no BrokenPipeError traceback on stderr.
    proc = subprocess.Popen(
        [sys.executable, "-m", "recserve", "models", "list", "--models", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child has imported anything, let alone printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_faiss_loader_chatter_only_with_verbose(tmp_path):
    # FAISS's loader logs each SIMD build it tries at INFO ("Could not load
    # library with AVX2 support ... ModuleNotFoundError" on a generic wheel):
    # an operator read them as failures. Quiet by default, shown with -v.
    data = tmp_path / "d"
    assert main(["data", "synth", "--users", "60", "--items", "40", "--interactions", "900",
                 "--out", str(data)]) == 0  # fmt: skip

    def train(*flags: str) -> str:
        argv = [sys.executable, "-m", "recserve", *flags, "train", "--data", str(data),
                "--algo", "als", "--param", "index=hnsw", "--param", "iterations=2",
                "--name", "als", "--models", str(tmp_path / "m"), "--no-evaluate"]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "faiss" not in train()
    assert "faiss.loader" in train("-v")  # the index was built: FAISS was loaded


@pytest.mark.parametrize("algo", ["svd", "itemknn"])
def test_recommend_folds_in_a_history_of_ids_as_the_server_does(small, tmp_path, capsys, algo):
    # `--history` gives ids without values: the server's meaning of such a
    # history (one event; to a rating model, what it expects of each item), not
    # a rating of 1, which turned svd's fold-in away from the items.
    from recserve.config import ServerConfig
    from recserve.feedback import OnlineState
    from recserve.serving import Catalog, Router
    from recserve.serving.answers import RecQuery

    create(algo, **({"epochs": 5} if algo == "svd" else {})).fit(small).save(tmp_path, "m")
    ids = small.items.ids([3, 17, 42, 8, 120])
    base = ["recommend", "--models", str(tmp_path), "--name", "m", "--history", ",".join(ids)]
    code, out, err = run(capsys, *base)
    assert code == 0, err
    got = [x["item_id"] for x in json.loads(out)["items"]]
    # --values: one per id, an empty entry that item without one
    values = [5.0, None, 2.0, None, 4.0]
    code, out, err = run(capsys, *base, "--values", "5,,2,,4")
    assert code == 0, err
    got_values = [x["item_id"] for x in json.loads(out)["items"]]
    catalog = Catalog(str(tmp_path))
    catalog.start()
    try:
        catalog.wait(60)
        router = Router(ServerConfig(models=str(tmp_path)), catalog, OnlineState())
        served = router.recommend(RecQuery(history=[(i, None) for i in ids], k=10, model="m"))
        ones = router.recommend(RecQuery(history=[(i, 1.0) for i in ids], k=10, model="m"))
        hist = list(zip(ids, values, strict=True))
        with_values = router.recommend(RecQuery(history=hist, k=10, model="m"))
    finally:
        catalog.close()
    assert got == served.item_ids
    assert (got != ones.item_ids) == (algo == "svd")  # a 1 is a low rating only to svd
    assert got_values == with_values.item_ids
    for bad, says in (
        (["--values", "5,2"], "values: 2 values for 5"),
        (["--values", "5,x,1,1,1"], "not a number"),
        (["--values", "1,1,1,1,1e38"], "within"),
    ):
        code, _, err = run(capsys, *base, *bad)
        assert code != 0 and says in err, (bad, err)
    code, _, err = run(capsys, *base[:5], "--user", small.users.ids([0])[0], "--values", "1")
    assert code != 0 and "give them with --history" in err


def test_a_folder_a_command_cannot_write_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    # It failed at the publish, after the fit (hours on big data), with
    # "[Errno 2] No such file or directory" naming no setting.
    import recserve.cli as cli

    data = tmp_path / "events.csv"
    data.write_text(
        "user,item\n" + "".join(f"u{u},i{(u * 7 + j) % 13}\n" for u in range(20) for j in range(4))
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    fits = []
    monkeypatch.setattr(cli, "load_dataset", lambda *a, **k: fits.append(a) or 1 / 0)
    for models, says in (
        (str(a_file), f"models: {a_file} is not a folder"),
        (str(a_file / "sub"), f"models: cannot create {a_file / 'sub'}"),
    ):
        for argv in (
            ["train", "--data", str(data), "--algo", "popularity", "--name", "p"],
            ["tune", "--data", str(data), "--algo", "popularity", "--trials", "1", "--name", "p"],
        ):
            code, _, err = run(capsys, *argv, "--models", models)
            assert code != 0 and says in err, (argv, err)
    for argv, says in (
        (["evaluate", "--data", data, "--algo", "popularity", "--out", tmp_path], "is a folder"),
        (["evaluate", "--data", data, "--compare", "popularity", "--out", a_file / "r"], "out: "),
        (["data", "synth", "--users", 5, "--items", 5, "--interactions", 9, "--out", a_file],
         f"out: {a_file} is not a folder"),
        (["quickstart", "--workdir", a_file / "w"], f"workdir: cannot create {a_file / 'w'}"),
    ):  # fmt: skip
        code, _, err = run(capsys, *argv)
        assert code != 0 and says in err, (argv, err)
    assert fits == []  # refused before the data was read
    monkeypatch.undo()
    code, _, err = run(
        capsys, "train", "--data", str(data), "--algo", "popularity", "--name", "p",
        "--models", str(tmp_path / "new" / "models"),
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "new" / "models" / "p").is_dir()
