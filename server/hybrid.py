"""The hybrid loop (the seed's Algorithm 1), run on the worker thread.

    P <- the user's prompt
    repeat `loops` times:
        the large model writes chain-of-thought about P (up to `cot_groups` lines/steps)
        the memory model reads (P, that chain-of-thought) and writes a condensed prompt
        P <- the condensed prompt (kept unchanged if the memory model wrote nothing)
    the large model answers P

Earlier chat turns stay in the large model's context unchanged; only the last user turn
is replaced by P. Each model keeps one KV cache per request (`PrefixKV`): a new prompt
reuses the cached positions it shares with the previous one (the chat template's system
header and turn markers for the large model; `<bos><|prompt|>` and any unchanged prompt
text for the memory model) and only the rest is prefilled.

Events for the serving layer (`engine.events`): `Reasoning` while thinking, then the same
`TokenStep` / `Usage` events as plain generation, with `Stats(HybridStats)` before `Usage`;
None between the memory model's tokens (nothing to send: the worker steps its batch there).
The memory model is reached through a `Condenser` (its `steps` yield between tokens, the text
is their return value); the truncation control and test stubs are plain functions, text in,
text out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field

import torch

from engine.detok import IncrementalDetokenizer, StopMatcher
from engine.events import Delta, Event, Reasoning, Stats, TokenStep, Usage
from engine.generate import SamplingParams, decode_one_token, make_generator, prefill
from engine.grammar import RowGrammars
from engine.lookup import accepted, propose
from engine.runner import LoadedModel
from engine.sampling import sample
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


class PrefixKV:
    """One model's KV cache for a request; `feed` reuses the longest shared prefix."""

    def __init__(self, model, capacity: int, stats: ModelStats):
        self.model, self.stats = model, stats
        self.cache = model.new_cache(1, capacity)
        self.ids: list[int] = []  # exactly the tokens whose K/V the cache holds

    def feed(self, ids: list[int]) -> torch.Tensor:
        if len(ids) > self.cache.max_len:
            raise ValueError(f"hybrid stage needs {len(ids)} tokens of context, over the {self.cache.max_len} "
                             "reserved for this request")
        shared = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)  # at least one token must run to get logits
        self.cache.rewind(shared)
        self.stats.cached_tokens += shared
        self.stats.prompt_tokens += len(ids) - shared
        t = torch.tensor([ids[shared:]], dtype=torch.long, device=self.model.device)
        self.ids = list(ids)
        return prefill(self.model, t, self.cache)

    def step(self, token: int) -> torch.Tensor:
        self.ids.append(token)
        return decode_one_token(self.model, torch.tensor([token], device=self.model.device), self.cache)

    def extend(self, tokens: list[int]) -> torch.Tensor:
        """Feed several tokens at once: logits (len(tokens), V), row i predicting after tokens[i]."""
        self.ids += tokens
        return self.model(torch.tensor([tokens], device=self.model.device), self.cache)[0]

    def truncate(self, n: int) -> None:
        """Keep the first n positions (drop a rejected draft)."""
        self.cache.rewind(n)
        del self.ids[n:]


def _decode(kv: PrefixKV, ids: list[int], max_new: int, eos: set[int], pick: Callable[[torch.Tensor], int],
            cancel: threading.Event) -> Iterator[int]:
    """Yield sampled tokens until EOS (not yielded), max_new, cancel, or the caller stops."""
    logits = kv.feed(ids)
    for i in range(max_new):
        if cancel.is_set():
            return
        tok = pick(logits)
        if tok in eos:
            return
        yield tok
        if i < max_new - 1:
            logits = kv.step(tok)


def _lookup_decode(kv: PrefixKV, ids: list[int], max_new: int, eos: set[int], cancel: threading.Event,
                   draft_tokens: int = 8) -> Iterator[int]:
    """`_decode` with greedy picks, checking prompt-lookup drafts (engine/lookup.py) several
    tokens per forward; the same tokens."""
    tok, n = int(kv.feed(ids)[0].argmax()), 0
    while not cancel.is_set() and tok not in eos:
        yield tok
        n += 1
        if n >= max_new:
            return
        draft = propose(kv.ids + [tok], min(draft_tokens, max_new - n))
        greedy = kv.extend([tok] + draft).argmax(-1).tolist()
        m = accepted(draft, greedy)
        kv.truncate(len(kv.ids) - (len(draft) - m))
        for t in draft[:m]:
            if cancel.is_set() or t in eos:
                return
            yield t
            n += 1
            if n >= max_new:
                return
        tok = greedy[m]


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
    """(P, chain-of-thought) -> the next P, with the memory model's KV cache kept across
    loops (`PrefixKV`); greedy, as the memory model was trained and evaluated."""

    def __init__(self, mm: MemoryModel, stats: HybridStats):
        self.mm, self.stats = mm, stats
        self.kv = PrefixKV(mm.model, mm.cfg.max_len, stats.small)

    def steps(self, prompt: str, cot: str, max_tokens: int, cancel: threading.Event) -> Generator[None, None, str]:
        """The condensation token by token: None after each one (a point where the worker may
        step the batch), the text as the generator's return value."""
        ids = self.mm.input_ids(prompt, cot)
        out = []
        # a condensed prompt mostly restates its input: prompt-lookup drafts decode it several
        # tokens per forward, with the same greedy output
        for tok in _lookup_decode(self.kv, ids, self.mm.budget(ids, max_tokens), {self.mm.cfg.eos_id}, cancel):
            out.append(tok)
            yield None
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
    large_kv: PrefixKV
    gen: torch.Generator
    cancel: threading.Event
    on_tokens: Callable[[int], None]
    thinking: bool = False  # a reasoning model (its template writes <think>): see _answer_stage

    def say(self, text: str) -> Iterator[Event]:
        if self.hp.return_reasoning and text:
            yield Reasoning(text)

    def pick(self, temperature: float, grammar: RowGrammars | None = None) -> Callable[[torch.Tensor], int]:
        """Sample one token; within `grammar` (its row 0) when given (the caller consumes the token)."""
        return lambda lg: int(sample(lg, temperature, self.sp.top_k, self.sp.top_p, self.gen,
                                     grammar.allowed([0], lg.device) if grammar is not None else None)[0])


def _cot_stage(r: _Request, p: str, loop: int) -> Iterator[Event | str]:
    """The large model's chain-of-thought about P, up to cot_groups lines; streams it as
    reasoning and yields the whole text (a str) last."""
    t0, hp = time.perf_counter(), r.hp
    if hp.cot_groups == 0:  # the empty-CoT control: nothing to think, nothing to stream
        yield ""
        return
    ids, _ = r.lm.encode_chat(r.history + cot_messages(p))
    detok = IncrementalDetokenizer(r.lm.tokenizer, ids)
    cot_text, groups, in_group, n_cot = "", 0, 0, 0
    yield from r.say(f"[loop {loop + 1}] reasoning:\n")
    for tok in _decode(r.large_kv, ids, hp.cot_groups * hp.cot_group_tokens, r.lm.eos_ids,
                       r.pick(hp.cot_temperature), r.cancel):
        n_cot += 1
        r.on_tokens(1)
        piece = detok.push(tok)
        cot_text += piece
        yield from r.say(piece)
        in_group += 1
        # a group (step) ends at a newline after some text, or at its token cap
        if ("\n" in piece and cot_text.strip()) or in_group >= hp.cot_group_tokens:
            groups, in_group = groups + 1, 0
            if groups >= hp.cot_groups:
                break
    tail = detok.flush()  # an incomplete character held back at the end
    yield from r.say(tail)
    st = r.stats
    st.raw_reasoning_tokens += n_cot
    st.large.completion_tokens += n_cot
    st.peak_context_tokens = max(st.peak_context_tokens, len(ids) + n_cot)
    st.seconds["cot"] += time.perf_counter() - t0
    yield plain_cot(cot_text + tail)


def plain_cot(text: str) -> str:
    """The chain-of-thought the memory model reads: a reasoning model's <think> tags removed
    (its thinking is the CoT; the tags are markup the memory model never saw in training)."""
    return text.replace(OPEN, "").replace(CLOSE, "")


def _answer_stage(r: _Request, p: str, stop: list[str]) -> Iterator[Event]:
    """The large model answers from P: TokenStep events, the last with its finish reason."""
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
    eos = set() if sp.ignore_eos else lm.eos_ids
    grammar = RowGrammars(sp.grammar, 1) if sp.grammar is not None else None  # structured output / tools
    n, finish = 0, None
    for tok in _decode(r.large_kv, ids, sp.max_tokens, eos, r.pick(sp.temperature, grammar), r.cancel):
        n += 1
        r.on_tokens(1)
        ended = grammar is not None and grammar.advance([0], [tok])[0]
        text = stops.feed(detok.push(tok))
        if ended and not stops.stopped:  # the document is complete
            text += stops.feed(detok.flush()) + stops.flush()
        finish = "stop" if stops.stopped or ended else None
        yield TokenStep([Delta(0, text, finish)], time.perf_counter())
        if finish:
            break
    if finish is None:
        text = stops.feed(detok.flush()) + stops.flush()
        finish = "stop" if (n < sp.max_tokens or stops.stopped) and not r.cancel.is_set() else "length"
        yield TokenStep([Delta(0, text, finish)], time.perf_counter())
    st = r.stats
    st.large.completion_tokens += n
    st.peak_context_tokens = max(st.peak_context_tokens, len(ids) + n)
    st.seconds["answer"] += time.perf_counter() - t0
    st.seconds = {k: round(v, 4) for k, v in st.seconds.items()}
    yield Stats(st)
    yield Usage(n)


def hybrid_work(lm: LoadedModel, mm: MemoryModel | None, messages: list[dict], hp: HybridParams,
                sp: SamplingParams, capacity: int, stop: list[str], on_tokens: Callable[[int], None] = lambda n: None,
                condenser: Callable[[HybridStats], Callable[..., str]] | None = None):
    """Worker-side generator for one hybrid chat request (n = 1). `condenser(stats)` makes
    the condensing function (default: the memory model `mm` with its own KV cache)."""

    def work(cancel: threading.Event) -> Iterator[Event]:
        st = HybridStats()
        r = _Request(lm, hp, sp, messages[:-1], st, PrefixKV(lm.model, capacity, st.large),
                     make_generator(sp.seed), cancel, on_tokens, thinks(getattr(lm.tokenizer, "chat_template", None)))
        p = messages[-1]["content"]
        if condenser:
            condense = condenser(st)
        elif hp.condense_with == "truncate":
            condense = Truncator(lm, p)
        else:
            condense = Condenser(mm, st)
        for loop in range(hp.loops):
            cot = ""
            for ev in _cot_stage(r, p, loop):  # 1. chain-of-thought from the large model
                if isinstance(ev, str):
                    cot = ev
                else:
                    yield ev
            if cancel.is_set():
                return
            t0 = time.perf_counter()  # 2. the memory model condenses (P, CoT) into the next P
            condensed = yield from _condense(condense, p, cot.strip(), hp.condense_tokens, cancel)
            st.seconds["condense"] += time.perf_counter() - t0
            yield from r.say(f"\n[loop {loop + 1}] condensed prompt:\n{condensed or '(empty: prompt kept)'}\n\n")
            p = condensed or p
            st.loops += 1
            if cancel.is_set():
                return
        yield from _answer_stage(r, p, stop)  # 3. the large model answers from P

    return work
