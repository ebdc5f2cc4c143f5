"""Text generation for one request: token ids from `generate`, text from the incremental
detokenizer, stop strings matched next to the tokens (so a match ends decoding at once),
all as typed events (`engine.events`).

    work = text_generation(lm, prompt_ids, params)
    for event in work(threading.Event()): ...
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .detok import IncrementalDetokenizer, StopMatcher
from .events import Delta, Event, TokenLogprob, TokenStep, Usage
from .generate import SamplingParams, generate
from .runner import LoadedModel


@dataclass
class _Row:
    detok: IncrementalDetokenizer
    stop: StopMatcher
    tokens: int = 0
    finish_reason: str | None = None


def token_logprob(tokenizer, token: int, lp: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
    def text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    return TokenLogprob(token=text(token), logprob=lp[0], top=[(text(t), v) for t, v in lp[1]])


def _advance(row: _Row, step, i: int, finished: list[bool]) -> str:
    """The row's new text for this step's token; marks the row finished on EOS or a stop string."""
    row.tokens += 1
    if step.eos[i]:
        row.finish_reason = "stop"
        return row.stop.feed(row.detok.flush()) + row.stop.flush()
    text = row.stop.feed(row.detok.push(step.tokens[i]))
    if row.stop.stopped:
        finished[i] = True  # generate() stops decoding this row
        row.finish_reason = "stop"
    return text


def _final_deltas(rows: list[_Row]) -> list[Delta]:
    """Rows still open when decoding ended: token budget reached (or cancelled)."""
    out = []
    for i, r in enumerate(rows):
        if r.finish_reason is None:
            text = r.stop.feed(r.detok.flush()) + r.stop.flush()
            r.finish_reason = "stop" if r.stop.stopped else "length"
            out.append(Delta(i, text, r.finish_reason))
    return out


def text_generation(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams,
                    on_tokens: Callable[[int], None] = lambda n: None
                    ) -> Callable[[threading.Event], Iterator[Event]]:
    """The worker-side job for n samples of one prompt: TokenStep events, then Usage.
    `on_tokens` is told of every generated token as it happens, cancelled requests included."""

    def work(cancel: threading.Event) -> Iterator[Event]:
        rows = [_Row(IncrementalDetokenizer(lm.tokenizer, prompt_ids), StopMatcher(params.stop))
                for _ in range(params.n)]
        finished = [False] * params.n
        for step in generate(lm.model, prompt_ids, params, lm.eos_ids, cancel, finished):
            deltas = []
            for i, r in enumerate(rows):
                if not step.active[i]:
                    continue
                text = _advance(r, step, i, finished)
                lp = token_logprob(lm.tokenizer, step.tokens[i], step.logprobs[i]) if step.logprobs else None
                deltas.append(Delta(i, text, r.finish_reason, lp))
            on_tokens(len(deltas))
            yield TokenStep(deltas, time.perf_counter())
        if final := _final_deltas(rows):
            yield TokenStep(final, time.perf_counter())
        yield Usage(sum(r.tokens for r in rows))

    return work
