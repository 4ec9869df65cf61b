"""Feedback: the durable event log (SQLite with WAL, or a Redis Stream shared by
replicas) and the per-user online state it feeds.

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

Idempotency: an event may carry a client-chosen `event_id`. Every store keeps
at most one event per (user_id, event_id), across restarts (SQLite: a unique
index; Redis: a marker key per event id, kept `dedup_seconds`, 7 days by
default), so a retried RecordInteractions stream stores each event once and
`append` returns how many were new.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One stored interaction (ids as on the wire). `value` is NaN for an event
    sent without one: each model reads that as it reads an inline history item
    without a value (`Recommender.unrated`: 1, but what a rating model expects of
    the item), so a recorded click is no low rating to svd."""

    user_id: str
    item_id: str
    value: float
    timestamp: int
    id: int | str = 0  # the log's position once stored (SQLite row id, Redis stream id)
    event_id: str = ""  # the client's id: stored at most once per (user_id, event_id)


class FeedbackUnavailable(OSError):
    """The feedback store cannot be reached: nothing was stored (answer UNAVAILABLE)."""


# How long a SQLite connection waits for another process's lock.
BUSY_WAIT_S = 30.0


def _setting_up(step: Callable[[], None], within: float) -> None:
    """Run `step`, again while SQLite answers "database is locked" at once, up to
    `within` seconds. Switching a new log to WAL mode takes an exclusive lock,
    and SQLite answers it busy without calling the connection's busy handler
    (its timeout) when another process is setting up the same file: worker
    processes started together on a fresh state_dir (`serve --workers`) lost
    one of them to that in 1-2% of starts."""
    end = time.monotonic() + within
    pause = 0.001
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > end:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.1)


class FeedbackStore:
    """Append-only event log in SQLite; `path=""` keeps events in memory (lost at exit)."""

    shared = False  # True for a store other processes append to (followed, not polled)
    start: int | str = 0  # the position before the first event

    def __init__(self, path: str | Path = "") -> None:
        self.path = str(path)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # timeout: with several worker processes a writer waits for the lock.
        self._db = sqlite3.connect(
            self.path or ":memory:",
            check_same_thread=False,
            isolation_level=None,
            timeout=BUSY_WAIT_S,
        )
        _setting_up(self._set_up, BUSY_WAIT_S)
        self._changes: mmap.mmap | None = None
        if self.path:
            fd = os.open(self.path + ".changes", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size < 8:
                    os.ftruncate(fd, 8)  # zeros; a file another process grew stays as it is
                self._changes = mmap.mmap(fd, 8)
            finally:
                os.close(fd)

    def _set_up(self) -> None:
        """WAL mode and the schema (each step idempotent: retried as a whole)."""
        if self.path:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OSError(f"{self.path}: SQLite refused WAL mode (got {mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events ("
            " id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, item_id TEXT NOT NULL,"
            " value REAL NOT NULL, ts INTEGER NOT NULL, event_id TEXT,"
            " unrated INTEGER NOT NULL DEFAULT 0)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        # Columns a log written by an older version lacks. `unrated` 1: sent
        # without a value (stored as value 1, which an older version reads).
        for name, kind in (("event_id", "TEXT"), ("unrated", "INTEGER NOT NULL DEFAULT 0")):
            if name in columns:
                continue
            try:
                self._db.execute(f"ALTER TABLE events ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as exc:  # another process added it just now
                if "duplicate column" not in str(exc):
                    raise
        self._db.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS events_user_event ON events (user_id, event_id)"
            " WHERE event_id IS NOT NULL"
        )

    def changes(self) -> int:
        """A counter every committed append moves (shared by all processes using
        this log; -1 for a log kept in memory). Equal values: nothing new."""
        if self._changes is None:
            return -1
        return struct.unpack_from("<Q", self._changes)[0]

    def append(self, events: Iterable[Event]) -> int:
        """Store events in one transaction; returns how many were new (an event
        whose (user_id, event_id) is stored already is skipped), after the commit."""
        rows = [
            (e.user_id, e.item_id, *_stored_value(e.value), e.timestamp, e.event_id or None)
            for e in events
        ]
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            before = self._db.total_changes
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO events (user_id, item_id, value, unrated, ts,"
                    " event_id) VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            new = self._db.total_changes - before
            self._db.execute("COMMIT")
            if not new:
                return 0
            if self._changes is not None:
                # After the commit, so a reader that sees the new value finds the
                # rows. Two processes bumping at once may merge into one step:
                # both commits precede it, so one sync still reads both.
                count = struct.unpack_from("<Q", self._changes)[0]
                struct.pack_into("<Q", self._changes, 0, count + 1)
        return new

    def replay(self, after: int = 0, batch: int = 10_000) -> Iterator[Event]:
        """Every stored event with id > after, in arrival order."""
        last = after
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, user_id, item_id, value, unrated, ts, event_id FROM events"
                    " WHERE id > ? ORDER BY id LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            for row_id, u, i, v, unrated, ts, eid in rows:
                value = math.nan if unrated else float(v)
                yield Event(u, i, value, int(ts), int(row_id), eid or "")
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

    def __init__(self, limit: int = 1000, max_events: int = 0) -> None:
        """limit: items kept per user; max_events: events kept over all users
        (0 = no bound). Past it the users whose last event is oldest are
        dropped whole. Memory is about 100 bytes per event plus 250 per user,
        so without a bound a stream of new user ids (sessions, say) grows the
        process until it is killed. Replicas apply one log in one order, so
        they drop the same users."""
        self.limit = limit
        self.max_events = max_events
        self.last_id: int | str = 0  # the log position applied so far (the store's own kind)
        # Plain dicts (insertion-ordered) of str -> float: the cyclic GC does not
        # track them, so a million online users add nothing to a full
        # collection (an OrderedDict each made one take ~230 ms instead of ~30).
        # Users are in the order of their last event (the oldest first): an
        # OrderedDict, whose move_to_end and popitem(last=False) take O(1) (a
        # plain dict's first key is found by skipping the deleted slots before
        # it: dropping 900k users one by one took 27 s).
        self._users: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.events = 0  # held over all users
        self.evicted = 0  # users dropped for max_events since start
        self._lock = threading.Lock()
        self._sync = threading.Lock()

    def sync(self, store: FeedbackStore | RedisFeedbackStore) -> int:
        """Apply every event the log holds beyond last_id; returns how many."""
        with self._sync:
            if self.last_id == 0:
                self.last_id = store.start
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
            self.last_id = events[-1].id  # the log gives events in order
        return len(events)

    def apply(self, events: Iterable[Event]) -> None:
        """Add events; a repeated item moves to the end with its latest value,
        and its user to the end of the users (the most recently active). The
        bound is kept after every event, so the state does not depend on how
        the log was cut into batches (a replay, a live stream, another worker)."""
        users, bound = self._users, self.max_events
        with self._lock:
            n = self.events
            for e in events:
                items = users.get(e.user_id)
                if items is None:
                    items = users[e.user_id] = {}
                else:
                    users.move_to_end(e.user_id)
                if items.pop(e.item_id, None) is None:
                    n += 1
                items[e.item_id] = e.value
                while len(items) > self.limit:
                    del items[next(iter(items))]  # the oldest
                    n -= 1
                if bound and n > bound:
                    n = self._evict(n)
            self.events = n

    def _evict(self, n: int) -> int:
        """Drop the least recently active users until n <= max_events (the one
        just active always stays); returns the events left."""
        users = self._users
        if not self.evicted:
            log.warning(
                "online state: over online_max_events=%d recorded events in memory; dropping "
                "the least recently active users (their events stay in the feedback log)",
                self.max_events,
            )
        while n > self.max_events and len(users) > 1:
            n -= len(users.popitem(last=False)[1])
            self.evicted += 1
        return n

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


class RedisFeedbackStore:
    """The event log as a Redis Stream that every replica appends to and follows.

    `append` writes a batch with XADD inside MULTI/EXEC and returns only after
    Redis accepted it (durable as Redis's own settings make it: with AOF and
    `appendfsync always`, acknowledged means on disk). Replicas follow the
    stream (XREAD BLOCK) from their last applied id, so an event recorded
    through one replica shows in the others' answers within milliseconds. Every
    failure to reach Redis raises FeedbackUnavailable: nothing is acknowledged
    that was not stored.
    """

    shared = True
    start = "0-0"

    def __init__(
        self, url: str, key: str = "recserve:feedback", dedup_seconds: int = 7 * 86400
    ) -> None:
        import redis  # the client library; only this store needs it

        self.url, self.key, self.dedup_seconds = url, key, dedup_seconds
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=10
        )
        self._append = self._redis.register_script(_APPEND_LUA)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise FeedbackUnavailable(
                f"feedback: {self.where()} unreachable ({what}: {exc})"
            ) from None

    def where(self) -> str:
        """The store's address without credentials (for messages and logs)."""
        head, _, tail = self.url.rpartition("@")
        scheme = head.split("://", 1)[0] + "://" if "://" in head else ""
        return scheme + tail if head else self.url

    def ping(self) -> None:
        """Raise FeedbackUnavailable unless Redis answers."""
        self._call("ping", self._redis.ping)

    def changes(self) -> int:
        """Replicas follow the stream instead of polling a counter."""
        return -1

    def append(self, events: Iterable[Event]) -> int:
        """Store events atomically (one Lua script: Redis runs it whole or not at
        all); returns how many were new, once Redis accepted them. An event with
        an event_id is added only if its marker key could be set (SET NX)."""
        rows = list(events)
        if not rows:
            return 0
        keys = [self.key]
        args: list[str | int] = [self.dedup_seconds]
        for e in rows:
            marker = f"{self.key}:id:{len(e.user_id)}:{e.user_id}:{e.event_id}"
            keys.append(marker if e.event_id else "")
            value, unrated = _stored_value(e.value)
            args += [e.user_id, e.item_id, repr(value), str(e.timestamp), e.event_id]
            args.append("1" if unrated else "")
        return int(self._call("append", self._append, keys=keys, args=args))

    def replay(self, after: int | str = "0-0", batch: int = 10_000) -> Iterator[Event]:
        """Every stored event after stream id `after`, in order."""
        last = str(after or "0-0")
        while True:
            rows = self._call("read", self._redis.xrange, self.key, f"({last}", "+", count=batch)
            if not rows:
                return
            for sid, fields in rows:
                yield _event_of(sid, fields)
            last = rows[-1][0].decode() if isinstance(rows[-1][0], bytes) else rows[-1][0]

    def wait(self, after: int | str, block_ms: int) -> bool:
        """Block up to block_ms for an event after `after`; True when one arrived."""
        got = self._call(
            "follow", self._redis.xread, {self.key: str(after or "0-0")}, count=1, block=block_ms
        )
        return bool(got)

    def count(self) -> int:
        """Events stored."""
        return int(self._call("count", self._redis.xlen, self.key))

    def close(self) -> None:
        """Close the connections."""
        self._redis.close()


# KEYS[1] the stream, KEYS[1 + n] event n's marker key ("" without an event_id);
# ARGV[1] the markers' lifetime in seconds, then per event: user, item, value,
# timestamp, event_id, "1" when sent without a value (field "n": the value
# stored is 1, which a replica of an older version reads) or "". Returns how
# many events were added.
_APPEND_LUA = """
local added = 0
for n = 2, #KEYS do
  local a = 2 + (n - 2) * 6
  local fresh = true
  if KEYS[n] ~= "" then
    fresh = redis.call("SET", KEYS[n], "1", "NX", "EX", ARGV[1])
  end
  if fresh then
    if ARGV[a + 5] == "1" then
      redis.call("XADD", KEYS[1], "*", "u", ARGV[a], "i", ARGV[a + 1], "v", ARGV[a + 2],
                 "t", ARGV[a + 3], "e", ARGV[a + 4], "n", "1")
    else
      redis.call("XADD", KEYS[1], "*", "u", ARGV[a], "i", ARGV[a + 1], "v", ARGV[a + 2],
                 "t", ARGV[a + 3], "e", ARGV[a + 4])
    end
    added = added + 1
  end
end
return added
"""


def _stored_value(value: float) -> tuple[float, int]:
    """(value, unrated) as a log stores an event's value: an event sent without
    one (NaN) is stored as 1 with the flag, so an older version reading the
    same log reads the 1 it always stored."""
    return (1.0, 1) if math.isnan(value) else (value, 0)


def _event_of(sid: bytes | str, fields: dict) -> Event:
    f = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    return Event(
        f["u"],
        f["i"],
        math.nan if f.get("n") == "1" else float(f["v"]),
        int(f["t"]),
        sid.decode() if isinstance(sid, bytes) else sid,
        f.get("e", ""),
    )


def open_store(target: str) -> FeedbackStore | RedisFeedbackStore:
    """The feedback log: a redis:// or rediss:// URL, a SQLite path, or "" for memory.
    A SQLite file that cannot be created stops start-up (OSError naming the path);
    a Redis that cannot be reached is retried by the follower (see App)."""
    if target.startswith(("redis://", "rediss://")):
        return RedisFeedbackStore(target)
    try:
        return FeedbackStore(target)
    except (OSError, sqlite3.Error) as exc:
        raise OSError(f"feedback: cannot open the SQLite log {target} ({exc})") from None
