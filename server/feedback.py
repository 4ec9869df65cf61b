"""Feedback: durable event log (SQLite, WAL) and the per-user online state it feeds.

`RecordInteractions` acknowledges events only after the transaction holding
them has committed (`synchronous=FULL`, so a commit survives power loss, not
just a process crash). At start-up every stored event is replayed into the
online state, so a restarted server recommends exactly as before it stopped.
The online state keeps, per user, the most recent `limit` distinct items with
their last value; models fold the user in again from training row + these.
With several worker processes an event recorded through one worker shows in
the next answer of any of them: every append bumps a counter in a small file
mapped by all workers (`<db>.changes`), and a worker reads the shared log
(`sync`) before it resolves a user whenever the counter moved; reading the
counter is a memory load, where asking SQLite costs ~5 us per request.
"""

from __future__ import annotations

import mmap
import os
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Event:
    """One stored interaction (ids as on the wire; value already defaulted)."""

    user_id: str
    item_id: str
    value: float
    timestamp: int
    id: int = 0  # the log's row id, once stored


class FeedbackStore:
    """Append-only event log; `path=""` keeps events in memory (lost at exit)."""

    def __init__(self, path: str | Path = "") -> None:
        self.path = str(path)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # timeout: with several worker processes a writer waits for the lock.
        self._db = sqlite3.connect(
            self.path or ":memory:", check_same_thread=False, isolation_level=None, timeout=30
        )
        if self.path:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OSError(f"{self.path}: SQLite refused WAL mode (got {mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events ("
            " id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, item_id TEXT NOT NULL,"
            " value REAL NOT NULL, ts INTEGER NOT NULL)"
        )
        self._changes: mmap.mmap | None = None
        if self.path:
            fd = os.open(self.path + ".changes", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size < 8:
                    os.ftruncate(fd, 8)  # zeros; a file another process grew stays as it is
                self._changes = mmap.mmap(fd, 8)
            finally:
                os.close(fd)

    def changes(self) -> int:
        """A counter every committed append moves (shared by all processes using
        this log; -1 for a log kept in memory). Equal values: nothing new."""
        if self._changes is None:
            return -1
        return struct.unpack_from("<Q", self._changes)[0]

    def append(self, events: Iterable[Event]) -> int:
        """Store events in one transaction; returns how many, after the commit."""
        rows = [(e.user_id, e.item_id, e.value, e.timestamp) for e in events]
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO events (user_id, item_id, value, ts) VALUES (?, ?, ?, ?)", rows
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            if self._changes is not None:
                # After the commit, so a reader that sees the new value finds the
                # rows. Two processes bumping at once may merge into one step:
                # both commits precede it, so one sync still reads both.
                count = struct.unpack_from("<Q", self._changes)[0]
                struct.pack_into("<Q", self._changes, 0, count + 1)
        return len(rows)

    def replay(self, after: int = 0, batch: int = 10_000) -> Iterator[Event]:
        """Every stored event with id > after, in arrival order."""
        last = after
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, user_id, item_id, value, ts FROM events WHERE id > ?"
                    " ORDER BY id LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            for row_id, u, i, v, ts in rows:
                yield Event(u, i, float(v), int(ts), int(row_id))
            last = rows[-1][0]

    def count(self) -> int:
        """Events stored."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        """Checkpoint the WAL and close the database."""
        with self._lock:
            self._db.close()
            if self._changes is not None:
                self._changes.close()
                self._changes = None


class OnlineState:
    """Per-user recent interactions recorded since the models were trained.

    It is fed only from the log (`sync`), in id order, so every worker process
    sharing one log converges to the same state, and `last_id` says how far.
    """

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self.last_id = 0
        self._users: dict[str, OrderedDict[str, float]] = {}
        self._lock = threading.Lock()
        self._sync = threading.Lock()

    def sync(self, store: FeedbackStore) -> int:
        """Apply every event the log holds beyond last_id; returns how many."""
        with self._sync:
            n = 0
            batch: list[Event] = []
            for e in store.replay(self.last_id):
                batch.append(e)
                if len(batch) >= 10_000:
                    n += self._apply(batch)
                    batch = []
            return n + self._apply(batch)

    def _apply(self, events: list[Event]) -> int:
        if events:
            self.apply(events)
            self.last_id = max(self.last_id, events[-1].id)
        return len(events)

    def apply(self, events: Iterable[Event]) -> None:
        """Add events; a repeated item moves to the end with its latest value."""
        with self._lock:
            for e in events:
                items = self._users.setdefault(e.user_id, OrderedDict())
                items.pop(e.item_id, None)
                items[e.item_id] = e.value
                while len(items) > self.limit:
                    items.popitem(last=False)

    def history(self, user_id: str) -> list[tuple[str, float]]:
        """The user's recorded (item id, value) pairs, oldest first; [] if none."""
        if not user_id:
            return []
        with self._lock:
            items = self._users.get(user_id)
            return list(items.items()) if items else []

    def __len__(self) -> int:
        return len(self._users)


def now() -> int:
    """Unix seconds, the timestamp of events sent with timestamp 0."""
    return int(time.time())


def open_store(path: str) -> FeedbackStore:
    """The feedback log at `path` ("" = memory); OSError naming the path when the
    file cannot be created or opened (start-up stops: nothing would be durable)."""
    try:
        return FeedbackStore(path)
    except (OSError, sqlite3.Error) as exc:
        raise OSError(f"feedback: cannot open the SQLite log {path} ({exc})") from None
