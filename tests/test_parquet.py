"""Parquet event logs: a file, a folder of part files, Spark/Hive partition
folders, a column mapping, and bad files refused with the file (and row) named.
Every read is checked against the same events read from the generic CSV."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recserve.cli import main
from recserve.data import DataError, generate, load_dataset, write_csv


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    """A synthetic log as a table (user_id, item_id, rating, timestamp) and as CSV."""
    s = generate(300, 120, 6000, seed=5)
    folder = tmp_path_factory.mktemp("csv")
    csv = write_csv(s, folder)
    ds = load_dataset(csv)
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(
        str(next(folder.glob("interactions.csv*"))),
        convert_options=pacsv.ConvertOptions(
            column_types={"user_id": pa.string(), "item_id": pa.string()}
        ),
    )
    return table, ds


def same(a, b):
    assert a.users.ids(np.arange(a.n_users)) == b.users.ids(np.arange(b.n_users))
    assert a.items.ids(np.arange(a.n_items)) == b.items.ids(np.arange(b.n_items))
    assert (a.interactions != b.interactions).nnz == 0
    np.testing.assert_array_equal(a.timestamps, b.timestamps)


def test_one_file_equals_the_csv(tmp_path, events):
    table, want = events
    pq.write_table(table, tmp_path / "events.parquet")
    got = load_dataset(tmp_path / "events.parquet")  # format detected from the name
    same(got, want)
    assert got.has_timestamps


def test_partitioned_folder_and_column_mapping(tmp_path, events):
    table, want = events
    renamed = table.rename_columns(["buyer", "product", "qty", "ts"])
    n = renamed.num_rows
    days = pa.array(["2026-11-30" if i < n // 2 else "2026-12-01" for i in range(n)])
    root = tmp_path / "log"
    pq.write_to_dataset(renamed.append_column("dt", days), root, partition_cols=["dt"])
    (root / "_SUCCESS").write_text("")  # Spark's marker files are skipped
    assert sorted(p.name for p in root.iterdir()) == ["_SUCCESS", "dt=2026-11-30", "dt=2026-12-01"]
    got = load_dataset(root, columns="user=buyer,item=product,value=qty,timestamp=ts")
    same(got, want)
    with pytest.raises(DataError, match=r"no user column \(looked for user_id"):
        load_dataset(root)  # buyer is no default name: the mapping is needed


def test_integer_ids_and_timestamp_columns(tmp_path):
    t = pa.table(
        {
            "user_id": pa.array([1, 2, 2], pa.int64()),
            "item_id": pa.array([10, 10, 11], pa.int32()),
            "timestamp": pa.array([1_700_000_000_500, 1_700_000_001_000, 5], pa.timestamp("ms")),
        }
    )
    pq.write_table(t, tmp_path / "a.parquet")
    ds = load_dataset(tmp_path / "a.parquet")
    assert ds.users.ids(np.arange(2)) == ["1", "2"] and ds.n_items == 2
    assert sorted(ds.timestamps.tolist()) == [0, 1_700_000_000, 1_700_000_001]
    assert ds.interactions.data.tolist() == [1.0, 1.0, 1.0]  # no value column: 1 each

    # ISO 8601 text, as a CSV export turned into Parquet keeps it
    text = pa.table({"user": ["a", "b"], "item": ["x", "x"], "time": ["1970-01-02", "5"]})
    pq.write_table(text, tmp_path / "b.parquet")
    assert sorted(load_dataset(tmp_path / "b.parquet").timestamps.tolist()) == [5, 86400]

    # float seconds (floored) and decimal values, as pandas and SQL exports write them
    floats = pa.table(
        {
            "user": ["a", "b", "c"],
            "item": ["x", "x", "y"],
            "rating": pa.array(
                [Decimal("3.5"), Decimal("4.0"), Decimal("-1.25")], pa.decimal128(4, 2)
            ),
            "ts": pa.array([1_600_000_000.75, 5.0, -0.5], pa.float64()),
        }
    )
    pq.write_table(floats, tmp_path / "c.parquet")
    ds = load_dataset(tmp_path / "c.parquet")
    assert sorted(ds.timestamps.tolist()) == [-1, 5, 1_600_000_000]
    assert sorted(ds.interactions.data.tolist()) == [-1.25, 3.5, 4.0]


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        (pa.table({"user_id": ["a"], "item_id": ["x"], "rating": ["five"]}), "expected numbers"),
        (pa.table({"user_id": ["a"], "product": ["x"]}), r"missing column 'item_id' \(item\)"),
        (pa.table({"user_id": ["a", None], "item_id": ["x", "y"]}), "row 2: missing value"),
        (pa.table({"user_id": ["a", "b"], "item_id": ["x", ""]}), "row 2: empty item_id"),
        (pa.table({"user_id": ["a"], "item_id": ["x"], "rating": [np.nan]}), "row 1: non-finite"),
        (pa.table({"user_id": ["a"], "item_id": ["x"], "rating": [3e38]}), "row 1: rating 3e"),
        (pa.table({"user_id": [1.5], "item_id": ["x"]}), "ids must be strings or integers"),
        (
            pa.table({"user_id": ["a"], "item_id": ["x"], "ts": ["noon"]}),
            "row 1: column ts: 'noon'",
        ),
        (pa.table({"user_id": ["a"], "item_id": ["x"], "ts": [np.inf]}), "row 1: non-finite ts"),
        (pa.table({"user_id": ["a"], "item_id": ["x"], "ts": [1e30]}), "row 1: column ts: 1e"),
    ],
    ids=[
        "text-value",
        "no-item",
        "null",
        "empty-id",
        "nan",
        "huge-value",
        "float-id",
        "text-time",
        "inf-time",
        "huge-time",
    ],
)
def test_bad_files_name_the_file(tmp_path, table, needle):
    folder = tmp_path / "log"
    folder.mkdir()
    valid = {"user_id": "u", "item_id": "i", "product": "i", "rating": 1.0, "ts": 5}
    names = dict.fromkeys(["user_id", "item_id", *table.column_names])
    good = pa.table({c: [valid[c]] for c in names if c != "product"})  # fine values
    pq.write_table(good, folder / "part-0.parquet")
    pq.write_table(table, folder / "part-1.parquet")
    mapping = "timestamp=ts" if "ts" in table.column_names else None
    with pytest.raises(DataError, match=needle) as info:
        load_dataset(folder, "parquet", columns=mapping)
    assert str(folder / "part-1.parquet") in str(info.value)


@pytest.mark.parametrize("value", [pa.float64(), pa.float32(), pa.int64(), None])
def test_a_file_without_rows_is_no_data_not_a_crash(tmp_path, value):
    # 0 rows with a float column made check_values index row -1 (IndexError);
    # an empty file among others is only skipped.
    cols = {"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string())}
    if value is not None:
        cols["rating"] = pa.array([], value)
    pq.write_table(pa.table(cols), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="no data rows"):
        load_dataset(tmp_path / "empty.parquet")
    folder = tmp_path / "log"
    folder.mkdir()
    pq.write_table(pa.table(cols), folder / "part-0.parquet")
    rows = {"user_id": ["a", "b"], "item_id": ["x", "y"]}
    if value is not None:
        rows["rating"] = pa.array([1, 2], value)
    pq.write_table(pa.table(rows), folder / "part-1.parquet")
    assert load_dataset(folder, "parquet").interactions.nnz == 2


def test_a_corrupt_file_is_named(tmp_path):
    folder = tmp_path / "log"
    folder.mkdir()
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i"]}), folder / "part-0.parquet")
    (folder / "part-1.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    with pytest.raises(DataError, match="not a readable Parquet") as info:
        load_dataset(folder, "parquet")
    assert "part-1.parquet" in str(info.value) or str(folder) in str(info.value)


def test_a_mapping_is_checked(tmp_path, events):
    table, _ = events
    pq.write_table(table, tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"missing column 'uid' \(user\)"):
        load_dataset(tmp_path / "e.parquet", columns="user=uid")
    with pytest.raises(ValueError, match="columns: 'who=uid'"):
        load_dataset(tmp_path / "e.parquet", columns="who=uid")
    with pytest.raises(ValueError, match="applies to --format csv or parquet, not ml-1m"):
        load_dataset(tmp_path / "e.parquet", "ml-1m", columns="user=user_id")


def test_cli_trains_from_parquet_with_a_mapping(tmp_path, events, capsys):
    table, _ = events
    pq.write_table(table.rename_columns(["uid", "sku", "qty", "ts"]), tmp_path / "e.parquet")
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "e.parquet"),
            "--columns",
            "user=uid,item=sku,value=qty,timestamp=ts",
            "--algo",
            "popularity",
            "--name",
            "pop",
            "--models",
            str(tmp_path / "models"),
            "--no-evaluate",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "models" / "pop" / "current").is_file()
