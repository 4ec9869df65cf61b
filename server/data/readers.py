"""Readers for public interaction-log formats, auto-detected from the path.

Formats: MovieLens 100K (u.data, u.item), 1M/10M (ratings.dat, movies.dat),
20M/25M/latest (ratings.csv, movies.csv, tags.csv), goodbooks-10k (ratings.csv,
books.csv, book_tags.csv + tags.csv), a generic CSV (user, item, optional value
and timestamp columns found by common names or named; optional items.csv with
item_id,title,genres|tags) and Parquet event logs (a file, or a folder of part
files, Spark/Hive partition folders such as dt=2026-11-30/ included).
Any CSV file may be gzip (.gz) or xz (.xz) compressed. Large files are parsed
by pyarrow's multithreaded readers, never a Python loop.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import lzma
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recserve.data.dataset import MAX_VALUE, Dataset, IdMap, build_csr, features_matrix
from recserve.data.formats import FORMATS, DataError, parse_columns

log = logging.getLogger(__name__)

COMPRESSED = (".gz", ".xz")
ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
_FLOAT_RE = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_INT_RE = r"^\s*[-+]?\d+\s*$"


@dataclass
class ItemMeta:
    """Item metadata from a side file: titles and tags (genres) per item id."""

    item_ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)
    weights: list[list[float]] | None = None


@dataclass
class Raw:
    """Interactions as read, before ids become dense indices."""

    users: pa.Array
    items: pa.Array
    values: np.ndarray
    timestamps: np.ndarray
    has_timestamps: bool
    # False for an implicit log (no value column: every row one event of value 1)
    has_values: bool = True


# ---------------------------------------------------------------------------
# files


def find_file(folder: Path, name: str) -> Path | None:
    """`folder/name`, or its .gz/.xz variant, if present."""
    for suffix in ("", *COMPRESSED):
        p = folder / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


SIDE_FILES = ("items.csv", "movies.csv", "tags.csv", "books.csv", "book_tags.csv")


def lone_csv(folder: Path) -> Path | None:
    """The folder's one delimited file (.csv/.tsv, maybe compressed) besides the
    known metadata files, if it has exactly one: `events.csv` alone is a dataset."""
    found = [
        f
        for f in folder.iterdir()
        if f.is_file()
        and base_name(f).endswith((".csv", ".tsv"))
        and base_name(f) not in SIDE_FILES
        and not f.name.startswith(".")
    ]
    return found[0] if len(found) == 1 else None


# Files that stand for their folder's dataset (ml-100k/u.data, ml-1m/ratings.dat,
# goodbooks-10k/ratings.csv): such a file is named by its folder, any other file
# by itself (exports/clicks.csv.gz is "clicks", not "exports").
FOLDER_FILES = frozenset({"u.data", "ratings.dat", "ratings.csv", "interactions.csv"})


def _dataset_name(path: Path) -> str:
    """A dataset's name in logs, reports and manifests. Taken from the absolute
    path, `.` and `..` spelled out (`--data .` was named ""), symlinks kept."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        return path.name or "dataset"
    base = base_name(path)
    if ML100K_SPLIT.fullmatch(base):  # one of ten parts of a folder
        return f"{path.parent.name}/{base}" if path.parent.name else base
    if base in FOLDER_FILES:
        return path.parent.name or Path(base).stem
    return Path(base).stem or base


def base_name(path: Path) -> str:
    """File name without a compression suffix."""
    name = path.name
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_binary(path: Path) -> IO[bytes]:
    """Open a possibly compressed file for reading bytes."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def first_line(path: Path, encoding: str = "utf-8") -> str:
    with open_binary(path) as fh:
        return fh.readline().decode(encoding, errors="replace").strip("\r\n\ufeff")


def header_columns(path: Path, delimiter: str = ",", encoding: str = "utf-8") -> list[str]:
    """Column names from a header line (surrounding quotes removed)."""
    return _names(first_line(path, encoding), delimiter)


def _names(line: str, delimiter: str) -> list[str]:
    return [c.strip().strip('"').strip() for c in line.split(delimiter)]


DELIMITERS = (",", "\t", ";", "|")  # the ones a delimited file is sniffed for


def sniff_delimiter(path: Path, column: str) -> str:
    """The delimiter (comma, tab, semicolon or pipe) that makes `column` one of
    the header's names; a comma when none does (the error then names the header)."""
    line = first_line(path)
    for d in DELIMITERS:
        if column in (c.lower() for c in _names(line, d)):
            return d
    return ","


def read_table(
    path: Path,
    columns: dict[str, pa.DataType],
    *,
    delimiter: str = ",",
    names: list[str] | None = None,
    encoding: str = "utf8",
    quoted: bool = True,
    required: tuple[str, ...] = (),
    layout: str = "",
) -> pa.Table:
    """Read the named columns of a delimited file with pyarrow, with errors that name the line.

    `names` gives column names for a file without a header. `required` columns
    must be present in a header (others in `columns` are read when present).
    `layout`, when given, is how a line should look: a line with the wrong
    number of fields is reported against it rather than as a column count
    (ML-1M's '::' is read as two ':' around an empty field).
    """
    given = (columns, names)
    header_lines = 0 if names else 1
    spaced = False
    if not names:
        line = first_line(path, "utf-8" if encoding == "utf8" else encoding)
        cols = _names(line, delimiter)
        # "user_id, item_id, rating": the values have the same space after the
        # delimiter, and are read trimmed (an id " a" would never match "a").
        spaced = any(raw != raw.strip() for raw in line.split(delimiter))
        if not any(cols):
            raise DataError(path, "empty file (no header line)", 1)
        # Header names match whatever their case and surrounding spaces
        # ("User_ID, Item_ID" from a spreadsheet export); the file is then read
        # under those names, its header line skipped.
        wanted = {k.lower(): k for k in columns}
        cols = [wanted.get(c.lower(), c) for c in cols]
        names = cols
        dupes = sorted({c for c in cols if cols.count(c) > 1})
        if dupes:
            raise DataError(path, f"duplicate column(s) in header: {', '.join(dupes)}", 1)
        missing = [c for c in required if c not in cols]
        if missing:
            raise DataError(
                path, f"missing column(s) {', '.join(missing)}; header has {', '.join(cols)}", 1
            )
        columns = {k: v for k, v in columns.items() if k in cols}
    read_opts = pacsv.ReadOptions(
        column_names=names,
        skip_rows=header_lines,
        encoding=encoding,
        block_size=1 << 24,
        use_threads=True,
    )
    parse_opts = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoted else False)
    # Only an empty field is missing: "nan" or "N/A" must not silently become null.
    convert_opts = pacsv.ConvertOptions(
        column_types=columns,
        include_columns=list(columns),
        strings_can_be_null=False,
        null_values=[""],
    )

    def source() -> IO[bytes] | str:
        return str(path) if not path.name.endswith(COMPRESSED) else open_binary(path)

    try:
        table = pacsv.read_csv(source(), read_opts, parse_opts, convert_opts)
    except pa.ArrowInvalid as exc:
        if "invalid UTF8" in str(exc) and encoding == "utf8":
            # Older public sets (Book-Crossing) and spreadsheet exports are Latin-1,
            # in which every byte is a letter: read so, ids keep their accents.
            log.warning("%s: not UTF-8 text; read as Latin-1", path)
            return read_table(
                path,
                given[0],
                delimiter=delimiter,
                names=given[1],
                encoding="latin-1",
                quoted=quoted,
                required=required,
                layout=layout,
            )
        raise _explain(
            path, exc, columns, read_opts, parse_opts, header_lines, source, layout
        ) from None
    if table.num_rows == 0:
        raise DataError(path, "no data rows", header_lines + 1)
    if header_lines and spaced:
        for i, name in enumerate(table.column_names):
            if pa.types.is_string(table.schema.field(i).type):
                table = table.set_column(i, name, pc.utf8_trim_whitespace(table.column(i)))
    for name in columns:
        check_values(path, table.column(name), name, header_lines + 1)
    return table


def check_values(where: Path, col: pa.Array, name: str, first: int, unit: str = "line") -> None:
    """Refuse a column's first missing value, non-finite float, float32 value
    beyond +-MAX_VALUE (float32 columns are values; timestamps are integers or
    float64) or empty string, naming the file and its line (or row): `first` is
    the number of the column's first value."""
    if len(col) == 0:  # (arrow's all() of nothing is null, not true)
        return
    if col.null_count:
        row = int(pc.index(pc.is_null(col), True).as_py())
        raise DataError(where, f"missing value in column {name}", row + first, unit)
    if pa.types.is_floating(col.type):
        finite = pc.is_finite(col)
        if not pc.all(finite).as_py():
            row = int(pc.index(finite, False).as_py())
            value = col[row].as_py()
            raise DataError(where, f"non-finite {name} {value!r} (NaN or inf)", row + first, unit)
        if pa.types.is_float32(col.type):
            inside = pc.less_equal(pc.abs(col), MAX_VALUE)
            if not pc.all(inside).as_py():
                row = int(pc.index(inside, False).as_py())
                value = col[row].as_py()
                what = f"{name} {value:g} beyond +-{MAX_VALUE:g} (values are float32; rescale them)"
                raise DataError(where, what, row + first, unit)
    if pa.types.is_string(col.type):
        empty = pc.equal(pc.utf8_length(col), 0)
        if pc.any(empty).as_py():
            row = int(pc.index(empty, True).as_py())
            raise DataError(where, f"empty {name}", row + first, unit)
        # Ids are kept as fixed-width bytes, where a NUL byte ends the id: two
        # ids would merge, or an event would match no id at all.
        nul = pc.match_substring(col, "\x00")
        if pc.any(nul).as_py():
            row = int(pc.index(nul, True).as_py())
            raise DataError(where, f"{name} holds a NUL byte (\\x00)", row + first, unit)


def _explain(
    path: Path,
    exc: pa.ArrowInvalid,
    columns: dict[str, pa.DataType],
    read_opts: pacsv.ReadOptions,
    parse_opts: pacsv.ParseOptions,
    header_lines: int,
    source: Callable[[], IO[bytes] | str],
    layout: str = "",
) -> DataError:
    """Turn a pyarrow error into a DataError with the offending line (re-reads on failure only)."""
    text = str(exc)
    if "Empty CSV file" in text:
        return DataError(path, "empty file", 1)
    if "parse error" in text:
        bad: list[tuple[int | None, str]] = []

        def handler(row: pacsv.InvalidRow) -> str:
            want = layout or f"{row.expected_columns} columns"
            got = "" if layout else f"{row.actual_columns}: "
            bad.append((row.number, f"expected {want}, got {got}{row.text[:80]!r}"))
            return "skip"

        serial = pacsv.ReadOptions(
            column_names=read_opts.column_names, encoding=read_opts.encoding, use_threads=False
        )
        opts = pacsv.ParseOptions(
            delimiter=parse_opts.delimiter,
            quote_char=parse_opts.quote_char,
            invalid_row_handler=handler,
        )
        with contextlib.suppress(pa.ArrowInvalid):
            pacsv.read_csv(
                source(),
                serial,
                opts,
                pacsv.ConvertOptions(
                    column_types={k: pa.string() for k in columns}, include_columns=list(columns)
                ),
            )
        if bad:
            return DataError(path, bad[0][1], bad[0][0])
        return DataError(path, text)
    match = re.search(r"column #(\d+).*conversion error to (\w+)", text)
    if match:
        # Re-read every wanted column as text and find the first unparsable value.
        as_text = pacsv.read_csv(
            source(),
            read_opts,
            parse_opts,
            pacsv.ConvertOptions(
                column_types={k: pa.string() for k in columns},
                include_columns=list(columns),
                strings_can_be_null=False,
            ),
        )
        for name, dtype in columns.items():
            if pa.types.is_string(dtype):
                continue
            pattern = _FLOAT_RE if pa.types.is_floating(dtype) else _INT_RE
            col = as_text.column(name)
            ok = pc.match_substring_regex(col, pattern)
            if pa.types.is_floating(dtype):
                ok = pc.or_(ok, pc.match_substring_regex(pc.utf8_lower(col), r"^\s*[-+]?(nan|inf)"))
            if not pc.all(ok).as_py():
                row = int(pc.index(ok, False).as_py())
                value = col[row].as_py()
                hint = " (a repeated header line?)" if value.strip() == name else ""
                kind = "a number" if pa.types.is_floating(dtype) else "an integer"
                return DataError(
                    path,
                    f"column {name}: {value!r} is not {kind}{hint}",
                    row + header_lines + 1,
                )
    return DataError(path, text)


# ---------------------------------------------------------------------------
# formats


# MovieLens 100k's own train/test splits, in u.data's layout (tab-separated, no header)
ML100K_SPLIT = re.compile(r"u[1-5ab]\.(base|test)")


def detect_format(path: str | Path) -> str:
    """The format of a dataset path (a folder or a ratings file)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        if find_file(p, "u.data"):
            return "ml-100k"
        if find_file(p, "ratings.dat"):
            return "ml-1m"
        for name in ("ratings.csv", "interactions.csv"):
            f = find_file(p, name)
            if f:
                return _csv_kind(f)
        if next(p.rglob("*.parquet"), None) is not None:
            return "parquet"
        if lone_csv(p) is not None:  # read by common column names, whatever its layout
            return "csv"
        raise DataError(
            p,
            "no known dataset here (looked for u.data, ratings.dat, ratings.csv, "
            "interactions.csv, each optionally .gz/.xz, *.parquet, or one other .csv); "
            "pass the file itself, or --format",
        )
    name = base_name(p)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name == "u.data" or ML100K_SPLIT.fullmatch(name):  # u1.base ... ub.test: u.data's layout
        return "ml-100k"
    if name.endswith(".dat"):  # MovieLens 1M/10M's "::"; other .dat files are delimited text
        return "ml-1m" if "::" in first_line(p) else _csv_kind(p)
    if name.endswith((".csv", ".tsv", ".txt")):
        return _csv_kind(p)
    raise DataError(
        p,
        "cannot tell the format from the file name (known: .csv, .tsv, .txt, .parquet, "
        ".dat, u.data and its splits u1.base..ub.test, each optionally .gz/.xz); "
        "pass --format",
    )


def _csv_kind(path: Path) -> str:
    header = header_columns(path)
    if "userId" in header and "movieId" in header:
        return "ml-20m"
    if "book_id" in header and "user_id" in header:
        return "goodbooks"
    return "csv"


def _folder_and_file(path: Path, name: str) -> tuple[Path, Path]:
    if path.is_dir():
        f = find_file(path, name)
        if f is None:
            raise DataError(path, f"no {name} (or .gz/.xz) in this folder")
        return path, f
    return path.parent, path


def read_ml100k(path: Path) -> tuple[Raw, ItemMeta | None]:
    folder, data = _folder_and_file(path, "u.data")
    t = read_table(
        data,
        {"user": pa.string(), "item": pa.string(), "rating": pa.float32(), "ts": pa.int64()},
        delimiter="\t",
        names=["user", "item", "rating", "ts"],
        quoted=False,
    )
    meta = None
    item_file = find_file(folder, "u.item")
    if item_file:
        genres = ML100K_GENRES
        genre_file = find_file(folder, "u.genre")
        if genre_file:
            with open_binary(genre_file) as fh:
                rows = [ln.split("|") for ln in fh.read().decode("latin-1").splitlines() if ln]
            genres = [name for name, _ in sorted(rows, key=lambda r: int(r[1]))]
        meta = ItemMeta()
        with open_binary(item_file) as fh:
            for n, line in enumerate(fh.read().decode("latin-1").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("|")
                if len(parts) < 5 + len(genres):
                    raise DataError(
                        item_file, f"expected {5 + len(genres)} fields, got {len(parts)}", n
                    )
                flags = parts[5 : 5 + len(genres)]
                meta.item_ids.append(parts[0])
                meta.titles.append(parts[1])
                meta.tags.append([g for g, f in zip(genres, flags, strict=True) if f == "1"])
    return _raw(t, "user", "item", "rating", "ts"), meta


def read_ml1m(path: Path) -> tuple[Raw, ItemMeta | None]:
    """ratings.dat uses '::' separators; no field contains ':' so ':' splits it."""
    folder, data = _folder_and_file(path, "ratings.dat")
    names = ["user", "e1", "item", "e2", "rating", "e3", "ts"]
    t = read_table(
        data,
        {"user": pa.string(), "item": pa.string(), "rating": pa.float32(), "ts": pa.int64()},
        delimiter=":",
        names=names,
        quoted=False,
        layout="UserID::MovieID::Rating::Timestamp",
    )
    meta = None
    movies = find_file(folder, "movies.dat")
    if movies:
        meta = ItemMeta()
        with open_binary(movies) as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # ML-1M is ISO-8859-1
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("::")
            if len(parts) != 3:
                raise DataError(movies, f"expected MovieID::Title::Genres, got {line[:80]!r}", n)
            meta.item_ids.append(parts[0])
            meta.titles.append(parts[1])
            meta.tags.append(_split_tags(parts[2]))
    return _raw(t, "user", "item", "rating", "ts"), meta


def read_ml20m(path: Path) -> tuple[Raw, ItemMeta | None]:
    folder, data = _folder_and_file(path, "ratings.csv")
    t = read_table(
        data,
        {
            "userId": pa.string(),
            "movieId": pa.string(),
            "rating": pa.float32(),
            "timestamp": pa.int64(),
        },
        required=("userId", "movieId", "rating", "timestamp"),
    )
    meta = None
    movies = find_file(folder, "movies.csv")
    if movies:
        mt = read_table(
            movies,
            {"movieId": pa.string(), "title": pa.string(), "genres": pa.string()},
            required=("movieId", "title", "genres"),
        )
        meta = ItemMeta(
            item_ids=mt.column("movieId").to_pylist(),
            titles=mt.column("title").to_pylist(),
            tags=[_split_tags(g) for g in mt.column("genres").to_pylist()],
        )
        tags = find_file(folder, "tags.csv")
        if tags:
            tt = read_table(
                tags, {"movieId": pa.string(), "tag": pa.string()}, required=("movieId", "tag")
            )
            _add_tags(
                meta,
                tt.column("movieId").to_pylist(),
                [f"tag:{s.strip().lower()}" for s in tt.column("tag").to_pylist()],
            )
    return _raw(t, "userId", "movieId", "rating", "timestamp"), meta


def read_goodbooks(path: Path) -> tuple[Raw, ItemMeta | None]:
    folder, data = _folder_and_file(path, "ratings.csv")
    t = read_table(
        data,
        {"user_id": pa.string(), "book_id": pa.string(), "rating": pa.float32()},
        required=("user_id", "book_id", "rating"),
    )
    meta = None
    books = find_file(folder, "books.csv")
    if books:
        bt = read_table(
            books,
            {"book_id": pa.string(), "goodreads_book_id": pa.string(), "title": pa.string()},
            required=("book_id", "title"),
        )
        ids = bt.column("book_id").to_pylist()
        meta = ItemMeta(
            item_ids=ids,
            titles=bt.column("title").to_pylist(),
            tags=[[] for _ in ids],
            weights=[[] for _ in ids],
        )
        book_tags, tag_names = find_file(folder, "book_tags.csv"), find_file(folder, "tags.csv")
        if book_tags and tag_names and "goodreads_book_id" in bt.column_names:
            names_t = read_table(
                tag_names,
                {"tag_id": pa.string(), "tag_name": pa.string()},
                required=("tag_id", "tag_name"),
            )
            name_of = dict(
                zip(
                    names_t.column("tag_id").to_pylist(),
                    names_t.column("tag_name").to_pylist(),
                    strict=True,
                )
            )
            gr_to_book = dict(zip(bt.column("goodreads_book_id").to_pylist(), ids, strict=True))
            bk = read_table(
                book_tags,
                {"goodreads_book_id": pa.string(), "tag_id": pa.string(), "count": pa.float32()},
                required=("goodreads_book_id", "tag_id", "count"),
            )
            row_of = {b: i for i, b in enumerate(ids)}
            for gr, tag, cnt in zip(
                bk.column("goodreads_book_id").to_pylist(),
                bk.column("tag_id").to_pylist(),
                bk.column("count").to_pylist(),
                strict=True,
            ):
                book = gr_to_book.get(gr)
                if book is None or cnt <= 0:
                    continue
                i = row_of[book]
                meta.tags[i].append(name_of.get(tag, f"tag{tag}"))
                assert meta.weights is not None
                meta.weights[i].append(float(cnt))
    log.warning("%s: goodbooks ratings have no timestamps; file order stands in for time", data)
    return _raw(t, "user_id", "book_id", "rating", None), meta


def read_generic(path: Path, mapping: dict[str, str] | None = None) -> tuple[Raw, ItemMeta | None]:
    """Interactions from a generic CSV: columns found by common names (COLUMN_NAMES,
    any case) or named by `mapping` ({role: column}); a file without a header
    is read as user,item[,rating[,timestamp]] when its third field is a number."""
    if path.is_dir():
        data = (
            find_file(path, "interactions.csv") or find_file(path, "ratings.csv") or lone_csv(path)
        )
        if data is None:
            raise DataError(
                path, "no interactions.csv or ratings.csv (or .gz/.xz), nor one other .csv, here"
            )
        folder = path
    else:
        folder, data = path.parent, path
    delimiter, chosen, headerless = _generic_layout(data, mapping or {})
    types = {
        "user": pa.string(),
        "item": pa.string(),
        "value": pa.float32(),
        "timestamp": pa.string(),
    }
    t = read_table(
        data,
        delimiter=delimiter,
        columns={chosen[role]: types[role] for role in chosen},
        names=headerless,
        required=tuple(chosen.values()),
    )
    first = 1 if headerless else 2
    ts = chosen.get("timestamp")
    if ts is not None:
        t = t.set_column(
            t.column_names.index(ts), ts, _seconds(data, t.column(ts).combine_chunks(), ts, first)
        )
    meta = None
    items = find_file(folder, "items.csv")
    if items:
        delimiter = sniff_delimiter(items, "item_id")
        header = [c.lower() for c in header_columns(items, delimiter)]
        tag_col = "genres" if "genres" in header else ("tags" if "tags" in header else None)
        cols = {"item_id": pa.string()}
        if "title" in header:
            cols["title"] = pa.string()
        if tag_col:
            cols[tag_col] = pa.string()
        it = read_table(items, cols, delimiter=delimiter, required=("item_id",))
        ids = it.column("item_id").to_pylist()
        meta = ItemMeta(
            item_ids=ids,
            titles=it.column("title").to_pylist() if "title" in cols else ["" for _ in ids],
            tags=[_split_tags(s) for s in it.column(tag_col).to_pylist()]
            if tag_col
            else [[] for _ in ids],
        )
    return _raw(t, chosen["user"], chosen["item"], chosen.get("value"), ts), meta


def _generic_layout(
    data: Path, mapping: dict[str, str]
) -> tuple[str, dict[str, str], list[str] | None]:
    """(delimiter, {role: column}, column names when the file has no header) of
    a generic CSV, from its first line."""
    line = first_line(data)
    if not line.strip():
        raise DataError(data, "empty file (no header line)", 1)
    for d in DELIMITERS:
        names = _names(line, d)
        if len(names) < 2:
            continue
        try:
            return d, match_columns(data, names, mapping, unit="line"), None
        except DataError:
            continue
    if not mapping:
        # No header: user,item,rating[,timestamp], the rating a number (a header's
        # third name never is).
        for d in DELIMITERS:
            fields = [f.strip().strip('"') for f in line.split(d)]
            if len(fields) in (3, 4) and re.match(_FLOAT_RE, fields[2]):
                names = ["user", "item", "value", "timestamp"][: len(fields)]
                log.info("%s: no header line; read as %s", data, ",".join(names))
                return d, {n: n for n in names}, names
    delimiter = max(DELIMITERS, key=lambda d: len(line.split(d)))
    try:
        match_columns(data, _names(line, delimiter), mapping, unit="line")
    except DataError as exc:  # name the role, and how to read a file without a header
        hint = "" if mapping else "; a file without a header needs one (user,item,...)"
        raise DataError(data, exc.problem + hint, 1) from None
    raise DataError(data, f"cannot read the header {line[:80]!r}", 1)  # pragma: no cover


def match_columns(
    where: Path, names: list[str], mapping: dict[str, str], unit: str = "row"
) -> dict[str, str]:
    """{role: column} among a file's column `names`: the mapping's (--columns),
    else the first of COLUMN_NAMES[role] present, the same name in any case.
    User and item are required; DataError naming what was looked for otherwise."""
    listing = ", ".join(names)
    if len(listing) > 200:
        listing = listing[:200] + "..."
    lower: dict[str, str] = {}
    for n in names:
        lower.setdefault(n.lower(), n)

    def find(name: str) -> str | None:
        return name if name in names else lower.get(name.lower())

    chosen = {}
    for role, candidates in COLUMN_NAMES.items():
        if role in mapping:
            found = find(mapping[role])
            if found is None:
                raise DataError(
                    where,
                    f"missing column {mapping[role]!r} ({role}); columns are {listing}",
                    1 if unit == "line" else None,
                )
            chosen[role] = found
            continue
        found = next((f for f in map(find, candidates) if f is not None), None)
        if found is not None:
            chosen[role] = found
        elif role in ("user", "item"):
            raise DataError(
                where,
                f"no {role} column (looked for {', '.join(candidates)}, in any case; "
                f"columns are {listing}): pass --columns {role}=NAME",
                1 if unit == "line" else None,
            )
    taken = [c for c in chosen.values()]
    dupes = sorted({c for c in taken if taken.count(c) > 1})
    if dupes:
        raise DataError(where, f"column {dupes[0]} given more than one role", None)
    return chosen


_ISO_DATE_RE = r"^\d{4}-\d{2}-\d{2}$"
_ZONE_RE = r"(Z|[+-]\d{2}(:?\d{2})?)$"


def _seconds(where: Path, col: pa.Array, name: str, first: int, unit: str = "line") -> pa.Array:
    """A text timestamp column as int64 seconds: seconds (integer, or fractional and
    floored) or ISO 8601 dates and times (a date: midnight; no zone: UTC), an
    error naming the first line (or row) that is neither."""
    with contextlib.suppress(pa.ArrowInvalid):
        return pc.cast(col, pa.int64())  # integer seconds, the common case: one pass
    text = pc.replace_substring_regex(pc.utf8_trim_whitespace(col), r"^\+", "")  # "+5"
    is_int = pc.match_substring_regex(text, _INT_RE)
    try:
        ints = pc.cast(pc.if_else(is_int, text, "0"), pa.int64())
    except pa.ArrowInvalid:  # an integer int64 cannot hold: name the first
        for row, (value, whole) in enumerate(
            zip(text.to_pylist(), is_int.to_pylist(), strict=True)
        ):
            if whole and not -(2**63) <= int(value) < 2**63:
                raise DataError(
                    where, f"column {name}: {value!r} is out of range", row + first, unit
                ) from None
        raise
    is_frac = pc.and_not(pc.match_substring_regex(text, _FLOAT_RE), is_int)
    if pc.any(is_frac).as_py():  # fractional seconds (1600000000.25, 1.6e9): floored
        frac = pc.floor(pc.cast(pc.if_else(is_frac, text, "0"), pa.float64()))
        ints = pc.if_else(is_frac, _whole_seconds(where, frac, name, first, unit), ints)
        is_int = pc.or_(is_int, is_frac)
    if pc.all(is_int).as_py():
        return ints
    # RFC 3339's lower-case t and z; digits past microseconds dropped
    text = pc.replace_substring_regex(pc.utf8_upper(text), r"(\.\d{6})\d+", r"\1")
    date_only = pc.match_substring_regex(text, _ISO_DATE_RE)
    iso = pc.if_else(date_only, pc.binary_join_element_wise(text, "T00:00:00", ""), text)
    zoned = pc.match_substring_regex(iso, _ZONE_RE)
    iso = pc.if_else(zoned, iso, pc.binary_join_element_wise(iso, "Z", ""))
    iso = pc.if_else(is_int, "1970-01-01T00:00:00Z", iso)
    try:
        micros = pc.cast(pc.cast(iso, pa.timestamp("us", "UTC")), pa.int64())
    except pa.ArrowInvalid:
        for row, value in enumerate(col.to_pylist()):  # the error path only
            if re.match(_FLOAT_RE, value):
                continue
            try:
                pc.cast(pa.array([_iso(value)]), pa.timestamp("us", "UTC"))
            except pa.ArrowInvalid:
                raise DataError(
                    where,
                    f"column {name}: {value!r} is not seconds or an ISO 8601 date/time",
                    row + first,
                    unit,
                ) from None
        raise
    seconds = pc.floor(pc.divide(pc.cast(micros, pa.float64()), 1e6))
    return pc.if_else(is_int, ints, pc.cast(seconds, pa.int64()))


def _whole_seconds(where: Path, seconds: pa.Array, name: str, first: int, unit: str) -> pa.Array:
    """Whole float seconds as int64; an error names the first one int64 cannot hold."""
    too_big = pc.greater_equal(pc.abs(seconds), 2.0**63)
    if pc.any(too_big).as_py():
        row = int(pc.index(too_big, True).as_py())
        value = seconds[row].as_py()
        raise DataError(where, f"column {name}: {value!r} is out of range", row + first, unit)
    return pc.cast(seconds, pa.int64())


def _iso(value: str) -> str:
    """One value as _seconds normalises it (for the error path)."""
    value = re.sub(r"(\.\d{6})\d+", r"\1", value.strip().upper())
    if re.match(_ISO_DATE_RE, value):
        value += "T00:00:00"
    return value if re.search(_ZONE_RE, value) else value + "Z"


def _split_tags(s: str | None) -> list[str]:
    if not s or s == "(no genres listed)":
        return []
    return [g.strip() for g in s.split("|") if g.strip()]


def _add_tags(meta: ItemMeta, item_ids: list[str], tags: list[str]) -> None:
    row_of = {i: n for n, i in enumerate(meta.item_ids)}
    for item, tag in zip(item_ids, tags, strict=True):
        n = row_of.get(item)
        if n is None:
            row_of[item] = n = len(meta.item_ids)
            meta.item_ids.append(item)
            meta.titles.append("")
            meta.tags.append([])
        meta.tags[n].append(tag)


def _raw(t: pa.Table, user: str, item: str, rating: str | None, ts: str | None) -> Raw:
    n = t.num_rows
    values = (
        t.column(rating).to_numpy().astype(np.float32, copy=False)
        if rating
        else np.ones(n, np.float32)
    )
    # Without a timestamp column an event's position in the file stands in for
    # its time (has_timestamps stays False): the temporal split holds out each
    # user's last rows, not the items whose ids sort last, as zeros made it.
    stamps = (
        t.column(ts).to_numpy().astype(np.int64, copy=False) if ts else np.arange(n, dtype=np.int64)
    )
    return Raw(
        t.column(user).combine_chunks(),
        t.column(item).combine_chunks(),
        values,
        stamps,
        ts is not None,
        rating is not None,
    )


# Column names taken for each role when --columns does not name one (the first
# present, in any case), in generic CSVs and Parquet. The later names are public
# datasets' own: Last.fm (userID, artistID, weight), Book-Crossing (User-ID, ISBN,
# Book-Rating), Amazon reviews (reviewerID, asin, overall, unixReviewTime), Yelp
# (business_id, stars), shop exports.
COLUMN_NAMES = {
    "user": (
        "user_id", "user", "userId", "uid", "customer_id", "visitor_id",
        "customer", "visitor", "member_id", "account_id", "reviewerID", "User-ID",
    ),
    "item": (
        "item_id", "item", "itemId", "movieId", "book_id", "product_id", "sku",
        "product", "movie_id", "track_id", "song_id", "artist_id", "artistId",
        "business_id", "article_id", "video_id", "asin", "ISBN",
    ),
    "value": (
        "rating", "value", "weight", "score", "count", "quantity",
        "plays", "playcount", "play_count", "clicks", "stars", "overall", "Book-Rating",
    ),
    "timestamp": (
        "timestamp", "ts", "time", "event_time", "datetime", "date",
        "created_at", "event_timestamp", "unixReviewTime",
    ),
}  # fmt: skip


def read_parquet(path: Path, columns: dict[str, str] | None = None) -> tuple[Raw, None]:
    """Interactions from a Parquet file or folder (hive partitions kept as columns),
    read file by file so every error names the file and the row within it."""
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(str(path), format="parquet", partitioning="hive")
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(path, f"not a readable Parquet file or folder ({exc})") from None
    fragments = list(dataset.get_fragments())
    if not fragments:
        raise DataError(path, "no Parquet files here")
    mapping = dict(columns or {})
    tables = []
    for fragment in fragments:
        where = Path(fragment.path)
        try:
            schema = fragment.physical_schema
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(where, f"not a readable Parquet file ({exc})") from None
        keys = pads.get_partition_keys(fragment.partition_expression)  # dt=... folders
        names = [*schema.names, *(k for k in keys if k not in schema.names)]
        chosen = match_columns(where, names, mapping)
        mapping = {**chosen, **mapping}  # the first file decides defaults for the rest
        try:
            table = fragment.to_table(columns=list(dict.fromkeys(chosen.values())))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(where, f"not a readable Parquet file ({exc})") from None
        tables.append(_typed_events(where, table, chosen))
    t = pa.concat_tables(tables)
    if t.num_rows == 0:
        raise DataError(path, "no data rows")
    has_value, has_ts = "value" in t.column_names, "timestamp" in t.column_names
    return _raw(
        t, "user", "item", "value" if has_value else None, "timestamp" if has_ts else None
    ), None


def _typed_events(where: Path, table: pa.Table, chosen: dict[str, str]) -> pa.Table:
    """The chosen columns as user, item (strings), value (float32), timestamp (int64
    seconds), each checked as the CSV reader checks: no missing, empty or
    non-finite values; errors name the file and the row (1-based)."""
    out = {}
    for role, name in chosen.items():
        col = table.column(name).combine_chunks() if table.num_rows else table.column(name)
        kind = col.type
        if pa.types.is_dictionary(kind):
            col, kind = col.cast(kind.value_type), kind.value_type
        if role in ("user", "item"):
            if not (
                pa.types.is_integer(kind)
                or pa.types.is_string(kind)
                or pa.types.is_large_string(kind)
            ):
                raise DataError(
                    where, f"column {name} ({role}): ids must be strings or integers, not {kind}"
                )
            col = col.cast(pa.string())
        elif role == "value":
            if not (
                pa.types.is_integer(kind)
                or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind)
                or pa.types.is_decimal(kind)
            ):
                raise DataError(where, f"column {name} (value): expected numbers, not {kind}")
            col = col.cast(pa.float32())
        else:
            if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
                col = pc.cast(col, pa.timestamp("s"), safe=False)  # whole seconds
            elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
                check_values(where, col, name, 1, unit="row")
                col = _seconds(where, col.cast(pa.string()), name, 1, unit="row")
            elif pa.types.is_floating(kind) or pa.types.is_decimal(kind):
                col = col.cast(pa.float64())
                check_values(where, col, name, 1, unit="row")
                col = _whole_seconds(where, pc.floor(col), name, 1, "row")  # fractions dropped
            elif not pa.types.is_integer(kind):
                raise DataError(
                    where,
                    f"column {name} (timestamp): expected seconds or a timestamp, not {kind}",
                )
            col = col.cast(pa.int64())
        check_values(where, col, name, 1, unit="row")
        out[role] = col
    return pa.table(out)


READERS: dict[str, Callable[[Path], tuple[Raw, ItemMeta | None]]] = {
    "ml-100k": read_ml100k,
    "ml-1m": read_ml1m,
    "ml-20m": read_ml20m,
    "goodbooks": read_goodbooks,
    "csv": read_generic,
}


# ---------------------------------------------------------------------------
# assembly


def _sorted_ids(*arrays: pa.Array) -> np.ndarray:
    """Sorted unique ids (as UTF-8 bytes) of the given string arrays."""
    parts = [pc.unique(a).cast(pa.binary()).to_numpy(zero_copy_only=False) for a in arrays]
    merged = np.concatenate(parts) if parts else np.zeros(0, object)
    if merged.size == 0:
        return np.zeros(0, dtype="S1")
    return np.unique(merged.astype("S"))


def _dense(column: pa.Array, ids: np.ndarray) -> np.ndarray:
    idx = pc.index_in(column.cast(pa.binary()), value_set=pa.array(ids, type=pa.binary()))
    return idx.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


# Epoch seconds this large are past the year 5000: such columns are counts of
# milliseconds, microseconds or nanoseconds since 1970 (Kafka, JavaScript and
# Spark exports), read as seconds so that time-based parameters (popularity's
# half-life in days) mean what they say.
_EPOCH_UNITS = (
    (1e17, 1_000_000_000, "nanoseconds"),
    (1e14, 1_000_000, "microseconds"),
    (1e11, 1_000, "milliseconds"),
)


def epoch_seconds(stamps: np.ndarray, where: Path | str = "") -> np.ndarray:
    """int64 timestamps as seconds: unchanged when they are seconds, divided
    (floored) when their median says milliseconds, microseconds or nanoseconds
    since 1970, with a warning naming the unit."""
    if stamps.size == 0:
        return stamps
    median = float(np.median(np.abs(stamps[:: max(1, stamps.size // 100_000)])))  # a sample
    for bound, per_second, unit in _EPOCH_UNITS:
        if median >= bound:
            log.warning(
                "%s: timestamps read as %s since 1970 (median %d), stored as seconds",
                where,
                unit,
                int(median),
            )
            return stamps // per_second
    return stamps


def load_dataset(
    path: str | Path,
    fmt: str | None = None,
    duplicates: str | None = None,
    columns: str | dict[str, str] | None = None,
) -> Dataset:
    """Read a dataset in any supported format (auto-detected unless `fmt` is given).
    `columns` maps roles to column names for Parquet (`user=uid,item=sku,...`).
    `duplicates`, for a repeated (user, item) pair: "last" keeps the latest event
    (a revised rating), "sum" adds values; None (default) sums an implicit log's
    events (no value column: each row one event, so a pair's value is how many
    times it happened) and keeps the last of anything with values."""
    if duplicates not in (None, "last", "sum"):
        raise ValueError(f"duplicates: expected 'last' or 'sum', got {duplicates!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    fmt = fmt or detect_format(p)
    mapping = parse_columns(columns) if isinstance(columns, str | None) else dict(columns)
    if fmt == "parquet":
        raw, meta = read_parquet(p, mapping)
    elif fmt == "csv":
        raw, meta = read_generic(p, mapping)
    elif mapping:
        raise ValueError(f"columns: a column mapping applies to --format csv or parquet, not {fmt}")
    elif fmt not in READERS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    else:
        raw, meta = READERS[fmt](p)
    if raw.has_timestamps:
        raw.timestamps = epoch_seconds(raw.timestamps, p)
    user_ids = _sorted_ids(raw.users)
    meta_items = pa.array(meta.item_ids, pa.string()) if meta else pa.array([], pa.string())
    item_ids = _sorted_ids(raw.items, meta_items)
    users = _dense(raw.users, user_ids)
    items = _dense(raw.items, item_ids)
    if duplicates is None:
        duplicates = "last" if raw.has_values else "sum"
    matrix, stamps = build_csr(
        users,
        items,
        raw.values,
        raw.timestamps,
        len(user_ids),
        len(item_ids),
        duplicates=duplicates,
    )
    if matrix.nnz < len(raw.values):
        log.info(
            "%s: %d repeated (user, item) events %s",
            p,
            len(raw.values) - matrix.nnz,
            "added up (counts)" if duplicates == "sum" else "dropped (the latest kept)",
        )
    titles = features = None
    names: list[str] = []
    if meta:
        rows = _dense(meta_items, item_ids)
        titles = np.full(len(item_ids), "", dtype=object)
        titles[rows] = meta.titles
        tags: list[list[str]] = [[] for _ in range(len(item_ids))]
        weights: list[list[float]] | None = [[] for _ in range(len(item_ids))]
        for r, t, i in zip(rows, meta.tags, range(len(rows)), strict=True):
            tags[r] = t
            assert weights is not None
            weights[r] = meta.weights[i] if meta.weights else [1.0] * len(t)
        features, names = features_matrix(tags, weights)
    name = _dataset_name(p)
    return Dataset(
        interactions=matrix,
        timestamps=stamps,
        users=IdMap(user_ids),
        items=IdMap(item_ids),
        item_titles=titles,
        item_features=features,
        feature_names=names,
        has_timestamps=raw.has_timestamps,
        name=name,
    )
