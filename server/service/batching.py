"""Dynamic batching for the asyncio transport (as Triton and TF Serving batch
model calls): concurrent plain Recommend calls to one factor model are
scored together, in one batched FAISS search or BLAS product, then answered
one by one.

How a call goes (Core.batch_plan decides which calls may be batched):

- A model whose one-call search is cheap (its running average under
  `batch_min_ms`, as on a small catalogue; the first call measures it) is
  never batched: it is answered at once, as without batching, since
  gathering peers would cost more than the search saves.
- Otherwise the call joins its key's pending batch (same model, version, k
  and filter_seen), gathered by a task of its own: gRPC hands the loop one new
  call per turn, so the task lets the loop turn until no call joined for a
  quarter of `batch_delay_ms`, the batch holds `batch_max` calls or the delay
  is up. A lone call waits that quarter (125 us by default), never the delay.
- The batch is scored on the loop in one call: FAISS searches the queries on
  all cores (the GIL released), a BLAS product scores the rows. No hand-over
  to another thread: measured, the two threads' contention for the GIL cost
  more than batching saved. Every call then checks its own deadline and
  builds its own answer: a batch of one is the unbatched answer itself; in a
  larger one, the same items with scores within float rounding (a batched
  product sums in another order). Callers that went away are not scored.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from recserve.serving import Router

if TYPE_CHECKING:
    from recserve.service.core import Core, Plan, Session

EWMA = 0.2  # weight of the newest one-call search time in a model's average
QUIET = 0.25  # a batch is scored once no call joined for this share of the delay


class Batcher:
    """Coalesces plain Recommend calls on one event loop (see the module doc)."""

    def __init__(self, core: Core) -> None:
        cfg = core.cfg
        self.core = core
        self.delay = cfg.batch_delay_ms / 1000
        self.max = cfg.batch_max
        self.min_cost = cfg.batch_min_ms / 1000
        self.cost: dict[tuple[str, str], float] = {}  # (model, version) -> one-call seconds
        self.pending: dict[tuple, list[tuple[Plan, asyncio.Future, float]]] = {}
        self._tasks: set[asyncio.Task] = set()  # gatherers running (held: no early GC)

    async def recommend(self, s: Session, request: Any) -> tuple[Any, Any]:
        """Recommend's (answer, trailing metadata) for one call, batched or not."""
        core = self.core
        plan = core.batch_plan(s, request)
        if plan is None:
            return core.recommend(s, request)
        model = plan.key[:2]
        cost = self.cost.get(model)
        if cost is None or cost < self.min_cost:
            t = time.perf_counter()
            items, scores = core.plan_one(plan)
            took = time.perf_counter() - t
            self.cost[model] = took if cost is None else cost + EWMA * (took - cost)
            return core.plan_answer(s, plan, items, scores, took)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        batch = self.pending.get(plan.key)
        if batch is None:
            batch = self.pending[plan.key] = []
            task = loop.create_task(self._gather(plan.key, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        batch.append((plan, future, time.perf_counter()))
        items, scores, seconds = await future
        return core.plan_answer(s, plan, items, scores, seconds)

    async def _gather(self, key: tuple, batch: list) -> None:
        """Let the loop take in the calls gRPC holds (one per loop turn) until none
        joined for a quarter of the delay, the batch is full or the delay is up;
        then score them.
        A task of its own: a caller that goes away never strands the others."""
        loop = asyncio.get_running_loop()
        start = last = loop.time()
        end, quiet = start + self.delay, self.delay * QUIET
        while len(batch) < self.max:
            n = len(batch)
            await asyncio.sleep(0)
            now = loop.time()
            if len(batch) > n:
                last = now
            elif now - last >= quiet or now >= end:
                break
        del self.pending[key]
        live = [b for b in batch if not b[1].done()]  # cancelled callers: not scored
        if not live:
            return
        model, _, k, filter_seen = key
        self.core.metrics.batch_size.labels(model).observe(len(live))
        t = time.perf_counter()
        try:
            rows = self._score(live, k, filter_seen)
        except Exception as exc:  # every caller of the batch gets the error
            for _, future, _ in live:
                if not future.done():
                    future.set_exception(exc)
            return
        if len(live) == 1:
            cost = self.cost[key[:2]]
            self.cost[key[:2]] = cost + EWMA * (time.perf_counter() - t - cost)
        now = time.perf_counter()
        for row, (_, future, t0) in zip(rows, live, strict=True):
            if not future.done():
                future.set_result((*row, now - t0))

    def _score(self, batch: list, k: int, filter_seen: bool) -> list[tuple]:
        """(items, scores) per call: one batched call, or for a batch of one the
        one-user kernel (the very answer an unbatched call gets)."""
        if len(batch) == 1:
            return [self.core.plan_one(batch[0][0])]
        users = [plan.user for plan, _, _ in batch]
        items, scores = Router.plain_batch(batch[0][0].slot, users, k, filter_seen)
        return list(zip(items, scores, strict=True))
