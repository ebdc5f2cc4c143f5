"""The worker's exclusive jobs (the hybrid loop, ONNX, n above max_num_seqs): advanced one
event at a time between batch steps, each holding rows, so max_num_seqs bounds them too."""

from __future__ import annotations

import asyncio
import threading
import time

from engine.batching import BatchConfig
from server.scheduler import Job, Scheduler


def _job(loop, name: str, events: int, log: list, gate: threading.Event | None = None) -> Job:
    def work(cancel):
        for i in range(events):
            if gate is not None:
                gate.wait(10)
            log.append((name, i))
            yield (name, i)
    return Job(loop, work=work)


def _wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline
        time.sleep(0.005)


def test_exclusive_jobs_interleave_within_the_row_budget():
    loop, log, gate = asyncio.new_event_loop(), [], threading.Event()
    sched = Scheduler(max_queue=4, batch=BatchConfig(max_num_seqs=2))
    try:
        jobs = [_job(loop, name, 3, log, gate) for name in "abc"]
        for j in jobs:
            sched.submit(j)
        _wait_for(lambda: sched.running == 2)  # a and b hold the two rows; c waits
        assert sched.waiting == 1
        gate.set()
        _wait_for(lambda: len(log) == 9)
        assert log[:6] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]  # alternating
        assert log.index(("c", 0)) == 6  # c starts once a row is free
        _wait_for(lambda: sched.running == 0)
    finally:
        sched.shutdown()
        loop.close()


def test_a_cancelled_exclusive_job_frees_its_row_at_once():
    loop, log, gate = asyncio.new_event_loop(), [], threading.Event()
    sched = Scheduler(max_queue=4, batch=BatchConfig(max_num_seqs=1))
    try:
        endless = _job(loop, "endless", 10**9, log)
        sched.submit(endless)
        _wait_for(lambda: len(log) > 5)
        short = _job(loop, "short", 2, log, gate)
        sched.submit(short)
        assert sched.waiting == 1  # the one row is taken
        endless.cancel.set()
        gate.set()
        _wait_for(lambda: ("short", 1) in log)
        _wait_for(lambda: sched.running == 0)
    finally:
        sched.shutdown()
        loop.close()


def test_none_from_an_exclusive_job_is_a_step_with_nothing_sent():
    from engine.events import Done

    loop, log = asyncio.new_event_loop(), []
    sched = Scheduler(max_queue=4, batch=BatchConfig(max_num_seqs=1))

    def work(cancel):
        for i in range(3):
            yield None  # e.g. a memory-model token
            log.append(i)
            yield ("token", i)

    try:
        job = Job(loop, work=work)
        sched.submit(job)
        _wait_for(lambda: sched.running == 0 and len(log) == 3)
        loop.run_until_complete(asyncio.sleep(0.01))  # deliver what the worker emitted
        sent = [job.events.get_nowait() for _ in range(job.events.qsize())]
        assert sent[:-1] == [("token", 0), ("token", 1), ("token", 2)] and isinstance(sent[-1], Done)
    finally:
        sched.shutdown()
        loop.close()
