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

Events for the serving layer: ("reasoning", text) while thinking, then the same ("step",
...) / ("usage", n) events as plain generation, with ("hybrid", HybridStats) before usage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from memory_model.condense import MemoryModel
from memory_model.large import answer_messages, cot_messages

from engine.detok import IncrementalDetokenizer, StopMatcher
from engine.generate import SamplingParams, decode_one_token, make_generator, prefill
from engine.sampling import sample
from engine.runner import LoadedModel


@dataclass
class HybridParams:
    loops: int = 4  # N_loops
    cot_groups: int = 3  # G_max: lines (steps) of chain-of-thought per loop
    cot_group_tokens: int = 64  # token cap per group, so a line that never ends still stops
    condense_tokens: int = 100  # memory-model tokens per condensed prompt
    cot_temperature: float = 0.0  # chain-of-thought sampling (0 = greedy, what the memory model saw in training)
    return_reasoning: bool = True  # stream/return the CoT and condensed prompts as reasoning_content
    answer_prefix: str = ""  # opens the answer turn (e.g. "The answer is"); part of the returned content


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


def context_budget(n_prompt: int, hp: HybridParams, answer_tokens: int) -> int:
    """Large-model positions one hybrid request can need: the longest stage is either a CoT
    (prompt + template + chain-of-thought) or the answer; a condensed P is at most
    ~2 large tokens per memory-model token."""
    p = max(n_prompt, 2 * hp.condense_tokens + 64)
    return p + max(hp.cot_groups * hp.cot_group_tokens, answer_tokens) + 32


def hybrid_work(lm: LoadedModel, mm: MemoryModel, messages: list[dict], hp: HybridParams, sp: SamplingParams,
                capacity: int, stop: list[str], on_tokens: Callable[[int], None] = lambda n: None):
    """Worker-side generator for one hybrid chat request (n = 1)."""

    def work(cancel: threading.Event) -> Iterator[tuple]:
        st = HybridStats()
        large_kv = PrefixKV(lm.model, capacity, st.large)
        small_kv = PrefixKV(mm.model, mm.cfg.max_len, st.small)
        history, p = messages[:-1], messages[-1]["content"]
        gen = make_generator(sp.seed)
        cot_pick = lambda lg: int(sample(lg, hp.cot_temperature, sp.top_k, sp.top_p, gen)[0])  # noqa: E731
        small_pick = lambda lg: int(lg[0].argmax())  # noqa: E731

        def say(text: str):
            return ("reasoning", text) if hp.return_reasoning and text else None

        for loop in range(hp.loops):
            # 1. chain-of-thought from the large model
            t0 = time.perf_counter()
            ids, _ = lm.encode_chat(history + cot_messages(p))
            detok = IncrementalDetokenizer(lm.tokenizer, ids)
            cot_text, groups, in_group, n_cot = "", 0, 0, 0
            if ev := say(f"[loop {loop + 1}] reasoning:\n"):
                yield ev
            for tok in _decode(large_kv, ids, hp.cot_groups * hp.cot_group_tokens, lm.eos_ids, cot_pick, cancel):
                n_cot += 1
                on_tokens(1)
                piece = detok.push(tok)
                cot_text += piece
                if ev := say(piece):
                    yield ev
                in_group += 1
                # a group (step) ends at a newline after some text, or at its token cap
                if ("\n" in piece and cot_text.strip()) or in_group >= hp.cot_group_tokens:
                    groups, in_group = groups + 1, 0
                    if groups >= hp.cot_groups:
                        break
            tail = detok.flush()  # an incomplete character held back at the end
            cot_text += tail
            if ev := say(tail):
                yield ev
            st.raw_reasoning_tokens += n_cot
            st.large.completion_tokens += n_cot
            st.peak_context_tokens = max(st.peak_context_tokens, len(ids) + n_cot)
            st.seconds["cot"] += time.perf_counter() - t0
            if cancel.is_set():
                return
            # 2. the memory model condenses (P, CoT) into the next P
            t0 = time.perf_counter()
            mids = mm.input_ids(p, cot_text.strip())
            budget = mm.budget(mids, hp.condense_tokens)
            out = list(_decode(small_kv, mids, budget, {mm.cfg.eos_id}, small_pick, cancel))
            st.small.completion_tokens += len(out)
            st.condensed_tokens += len(out)
            condensed = mm.tok.decode(out).strip()
            st.seconds["condense"] += time.perf_counter() - t0
            if ev := say(f"\n[loop {loop + 1}] condensed prompt:\n{condensed or '(empty: prompt kept)'}\n\n"):
                yield ev
            if condensed:
                p = condensed
            st.loops += 1
            if cancel.is_set():
                return
        # 3. the large model answers from P
        t0 = time.perf_counter()
        ids, extra_stops = lm.encode_chat(history + answer_messages(p))
        st.final_prompt_tokens = len(lm.tokenizer(p, add_special_tokens=False)["input_ids"])
        if hp.answer_prefix:  # the model continues the prefix, as the memory model's reward assumed
            ids = ids + lm.tokenizer(hp.answer_prefix, add_special_tokens=False)["input_ids"]
            yield ("step", [(0, hp.answer_prefix, None, None)], time.perf_counter())
        detok = IncrementalDetokenizer(lm.tokenizer, ids)
        stops = StopMatcher(stop + [s for s in extra_stops if s not in stop])
        answer_pick = lambda lg: int(sample(lg, sp.temperature, sp.top_k, sp.top_p, gen)[0])  # noqa: E731
        eos = set() if sp.ignore_eos else lm.eos_ids
        n, finish = 0, None
        for tok in _decode(large_kv, ids, sp.max_tokens, eos, answer_pick, cancel):
            n += 1
            on_tokens(1)
            text = stops.feed(detok.push(tok))
            if stops.stopped:
                finish = "stop"
            yield ("step", [(0, text, finish, None)], time.perf_counter())
            if finish:
                break
        if finish is None:
            text = stops.feed(detok.flush()) + stops.flush()
            finish = "stop" if (n < sp.max_tokens or stops.stopped) and not cancel.is_set() else "length"
            yield ("step", [(0, text, finish, None)], time.perf_counter())
        st.large.completion_tokens += n
        st.peak_context_tokens = max(st.peak_context_tokens, len(ids) + n)
        st.seconds["answer"] += time.perf_counter() - t0
        st.seconds = {k: round(v, 4) for k, v in st.seconds.items()}
        yield ("hybrid", st)
        yield ("usage", n)

    return work
