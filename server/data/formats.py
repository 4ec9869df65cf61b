"""The dataset formats recserve reads and the error its readers raise (no pyarrow here,
so the CLI can name them without importing the readers)."""

from __future__ import annotations

from pathlib import Path

FORMATS = ("ml-100k", "ml-1m", "ml-20m", "goodbooks", "csv")


class DataError(ValueError):
    """Bad input data: the message names the file, the line and the problem."""

    def __init__(self, path: Path | str, problem: str, line: int | None = None) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
