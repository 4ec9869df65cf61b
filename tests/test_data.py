"""Readers against small files in every supported format; bad input; synthetic data."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import numpy as np
import pytest

from recserve.data import (
    DataError,
    IdMap,
    build_csr,
    detect_format,
    generate,
    load_dataset,
    to_dataset,
    write_csv,
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".xz"):
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


def entries(ds) -> dict[tuple[str, str], float]:
    m = ds.interactions.tocoo()
    users, items = ds.users.ids(m.row), ds.items.ids(m.col)
    return {(u, i): float(v) for u, i, v in zip(users, items, m.data, strict=True)}


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
def test_ml100k(tmp_path, suffix):
    write(
        tmp_path / f"u.data{suffix}",
        "196\t242\t3\t881250949\n186\t302\t3.5\t891717742\n196\t302\t1\t881250950\n",
    )
    flags = ["0"] * 19
    action = flags.copy()
    action[1] = "1"
    write(
        tmp_path / "u.item",
        "242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(action) + "\n"
        "302|L.A. Confidential (1997)|01-Jan-1997||http://y|" + "|".join(flags) + "\n"
        "999|Caf\xe9 (1990)|01-Jan-1990||http://z|" + "|".join(action) + "\n",
        encoding="latin-1",
    )
    assert detect_format(tmp_path) == "ml-100k"
    ds = load_dataset(tmp_path)
    assert entries(ds) == {("196", "242"): 3.0, ("186", "302"): 3.5, ("196", "302"): 1.0}
    assert ds.n_items == 3  # 999 has metadata but no events: still an item
    j = ds.items.get("999")
    assert ds.item_titles[j] == "Café (1990)"
    assert ds.feature_names == ["Action"]
    assert ds.item_features[j].toarray().tolist() == [[1.0]]
    assert ds.item_features[ds.items.get("302")].nnz == 0
    assert sorted(ds.timestamps.tolist()) == [881250949, 881250950, 891717742]


@pytest.mark.parametrize("name", ["u1.base", "u5.test.xz", "ua.base.gz", "ub.test"])
def test_ml100k_split_files_read_as_u_data_with_its_item_metadata(tmp_path, name):
    # MovieLens 100k ships its own splits (u1.base ... ub.test) beside u.data and
    # u.item, in u.data's layout: they were "cannot tell the format".
    write(tmp_path / name, "196\t242\t3\t881250949\n186\t302\t4\t891717742\n")
    flags = ["0"] * 19
    write(tmp_path / "u.item", "242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(flags) + "\n")
    assert detect_format(tmp_path / name) == "ml-100k"
    ds = load_dataset(tmp_path / name)
    assert entries(ds) == {("196", "242"): 3.0, ("186", "302"): 4.0}
    assert ds.item_titles[ds.items.get("242")] == "Kolya (1996)"
    assert sorted(ds.timestamps.tolist()) == [881250949, 891717742]
    # Named by its folder and itself: u1.base and u1.test are two of ten parts.
    assert ds.name == f"{tmp_path.name}/{name.removesuffix('.xz').removesuffix('.gz')}"


def test_a_txt_ratings_file_is_read_as_delimited_text_and_others_are_named(tmp_path):
    f = write(tmp_path / "ratings.txt", "u1,i1,5,1700000000\nu2,i1,3,1700000001\n")
    assert detect_format(f) == "csv"
    assert entries(load_dataset(f)) == {("u1", "i1"): 5.0, ("u2", "i1"): 3.0}
    other = write(tmp_path / "ratings.json", "[]")
    with pytest.raises(DataError, match=r"cannot tell the format .*u1\.base\.\.ub\.test"):
        detect_format(other)


def test_ml1m_dat_with_colons_in_titles(tmp_path):
    write(
        tmp_path / "ratings.dat.gz",
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n",
    )
    write(
        tmp_path / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::Star Wars: Episode IV (1977)::Action|Sci-Fi\n",
        encoding="latin-1",
    )
    assert detect_format(tmp_path) == "ml-1m"
    assert detect_format(tmp_path / "ratings.dat.gz") == "ml-1m"
    ds = load_dataset(tmp_path)
    assert entries(ds) == {("1", "1193"): 5.0, ("1", "661"): 3.0, ("2", "1193"): 4.0}
    assert ds.item_titles[ds.items.get("661")] == "Star Wars: Episode IV (1977)"
    assert ds.feature_names == ["Action", "Drama", "Sci-Fi"]


@pytest.mark.parametrize("bad", ["1::661::3", "1:661:3:978302109"])
def test_a_malformed_ml1m_line_is_named_against_its_layout(tmp_path, bad):
    """ML-1M's '::' is read as ':' around empty fields, so a short line was
    "expected 7 columns, got 5" for a file of four fields; it is now shown
    against the layout it should have."""
    write(tmp_path / "ratings.dat", f"1::1193::5::978300760\n{bad}\n")
    with pytest.raises(DataError, match="expected UserID::MovieID::Rating::Timestamp") as info:
        load_dataset(tmp_path)
    assert info.value.line == 2 and bad in str(info.value)


def test_ml20m_csv_with_quoted_titles_and_tags(tmp_path):
    write(
        tmp_path / "ratings.csv.xz",
        "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n"
        "1,29,3.5,1112484676\n7,2,4.0,1112484819\n",
    )
    write(
        tmp_path / "movies.csv",
        'movieId,title,genres\n2,"Jumanji, The (1995)",'
        "Adventure|Children\n29,City (1995),(no genres listed)\n",
    )
    write(tmp_path / "tags.csv", "userId,movieId,tag,timestamp\n1,29,Dark ,1\n7,29,dark,2\n")
    assert detect_format(tmp_path) == "ml-20m"
    ds = load_dataset(tmp_path)
    assert entries(ds) == {("1", "2"): 3.5, ("1", "29"): 3.5, ("7", "2"): 4.0}
    assert ds.item_titles[ds.items.get("2")] == "Jumanji, The (1995)"
    feats = dict(
        zip(ds.feature_names, ds.item_features[ds.items.get("29")].toarray()[0], strict=True)
    )
    assert feats["tag:dark"] == 2.0 and feats["Adventure"] == 0.0


def test_goodbooks(tmp_path):
    write(tmp_path / "ratings.csv", "user_id,book_id,rating\n1,258,5\n2,4081,4\n2,258,5\n")
    write(tmp_path / "books.csv", "book_id,goodreads_book_id,title\n258,1,A Book\n4081,2,Another\n")
    write(
        tmp_path / "book_tags.csv",
        "goodreads_book_id,tag_id,count\n1,30574,167697\n1,11305,37174\n2,30574,10\n",
    )
    write(tmp_path / "tags.csv", "tag_id,tag_name\n11305,fantasy\n30574,to-read\n")
    assert detect_format(tmp_path) == "goodbooks"
    ds = load_dataset(tmp_path)
    assert not ds.has_timestamps
    assert entries(ds) == {("1", "258"): 5.0, ("2", "4081"): 4.0, ("2", "258"): 5.0}
    row = ds.item_features[ds.items.get("258")].toarray()[0]
    assert dict(zip(ds.feature_names, row, strict=True)) == {
        "fantasy": 37174.0,
        "to-read": 167697.0,
    }


def test_generic_csv_with_items_and_optional_columns(tmp_path):
    write(tmp_path / "interactions.csv", "user_id,item_id\nalice,x\nbob,y\nalice,y\n")
    write(tmp_path / "items.csv", "item_id,title,tags\nx,Ex,a|b\nz,Zed,b\n")
    ds = load_dataset(tmp_path)
    assert entries(ds) == {("alice", "x"): 1.0, ("bob", "y"): 1.0, ("alice", "y"): 1.0}
    assert ds.items.ids(range(ds.n_items)) == ["x", "y", "z"]
    assert ds.feature_names == ["a", "b"]
    assert load_dataset(tmp_path / "interactions.csv", fmt="csv").nnz == 3


@pytest.mark.parametrize(
    "body",
    [
        "user_id, item_id, rating\nalice, x, 4\nbob, y, 2\n",  # a space after each comma
        "User_ID,Item_ID,Rating\nalice,x,4\nbob,y,2\n",  # another case
        '"USER_ID" , "item_id" ,rating\nalice,x,4\nbob,y,2\n',  # quoted, spaced, upper
        "user_id\titem_id\trating\nalice\tx\t4\nbob\ty\t2\n",  # tab-separated
        "user_id;item_id;rating\nalice;x;4\nbob;y;2\n",  # semicolons
        "\ufeffuser_id,item_id,rating\r\nalice,x,4\r\nbob,y,2\r\n",  # BOM, CRLF
    ],
)
def test_generic_csv_as_spreadsheets_write_it(tmp_path, body):
    # Exports from spreadsheets and databases differ in header case, spaces and
    # delimiter; the ids must come out the same ("x", never " x"), or requests
    # naming them would never match.
    ds = load_dataset(write(tmp_path / "interactions.csv", body))
    assert entries(ds) == {("alice", "x"): 4.0, ("bob", "y"): 2.0}
    # items.csv beside it may be written the same way
    delimiter = "\t" if "\t" in body else (";" if ";" in body else ",")
    write(
        tmp_path / "items.csv",
        f"Item_ID{delimiter} Title{delimiter}tags\nx{delimiter} Ex{delimiter}a|b\n",
    )
    ds = load_dataset(tmp_path)
    assert ds.feature_names == ["a", "b"] and entries(ds)[("alice", "x")] == 4.0


def stamps(ds) -> dict[tuple[str, str], int]:
    m = ds.interactions
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    users, items = ds.users.ids(rows), ds.items.ids(m.indices)
    return {(u, i): int(t) for u, i, t in zip(users, items, ds.timestamps, strict=True)}


@pytest.mark.parametrize(
    "body",
    [
        "user,item,rating,timestamp\nalice,x,4,100\nbob,y,2,200\n",  # the brief's own words
        "userId,itemId,rating,timestamp\nalice,x,4,100\nbob,y,2,200\n",
        "UID;SKU;Score;TS\nalice;x;4;100\nbob;y;2;200\n",
        "customer_id\tproduct_id\tquantity\tevent_time\nalice\tx\t4\t100\nbob\ty\t2\t200\n",
        "alice,x,4,100\nbob,y,2,200\n",  # no header: user,item,rating,timestamp
        "alice|x|4.0|100\nbob|y|2|200\n",
    ],
)
def test_generic_csv_finds_columns_by_common_names(tmp_path, body):
    # Exports name their columns in many ways; the common ones are found as
    # Parquet's are, and a file without a header is read by position.
    ds = load_dataset(write(tmp_path / "events.csv", body))
    assert entries(ds) == {("alice", "x"): 4.0, ("bob", "y"): 2.0}
    assert stamps(ds) == {("alice", "x"): 100, ("bob", "y"): 200}
    assert ds.has_timestamps


@pytest.mark.parametrize(
    ("name", "body"),
    [
        # Last.fm (hetrec): a tab-separated .dat with a header, play counts as weight
        ("user_artists.dat", "userID\tartistID\tweight\nalice\tx\t4\nbob\ty\t2\n"),
        # Book-Crossing: semicolons, every field quoted
        ("BX-Book-Ratings.csv", '"User-ID";"ISBN";"Book-Rating"\n"alice";"x";"4"\n"bob";"y";"2"\n'),
        # Amazon reviews, Yelp, a shop export
        ("reviews.csv", "reviewerID,asin,overall,unixReviewTime\nalice,x,4,100\nbob,y,2,200\n"),
        (
            "yelp.csv",
            "user_id,business_id,stars,date\nalice,x,4,1970-01-01T00:01:40Z\nbob,y,2,200\n",
        ),
        ("orders.csv", "customer,product,quantity,created_at\nalice,x,4,100\nbob,y,2,200\n"),
        ("plays.tsv", "user_id\ttrack_id\tplay_count\nalice\tx\t4\nbob\ty\t2\n"),
    ],
)
def test_public_datasets_own_column_names_are_found(tmp_path, name, body):
    # They were "no user column" (or, for a .dat, "expected 7 columns": read as
    # MovieLens 1M's "::" layout).
    ds = load_dataset(write(tmp_path / name, body))
    assert entries(ds) == {("alice", "x"): 4.0, ("bob", "y"): 2.0}
    if "100" in body:
        assert stamps(ds) == {("alice", "x"): 100, ("bob", "y"): 200}


def test_latin_1_text_is_read_as_latin_1(tmp_path):
    # Book-Crossing and many spreadsheet exports are Latin-1: pyarrow's "invalid
    # UTF8 data" escaped as an ArrowInvalid naming neither file nor line.
    body = '"User-ID";"ISBN";"Book-Rating"\n"Jos\xe9";"x";"4"\n"bob";"y";"2"\n'
    path = tmp_path / "ratings.csv"
    path.write_bytes(body.encode("latin-1"))
    assert entries(load_dataset(path)) == {("José", "x"): 4.0, ("bob", "y"): 2.0}
    path.write_bytes(body.encode("utf-8"))  # the same text as UTF-8 reads the same
    assert entries(load_dataset(path)) == {("José", "x"): 4.0, ("bob", "y"): 2.0}


def test_a_folder_with_one_csv_is_that_dataset(tmp_path):
    write(tmp_path / "events.csv.gz", "userId,movieId,rating\nalice,x,4\nbob,y,2\n")
    write(tmp_path / "items.csv", "item_id,title\nx,Ex\n")
    ds = load_dataset(tmp_path)
    assert entries(ds) == {("alice", "x"): 4.0, ("bob", "y"): 2.0}
    assert list(ds.item_titles) == ["Ex", ""]
    write(tmp_path / "more.csv", "user,item\na,b\n")  # two candidates: which one is unclear
    with pytest.raises(DataError, match=r"no known dataset here.*one other \.csv"):
        load_dataset(tmp_path)


def test_fractional_seconds_are_floored(tmp_path):
    # Exports often write epoch seconds as floats (pandas does once a value is missing).
    body = "user,item,ts\na,x,1600000000.75\na,y,1.6e9\nb,x,-0.5\nb,y,17\nc,x, +2.0 \n"
    ds = load_dataset(write(tmp_path / "log.csv", body))
    assert stamps(ds) == {
        ("a", "x"): 1600000000,
        ("a", "y"): 1600000000,
        ("b", "x"): -1,  # floored, as numpy's floor (and an ISO time's fraction)
        ("b", "y"): 17,
        ("c", "x"): 2,
    }
    mixed = "user,item,ts\na,x,2026-01-02\na,y,1767312000.5\n"
    assert set(stamps(load_dataset(write(tmp_path / "mixed.csv", mixed))).values()) == {1767312000}


@pytest.mark.parametrize(
    "scale, unit",
    [(1, None), (1000, "milliseconds"), (10**6, "microseconds"), (10**9, "nanoseconds")],
)
def test_epoch_timestamps_in_finer_units_are_read_as_seconds(tmp_path, caplog, scale, unit):
    # Kafka and JavaScript log milliseconds since 1970, Spark micro- or nanoseconds:
    # read as seconds, popularity's half-life in days would mean a thousand times less.
    seconds = [1767312000, 1767312001, 1767398400]
    body = "user,item,ts\n" + "".join(
        f"u{n},i{n},{s * scale + scale // 2}\n" for n, s in enumerate(seconds)
    )
    with caplog.at_level("WARNING", logger="recserve.data.readers"):
        ds = load_dataset(write(tmp_path / "log.csv", body))
    assert sorted(ds.timestamps.tolist()) == seconds
    warned = [r.getMessage() for r in caplog.records if "since 1970" in r.getMessage()]
    if unit is None:
        assert warned == []
    else:
        assert len(warned) == 1 and f"read as {unit}" in warned[0]


def test_generic_csv_iso_dates_and_a_column_mapping(tmp_path):
    body = (
        "who,what,qty,when\n"
        "a,x,1,2026-01-02\n"  # a date: midnight UTC
        "a,y,2,2026-01-02T10:00:00Z\n"
        "b,x,3,2026-01-02 10:00:00+02:00\n"
        "b,y,4, 2026-01-02T10:00:30.9 \n"  # no zone: UTC; fractions dropped
        "c,x,5,2026-01-02t10:00:00.123456789z\n"  # RFC 3339's lower case, nanoseconds
        "c,y,6,2026-01-02T10:00\n"
    )
    path = write(tmp_path / "log.csv", body)
    with pytest.raises(DataError, match=r"line 1: no user column.*--columns user=NAME"):
        load_dataset(path)
    ds = load_dataset(path, columns="user=who,item=what,value=qty,timestamp=when")
    assert entries(ds) == {
        ("a", "x"): 1.0,
        ("a", "y"): 2.0,
        ("b", "x"): 3.0,
        ("b", "y"): 4.0,
        ("c", "x"): 5.0,
        ("c", "y"): 6.0,
    }
    day = 1767312000  # 2026-01-02T00:00:00Z
    assert stamps(ds) == {
        ("a", "x"): day,
        ("a", "y"): day + 36000,
        ("b", "x"): day + 28800,
        ("b", "y"): day + 36030,
        ("c", "x"): day + 36000,
        ("c", "y"): day + 36000,
    }
    with pytest.raises(DataError, match=r"missing column 'qty2' \(value\); columns are who"):
        load_dataset(path, columns="user=who,item=what,value=qty2")
    with pytest.raises(ValueError, match="csv or parquet, not ml-100k"):
        load_dataset(path, fmt="ml-100k", columns="user=who")


def test_duplicates_last_or_sum():
    u = np.array([0, 0, 0, 1])
    i = np.array([1, 1, 1, 0])
    v = np.array([1.0, 5.0, 3.0, 2.0])
    ts = np.array([10, 30, 20, 5])
    last, kept = build_csr(u, i, v, ts, 2, 2)
    assert last.toarray().tolist() == [[0, 5], [2, 0]]  # latest timestamp wins, not file order
    assert sorted(kept.tolist()) == [5, 30]
    summed, _ = build_csr(u, i, v, ts, 2, 2, duplicates="sum")
    assert summed.toarray().tolist() == [[0, 9], [2, 0]]


def test_an_implicit_logs_repeated_events_are_counted(tmp_path, caplog):
    # Without a value column every row is one event: a pair clicked three times
    # is worth 3, not 1 (which "keep the latest" made of it). With values, a
    # repeated pair is a revised rating: the latest is kept. Either is forced
    # with duplicates= (the CLI's --duplicates).
    clicks = write(tmp_path / "clicks.csv", "user,item,ts\na,x,1\na,x,2\nb,y,3\na,x,4\nb,x,5\n")
    with caplog.at_level("INFO", logger="recserve.data.readers"):
        ds = load_dataset(clicks)
    assert entries(ds) == {("a", "x"): 3.0, ("b", "y"): 1.0, ("b", "x"): 1.0}
    assert stamps(ds)[("a", "x")] == 4
    assert "2 repeated (user, item) events added up (counts)" in caplog.text
    assert entries(load_dataset(clicks, duplicates="last"))[("a", "x")] == 1.0
    rated = write(tmp_path / "rated.csv", "user,item,rating,ts\na,x,2,1\na,x,5,2\nb,y,4,3\n")
    assert entries(load_dataset(rated)) == {("a", "x"): 5.0, ("b", "y"): 4.0}
    assert entries(load_dataset(rated, duplicates="sum"))[("a", "x")] == 7.0
    with pytest.raises(ValueError, match="duplicates: expected 'last' or 'sum', got 'max'"):
        load_dataset(rated, duplicates="max")


@pytest.mark.parametrize(
    "body, line, message",
    [
        ("user_id,rating\n1,2\n", 1, "no item column.*item_id.*--columns item="),
        ("user_id,item_id,rating\n1,2,3\n1,3,abc\n", 3, "rating: 'abc' is not a number"),
        ("user_id,item_id,rating\n1,2,3\nuser_id,item_id,rating\n", 3, "repeated header"),
        ("user_id,item_id,user_id\n1,2,3\n", 1, "duplicate column.*user_id"),
        ("user_id,item_id,rating\n1,2,3\n1,3\n", 3, "expected 3 columns, got 2"),
        ("user_id,item_id,rating\n1,2,nan\n", 2, "non-finite rating"),
        # Near float32's limit every score of a model summing them was +inf.
        ("user_id,item_id,rating\n1,2,1e30\n1,3,-3e38\n", 3, r"rating -3e\+38 beyond \+-1e\+30"),
        ("user_id,item_id,rating\n1,,4\n", 2, "empty item_id"),
        ("user_id,item_id,rating\n1,2,\n", 2, "missing value in column rating"),
        (
            "user_id,item_id,rating,timestamp\n1,2,3,4.5\n1,3,3,4.5.6\n",
            3,
            "timestamp: '4.5.6' is not seconds or an ISO 8601",
        ),
        ("user_id,item_id,rating,timestamp\n1,2,3,4\n1,3,3,1e30\n", 3, "1e\\+30 is out of range"),
        # An integer int64 cannot hold: pyarrow's own message named no line.
        ("user,item,ts\na,x,5\nb,y,99999999999999999999999\n", 3, "'9+' is out of range"),
        # Ids are stored as fixed-width bytes, where NUL ends them: the event
        # matched no id and bincount failed ("no negative elements").
        ("user_id,item_id,rating\n1,2,3\n\x00\x01,3,4\n", 3, "user_id holds a NUL byte"),
        ("user_id,item_id,rating\n1,2,3\n1,x\x00,4\n", 3, "item_id holds a NUL byte"),
        ("user_id,item_id,rating\n", 2, "no data rows"),
        ("user,item,rating,ts\n1,2,3,2026-01-02\n1,3,4,yesterday\n", 3, "'yesterday' is not"),
        ("user,item,rating,ts\n1,2,3,2026-13-02\n", 2, "'2026-13-02' is not"),
        ("user,item,ts\na,x,+5\nb,y,2026-01-02\nc,z,x5\n", 4, "'x5' is not seconds"),
        ("buyer,thing,qty\n1,2,3\n", 1, "no user column.*customer_id.*--columns"),
        ("alice,x\nbob,y\n", 1, r"no user column.*needs one \(user,item"),  # no header
    ],
)
def test_bad_input_names_file_line_and_problem(tmp_path, body, line, message):
    path = write(tmp_path / "ratings.csv", body)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(path, fmt="csv")
    assert info.value.line == line
    assert str(path) in str(info.value)


def test_empty_file_and_unknown_layout(tmp_path):
    path = write(tmp_path / "ratings.csv", "")
    with pytest.raises(DataError, match="empty"):
        load_dataset(path, fmt="csv")
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="no known dataset"):
        load_dataset(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing")


def test_idmap_lookups():
    ids = IdMap.from_ids(["b", "a", "ü", "10", "2", "a"])
    assert len(ids) == 5
    assert ids.ids(ids.index(["ü", "a", "10"])) == ["ü", "a", "10"]
    assert ids.index(["zz", "", "a\x00"]).tolist() == [-1, -1, -1]
    assert IdMap.from_ids([]).index(["a"]).tolist() == [-1]


def test_idmap_lookups_of_ids_longer_than_any_stored():
    # A key wider than the map's dtype cannot be in it; the lookups answer -1 for
    # it (without widening the map) and still find the keys that fit beside it.
    rng = np.random.default_rng(0)
    stored = sorted({str(int(u)) for u in rng.integers(1, 5000, 300)} | {"ü1"})
    ids = IdMap.from_ids(stored)
    where = {k: i for i, k in enumerate(sorted(stored, key=lambda k: k.encode()))}
    asked = ["new-user-123", stored[5], "ü1", "99999999", stored[-1], "ü12", "", "4\x00"]
    want = [where.get(k, -1) if k and not k.endswith("\x00") else -1 for k in asked]
    assert ids.index(asked).tolist() == want
    assert [ids.get(k) for k in asked] == want
    encoded = np.array([k.encode() for k in asked[:6]], dtype="S")
    assert ids.index(encoded).tolist() == want[:6]
    assert ids.index(["new-user-123"]).tolist() == [-1]


@pytest.mark.parametrize("width", [4, 40, 300])
def test_idmap_str_lookups_equal_a_dict_on_a_mapped_map(tmp_path, width):
    # index()/get() of str ids run a binary search over the map's fixed-width
    # rows (kernels.wire.lookup); a dict of the stored ids is the reference, and
    # the map is memory-mapped as in a bundle. Ids up to `width` bytes (300: past
    # the kernel's 256-byte stack buffer), with non-ASCII characters, NULs inside
    # (stored) and at the end (never stored, never found), and empty keys.
    rng = np.random.default_rng(width)
    alphabet = ["a", "b", "z", "0", "9", "ü", "\x00", "-", "日"]

    def some_id(most: int) -> str:
        n = int(rng.integers(1, most + 1))
        s = "".join(alphabet[int(j)] for j in rng.integers(0, len(alphabet), n))
        return s.rstrip("\x00") or "x"

    stored = sorted({some_id(max(1, width // 3)) for _ in range(500)})
    stored = [s for s in stored if len(s.encode()) <= width]
    np.save(tmp_path / "ids.npy", IdMap.from_ids(stored).array)
    ids = IdMap(np.load(tmp_path / "ids.npy", mmap_mode="r"))
    where = {k: i for i, k in enumerate(sorted(stored, key=lambda k: k.encode()))}
    asked = stored[::3] + [some_id(width) for _ in range(300)] + ["", "a\x00", "ü\x00\x00"]
    asked += ["y" * (width + 1), stored[0] + "\x00"]
    want = [where.get(k, -1) for k in asked]
    assert ids.index(asked).tolist() == want
    assert [ids.get(k) for k in asked] == want
    assert ids.index(np.array(asked, dtype=object)).tolist() == want
    assert ids.index(iter(asked[:10])).tolist() == want[:10]
    # Bytes keys keep numpy's search (bundles, importers): the same answers for
    # keys without trailing NULs.
    plain = [k for k in asked if not k.endswith("\x00") and k]
    encoded = np.array([k.encode() for k in plain], dtype="S")
    assert ids.index(encoded).tolist() == [where.get(k, -1) for k in plain]


def test_synthetic_is_deterministic_long_tailed_and_round_trips(tmp_path):
    a, b = generate(800, 400, 20_000, seed=5), generate(800, 400, 20_000, seed=5)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert not np.array_equal(a.items, generate(800, 400, 20_000, seed=6).items)
    ds = to_dataset(a)
    assert ds.nnz == 20_000 and np.diff(ds.interactions.indptr).min() >= 1
    counts = np.sort(np.bincount(ds.interactions.indices, minlength=ds.n_items))[::-1]
    assert counts[: ds.n_items // 10].sum() > 0.3 * ds.nnz  # top 10% of items: > 30% of events
    assert set(np.unique(ds.interactions.data)) <= {1, 2, 3, 4, 5}
    back = load_dataset(write_csv(a, tmp_path / "syn"))
    assert back.users == ds.users and back.items == ds.items
    assert (back.interactions != ds.interactions).nnz == 0
    np.testing.assert_array_equal(back.timestamps, ds.timestamps)
    assert (back.item_features != ds.item_features).nnz == 0


@pytest.mark.parametrize("users,items,events", [(200, 15, 1_500), (40, 60, 1_200), (3, 4, 6)])
def test_synthetic_fills_a_dense_matrix_up_to_half(users, items, events):
    """Narrow tastes saturate a dense request (users run out of items in their
    genres): it still gets exactly the events asked for, distinct, every user
    with one, the same for the same seed (it raised RuntimeError before)."""
    a = generate(users, items, events, seed=3)
    keys = a.users * items + a.items
    assert keys.size == events and np.unique(keys).size == events
    assert np.bincount(a.users, minlength=users).min() >= 1
    assert a.items.max() < items
    np.testing.assert_array_equal(
        keys, (lambda b: b.users * items + b.items)(generate(users, items, events, seed=3))
    )
    with pytest.raises(ValueError, match="more than half"):
        generate(users, items, events + 1, seed=3)


def test_synthetic_carries_collaborative_signal(small):
    """A plain numpy item-cosine kNN beats popularity on held-out events."""
    m = small.interactions.tocsr()
    rng = np.random.default_rng(0)
    test = np.zeros(m.shape, bool)
    train = (m > 0).toarray().astype(np.float64)
    for u in range(m.shape[0]):
        items = m.indices[m.indptr[u] : m.indptr[u + 1]]
        if items.size >= 4:
            held = rng.choice(items, items.size // 4, replace=False)
            test[u, held], train[u, held] = True, 0
    norms = np.sqrt(train.sum(0)) + 1e-9
    sim = (train.T @ train) / np.outer(norms, norms)
    np.fill_diagonal(sim, 0)

    def recall(scores):
        scores = np.where(train > 0, -np.inf, scores)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        hits = np.take_along_axis(test, top, 1).sum(1)
        n = np.minimum(test.sum(1), 10)
        return float((hits[n > 0] / n[n > 0]).mean())

    knn, pop = recall(train @ sim), recall(np.broadcast_to(train.sum(0), train.shape))
    assert knn > 1.3 * pop, (knn, pop)


@pytest.mark.parametrize(
    "rel, want",
    [
        ("exports/clicks.csv", "clicks"),
        ("exports/clicks.csv.gz", "clicks"),
        ("ml-1m/ratings.dat", "ml-1m"),
        ("goodbooks-10k/ratings.csv", "goodbooks-10k"),
        ("shop/interactions.csv", "shop"),
        ("ml-100k/u.data", "ml-100k"),
    ],
)
def test_a_dataset_is_named_by_its_file_unless_the_file_stands_for_its_folder(tmp_path, rel, want):
    # A generic CSV in a folder of exports was named after the folder ("exports"):
    # in evaluate's report, train's log and the bundle's manifest.
    f = tmp_path / rel
    if rel.endswith("u.data"):
        write(f, "196\t242\t3\t881250949\n186\t302\t4\t891717742\n")
    elif rel.endswith("ratings.dat"):
        write(f, "1::10::5::978300760\n2::10::3::978300761\n")
    elif rel.startswith("goodbooks"):
        write(f, "user_id,book_id,rating\n1,10,5\n2,10,3\n")
    else:
        write(f, "user,item,rating\n1,10,5\n2,10,3\n")
    assert load_dataset(f).name == want
    assert load_dataset(f.parent).name == f.parent.name


def test_relative_paths_name_the_dataset_as_absolute_ones_do(tmp_path, monkeypatch):
    # `recserve train --data .` published a manifest whose dataset name was "".
    folder = tmp_path / "shop"
    write(folder / "interactions.csv", "user,item\n1,10\n2,10\n")
    write(folder / "ml-100k" / "u1.base", "196\t242\t3\t881250949\n")
    monkeypatch.chdir(folder)
    assert load_dataset(".").name == "shop"
    assert load_dataset("interactions.csv").name == "shop"
    monkeypatch.chdir(folder / "ml-100k")
    assert load_dataset("..").name == "shop"
    assert load_dataset("u1.base").name == "ml-100k/u1.base"
    assert load_dataset("./u1.base").name == "ml-100k/u1.base"
