"""The studies' process pool: single-thread training jobs in spawned processes, at most
``workers`` at once, started one by one as workers free up, so the next job can depend on what
the last one found (``run_pool``), or taken from a fixed list (``parallel``).

A SIGTERM to the study is passed on to the running jobs (a trainer then writes a checkpoint of
its step and stops) and no further job starts (nor after a failed job or Ctrl-C), so a stopped
study leaves no process behind and the same command continues it."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import signal
from collections.abc import Callable, Hashable
from typing import Any

Job = tuple[Hashable, Callable, tuple]  # (key, fn, args): fn(*args) runs in a worker

_STOP = None  # in a worker: the study's stop event


def _init_worker(stop) -> None:
    """A worker: keep the study's stop event; a SIGTERM outside a trainer's own handling (an
    evaluation, a start-up) ends the job, not the process, so the pool stays whole."""
    global _STOP
    _STOP = stop
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # started while it was blocked

    def end_job(signum, frame):
        raise SystemExit(f"job stopped by signal {signum}")

    signal.signal(signal.SIGTERM, end_job)


def _guarded(fn, *job):
    """``fn(*job)``, unless the study was stopped before this job could start."""
    if _STOP is not None and _STOP.is_set():
        raise RuntimeError(f"not started: the study was stopped before job {job[:2]}")
    return fn(*job)


def run_pool(next_job: Callable[[set], Job | None], workers: int,
             on_done: Callable[[Hashable, Any], None] = lambda key, result: None) -> dict:
    """Keep up to ``workers`` jobs running. ``next_job(busy)`` gives the next job whose key is
    not in ``busy`` (the keys running or done in this call), or None when none can start now;
    ``on_done(key, result)`` runs here as each job ends, and may make new jobs available.
    Returns ``{key: result}``; a failed job's exception is raised once the others stopped."""
    ctx = multiprocessing.get_context("spawn")
    stop_event = ctx.Event()
    out: dict = {}
    running: dict[cf.Future, Hashable] = {}
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                  initializer=_init_worker, initargs=(stop_event,))
    stopping = []

    def stop(signum, frame):
        stop_event.set()
        for child in multiprocessing.active_children():
            child.terminate()
        if not stopping:  # a second SIGTERM while the workers finish only passes it on
            stopping.append(signum)
            raise SystemExit(f"stopped by signal {signum}: the running jobs saved their step; "
                             "the same command continues")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            while len(running) < workers:
                job = next_job(set(running.values()) | set(out))
                if job is None:
                    break
                key, fn, args = job
                # submit() holds the pool's lock, which the handler's shutdown path must not meet
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                try:
                    running[pool.submit(_guarded, fn, *args)] = key
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            if not running:
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                key = running.pop(fut)
                out[key] = fut.result()
                on_done(key, out[key])
    finally:
        stop_event.set()  # a job not yet started after a failure or a stop does not start
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)
    return out


def parallel(jobs: list[tuple], fn: Callable, workers: int, keys: tuple | None = None) -> dict:
    """``fn(*job)`` for every job, in order, ``workers`` at once; results by ``keys[i]`` (by
    the job's first two fields without them)."""
    queue = list(enumerate(jobs))

    def next_job(busy: set) -> Job | None:
        if not queue:
            return None
        i, job = queue.pop(0)
        return (keys[i] if keys else job[:2]), fn, job

    return run_pool(next_job, workers)
