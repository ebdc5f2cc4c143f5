"""One worker thread running jobs in FIFO order, off the event loop.

A job is a generator of typed events (`engine.events`, built by the serving layer); the
worker iterates it and hands each event to the job's asyncio queue, adding `Failed` if the
job raised and `Done` after every job. Cancellation (client gone) is a
threading.Event the job's generator checks every token. The queue is bounded: a full
queue is refused at submit time so the route can answer 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from engine.events import Done, Event, Failed


class QueueFull(Exception):
    pass


@dataclass
class Job:
    work: Callable[[threading.Event], Iterator[Event]]  # yields events; gets the cancel flag
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    def __init__(self, max_queue: int, on_state: Callable[[int, int], None] | None = None):
        self.max_queue = max_queue
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self._on_state = on_state or (lambda waiting, running: None)
        self._thread = threading.Thread(target=self._loop, name="generation-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(f"{self.waiting} requests are already waiting (limit {self.max_queue})")
            self.waiting += 1
            self._publish()
        self._q.put(job)

    def _publish(self) -> None:
        self._on_state(self.waiting, self.running)

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            with self._lock:
                self.waiting -= 1
                self.running += 1
                self._publish()
            job.started_at = time.perf_counter()
            try:
                if not job.cancel.is_set():
                    for event in job.work(job.cancel):
                        job.emit(event)
                        if job.cancel.is_set():
                            break
            except Exception as e:  # reported to the client; the worker keeps serving
                job.emit(Failed(e))
            finally:
                job.emit(Done())
                with self._lock:
                    self.running -= 1
                    self._publish()

    def shutdown(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)
