"""Continuous batching: many sequences decoded together, joining and leaving at step boundaries.

    engine = BatchEngine(model, BatchConfig(max_num_seqs=8, prefill_chunk=256))
    engine.add(Sequence(prompt_ids, params, eos_ids))
    while engine.has_work:
        for seq, out in engine.step().items(): ...  # a StepOutput for each sequence that sampled

One `step()`:
  1. retire rows that finished (EOS or max_tokens here, a stop string in the text layer, which
     marks `seq.finished`) and sequences that were cancelled, freeing their cache rows (slots);
     with a `PrefixCache`, a sequence's first row leaves its prompt + generated KV there;
  2. admit waiting sequences, first come first served, into free slots (n rows for n samples);
     with a `PrefixCache`, the KV of the prompt's longest cached prefix is copied into the
     first row, and prefill continues after it (`seq.cached_tokens`);
  3. one batched decode forward for every running row, each at its own position
     (`Transformer.forward_rows` over a `SlotKVCache`);
  4. prefill admitted prompts, at most `prefill_chunk` prompt tokens per step in all, so the
     running streams keep emitting while a long prompt is read; a prompt whose last chunk ran
     samples its first token (its n rows then copy the prefilled row, and the prefix cache
     gets the prompt at once, for concurrent requests that share it).
Sampling is per sequence, with its own SamplingParams and seeded torch.Generator, so a seeded
request samples the same tokens alone or in a batch. The per-sequence `StepOutput` is exactly
what `generate` yields for one request, so the text layer (`engine.textgen`) serves both.
A greedy sequence with `lookup_draft` (the hybrid loop's condensations) decodes with
prompt-lookup drafts instead: its rows run in a forward of their own over T = 1 + draft
tokens, and a step may add several tokens (`StepOutput.drafted`). With `compile`, that forward
is a compiled graph too (`CompiledDecode.check`), every row padded to the longest draft allowed.

A job made of several sequences (the hybrid loop's stages) is a generator that yields
`Join(model, seq)` to put a sequence into that model's batch and None to wait a step, and
reads `seq.out` as it grows; the server's scheduler steps its batches for it, `drive` runs one
alone.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .compiled import CompiledDecode
from .generate import SamplingParams, StepOutput, constrained_sample, make_generator, row_end, token_logprobs
from .grammar import RowGrammars
from .kv_cache import SlotKVCache
from .lookup import accepted, propose
from .prefix_cache import PrefixCache


@dataclass
class BatchConfig:
    max_num_seqs: int = 8  # cache rows (slots) decoded together; a request with n samples takes n
    prefill_chunk: int = 256  # prompt tokens prefilled per step, over all admitted prompts
    compile: bool = False  # decode steps as one compiled graph (engine/compiled.py) where the model allows

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.prefill_chunk < 1:
            raise ValueError("max_num_seqs and prefill_chunk must be at least 1")


@dataclass(eq=False)  # identity: a Sequence is a dict key in step()'s result
class Sequence:
    """One request in the batch: n rows (samples) of one prompt."""
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: set[int]
    # per row; the engine sets a row on EOS, the text layer when a stop string matched
    finished: list[bool] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    adapter: str | None = None  # a per-request LoRA adapter of the model (engine.adapters), or the base weights
    # the engine's bookkeeping
    slots: list[int | None] = field(default_factory=list)  # cache row of each sample; None once it is free
    prefilled: int = 0  # prompt tokens in the cache
    cached_tokens: int = 0  # of those, copied from the prefix cache instead of prefilled
    steps: int = 0  # tokens sampled per row so far
    done: bool = False  # nothing more will come: finished, out of tokens, or cancelled
    error: BaseException | None = None  # set with done when the batch's forward failed (by its driver)

    def __post_init__(self):
        n = self.params.n
        self.finished = self.finished if self.finished is not None else [False] * n
        self.last = [0] * n  # per row: the sampled token not yet fed to the model
        self.out: list[list[int]] = [[] for _ in range(n)]  # per row: every sampled token
        self.gen = make_generator(self.params.seed)
        self.grammars = RowGrammars(self.params.grammar, n) if self.params.grammar is not None else None
        self.grammar_ended = [False] * n  # per row: its grammar's document is complete

    @property
    def admitted(self) -> bool:
        return bool(self.slots)

    @property
    def decoding(self) -> bool:
        return self.admitted and self.prefilled == len(self.prompt_ids)

    def live(self) -> list[int]:
        """Rows still generating."""
        return [i for i, f in enumerate(self.finished) if not f]

    def fed(self, row: int, length: int) -> list[int]:
        """The token ids behind the first `length` cache positions of a row: the prompt, then
        the row's samples (all but the last, which is sampled and not yet fed)."""
        return (self.prompt_ids + self.out[row])[:length]


class BatchEngine:
    def __init__(self, model, cfg: BatchConfig | None = None, prefix_cache: PrefixCache | None = None):
        self.model, self.cfg = model, cfg or BatchConfig()
        self.prefix = prefix_cache  # may be shared by several engines (models): entries know their model
        self.cache: SlotKVCache | None = None  # made on first admission, dropped when idle and grown
        self.free = list(range(self.cfg.max_num_seqs))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted (prefilling or decoding), in admission order
        self.decoder = CompiledDecode(model) if self.cfg.compile and CompiledDecode.supports(model) else None

    def add(self, seq: Sequence) -> None:
        p = seq.params
        if p.n > self.cfg.max_num_seqs:
            raise ValueError(f"n={p.n} samples need more rows than max_num_seqs={self.cfg.max_num_seqs}")
        if len(seq.prompt_ids) + p.max_tokens > self.model.max_len:
            raise ValueError(f"{len(seq.prompt_ids)} prompt + {p.max_tokens} new tokens exceed max_len "
                             f"{self.model.max_len}")
        if not seq.prompt_ids or p.max_tokens < 1:
            raise ValueError("a sequence needs a prompt and at least one token to generate")
        if seq.adapter is not None and seq.adapter not in getattr(self.model, "adapter_bank", ()):
            raise ValueError(f"the model has no adapter {seq.adapter!r}")
        if p.lookup_draft and (p.temperature > 0 or p.n > 1 or p.grammar is not None or p.logprobs is not None):
            raise ValueError("lookup drafts need greedy decoding of one row without a grammar or logprobs")
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def rows_in_use(self) -> int:
        return self.cfg.max_num_seqs - len(self.free)

    @torch.inference_mode()
    def step(self) -> dict[Sequence, StepOutput]:
        self._retire()
        self._admit()
        decoding = [s for s in self.running if s.decoding]  # before prefill: a prompt finishing now samples there
        plain = [s for s in decoding if not s.params.lookup_draft]
        drafting = [s for s in decoding if s.params.lookup_draft]
        out = self._decode(plain) if plain else {}
        out.update(self._decode_drafts(drafting) if drafting else {})
        out.update(self._prefill())
        for seq in out:
            if seq.steps >= seq.params.max_tokens:
                seq.finished[:] = [True] * len(seq.finished)  # the token budget ends every row
        self._retire()
        return out

    # ---- slots ------------------------------------------------------------------------

    def _retire(self) -> None:
        for seq in self.running:
            if seq.cancel.is_set():
                seq.finished[:] = [True] * len(seq.finished)
            for i, f in enumerate(seq.finished):
                if f and seq.slots[i] is not None:
                    if i == 0:  # n samples of a prompt keep one entry: choice 0 is what a chat continues
                        self._keep(seq, 0)
                    self.free.append(seq.slots[i])
                    seq.slots[i] = None
            seq.done = all(seq.finished)
        self.running = [s for s in self.running if not s.done]
        for seq in [s for s in self.waiting if s.cancel.is_set()]:
            self.waiting.remove(seq)
            seq.done = True
        if not self.has_work and self.cache is not None and self.cache.capacity > self.cache.initial:
            # An idle engine keeps only a cache of the starting size: re-allocating it cost each
            # request ~20 ms at concurrency 1 (SmolLM2, 8 slots: 94 MB), while one grown by a long
            # request (up to slots x max_len) is given back. Stale rows are masked by length.
            self.cache = None

    def _admit(self) -> None:
        while self.waiting and len(self.free) >= self.waiting[0].params.n:
            seq = self.waiting.popleft()
            self.free.sort()  # lowest slots first: running rows stay contiguous, read as a view
            seq.slots, self.free = self.free[:seq.params.n], self.free[seq.params.n:]
            if self.cache is None:
                self.cache = self.model.new_slot_cache(self.cfg.max_num_seqs)
            # Grow once, now, to the prompt and its first tokens: growing for the prefix-cache copy,
            # then again (doubling) for the prefill's last chunk re-zeroed and copied every slot
            # twice (a 1k-token second turn of SmolLM2: 298 vs 95 ms of its TTFT)
            self.cache.reserve(min(self.cache.max_len, len(seq.prompt_ids) + min(seq.params.max_tokens, 256)))
            for s in seq.slots:
                self.cache.free(s)
            if self.prefix is not None and (hit := self.prefix.match(self._owner(seq), seq.prompt_ids)):
                (k, v), m = hit
                self.cache.write_row(seq.slots[0], k, v, m)
                seq.prefilled = seq.cached_tokens = m
            self.running.append(seq)

    def _keep(self, seq: Sequence, i: int) -> None:
        """Store the KV row i of seq holds in the prefix cache (before the slot is freed)."""
        n = self.cache.lens[seq.slots[i]] if self.cache is not None else 0
        if self.prefix is not None and n > 0:
            self.prefix.store(self._owner(seq), seq.fed(i, n), lambda m: self.cache.read_row(seq.slots[i], m),
                              self.cache.token_bytes())

    def _owner(self, seq: Sequence):
        """Whose KV a prefix-cache entry is: the model, or the model with one adapter (the
        adapter changes every layer's K and V, so the base and each adapter never share)."""
        return self.model if seq.adapter is None else (self.model, seq.adapter)

    # ---- forwards ---------------------------------------------------------------------

    def _decode(self, seqs: list[Sequence]) -> dict[Sequence, StepOutput]:
        """One forward for every live row of `seqs`, then each sequence samples its rows."""
        rows = sorted((seq.slots[i], seq, i) for seq in seqs for i in seq.live())  # by slot: a view when contiguous
        slots = [r[0] for r in rows]
        if self.decoder is not None:
            logits = self.decoder(self.cache, {slot: seq.last[i] for slot, seq, i in rows},
                                  {slot: seq.adapter for slot, seq, _ in rows})  # (B, V), slot order
        else:
            self.cache.reserve(max(self.cache.lens[s] for s in slots) + 1)
            ids = torch.tensor([[seq.last[i]] for _, seq, i in rows], device=self.model.device)
            logits = self.model.forward_rows(ids, self.cache.view(slots), last_only=True,
                                             adapters=[seq.adapter for _, seq, _ in rows])[:, -1]  # (B, V)
        out = {}
        for seq in seqs:
            at = [j for j, (_, s, _) in enumerate(rows) if s is seq]
            out[seq] = self._sample(seq, logits[at], [rows[j][2] for j in at])
        return out

    def _decode_drafts(self, seqs: list[Sequence]) -> dict[Sequence, StepOutput]:
        """One forward for the rows of greedy `lookup_draft` sequences: each row feeds its last
        token and a prompt-lookup draft (padded to the longest), keeps the draft tokens the
        model confirms plus the model's next one, and rewinds its length past the rest."""
        rows = sorted((seq.slots[0], seq) for seq in seqs)
        starts = [self.cache.lens[slot] for slot, _ in rows]
        longest = max(starts)
        room = self.model.max_len - longest - 1  # padding counts too
        drafts = [propose(seq.prompt_ids + seq.out[0],
                          max(0, min(seq.params.lookup_draft, seq.params.max_tokens - seq.steps - 1, room)))
                  for _, seq in rows]
        greedy = self._check(rows, drafts, longest)  # (B, T): the choice after each fed token
        out = {}
        for (slot, seq), draft, g, start in zip(rows, drafts, greedy, starts):
            m = accepted(draft, g)
            new, eos = [], False
            for tok in draft[:m] + [g[m]]:
                new.append(tok)
                eos, _ = row_end(tok, False, seq.eos_ids, seq.params.ignore_eos)
                if eos or seq.steps + len(new) >= seq.params.max_tokens:
                    break
            self.cache.lens[slot] = start + len(new)  # positions of [last] + new[:-1]: what was fed and kept
            seq.out[0] += new
            seq.last[0] = new[-1]
            seq.steps += len(new)
            seq.finished[0] = seq.finished[0] or eos
            out[seq] = StepOutput([new[-1]], [True], [eos], drafted=[new[:-1]])
        return out

    def _check(self, rows: list[tuple[int, Sequence]], drafts: list[list[int]], longest: int) -> list[list[int]]:
        """Each row's last token and draft in one forward -> the greedy choice after each fed
        token (`longest`: the rows' longest cache length). Compiled, every row is padded to the
        longest draft any of the sequences may propose (one graph, T a constant of it), and a
        step where no row has a draft runs the decode step's graph (T = 1: 3.7 against 10.9 ms for
        the 70M memory model); eager, rows are padded to the longest draft of this step."""
        fed = [[seq.last[0]] + d for (_, seq), d in zip(rows, drafts)]

        def padded(t: int) -> list[list[int]]:
            return [f + [0] * (t - len(f)) for f in fed]

        if self.decoder is not None and not any(seq.adapter for _, seq in rows):
            if not any(drafts):  # nothing to check: one token a row, on the decode step's graph
                logits = self.decoder(self.cache, {slot: seq.last[0] for slot, seq in rows})
                return [[g] for g in logits.argmax(-1).tolist()]
            t = 1 + max(seq.params.lookup_draft for _, seq in rows)
            greedy = self.decoder.check(self.cache, dict(zip((slot for slot, _ in rows), padded(t))))
            if greedy is not None:
                return greedy
        t = max(map(len, fed))
        self.cache.reserve(longest + t)
        ids = torch.tensor(padded(t), device=self.model.device)
        return self.model.forward_rows(ids, self.cache.view([slot for slot, _ in rows]),
                                       adapters=[seq.adapter for _, seq in rows]).argmax(-1).tolist()

    def _prefill(self) -> dict[Sequence, StepOutput]:
        budget, out = self.cfg.prefill_chunk, {}
        for seq in self.running:
            left = len(seq.prompt_ids) - seq.prefilled
            if left == 0:
                continue
            if budget == 0:
                break
            t, row = min(left, budget), seq.slots[0]
            self.cache.reserve(seq.prefilled + t)
            ids = torch.tensor([seq.prompt_ids[seq.prefilled:seq.prefilled + t]], device=self.model.device)
            logits = self.model.forward_rows(ids, self.cache.view([row]), last_only=True,
                                             adapters=[seq.adapter])[:, -1]  # (1, V)
            seq.prefilled += t
            budget -= t
            if seq.prefilled == len(seq.prompt_ids):
                for other in seq.slots[1:]:
                    self.cache.copy_row(row, other)
                self._keep(seq, 0)
                n = seq.params.n
                out[seq] = self._sample(seq, logits.expand(n, -1), list(range(n)))
        return out

    @staticmethod
    def _sample(seq: Sequence, logits: torch.Tensor, rows: list[int]) -> StepOutput:
        """Sample `rows` of `seq` (logits (len(rows), V)) with its own parameters and generator;
        a StepOutput over all n rows as `generate` yields it (other rows inactive)."""
        p, n = seq.params, seq.params.n
        tok, ended = constrained_sample(logits, p, seq.gen, seq.grammars, rows)
        lps = token_logprobs(logits, tok, p.logprobs)
        out = StepOutput([0] * n, [False] * n, [False] * n, [None] * n if lps is not None else None,
                         [False] * n if seq.grammars is not None else None)
        for j, (i, t) in enumerate(zip(rows, tok.tolist())):
            out.tokens[i], out.active[i] = t, True
            out.eos[i], grammar_end = row_end(t, ended[j], seq.eos_ids, p.ignore_eos)
            if out.ended is not None:
                out.ended[i] = grammar_end
            seq.grammar_ended[i] = grammar_end
            seq.finished[i] = seq.finished[i] or out.eos[i] or grammar_end
            seq.last[i] = t
            seq.out[i].append(t)
            if lps is not None:
                out.logprobs[i] = lps[j]
        seq.steps += 1
        return out


@dataclass
class Join:
    """What a job of several sequences yields to put `seq` into `model`'s batch."""
    model: object
    seq: Sequence


def drive(events: Iterator, cfg: BatchConfig | None = None, prefix_cache: PrefixCache | None = None) -> Iterator:
    """Run such a job alone (scripts, tests): its sequences in engines of its own, one step
    whenever it waits (yields None); its other items are passed on."""
    engines: dict[int, BatchEngine] = {}
    for ev in events:
        if isinstance(ev, Join):
            engine = engines.setdefault(id(ev.model), BatchEngine(ev.model, cfg, prefix_cache))
            engine.add(ev.seq)
        elif ev is None:
            for engine in engines.values():
                if engine.has_work:
                    engine.step()
        else:
            yield ev
