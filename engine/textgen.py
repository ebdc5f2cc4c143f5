"""Text generation for one request: token ids from a `BatchEngine` or from `generate`, text
from the incremental detokenizer, stop strings matched next to the tokens (so a match ends
decoding at once), all as typed events (`engine.events`).

    work = text_generation(lm, prompt_ids, params)        # alone
    for event in work(threading.Event()): ...

    req = TextRequest(lm, prompt_ids, params)             # in a batch
    engine.add(req.seq)
    while not req.seq.done:
        if (out := engine.step().get(req.seq)): event = req.step(out)
    events = req.close()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .batching import Sequence
from .detok import IncrementalDetokenizer, StopMatcher
from .events import Delta, Event, TokenLogprob, TokenStep, Usage
from .generate import SamplingParams, StepOutput, generate
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
        finished[i] = True  # the batch engine (or generate) stops decoding this row
        row.finish_reason = "stop"
    elif step.ended is not None and step.ended[i]:  # the grammar's document is complete
        row.finish_reason = "stop"
        text += row.stop.feed(row.detok.flush()) + row.stop.flush()
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


class TextRequest:
    """One plain generation request (n samples of one prompt) as text events.

    Token ids come either from a batch (`seq` joins a `BatchEngine`; pass each StepOutput it
    gets to `step`, then call `close` once `seq.done`) or from `generate` alone (`work`). Both
    share `finished`, which the text layer sets when a row's stop string matched, so the token
    side stops decoding that row at once. `on_tokens` is told of every generated token as it
    happens, cancelled requests included."""

    def __init__(self, lm: LoadedModel, prompt_ids: list[int], params: SamplingParams,
                 on_tokens: Callable[[int], None] = lambda n: None):
        self.lm, self.prompt_ids, self.params, self.on_tokens = lm, prompt_ids, params, on_tokens
        self.rows = [_Row(IncrementalDetokenizer(lm.tokenizer, prompt_ids), StopMatcher(params.stop))
                     for _ in range(params.n)]
        self.finished = [False] * params.n
        self.seq = Sequence(prompt_ids, params, lm.eos_ids, finished=self.finished, adapter=lm.adapter)

    def step(self, out: StepOutput) -> TokenStep:
        """The text of one step's tokens: a delta per row that was still running."""
        deltas = []
        for i, r in enumerate(self.rows):
            if not out.active[i]:
                continue
            text = _advance(r, out, i, self.finished)
            lp = token_logprob(self.lm.tokenizer, out.tokens[i], out.logprobs[i]) if out.logprobs else None
            deltas.append(Delta(i, text, r.finish_reason, lp))
        self.on_tokens(len(deltas))
        return TokenStep(deltas, time.perf_counter())

    def close(self) -> list[Event]:
        """After the last step: the open rows' held-back text and finish reasons, then Usage."""
        final = _final_deltas(self.rows)
        usage = Usage(sum(r.tokens for r in self.rows), self.seq.cached_tokens)  # 0 when run alone (`work`)
        return ([TokenStep(final, time.perf_counter())] if final else []) + [usage]

    def work(self, cancel: threading.Event) -> Iterator[Event]:
        """The request alone on the worker: `generate` (prefill once, n rows in lockstep)."""
        for out in generate(self.lm.model, self.prompt_ids, self.params, self.lm.eos_ids, cancel, self.finished,
                            self.lm.adapter):
            yield self.step(out)
        yield from self.close()


def text_generation(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams,
                    on_tokens: Callable[[int], None] = lambda n: None
                    ) -> Callable[[threading.Event], Iterator[Event]]:
    """The worker-side job for n samples of one prompt run alone: TokenStep events, then Usage."""
    return TextRequest(lm, prompt_ids, params, on_tokens).work
