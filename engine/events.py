"""Typed events from a generation job to whoever serves it.

The worker thread runs a job (plain generation, or the hybrid loop) as a generator of
these events; the HTTP layer turns them into OpenAI wire objects (vLLM's engine hands
`RequestOutput` dataclasses to `serving_chat.py` the same way). Nothing here knows about
HTTP or pydantic, so benchmarks and scripts can consume a job directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Event:
    """Base of every event a job yields (or the scheduler adds: Failed, Done)."""


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's text and log-probability, with the top alternatives."""
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Delta:
    """New text of one choice (row `index`); `finish_reason` set on the row's last delta."""
    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | None (still running)
    logprob: TokenLogprob | None = None

    @property
    def empty(self) -> bool:
        return not self.text and self.finish_reason is None and self.logprob is None


@dataclass(frozen=True)
class TokenStep(Event):
    """One decode step: a delta per row that produced a token (or finished) in it."""
    deltas: list[Delta]
    t: float  # perf_counter() when the step's tokens were ready (TTFT, inter-token latency)


@dataclass(frozen=True)
class Reasoning(Event):
    """Reasoning text (the hybrid loop's chain-of-thought and condensed prompts)."""
    text: str


@dataclass(frozen=True)
class Stats(Event):
    """A job's own accounting, e.g. the hybrid loop's per-stage `HybridStats`."""
    stats: Any


@dataclass(frozen=True)
class Usage(Event):
    """Generated tokens of the answer (all rows); the job's last event."""
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache, not a prefill


@dataclass(frozen=True)
class Failed(Event):
    """The job raised; added by the scheduler, which keeps serving."""
    error: BaseException


@dataclass(frozen=True)
class Done(Event):
    """Nothing follows; added by the scheduler after every job, failed or not."""
