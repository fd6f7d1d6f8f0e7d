"""A bounded, ordered pipeline for a backlog of photos: read/decode/preprocess in worker threads, decide in order.

``predict`` and ``serve`` spend most of each photo in work that releases the GIL (Pillow's JPEG decoder and resize,
numpy on whole arrays, hashing the file), so worker threads overlap it across cores while the calling thread runs
the model (one inference request is not safe to share between threads) and writes the results in input order.
At most ``2 x workers`` photos are in flight, so memory stays bounded whatever the backlog: each holds one decoded,
draft-scaled image and one network input (a non-JPEG file is decoded at full size: the decode budget,
``preprocess.MAX_DECODE_BYTES``, then applies per worker). With one worker nothing runs in another thread (the
behaviour before).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from tlcompile.errors import TlcompileError
from tlcompile.runtime.inference import default_threads

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 64
# More workers than this rarely helps: decoding a draft-scaled JPEG is ~10x the model's time per photo here, and
# every worker holds its photo's arrays in memory.
DEFAULT_MAX_WORKERS = 4
IN_FLIGHT_PER_WORKER = 2


def default_workers() -> int:
    """One worker per usable core (affinity and TLCOMPILE_NUM_THREADS respected), at most DEFAULT_MAX_WORKERS."""
    return max(1, min(DEFAULT_MAX_WORKERS, default_threads()))


# A model of at most this many multiply-accumulates per image is cheap beside its photo's decode (the quickstart's
# 16 M: ~2 ms against ~12 ms for a 12 MP JPEG on a 2-core AMD EPYC); a heavier one is the backlog's slowest stage.
CHEAP_MODEL_MACS = 100_000_000


def model_threads(workers: int, *, explain: bool = False, macs: int | None = None) -> int:
    """The model's threads beside ``workers`` threads that prepare photos: for a cheap model (``macs``, its
    multiply-accumulates per image, at most :data:`CHEAP_MODEL_MACS`) the cores the workers leave, at least one;
    every usable core for one worker, for explanations (a heatmap runs the model on hundreds of masked copies of each
    photo, the model is then the work), and for a heavier or unknown model (then the model is what a backlog waits
    for).

    The workers keep their cores busy on a backlog, and a cheap model's thread pool spread over those cores only adds
    wake-ups: two workers and a two-thread ONNX Runtime on 2 cores took 20.6-21.0 ms of CPU per photo (~18k context
    switches per 200 photos) and cleared 88-90 photos/s; with one model thread, 18.9-19.0 ms and 97-98 photos/s
    (quickstart bundle, fp32 and int8 on onnxruntime, "AMD EPYC" with AVX-512; OpenVINO's int8 was the same either
    way). The README's build-time section has the figures and the command.
    """
    cores = default_threads()
    if workers <= 1 or explain or macs is None or macs > CHEAP_MODEL_MACS:
        return cores
    return max(1, cores - workers)


def check_workers(workers: int | None, source: str = "--workers") -> int:
    """``workers`` (None: :func:`default_workers`), refused with one line when out of range."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise TlcompileError(
            f"{source} {workers!r} is out of range; valid: a whole number of worker threads from 1 to {MAX_WORKERS}"
        )
    return workers


def ordered(
    fn: Callable[[T], R], items: Iterable[T], workers: int, *, stop: threading.Event | None = None
) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` for each item, in the order of ``items``, with ``fn`` run in up to ``workers`` threads.

    ``fn`` must not raise (return its error instead): a result is handed out only when its turn comes, so an
    exception would be reported out of order. ``items`` is consumed lazily in the calling thread, as room frees up.
    Once ``stop`` is set no new item is started; those already started are finished and handed out (their work is
    not lost, and the caller records them). Leaving the loop early cancels what has not started and waits for what
    has.
    """
    if workers <= 1:
        for item in items:
            if stop is not None and stop.is_set():
                return
            yield item, fn(item)
        return
    source = iter(items)
    window: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tlcompile-worker") as pool:
        try:
            exhausted = False
            while True:
                while not exhausted and len(window) < IN_FLIGHT_PER_WORKER * workers:
                    if stop is not None and stop.is_set():
                        exhausted = True
                        break
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    window.append((item, pool.submit(fn, item)))
                if not window:
                    return
                item, future = window.popleft()
                yield item, future.result()
        finally:
            for _, future in window:
                future.cancel()
