"""The feedback log's change counter: what lets --workers N skip reading the log
on every request while an event recorded through one worker still shows in the
next answer of any other."""

from __future__ import annotations

import gc
import math
import random
import sqlite3
import subprocess
import sys
import textwrap

from prometheus_client import CollectorRegistry

from recserve.config import ServerConfig
from recserve.feedback import Event, FeedbackStore, OnlineState
from recserve.service import App


def test_every_append_moves_the_shared_counter(tmp_path):
    db = str(tmp_path / "fb.sqlite")
    a, b = FeedbackStore(db), FeedbackStore(db)
    assert a.changes() == b.changes() == 0
    assert a.append([Event("u1", "i1", 1.0, 0)]) == 1
    assert a.changes() == b.changes() == 1
    assert a.append([]) == 0  # nothing stored, nothing to announce
    assert b.changes() == 1
    # Another process: its commit shows through the mapped counter here.
    code = textwrap.dedent(
        f"""
        from recserve.feedback import Event, FeedbackStore, OnlineState
        FeedbackStore({db!r}).append([Event("u2", "i2", 2.0, 0), Event("u2", "i3", 1.0, 0)])
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert b.changes() == 2
    assert [e.user_id for e in b.replay()] == ["u1", "u2", "u2"]
    a.close()
    assert FeedbackStore(db).changes() == 2  # the counter outlives the processes
    assert FeedbackStore("").changes() == -1  # in memory: nothing shared


def test_worker_reads_the_log_only_when_it_moved(tmp_path, monkeypatch):
    db = str(tmp_path / "fb.sqlite")
    app = App(
        ServerConfig(models=str(tmp_path / "none"), workers=2, feedback_db=db),
        registry=CollectorRegistry(),
    )
    reads = []
    sync = app.online.sync
    monkeypatch.setattr(app.online, "sync", lambda store: reads.append(1) or sync(store))
    app.shared_sync()
    assert len(reads) == 1  # the first call always reads
    app.shared_sync()
    app.shared_sync()
    assert len(reads) == 1
    other = FeedbackStore(db)  # another worker records
    other.append([Event("u9", "i4", 3.0, 0)])
    app.shared_sync()
    assert len(reads) == 2 and app.online.history("u9") == [("i4", 3.0)]
    app.shared_sync()
    assert len(reads) == 2


def test_online_state_keeps_each_users_latest_items_in_order():
    # Against a plain list model: a repeated item moves to the end with its
    # latest value; only the newest `limit` distinct items stay.
    rng = random.Random(7)
    state, model = OnlineState(limit=5), {}
    for n in range(3000):
        user, item = f"u{rng.randrange(20)}", f"i{rng.randrange(12)}"
        state.apply([Event(user, item, float(n), 0)])
        kept = [(i, v) for i, v in model.get(user, []) if i != item] + [(item, float(n))]
        model[user] = kept[-5:]
    assert len(state) == len(model)
    for user, expected in model.items():
        assert state.history(user) == expected
    assert state.history("nobody") == [] and state.history("") == []


def test_online_state_keeps_at_most_max_events_dropping_the_least_recently_active_users(caplog):
    # Without a bound a stream of new user ids (sessions) grew the process by
    # ~350 bytes each until it was killed. Against a plain model: users in the
    # order of their last event; past max_events the oldest users go whole.
    rng = random.Random(11)
    state, model = OnlineState(limit=4, max_events=30), {}
    dropped = 0
    for n in range(5000):
        user, item = f"u{rng.randrange(60)}", f"i{rng.randrange(9)}"
        state.apply([Event(user, item, float(n), 0)])
        kept = [(i, v) for i, v in model.pop(user, []) if i != item] + [(item, float(n))]
        model[user] = kept[-4:]  # reinserted: the most recently active is last
        while sum(len(v) for v in model.values()) > 30:
            del model[next(iter(model))]
            dropped += 1
    assert state.events == sum(len(v) for v in model.values()) <= 30
    assert state.evicted == dropped > 0 and len(state) == len(model)
    for user in (f"u{i}" for i in range(60)):
        assert state.history(user) == model.get(user, [])
    assert "over online_max_events=30" in caplog.text
    # The same log applied in one batch (a restart's replay, another worker)
    # leaves the same state.
    rng = random.Random(11)
    again = OnlineState(limit=4, max_events=30)
    again.apply(
        Event(f"u{rng.randrange(60)}", f"i{rng.randrange(9)}", float(n), 0) for n in range(5000)
    )
    assert all(again.history(f"u{i}") == state.history(f"u{i}") for i in range(60))
    unbounded = OnlineState(limit=4)
    unbounded.apply(Event(f"s{n}", "i", 1.0, 0) for n in range(10_000))
    assert len(unbounded) == unbounded.events == 10_000 and unbounded.evicted == 0


def test_online_users_add_nothing_to_the_cyclic_collectors_work():
    # A million online users must not make every full collection scan a
    # million containers (a stall of every call in flight).
    state = OnlineState()
    gc.collect()
    before = len(gc.get_objects())
    state.apply(Event(f"u{n}", f"i{n % 50}", 1.0, 0) for n in range(20_000))
    state.apply(Event(f"u{n}", f"i{n % 7}", 2.0, 0) for n in range(0, 20_000, 3))
    assert len(state) == 20_000
    assert len(gc.get_objects()) - before < 100


def test_a_log_another_process_is_setting_up_is_waited_for(tmp_path):
    """Worker processes started together on a fresh state_dir open one log at
    once. SQLite answers the switch to WAL mode "database is locked" at once,
    without the connection's busy timeout, while another connection holds a
    write lock (found by a CI run: `serve --workers 2` lost a worker; 4 of 300
    starts of four processes). Here another connection holds one for 0.3 s:
    the store waits for it instead of failing."""
    import sqlite3
    import threading

    path = tmp_path / "feedback.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE other (x)")
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        store = FeedbackStore(path)  # the old code: OperationalError at once
    finally:
        release.join()
        other.close()
    assert store.append([Event("u", "i", 1.0, 0, event_id="e")]) == 1


def _old_log(folder, more_columns: str, row: tuple) -> str:
    """A SQLite log as an older version wrote it (the columns up to ts, then
    `more_columns`), holding one event `row` (user, item, value, ts)."""
    path = str(folder / "old.sqlite")
    old = sqlite3.connect(path, isolation_level=None)
    old.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, user_id TEXT NOT NULL,"
        f" item_id TEXT NOT NULL, value REAL NOT NULL, ts INTEGER NOT NULL{more_columns})"
    )
    old.execute("INSERT INTO events (user_id, item_id, value, ts) VALUES (?, ?, ?, ?)", row)
    old.close()
    return path


def test_a_log_from_before_event_ids_is_upgraded_once_whoever_adds_the_column(
    tmp_path, monkeypatch
):
    """A log written before event ids existed gets the event_id column on open,
    its events kept. Two processes opening it at once both see the column
    missing and both add it: the second's ALTER fails with "duplicate column",
    which is the other process's work done, not an error. Here a second
    connection adds the column between this store's schema read and its ALTER."""
    import recserve.feedback as feedback

    path = _old_log(tmp_path, "", ("u0", "i0", 2.0, 5))
    real_connect = sqlite3.connect
    raced = []

    class Racing:
        """The store's connection; after its schema read, another process's ALTER."""

        def __init__(self, *a, **kw):
            self._c = real_connect(*a, **kw)

        def execute(self, sql, *args):
            cur = self._c.execute(sql, *args)
            if sql.startswith("PRAGMA table_info(events)") and not raced:
                rows = cur.fetchall()
                other = real_connect(path, isolation_level=None)
                other.execute("ALTER TABLE events ADD COLUMN event_id TEXT")
                other.close()
                raced.append(True)
                return iter(rows)
            return cur

        def __getattr__(self, name):
            return getattr(self._c, name)

    monkeypatch.setattr(feedback.sqlite3, "connect", Racing)
    store = FeedbackStore(path)
    monkeypatch.undo()
    assert raced == [True]
    assert store.append([Event("u1", "i1", 1.0, 7, event_id="e1")]) == 1
    assert store.append([Event("u1", "i1", 1.0, 7, event_id="e1")]) == 0  # a retry: skipped
    got = [(e.user_id, e.item_id, e.value, e.timestamp, e.event_id) for e in store.replay()]
    assert got == [("u0", "i0", 2.0, 5, ""), ("u1", "i1", 1.0, 7, "e1")]
    store.close()
    again = FeedbackStore(path)  # the upgraded log opens as any other
    assert len(list(again.replay())) == 2
    again.close()


def test_a_long_log_replays_in_batches_to_the_state_of_one_pass(tmp_path):
    # A restart replays the whole log, 10,000 events at a time: 25,000 events
    # (two full batches and a rest) and then more leave the state a single pass
    # over the same events gives.
    rng = random.Random(3)
    # Each user's events in one stretch: a batch not applied loses its users.
    events = [Event(f"u{n // 100}", f"i{rng.randrange(40)}", float(n), 0) for n in range(25_000)]
    store = FeedbackStore(str(tmp_path / "log.sqlite"))
    store.append(events)
    state = OnlineState(limit=6)
    assert state.sync(store) == 25_000
    more = [Event(f"u{rng.randrange(250)}", f"i{rng.randrange(40)}", -1.0, 0) for _ in range(10)]
    store.append(more)
    assert state.sync(store) == 10 and state.sync(store) == 0
    one = OnlineState(limit=6)
    one.apply(events + more)
    assert len(state) == len(one) == 250 and state.events == one.events
    for user in (f"u{i}" for i in range(250)):
        assert state.history(user) == one.history(user)


def test_an_event_without_a_value_is_kept_unrated_and_an_older_reader_sees_1(tmp_path):
    """NaN (sent without a value) survives the log and a restart as NaN; in the
    file it is a 1 with the `unrated` flag, what an older version wrote and
    reads. A log from before the flag reads as it was written (rated)."""
    path = _old_log(tmp_path, ", event_id TEXT", ("u", "a", 1.0, 5))
    store = FeedbackStore(path)
    events = [Event("u", "b", math.nan, 6), Event("u", "c", 0.0, 7), Event("u", "d", 3.5, 8)]
    assert store.append(events) == 3
    store.close()
    again = FeedbackStore(path)
    got = [(e.item_id, e.value) for e in again.replay()]
    assert got[0] == ("a", 1.0) and got[2:] == [("c", 0.0), ("d", 3.5)]
    assert got[1][0] == "b" and math.isnan(got[1][1])
    state = OnlineState()
    state.sync(again)
    assert [i for i, v in state.history("u") if math.isnan(v)] == ["b"]
    again.close()
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM events WHERE item_id = 'b'").fetchone() == (1.0,)
    raw.close()
