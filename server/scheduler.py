"""The generation worker: one thread, off the event loop, that runs generation in continuous
batches (one `engine.batching.BatchEngine` per model) and other jobs between their steps.

Jobs start first come, first served:
- a plain generation (`engine.textgen.TextRequest`) joins its model's batch as soon as
  `max_num_seqs` rows have room for its n samples; every batch step hands each running request
  its own TokenStep (text, finish reasons, logprobs), and Usage at its end; the batches share
  one prefix cache (`engine.prefix_cache`), whose entries each belong to one model;
- any other job is a generator the worker advances between batch steps. The hybrid loop's
  yields `Join(model, seq)` for each of its stages, which the worker adds to that model's batch
  (the large model's stages decode with plain requests, the memory model's with each other),
  and None while it waits for a step: the worker advances it until it waits, so it reads every
  token its sequences got in the last step. A job that joins no batch - a model without a
  batched forward (ONNX Runtime), or n above max_num_seqs - runs alone, one event (a token) per
  batch step, so it and the batch progress together. Either holds min(n, max_num_seqs) rows
  while it runs (a hybrid request: one; its stages run one at a time).
Every job's events go to its own asyncio queue; the worker adds `Failed` if the job raised and
`Done` after every job. Cancellation (client gone) is a threading.Event: a batched request (or
stage) leaves the batch at the next step, freeing its rows; an exclusive job checks it every
token. A batch whose forward failed is replaced by a fresh one: its requests fail, and so does
each job whose stage was in it (`seq.error`). A request is refused at submit time (the route
answers 429 with Retry-After) only when every row is taken and `max_queue` requests already wait.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from engine.batching import BatchConfig, BatchEngine, Join
from engine.events import Done, Event, Failed
from engine.prefix_cache import PrefixCache
from engine.textgen import TextRequest


_END = object()  # an exclusive job's generator is exhausted


class QueueFull(Exception):
    pass


@dataclass
class Job:
    loop: asyncio.AbstractEventLoop
    work: Callable[[threading.Event], Iterator[Event]] | None = None  # an exclusive job; gets the cancel flag
    request: TextRequest | None = None  # a plain generation: batched when its model allows
    start: Callable[[], None] = lambda: None  # on the worker thread as the job starts (the profile's threads)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    joined: bool = False  # an exclusive job that has put a sequence into a batch (the hybrid loop)

    def __post_init__(self):
        if (self.work is None) == (self.request is None):
            raise ValueError("a job is either exclusive work or a generation request")
        if self.request is not None:
            self.cancel = self.request.seq.cancel  # the batch engine watches the same flag
            self.work = self.request.work  # what it runs when it cannot join a batch

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    def __init__(self, max_queue: int, on_state: Callable[[int, int], None] | None = None,
                 batch: BatchConfig | None = None, prefix_cache: PrefixCache | None = None):
        self.max_queue = max_queue
        self.batch = batch or BatchConfig()
        self.prefix_cache = prefix_cache  # None: every prompt is prefilled whole
        self._on_state = on_state or (lambda waiting, running: None)
        self._cv = threading.Condition()  # guards the fields below; wakes an idle worker
        self._pending: deque[Job] = deque()  # submitted, not started
        self.running = 0  # started jobs, batched or exclusive
        self._rows = 0  # rows held by batched requests (all models: max_num_seqs bounds the work per step)
        self._stopping = False
        # the worker's own state
        self._engines: dict[int, BatchEngine] = {}  # by id() of the model
        self._batched: list[Job] = []
        self._alone: list[tuple[Job, Iterator[Event]]] = []  # exclusive jobs, advanced an event at a time
        self._thread = threading.Thread(target=self._loop, name="generation-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The generation worker is running (a health check replaces a replica whose worker died)."""
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cv:
            free = max(0, self.batch.max_num_seqs - self._rows)
            if self.waiting >= self.max_queue + free:
                raise QueueFull(f"all {self.batch.max_num_seqs} rows are generating and {self.waiting} requests "
                                f"are already waiting (limit {self.max_queue})")
            self._pending.append(job)
            self._publish()
            self._cv.notify()

    def batchable(self, job: Job) -> bool:
        r = job.request
        return r is not None and hasattr(r.lm.model, "forward_rows") and r.params.n <= self.batch.max_num_seqs

    def _publish(self) -> None:  # under the lock
        self._on_state(self.waiting, self.running)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._pending or self._batched or self._alone):
                    self._cv.wait()
                if self._stopping:
                    for _, events in self._alone:
                        events.close()  # let the generators release their caches
                    return
            self._start_jobs()
            self._step_alone()
            self._step()

    # ---- starting jobs ------------------------------------------------------------------

    def _start_jobs(self) -> None:
        """Start waiting jobs in arrival order while the next one fits: batched requests join
        their batch, an exclusive job runs now, alone."""
        while True:
            with self._cv:
                if not self._pending:
                    return
                job = self._pending[0]
                batched = self.batchable(job) and not job.cancel.is_set()
                rows = self._rows_of(job, batched)
                if self._rows + rows > self.batch.max_num_seqs:
                    return  # it waits for rows, and everyone behind it too
                self._pending.popleft()
                self._rows += rows
                self.running += 1
                self._publish()
            job.started_at = time.perf_counter()
            if job.cancel.is_set():  # the client left while it waited
                self._finish(job, rows)
            elif batched:
                self._join_batch(job)
            else:
                self._start_alone(job, rows)

    def _rows_of(self, job: Job, batched: bool) -> int:
        """Rows a job holds while it runs: its n samples in a batch; an exclusive one as many, up
        to all of them (a hybrid request: one), so max_num_seqs bounds exclusive work too."""
        n = job.request.params.n if job.request is not None else 1
        return n if batched else min(n, self.batch.max_num_seqs)

    def _join_batch(self, job: Job) -> None:
        try:
            job.start()
            self._engine(job.request.lm.model).add(job.request.seq)
            self._batched.append(job)
        except Exception as e:
            job.emit(Failed(e))
            self._finish(job, job.request.params.n)

    def _engine(self, model) -> BatchEngine:
        engine = self._engines.get(id(model)) or BatchEngine(model, self.batch, self.prefix_cache)
        self._engines[id(model)] = engine
        return engine

    def _start_alone(self, job: Job, rows: int) -> None:
        try:
            job.start()
            self._alone.append((job, iter(job.work(job.cancel))))
        except Exception as e:  # reported to the client; the worker keeps serving
            job.emit(Failed(e))
            self._finish(job, rows)

    def _step_alone(self) -> None:
        """Advance every exclusive job between batch steps: one that joins batches until it
        waits for the next step, any other by one event (a token)."""
        for job, events in list(self._alone):
            try:
                while True:
                    event = next(events, _END)
                    if isinstance(event, Join):
                        self._engine(event.model).add(event.seq)
                        job.joined = True
                        continue
                    if event is not _END and event is not None:  # None: waiting, nothing to send
                        job.emit(event)
                    if event is _END or job.cancel.is_set():
                        self._end_alone(job, events)
                        break
                    if event is None or not job.joined:
                        break
            except Exception as e:  # reported to the client; the worker keeps serving
                job.emit(Failed(e))
                self._end_alone(job, events)

    def _end_alone(self, job: Job, events: Iterator[Event]) -> None:
        self._alone = [(j, ev) for j, ev in self._alone if j is not job]
        if hasattr(events, "close"):
            events.close()  # a cancelled generator stops here, not at garbage collection
        self._finish(job, self._rows_of(job, False))

    def _finish(self, job: Job, rows: int) -> None:
        with self._cv:
            self._rows -= rows
            self.running -= 1
            self._publish()
        job.emit(Done())  # after the gauges: a client that sees Done sees them settled

    # ---- batch steps ----------------------------------------------------------------------

    def _step(self) -> None:
        """One step of every model's batch that has work; each batched request gets its
        TokenStep, finished ones their end (a hybrid stage's job reads its sequence itself)."""
        for key, engine in list(self._engines.items()):
            if not engine.has_work:
                continue
            jobs = [j for j in self._batched if id(j.request.lm.model) == key]
            try:
                outs = engine.step()
            except Exception as e:  # every request of this batch fails; a fresh engine serves the next
                # the prefix cache holds copies, valid whatever the failed step left in the rows
                self._engines[key] = BatchEngine(engine.model, self.batch, self.prefix_cache)
                for seq in engine.running + list(engine.waiting):
                    seq.error, seq.done = e, True  # a hybrid stage: its job raises it
                for job in jobs:
                    self._leave_batch(job, failed=e)
                continue
            for job in jobs:
                req = job.request
                try:
                    if req.seq in outs:
                        job.emit(req.step(outs[req.seq]))
                    if req.seq.done:
                        self._leave_batch(job)
                except Exception as e:  # this request's text failed: it alone leaves
                    req.seq.cancel.set()  # the engine frees its rows at the next step
                    self._leave_batch(job, failed=e)

    def _leave_batch(self, job: Job, failed: Exception | None = None) -> None:
        self._batched.remove(job)
        if failed is not None:
            job.emit(Failed(failed))
        elif not job.cancel.is_set():
            for event in job.request.close():
                job.emit(event)
        self._finish(job, job.request.params.n)

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=5)
