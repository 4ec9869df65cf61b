"""The dataset formats recserve reads and the error its readers raise (no pyarrow here,
so the CLI can name them without importing the readers)."""

from __future__ import annotations

from pathlib import Path

FORMATS = ("ml-100k", "ml-1m", "ml-20m", "goodbooks", "csv", "parquet")
# The names --columns maps (parquet): interactions need user and item.
COLUMN_ROLES = ("user", "item", "value", "timestamp")


class DataError(ValueError):
    """Bad input data: the message names the file, the line (or row) and the problem."""

    def __init__(
        self, path: Path | str, problem: str, line: int | None = None, unit: str = "line"
    ) -> None:
        where = f"{path}" if line is None else f"{path}, {unit} {line}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


def parse_columns(text: str | None) -> dict[str, str]:
    """`user=uid,item=sku,value=qty,timestamp=ts` as {role: column}; ValueError naming
    the bad part."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        role, eq, column = part.partition("=")
        role, column = role.strip(), column.strip()
        if not eq or not column or role not in COLUMN_ROLES:
            raise ValueError(
                f"columns: {part.strip()!r}: expected ROLE=COLUMN with ROLE one of "
                f"{', '.join(COLUMN_ROLES)}"
            )
        if role in out:
            raise ValueError(f"columns: {role} given twice")
        out[role] = column
    return out
