"""The continuous-batching decode step as one torch.compile (inductor) graph.

Why: at batch 1 about 40% of a SmolLM2 token's time was ~1,600 small ops (dtype casts, RoPE,
norms, residuals, KV writes) at a few microseconds each; compiling each block separately was
slower (the guards of 90 compiled callables cost more than the fusion saved). Here the whole
step is one graph (gpt-fast's design), with shapes that do not change from step to step:

  - the batch is the slots [0, B) up to the highest running one (slots are taken lowest
    first, so that is usually exactly the running rows): a free or prefilling row inside it
    computes a throw-away token, written past its valid length (the last reserved position),
    so no row's data changes and rows are read as a slice of the cache, never gathered;
  - positions, the keys each row may see and the RoPE rows are tensors, not Python ints; B,
    the attended length S and the cache's capacity are the dynamic sizes, marked as such on
    the tensors (`_mark_dynamic`); everything else is static. Dynamo specializes a size of 1,
    so there are two graphs per model, B = 1 and B >= 2, both compiled by `warm_up`.
    `dynamic=True` was measured first: it made every float attribute of the model (norm eps
    and offsets, attention scales, RoPE bases: 184 on SmolLM2) a graph input, which a step
    then rebuilt as 155 small tensors before the graph ran (0.7-0.8 ms of a ~10 ms step,
    profiled), kept inductor from folding them, and guarded every weight's dimensions.
A fixed B = max_num_seqs (one graph) was measured first: one stream then paid for eight
(TPOT 52.8 ms against 30.1 eager on SmolLM2 int8, 2 cores).

In the batch-1 graph, int8 weight-only products and the attention are written as products and
sums (engine/quant.py `_rows_times_int8`, `Attention._one_query`) that inductor fuses into a
few loop nests instead of calling kernels: SmolLM2 int8 decode alone went from 43.8 to 52-59
tok/s (2 cores; llama-bench about 80 in the same runs). Batched graphs keep the int8 kernel
and take the same attention (`_one_query` at any B: 5-8% off a 4- or 8-row step).
Prefill, models with CHAI layers and ONNX sessions keep the eager path. Compiling costs tens
of seconds, paid by `warm_up` at start-up, not by the first request.
Per-request LoRA adapters (engine/adapters.py): the batch-1 graph has a copy per adapter, the
adapter traced in as a constant; the multi-row graph has two, the base model's and one that
computes every loaded adapter's product with a per-row 0/1 mask per adapter (graph inputs), so
a step mixing base rows and rows of any adapters runs compiled too.
Prompt-lookup draft checks (engine/lookup.py: the memory model's condensations, T = 1 + 8
tokens a row) have graphs of their own (`check`, `warm_up_checks`), T a constant of each: the
70M memory model's check took 10.9 ms compiled against 14.2 eager (2 cores, int8, median of
21), a whole condensation 167 against 210 ms (benchmarks/condense_speed.py, with the steps that
found no draft on the one-token graph: engine/batching.py `_check`). The batch-1 options
do not apply there: T rows go through the int8 kernel and SDPA, not the fused one-row products.
"""

from __future__ import annotations

import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kv_cache import SlotKVCache
from .model import Transformer


class _Slots:
    """The `KVCache` interface `Transformer._run` calls, over slots [0, B) of a SlotKVCache,
    with write positions as a tensor pos (B, T)."""

    def __init__(self, ks: list[torch.Tensor], vs: list[torch.Tensor], pos: torch.Tensor, n_keys: int):
        self.ks, self.vs, self.pos, self.n = ks, vs, pos, n_keys
        self.b = pos.shape[0]
        self.rows = torch.arange(self.b, device=pos.device)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # advanced indices around a slice put their dims first: the target is (B, T, heads, hd)
        self.ks[layer][self.rows, :, self.pos] = k.transpose(1, 2)
        self.vs[layer][self.rows, :, self.pos] = v.transpose(1, 2)
        return self.ks[layer][:self.b, :, :self.n], self.vs[layer][:self.b, :, :self.n]

    def advance(self, n: int) -> None:
        pass  # the caller keeps the lengths


def _step(model: Transformer, ids: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
          ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """ids (B, 1) of slots [0, B) at positions pos (B,), each row seeing keys [0, pos]; keys = arange(S)."""
    p = pos[:, None]
    return model._run(ids, model.inputs_at(p, keys), _Slots(ks, vs, p, keys.shape[0]), True)[:, -1]


def _check(model: Transformer, ids: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
           ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """ids (B, T) of slots [0, B) from positions pos (B,) on -> the greedy choice after each
    (B, T): a prompt-lookup draft checked in one forward (engine/lookup.py)."""
    p = pos[:, None] + torch.arange(ids.shape[1], device=pos.device)
    return model._run(ids, model.inputs_at(p, keys), _Slots(ks, vs, p, keys.shape[0]), False).argmax(-1)


# The batch-1 graph (its int8 products are engine/quant.py `_rows_times_int8`): a low
# realize_opcount_threshold stores a value that a loop reads many times instead of
# recomputing it at each read; at the default (30) inductor inlined each RMSNorm
# (a scalar sqrt per element) into the int8 products that read it, once per weight element
# (SmolLM2 step ~20 ms). 0 also stored the attention's broadcast products (9 heads x S x 64
# floats, twice a layer): 8.5 us a cached position against 5 at 4, which still stores the norms
# (step at S 128-188, interleaved, median of 8 rounds: 9.4 ms at 4, 9.8 at 0, 9.8 at 2; 8 inlines
# the norms again, 12 ms).
# With two or more rows the same option stored the int8 products' broadcasts (about 1 ms
# each): those graphs keep the int8 kernel and inductor's defaults. Both: emulate_precision_casts rounds
# bf16 intermediates as eager does, so compiled logits agree with eager ones to the last bits
# of a product's summation, not to 1-6% (tiny int8 model).
# size_asserts off: dynamo's guards already check every input's shape, and the graph's Python
# wrapper otherwise re-checked each of its ~580 inputs on every step (p10 step 9.8 vs 10.3 ms).
_OPTIONS = {True: {"realize_opcount_threshold": 4, "emulate_precision_casts": True, "size_asserts": False},
            False: {"emulate_precision_casts": True, "size_asserts": False}}


@dataclass
class _Compiled:
    """One compiled step function: a model, a slot count, one row or several."""
    fn: Callable
    traced: bool = False  # called once in inference mode: its graph exists, guards can be skipped

    def __call__(self, *args) -> torch.Tensor:
        # Dynamo's guards (~6,000 on SmolLM2: every weight's type, shape and marks) took
        # 0.35 ms of a 9.3 ms batch-1 step (interleaved A/B, median of 12 rounds: 8.98 vs
        # 9.34 ms). They are skipped once this function has a graph: it only ever sees one
        # model, one slot count and one batch kind (B = 1 or B >= 2), so what can still vary is
        # what the graph takes as symbols (B, S, the cache's capacity) - the conditions under
        # which torch documents skip_guard_eval_unsafe as safe. Outside inference mode (where
        # the graph was not traced) the guards run.
        if self.traced and torch.is_inference_mode_enabled():
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self.fn(*args)
            except RuntimeError as e:  # raised before the graph runs: no input was touched
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
                # torch found no graph of this function for these inputs (a guard failed: e.g.
                # other strides; S equal to the capacity was one until `CompiledDecode` kept
                # the capacity above S): compiled now with the guards on, then told apart from
                # the first graph by the guards that differ
        out = self.fn(*args)
        self.traced = self.traced or torch.is_inference_mode_enabled()
        return out


MASKED = "*masked*"  # the multi-row graph through every adapter, each masked to its rows

# per model: (slots, one row, adapter or MASKED, tokens a row) -> its compiled step; a later
# engine on the model reuses what `warm_up` compiled, and a model's graphs go with it
_compiled: "weakref.WeakKeyDictionary[Transformer, dict[tuple[int, bool, str | None, int], _Compiled]]" = (
    weakref.WeakKeyDictionary())


def _compiled_step(model: Transformer, slots: int, one_row: bool, adapter: str | None = None, t: int = 1
                   ) -> _Compiled:
    """A function of its own per (model, slots, one row, adapter, T): dynamo keeps graphs per code
    object, so each gets a copy of `_step`'s code (T = 1) or `_check`'s (a draft check, T > 1) and
    holds exactly one graph. A per-request LoRA adapter is traced into its batch-1 graph as a
    constant, and MASKED names the multi-row graph through every adapter, which is why they are
    part of the key: the graph's guards are skipped once it exists. (An adapter called MASKED
    cannot collide: names key batch-1 graphs only.) T is a constant of its graph: the batch
    engine checks drafts padded to one length."""
    steps = _compiled.setdefault(model, {})
    key = (slots, one_row, adapter, t)
    if key not in steps:
        code = _step if t == 1 else _check
        fresh = types.FunctionType(code.__code__.replace(), code.__globals__, code.__name__)
        # the batch-1 options fit one token a row (fused int8 products and attention); a draft
        # check is T rows of products either way, for the int8 kernel and SDPA
        options = _OPTIONS[one_row and t == 1]
        steps[key] = _Compiled(torch.compile(fresh, dynamic=None, fullgraph=True, options=options))
    return steps[key]


def _mark_dynamic(cache: SlotKVCache, ids: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor) -> None:
    """The sizes that change from step to step, for dynamo to trace as symbols: S (keys), the
    cache's capacity (it grows) and, with two or more rows, B. A cache tensor keeps its mark,
    so each is marked once (a step checks 2 x layers attributes, not 4 x layers calls)."""
    torch._dynamo.mark_dynamic(keys, 0)
    if ids.shape[0] > 1:
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(pos, 0)
    for t in cache.k + cache.v:
        if not hasattr(t, "_dynamo_dynamic_indices"):
            torch._dynamo.mark_dynamic(t, 2)


class CompiledDecode:
    def __init__(self, model: Transformer):
        if not self.supports(model):
            raise ValueError("the compiled decode step needs an engine Transformer without CHAI layers")
        self.model = model

    @staticmethod
    def supports(model) -> bool:
        return isinstance(model, Transformer) and not any(blk.attn.chai for blk in model.layers)

    def __call__(self, cache: SlotKVCache, tokens: dict[int, int],
                 adapters: dict[int, str | None] | None = None) -> torch.Tensor:
        """Next-token logits (len(tokens), V) for the rows in `tokens` (slot -> last token), in
        slot order; every row in `tokens` advances by one position. `adapters`: slot -> that
        row's per-request LoRA adapter (missing or None: the base weights)."""
        rows = sorted(tokens)
        b = rows[-1] + 1
        end = max(cache.lens[r] for r in rows) + 1
        # room past every row (idle rows write there), and one more: the graphs are traced with
        # S below the capacity and guard S != capacity (equal, it was a recompile mid-request).
        # S < capacity holds even at max_len: a row's end is at most max_len - 1
        cache.reserve(min(max(max(cache.lens[:b]) + 1, end) + 1, cache.max_len))
        ids, pos, keys = self._inputs(cache, {s: [tok] for s, tok in tokens.items()}, end)
        names = [(adapters or {}).get(s) if s in tokens else None for s in range(b)]  # idle rows: base
        if not any(names):
            logits = _compiled_step(self.model, cache.slots, b == 1)(self.model, ids, pos, keys, cache.k, cache.v)
        else:
            logits = self._through_adapters(cache, names, ids, pos, keys)
        for r in rows:
            cache.lens[r] += 1
        return logits[rows]

    def _inputs(self, cache: SlotKVCache, fed: dict[int, list[int]], end: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step's graph inputs over slots [0, B): ids (B, T) (idle rows: zeros), each row's first
        position pos (B,) (idle rows: the last T reserved ones, past every row's length) and
        keys = arange(end), for the rows in `fed` (slot -> its T tokens)."""
        dev, b, t = self.model.device, max(fed) + 1, len(next(iter(fed.values())))
        idle = cache.capacity - t
        pos = torch.tensor([cache.lens[s] if s in fed else idle for s in range(b)], device=dev)
        ids = torch.tensor([fed.get(s, [0] * t) for s in range(b)], device=dev)
        keys = torch.arange(end, device=dev)
        _mark_dynamic(cache, ids, pos, keys)
        return ids, pos, keys

    def _through_adapters(self, cache: SlotKVCache, names: list[str | None], ids, pos, keys) -> torch.Tensor:
        bank = self.model.adapter_bank
        if len(names) == 1:  # the adapter is a constant of its batch-1 graph
            step, groups = _compiled_step(self.model, cache.slots, True, names[0]), bank.masks(names)
        else:  # one graph for any mix: every adapter's product, masked to its rows
            step, groups = _compiled_step(self.model, cache.slots, False, MASKED), bank.masks(names, every=True)
            for _, mask in groups:
                torch._dynamo.mark_dynamic(mask, 0)
        with bank.select(groups):
            return step(self.model, ids, pos, keys, cache.k, cache.v)

    def check(self, cache: SlotKVCache, fed: dict[int, list[int]]) -> list[list[int]] | None:
        """A prompt-lookup draft check (engine/lookup.py) for the rows in `fed` (slot -> its last
        token and a draft, every row the same length T): the greedy choice after each fed token,
        (len(fed), T) in slot order; every row advances by T (the caller keeps the confirmed
        part). None, touching nothing, where the rows' positions would not fit below max_len:
        the caller checks eagerly."""
        rows = sorted(fed)
        t, b = len(fed[rows[0]]), rows[-1] + 1
        end = max(cache.lens[r] for r in rows) + t
        # idle rows write their T throw-away tokens at the last T reserved positions, past every
        # row's length; and S stays below the capacity, as for `__call__`
        need = max(max(cache.lens[:b]) + t, end + 1)
        if need > cache.max_len:
            return None
        cache.reserve(need)
        ids, pos, keys = self._inputs(cache, fed, end)
        greedy = _compiled_step(self.model, cache.slots, b == 1, None, t)(self.model, ids, pos, keys,
                                                                           cache.k, cache.v)
        for r in rows:
            cache.lens[r] += t
        return greedy[rows].tolist()

    def warm_up_checks(self, slots: int, t: int) -> float:
        """Compile the draft checks of T tokens a row now (one row, and two with two or more
        slots, each at two lengths), as `warm_up` does for decode steps. Returns the seconds."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            for n in [1, 2][:slots]:
                cache = self.model.new_slot_cache(slots)
                cache.lens[:n] = [37] * n
                for _ in range(2):
                    self.check(cache, {r: [0] * t for r in range(n)})
        return time.perf_counter() - t0

    def warm_up(self, slots: int) -> float:
        """Compile now, on a throw-away cache of `slots` rows: one row, then (with two or more
        slots) two, each at two lengths (the second must not recompile); one row through each
        per-request LoRA adapter of the model, and two through the masked graph. Returns the
        seconds."""
        t0 = time.perf_counter()
        with torch.inference_mode():  # the engine's caches are inference tensors: a guard tells them apart
            names = self.model.adapter_bank.names
            steps = [{0: a} for a in [None, *names]]  # batch 1: base, each adapter
            if slots > 1:  # several rows: base, and the masked graph (an adapter row beside a base one)
                steps += [{0: None, 1: None}] + ([{0: names[0], 1: None}] if names else [])
            for adapters in steps:
                cache = self.model.new_slot_cache(slots)
                # lengths no other size has (dynamo would tie equal sizes together) and not 1 (it would specialize)
                cache.lens[:2] = [37, 37][:slots]
                for _ in range(2):
                    self(cache, dict.fromkeys(adapters, 0), adapters)
        return time.perf_counter() - t0
