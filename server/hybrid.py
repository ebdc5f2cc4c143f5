"""The hybrid loop (the seed's Algorithm 1), run on the worker thread.

    P <- the user's prompt
    repeat `loops` times:
        the large model writes chain-of-thought about P (up to `cot_groups` lines/steps)
        the memory model reads (P, that chain-of-thought) and writes a condensed prompt
        P <- the condensed prompt (kept unchanged if the memory model wrote nothing)
        stop once the chain-of-thought states the answer (`stop_at_answer`)
    the large model answers P

Earlier chat turns stay in the large model's context unchanged; only the last user turn
is replaced by P. Every stage is a sequence in its model's continuous batch
(`engine.batching`): the large model's chain-of-thought and answer decode in the same forward
as plain requests, the memory model's condensations of concurrent requests together. A stage
ends by marking its sequence finished; the batch then leaves its KV in the prefix cache, so
the next stage prefills only what it does not share with the last (the chat template's system
header and turn markers for the large model; `<bos><|prompt|>` and any unchanged prompt text
for the memory model).

The job is a generator: `Join(model, seq)` puts a stage's sequence into a batch, None waits for
a batch step (the scheduler, or `engine.batching.drive` outside a server), and the events for
the serving layer (`engine.events`): `Reasoning` while thinking, then the same `TokenStep` /
`Usage` events as plain generation, with `Stats(HybridStats)` before `Usage`. The memory model is
reached through a `Condenser` (its `steps` are such a generator, the text their return value);
the truncation control and test stubs are plain functions, text in, text out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from engine.batching import Join, Sequence
from engine.detok import IncrementalDetokenizer, StopMatcher
from engine.events import Delta, Event, Reasoning, Stats, TokenStep, Usage
from engine.generate import SamplingParams, make_generator
from engine.runner import LoadedModel
from memory_model.condense import MemoryModel
from memory_model.large import answer_messages, cot_messages

from .think import CLOSE, OPEN, thinks


@dataclass
class HybridParams:
    loops: int = 4  # N_loops
    cot_groups: int = 3  # G_max: lines (steps) of chain-of-thought per loop
    cot_group_tokens: int = 64  # token cap per group, so a line that never ends still stops
    condense_tokens: int = 100  # memory-model tokens per condensed prompt
    cot_temperature: float = 0.0  # chain-of-thought sampling (0 = greedy, what the memory model saw in training)
    return_reasoning: bool = True  # stream/return the CoT and condensed prompts as reasoning_content
    answer_prefix: str = ""  # opens the answer turn (e.g. "The answer is"); part of the returned content
    # Controls for evaluating the loop (cot_groups=0 is the other: the memory model condenses
    # the prompt with an empty chain-of-thought): "truncate" replaces the memory model by
    # P' = the user's question + the last condense_tokens large-model tokens of the chain-of-thought.
    condense_with: str = "memory_model"  # "memory_model" | "truncate"
    # With an answer_prefix: a chain-of-thought line that opens with it ends the loops. Only the
    # reasoning before that line is condensed (none: P is kept), since the answer stage states
    # the answer again from P; more loops would only re-derive a finished result from a lossier P.
    stop_at_answer: bool = True


@dataclass
class ModelStats:
    prompt_tokens: int = 0  # prefilled
    cached_tokens: int = 0  # prompt positions reused from the request's KV cache
    completion_tokens: int = 0


@dataclass
class HybridStats:
    loops: int = 0
    large: ModelStats = field(default_factory=ModelStats)
    small: ModelStats = field(default_factory=ModelStats)
    raw_reasoning_tokens: int = 0  # chain-of-thought tokens the large model wrote
    condensed_tokens: int = 0  # tokens the memory model wrote
    final_prompt_tokens: int = 0  # large-model tokens of the P the answer was written from
    peak_context_tokens: int = 0  # longest large-model context (prompt + generated) of any stage
    # wall time each stage spanned (with other requests interleaved on the worker, their steps count too)
    seconds: dict = field(default_factory=lambda: {"cot": 0.0, "condense": 0.0, "answer": 0.0})

    def to_dict(self) -> dict:
        return asdict(self)


def _stream(model, seq: Sequence) -> Iterator[int | Join | None]:
    """A stage's sequence in its model's batch, token by token: `Join` first, then each token
    as the batch samples it (EOS ends the stream, not yielded, unless the sequence ignores EOS),
    None while waiting for a step.
    A caller that has what it needs marks `seq.finished` and stops reading: the batch retires
    the row at its next step, leaving its KV to the prefix cache for the next stage."""
    yield Join(model, seq)
    eos = set() if seq.params.ignore_eos else seq.eos_ids
    n = 0
    try:
        while True:
            if seq.error is not None:
                raise seq.error
            new = seq.out[0][n:]
            n += len(new)
            for tok in new:
                if tok in eos:
                    return
                yield tok
            if seq.done:
                return
            yield None
    finally:  # however the reader stopped (done, enough, closed), the row leaves the batch
        seq.finished[:] = [True] * len(seq.finished)


def _stage_seq(ids: list[int], params: SamplingParams, eos: set[int], cancel: threading.Event,
               gen: torch.Generator | None = None, adapter: str | None = None) -> Sequence:
    seq = Sequence(list(ids), params, eos, cancel=cancel, adapter=adapter)
    if gen is not None:  # one generator for all of a request's sampled stages: seeded requests repeat
        seq.gen = gen
    return seq


def _count_prompt(stats: ModelStats, seq: Sequence) -> None:
    stats.cached_tokens += seq.cached_tokens
    stats.prompt_tokens += len(seq.prompt_ids) - seq.cached_tokens


def context_budget(n_prompt: int, hp: HybridParams, answer_tokens: int) -> int:
    """Large-model positions one hybrid request can need: the longest stage is either a CoT
    (prompt + template + chain-of-thought) or the answer; a condensed P is at most
    ~2 large tokens per memory-model token; a truncated one is the question + its tail."""
    if hp.condense_with == "truncate":
        p = n_prompt + hp.condense_tokens + 64
    else:
        p = max(n_prompt, 2 * hp.condense_tokens + 64)
    return p + max(hp.cot_groups * hp.cot_group_tokens, answer_tokens) + 32


class Condenser:
    """(P, chain-of-thought) -> the next P, written by the memory model in its own batch
    (memory-model stages of concurrent requests decode together); greedy, as the memory model
    was trained and evaluated, with prompt-lookup drafts (a condensed prompt mostly restates its
    input: several tokens per forward, the same greedy output). Across loops the shared
    `<bos><|prompt|>` prefix comes back from the prefix cache."""

    LOOKUP_DRAFT = 8

    def __init__(self, mm: MemoryModel, stats: HybridStats):
        self.mm, self.stats = mm, stats

    def steps(self, prompt: str, cot: str, max_tokens: int, cancel: threading.Event) -> Generator[object, None, str]:
        """The condensation: `Join` / None for the scheduler while it is written, the text as the
        generator's return value."""
        ids = self.mm.input_ids(prompt, cot)
        params = SamplingParams(max_tokens=self.mm.budget(ids, max_tokens), temperature=0.0,
                                lookup_draft=self.LOOKUP_DRAFT)
        seq = _stage_seq(ids, params, {self.mm.cfg.eos_id}, cancel)
        out = []
        for tok in _stream(self.mm.model, seq):
            if isinstance(tok, int):
                out.append(tok)
            else:
                yield tok
        _count_prompt(self.stats.small, seq)
        self.stats.small.completion_tokens += len(out)
        self.stats.condensed_tokens += len(out)
        return self.mm.tok.decode(out).strip()


def _condense(condense: Condenser | Callable[..., str], *args) -> Generator[None, None, str]:
    """A condenser's text, step by step when it can (Condenser.steps), else in one call."""
    if hasattr(condense, "steps"):
        return (yield from condense.steps(*args))
    return condense(*args)


class Truncator:
    """The truncation control: no memory model; the next P is the user's question followed
    by the chain-of-thought's last `max_tokens` tokens (the large model's tokenizer)."""

    def __init__(self, lm: LoadedModel, question: str):
        self.tok, self.question = lm.tokenizer, question

    def __call__(self, prompt: str, cot: str, max_tokens: int, cancel: threading.Event) -> str:
        ids = self.tok(cot, add_special_tokens=False)["input_ids"]
        tail = self.tok.decode(ids[-max_tokens:], skip_special_tokens=True).strip() if cot else ""
        return f"{self.question}\n{tail}" if tail else ""


@dataclass
class _Request:
    """What every stage of one hybrid request shares."""
    lm: LoadedModel
    hp: HybridParams
    sp: SamplingParams
    history: list[dict]  # earlier chat turns, kept unchanged
    stats: HybridStats
    gen: torch.Generator
    cancel: threading.Event
    on_tokens: Callable[[int], None]
    thinking: bool = False  # a reasoning model (its template writes <think>): see _answer_stage

    def say(self, text: str) -> Iterator[Event]:
        if self.hp.return_reasoning and text:
            yield Reasoning(text)


@dataclass
class _Cot:
    """A loop's chain-of-thought: its text (without an answer line) and whether it stated the answer."""
    text: str = ""
    answered: bool = False


def _states_answer(hp: HybridParams, line: str) -> bool:
    return hp.stop_at_answer and bool(hp.answer_prefix) and line.lstrip().startswith(hp.answer_prefix)


def _cot_stage(r: _Request, p: str, loop: int) -> Iterator[Event | Join | _Cot | None]:
    """The large model's chain-of-thought about P, up to cot_groups lines, as a sequence in the
    large model's batch; streams it as reasoning and yields a `_Cot` last. With stop_at_answer
    it stops as soon as a line opens with the answer prefix."""
    t0, hp = time.perf_counter(), r.hp
    if hp.cot_groups == 0:  # the empty-CoT control: nothing to think, nothing to stream
        yield _Cot()
        return
    ids, _ = r.lm.encode_chat(r.history + cot_messages(p))
    params = SamplingParams(max_tokens=hp.cot_groups * hp.cot_group_tokens, temperature=hp.cot_temperature,
                            top_p=r.sp.top_p, top_k=r.sp.top_k)
    seq = _stage_seq(ids, params, r.lm.eos_ids, r.cancel, r.gen, r.lm.adapter)
    detok = IncrementalDetokenizer(r.lm.tokenizer, ids)
    cot_text, groups, in_group, n_cot, line_start, answered = "", 0, 0, 0, 0, False
    yield from r.say(f"[loop {loop + 1}] reasoning:\n")
    for tok in _stream(r.lm.model, seq):
        if not isinstance(tok, int):
            yield tok
            continue
        n_cot += 1
        r.on_tokens(1)
        piece = detok.push(tok)
        cot_text += piece
        yield from r.say(piece)
        in_group += 1
        if _states_answer(hp, cot_text[line_start:]):
            answered, seq.finished[0] = True, True
            break
        if "\n" in piece:
            line_start = cot_text.rfind("\n") + 1
        # a group (step) ends at a newline after some text, or at its token cap
        if ("\n" in piece and cot_text.strip()) or in_group >= hp.cot_group_tokens:
            groups, in_group = groups + 1, 0
            if groups >= hp.cot_groups:
                seq.finished[0] = True  # enough: the batch retires the row at its next step
                break
    tail = "" if answered else detok.flush()  # an incomplete character held back at the end
    yield from r.say(tail)
    st = r.stats
    _count_prompt(st.large, seq)
    st.raw_reasoning_tokens += n_cot
    st.large.completion_tokens += n_cot
    st.peak_context_tokens = max(st.peak_context_tokens, len(ids) + n_cot)
    st.seconds["cot"] += time.perf_counter() - t0
    yield _Cot(plain_cot(cot_text[:line_start] if answered else cot_text + tail), answered)


def plain_cot(text: str) -> str:
    """The chain-of-thought the memory model reads: a reasoning model's <think> tags removed
    (its thinking is the CoT; the tags are markup the memory model never saw in training)."""
    return text.replace(OPEN, "").replace(CLOSE, "")


def _answer_stage(r: _Request, p: str, stop: list[str]) -> Iterator[Event | Join | None]:
    """The large model answers from P, a sequence in its batch: TokenStep events, the last with
    its finish reason."""
    t0, sp, lm = time.perf_counter(), r.sp, r.lm
    # A reasoning model answers without thinking again: the loop has done its thinking, and a
    # second <think> block would spend the answer's tokens (Qwen3's switch, enable_thinking=False).
    ids, extra_stops = lm.encode_chat(r.history + answer_messages(p), **({"enable_thinking": False} if r.thinking
                                                                          else {}))
    r.stats.final_prompt_tokens = len(lm.tokenizer(p, add_special_tokens=False)["input_ids"])
    if r.hp.answer_prefix:  # the model continues the prefix, as the memory model's reward assumed
        ids = ids + lm.tokenizer(r.hp.answer_prefix, add_special_tokens=False)["input_ids"]
        yield TokenStep([Delta(0, r.hp.answer_prefix)], time.perf_counter())
    detok = IncrementalDetokenizer(lm.tokenizer, ids)
    stops = StopMatcher(stop + [s for s in extra_stops if s not in stop])
    # the batch samples within the grammar (structured output / tools) and ends the row with it
    seq = _stage_seq(ids, replace(sp, n=1, stop=[], logprobs=None), lm.eos_ids, r.cancel, r.gen, lm.adapter)
    n, finish = 0, None
    for tok in _stream(lm.model, seq):
        if not isinstance(tok, int):
            yield tok
            continue
        n += 1
        r.on_tokens(1)
        text = stops.feed(detok.push(tok))
        if stops.stopped:
            seq.finished[0] = True
            finish = "stop"
        yield TokenStep([Delta(0, text, finish)], time.perf_counter())
        if finish:
            break
    if finish is None:
        text = stops.feed(detok.flush()) + stops.flush()
        ended = seq.grammar_ended[0]  # the document is complete: its text counts, then "stop"
        finish = "stop" if (n < sp.max_tokens or stops.stopped or ended) and not r.cancel.is_set() else "length"
        yield TokenStep([Delta(0, text, finish)], time.perf_counter())
    st = r.stats
    _count_prompt(st.large, seq)
    st.large.completion_tokens += n
    st.peak_context_tokens = max(st.peak_context_tokens, len(ids) + n)
    st.seconds["answer"] += time.perf_counter() - t0
    st.seconds = {k: round(v, 4) for k, v in st.seconds.items()}
    yield Stats(st)
    yield Usage(n)


def hybrid_work(lm: LoadedModel, mm: MemoryModel | None, messages: list[dict], hp: HybridParams,
                sp: SamplingParams, stop: list[str], on_tokens: Callable[[int], None] = lambda n: None,
                condenser: Callable[[HybridStats], Callable[..., str]] | None = None):
    """Worker-side generator for one hybrid chat request (n = 1). `condenser(stats)` makes
    the condensing function (default: the memory model `mm`, a `Condenser`)."""

    def work(cancel: threading.Event) -> Iterator[Event]:
        st = HybridStats()
        r = _Request(lm, hp, sp, messages[:-1], st, make_generator(sp.seed), cancel, on_tokens,
                     thinks(getattr(lm.tokenizer, "chat_template", None)))
        p = messages[-1]["content"]
        if condenser:
            condense = condenser(st)
        elif hp.condense_with == "truncate":
            condense = Truncator(lm, p)
        else:
            condense = Condenser(mm, st)
        for loop in range(hp.loops):
            cot = _Cot()
            for ev in _cot_stage(r, p, loop):  # 1. chain-of-thought from the large model
                if isinstance(ev, _Cot):
                    cot = ev
                else:
                    yield ev
            if cancel.is_set():
                return
            st.loops += 1
            if cot.answered and not cot.text.strip():  # nothing new before the answer: P stands
                yield from r.say(f"\n[loop {loop + 1}] the answer is stated: prompt kept\n\n")
                break
            t0 = time.perf_counter()  # 2. the memory model condenses (P, CoT) into the next P
            condensed = yield from _condense(condense, p, cot.text.strip(), hp.condense_tokens, cancel)
            st.seconds["condense"] += time.perf_counter() - t0
            yield from r.say(f"\n[loop {loop + 1}] condensed prompt:\n{condensed or '(empty: prompt kept)'}\n\n")
            p = condensed or p
            if cancel.is_set():
                return
            if cot.answered:
                break
        yield from _answer_stage(r, p, stop)  # 3. the large model answers from P

    return work
