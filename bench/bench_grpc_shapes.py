"""What a response shape costs in grpc-python, with no model work at all.

    python bench/bench_grpc_shapes.py

A grpc.aio server (in a child process) answers the same RecommendRequest six
ways: a tiny unary reply, a unary RecommendResponse of 10 items (with and
without trailing metadata), a server stream of one such message (with and
without a separate initial-metadata write), and a stream of 10 RankedItems.
A sync client measures q/s and p50 at concurrency 1 and 8. This is why
Recommend is unary and the per-item stream is RecommendStream.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from recserve.v1 import recommender_pb2 as pb

ITEMS = [pb.RankedItem(item_id=str(i), score=1.0 / (i + 1), rank=i + 1) for i in range(10)]
MD = (("x-recserve-model", "als"),)


def _answer() -> pb.RecommendResponse:
    return pb.RecommendResponse(items=ITEMS, model="als", version="v1")


async def unary_small(req, ctx):
    return pb.RecordSummary(accepted=1)


async def unary_10(req, ctx):
    return _answer()


async def unary_10_trailers(req, ctx):
    ctx.set_trailing_metadata(MD)
    return _answer()


async def stream_1(req, ctx):
    yield _answer()


async def stream_1_headers(req, ctx):
    await ctx.send_initial_metadata(MD)
    yield _answer()


async def stream_10_headers(req, ctx):
    await ctx.send_initial_metadata(MD)
    for item in ITEMS:
        yield item


SHAPES = {
    "unary_small": (unary_small, False, pb.RecordSummary),
    "unary_10": (unary_10, False, pb.RecommendResponse),
    "unary_10_trailers": (unary_10_trailers, False, pb.RecommendResponse),
    "stream_1": (stream_1, True, pb.RecommendResponse),
    "stream_1_headers": (stream_1_headers, True, pb.RecommendResponse),
    "stream_10_headers": (stream_10_headers, True, pb.RankedItem),
}


def _serve(queue) -> None:
    async def main() -> None:
        handlers = {}
        for name, (fn, streaming, out) in SHAPES.items():
            make = (
                grpc.unary_stream_rpc_method_handler
                if streaming
                else grpc.unary_unary_rpc_method_handler
            )
            handlers[name] = make(
                fn,
                request_deserializer=pb.RecommendRequest.FromString,
                response_serializer=out.SerializeToString,
            )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("x.X", handlers),))
        queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _load(port: int, name: str, conc: int, seconds: float) -> tuple[float, float]:
    _, streaming, out = SHAPES[name]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(
        f"/x.X/{name}",
        request_serializer=pb.RecommendRequest.SerializeToString,
        response_deserializer=out.FromString,
    )
    req = pb.RecommendRequest(user_id="1", k=10)
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            if streaming:
                for _ in call(req):
                    pass
            else:
                call(req)
            with lock:
                lat.append(time.perf_counter() - t)

    with ThreadPoolExecutor(conc) as pool:
        for _ in range(conc):
            pool.submit(worker)
    channel.close()
    return len(lat) / seconds, statistics.median(lat) * 1e3


def main() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(queue,), daemon=True)
    server.start()
    port = queue.get(timeout=30)
    print(f"{'conc':>4}  {'shape':<18}{'q/s':>8}{'p50 ms':>9}")
    try:
        for conc in (1, 8):
            for name in SHAPES:
                _load(port, name, conc, 0.5)  # warm-up
                qps, p50 = _load(port, name, conc, 3.0)
                print(f"{conc:>4}  {name:<18}{qps:>8,.0f}{p50:>9.3f}", flush=True)
    finally:
        server.kill()


if __name__ == "__main__":
    main()
