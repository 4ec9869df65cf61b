"""`recserve models prune` and `rollback`: old versions go, the current one and
the newest others stay; a rollback points `current` at a verified older
version, which a running server serves after its next reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recserve.cli import main
from recserve.data import generate, to_dataset
from recserve.models import bundle, create
from recserve.v1 import recommender_pb2 as pb
from tests.service_helpers import flip_byte, running


@pytest.fixture(scope="module")
def data():
    return to_dataset(generate(120, 60, 2_000, seed=4), name="prune")


def publish(data, models: Path, name: str, n: int) -> list[str]:
    """n versions of one popularity model, oldest first; the last is current."""
    out = []
    for i in range(n):
        m = create("popularity", weighting="count" if i % 2 else "value").fit(data)
        out.append(m.save(models, name).name)
    return out


def cli(capsys, *argv) -> tuple[int, dict, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if out.strip() else {}), err


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_prune_keeps_the_current_and_the_newest_others(data, tmp_path, capsys):
    models = tmp_path / "m"
    pop = publish(data, models, "pop", 5)
    knn = [create("itemknn").fit(data).save(models, "knn").name]
    (models / "pop" / ".tmp-crashed-publish").mkdir()  # a publish in progress: never touched
    sizes = {v: folder_bytes(models / "pop" / v) for v in pop}

    code, dry, _ = cli(capsys, "models", "prune", "--models", models, "--keep", 2, "--dry-run")
    assert code == 0 and dry["dry_run"] is True
    assert bundle.versions(models / "pop") == pop  # nothing deleted
    by_name = {m["name"]: m for m in dry["models"]}
    assert [r["version"] for r in by_name["pop"]["removed"]] == pop[:2]
    assert by_name["knn"] == {"name": "knn", "current": knn[0], "kept": knn, "removed": []}
    assert dry["freed_bytes"] == sizes[pop[0]] + sizes[pop[1]]

    code, done, _ = cli(capsys, "models", "prune", "--models", models, "--keep", 2)
    assert (
        code == 0 and done["models"] == dry["models"] and done["freed_bytes"] == dry["freed_bytes"]
    )
    assert bundle.versions(models / "pop") == pop[2:]
    assert (models / "pop" / ".tmp-crashed-publish").is_dir()
    assert not [p for p in (models / "pop").iterdir() if p.name.startswith(".prune-")]
    assert bundle.current_version(models / "pop") == pop[-1]
    bundle.verify(bundle.resolve(models, "pop"))

    # after a rollback the current is an older version: it stays, and the newer
    # ones count among the kept
    cli(capsys, "models", "rollback", "--models", models, "--name", "pop")
    _, done, _ = cli(capsys, "models", "prune", "--models", models, "--name", "pop", "--keep", 0)
    assert done["models"][0]["kept"] == [pop[3]]
    assert bundle.versions(models / "pop") == [pop[3]]
    assert bundle.versions(models / "knn") == knn


def test_keeping_more_than_there_is_keeps_all(data, tmp_path):
    models = tmp_path / "m"
    pop = publish(data, models, "pop", 4)
    out = bundle.prune(models, "pop", keep=4)  # 3 others
    assert out["kept"] == pop and out["removed"] == []
    assert bundle.versions(models / "pop") == pop


def test_prune_refuses_what_it_cannot_do(data, tmp_path, capsys):
    models = tmp_path / "m"
    publish(data, models, "pop", 2)
    code, _, err = cli(capsys, "models", "prune", "--models", models, "--keep", -1)
    assert code == 2 and "keep: must be >= 0" in err
    code, _, err = cli(capsys, "models", "prune", "--models", models, "--name", "nope")
    assert code == 2 and "no model named 'nope'" in err
    (models / "pop" / "current").unlink()  # nothing published as current: nothing pruned
    with pytest.raises(bundle.BundleError, match="no current version"):
        bundle.prune(models, "pop", 0)
    assert len(bundle.versions(models / "pop")) == 2


def test_rollback_goes_to_a_verified_older_version(data, tmp_path, capsys, caplog):
    models = tmp_path / "m"
    pop = publish(data, models, "pop", 3)
    with caplog.at_level("INFO"):
        code, out, _ = cli(capsys, "models", "rollback", "--models", models, "--name", "pop")
    assert code == 0 and out == {"name": "pop", "from": pop[2], "to": pop[1]}
    assert "reload the server to serve it" in caplog.text
    assert bundle.current_version(models / "pop") == pop[1]
    # an explicit version, newer ones included
    _, out, _ = cli(capsys, "models", "rollback", "--models", models, "--name", "pop",
                    "--version", pop[2])  # fmt: skip
    assert out["to"] == pop[2]
    # a version that fails verification is refused; current stays
    flip_byte(models / "pop" / pop[0] / "scores.npy")
    code, _, err = cli(capsys, "models", "rollback", "--models", models, "--name", "pop",
                       "--version", pop[0])  # fmt: skip
    assert code == 2 and "sha256 differs" in err
    assert bundle.current_version(models / "pop") == pop[2]
    code, _, err = cli(capsys, "models", "rollback", "--models", models, "--name", "pop",
                       "--version", "20000101T000000000000Z")  # fmt: skip
    assert code == 2 and "missing" in err
    # nothing older than the oldest
    bundle.set_current(models, "pop", pop[1])
    cli(capsys, "models", "rollback", "--models", models, "--name", "pop")  # to pop[0]: corrupt
    assert bundle.current_version(models / "pop") == pop[1]
    bundle.set_current(models, "pop", pop[0])
    code, _, err = cli(capsys, "models", "rollback", "--models", models, "--name", "pop")
    assert code == 2 and "no version older" in err
    with pytest.raises(SystemExit) as exc:  # argparse: --name is required
        main(["models", "rollback", "--models", str(models)])
    assert exc.value.code == 2 and "--name" in capsys.readouterr().err


def test_a_running_server_serves_the_rolled_back_version_after_a_reload(data, tmp_path, capsys):
    models = tmp_path / "m"
    pop = publish(data, models, "pop", 3)
    with running(models) as srv:
        _, md = srv.recommend(user_id="1", model="pop")
        assert md["x-recserve-version"] == pop[2]
        # pruning what the server does not serve changes nothing for it
        cli(capsys, "models", "prune", "--models", models, "--keep", 1)
        assert bundle.versions(models / "pop") == pop[1:]
        _, md = srv.recommend(user_id="1", model="pop")
        assert md["x-recserve-version"] == pop[2]
        cli(capsys, "models", "rollback", "--models", models, "--name", "pop")
        _, md = srv.recommend(user_id="1", model="pop")
        assert md["x-recserve-version"] == pop[2]  # until the reload
        srv.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=30)
        items, md = srv.recommend(user_id="1", model="pop")
        assert md["x-recserve-version"] == pop[1] and items
