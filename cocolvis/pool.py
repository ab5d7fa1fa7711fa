"""The build's worker pool: a few images' masks per message, a dead worker noticed at once.

Workers are forked before the annotation files are read, so they share none of the
parent's copy of a 1 GB file and peak memory does not grow with the worker count; each
receives a few images' annotations at a time. Workers ignore Ctrl-C and SIGHUP: the parent
stops handing out work, lets the images in flight finish, and the build can be resumed (a
SIGTERM of the parent alone does the same; one sent to the whole process group ends the
workers at once). A worker dies with its parent however the parent ends, SIGKILL included
(`segkit.signals.die_with_parent`), so none is left holding the parent's pipes open.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

from segkit.io import InputError
from segkit.signals import worker_setup
from cocolvis.paint import MaskResult, MaskTask, write_mask

CHUNK = 4
"""Images per message to a worker: one at a time, the parent's per-message cost held two
workers to 1.5x the throughput of one; four bring it to 1.9x and still keep a worker's
share of the annotations a few images' worth."""
IN_FLIGHT = 3
"""Chunks queued per worker: enough to keep every worker busy, few enough to stop fast."""


MAX_WORKERS = 256
"""Most worker processes a build starts."""


def default_workers() -> int:
    """All the cores this process may run on, at most MAX_WORKERS."""
    try:
        return min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    except AttributeError:
        return min(os.cpu_count() or 1, MAX_WORKERS)


def _ready() -> None:
    """A no-op: submitting it makes the executor fork every worker now."""


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[cf.ProcessPoolExecutor | None]:
    """A pool of `workers` processes, started now, or None for one worker (work stays in this process)."""
    if workers > MAX_WORKERS:
        raise InputError(None, f"--workers {workers}: at most {MAX_WORKERS} worker processes")
    if workers <= 1:
        yield None
        return
    fork = "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker_setup, initargs=(os.getpid(),))
    try:
        pool.submit(_ready).result()  # with fork, every worker starts at the first submit
        yield pool
    except BrokenProcessPool:
        raise InputError(None, "a worker process died (killed, or out of memory?); the build stopped") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_masks(tasks: list[MaskTask]) -> list[MaskResult]:
    """The worker function: paint and write a chunk of masks."""
    return [write_mask(t) for t in tasks]


def _chunks(tasks: Iterable[MaskTask], size: int) -> Iterator[list[MaskTask]]:
    chunk = []
    for task in tasks:
        chunk.append(task)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_tasks(tasks: Iterable[MaskTask], pool: cf.ProcessPoolExecutor | None = None,
              workers: int = 2) -> Iterator[MaskResult]:
    """Write every task's mask, in this process or on `pool`; results come in any order.

    At most IN_FLIGHT chunks per worker (`workers`, the pool's size) are queued, so tasks are made (and their
    annotations copied) only shortly before a worker needs them.
    """
    if pool is None:
        yield from map(write_mask, tasks)
        return
    chunks = _chunks(tasks, CHUNK)
    pending = set()
    limit = IN_FLIGHT * workers
    try:
        while True:
            for chunk in chunks:
                pending.add(pool.submit(write_masks, chunk))
                if len(pending) >= limit:
                    break
            if not pending:
                return
            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                yield from future.result()
    finally:
        for future in pending:
            future.cancel()
