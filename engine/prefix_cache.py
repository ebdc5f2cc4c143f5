"""Prefix caching across requests (llama.cpp `cache_prompt`, vLLM automatic prefix caching).

The batch engine stores the KV of finished work here: a prompt once it is prefilled, and a
row's prompt + generated tokens when the row leaves its slot (the next turn of a chat
contains the previous answer). A new prompt copies the KV of its longest shared token prefix
into its row and prefills only the rest.

    cache = PrefixCache(budget_bytes=256 * 2**20)
    engine = BatchEngine(model, cfg, prefix_cache=cache)

Why a plain list of entries with a longest-common-prefix search, not vLLM's hashed blocks:
at this server's scale (a few MiB of KV per thousand tokens, a budget of hundreds of MiB, so
tens of entries) one vectorised comparison per entry costs microseconds, and whole-entry
entries need no block tables in the attention kernel (a row is copied in contiguously). The
price is that two conversations sharing a system prompt each hold a copy of it; an entry a
longer one extends is dropped (`store` below), so one conversation holds one entry.

Exactness: a position's K and V depend only on the tokens up to it (causal), and RoPE is
applied at absolute positions, so a prefix's KV is the same whichever request computed it
(up to float rounding of a different batch shape, as with chunked prefill). Sliding-window
layers keep the full history in `SlotKVCache` and mask by window, so a reused prefix holds
every key a later query may need; CHAI layers' fewer key heads are stored as they are cached.
Entries belong to one owner (a model, or a model with a per-request adapter: `(model, name)`,
compared with ==): two owners never share KV.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

import torch

KV = tuple[list[torch.Tensor], list[torch.Tensor]]  # per layer: k (k_heads, T, hd), v (n_kv, T, hd)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused at least one position
    query_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # prompt tokens whose KV was reused instead of prefilled
    evictions: int = 0  # entries dropped to stay under the budget


@dataclass(eq=False)
class _Entry:
    owner: object
    ids: torch.Tensor  # (T,) int64 on CPU: compared with each new prompt
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    nbytes: int


class PrefixCache:
    """Token-prefix -> KV entries under a byte budget, least recently used evicted first.
    Used from the generation worker thread only; `stats` and `nbytes` are plain ints that
    another thread (the /metrics scrape) may read at any time."""

    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError("a prefix cache needs a positive budget (0 means: make none)")
        self.budget = budget_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._keys = count()
        self.nbytes = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, owner, ids: list[int]) -> tuple[KV, int] | None:
        """The cached KV of `ids`' longest cached prefix and its length m, at most len(ids) - 1:
        the last prompt token is always prefilled, since its logits give the first sample.
        The KV tensors are the entry's own (copy, don't write); None when nothing is shared."""
        self.stats.queries += 1
        self.stats.query_tokens += len(ids)
        best, m = self._longest(owner, torch.tensor(ids, dtype=torch.long))
        m = min(m, len(ids) - 1)
        if best is None or m <= 0:
            return None
        self._entries.move_to_end(best)
        self.stats.hits += 1
        self.stats.hit_tokens += m
        e = self._entries[best]
        return (e.k, e.v), m

    def store(self, owner, ids: list[int], read: Callable[[int], KV], token_bytes: int) -> None:
        """Keep the KV of `ids` (`read(n)` copies the first n positions out of the caller's
        cache; called only when something new is stored). An entry that already covers `ids`
        is just marked used; entries `ids` extends are replaced; an entry over the whole
        budget keeps only the prefix that fits."""
        q = torch.tensor(ids[:self.budget // token_bytes], dtype=torch.long)
        n = len(q)
        if n == 0:
            return
        for key, e in list(self._entries.items()):
            if e.owner != owner:
                continue
            m = _common_prefix(e.ids, q)
            if m == n:  # nothing new
                self._entries.move_to_end(key)
                return
            if m == len(e.ids):  # the new entry extends it
                self._drop(key)
        k, v = read(n)
        nbytes = sum(t.numel() * t.element_size() for t in k + v)
        self._entries[next(self._keys)] = _Entry(owner, q, k, v, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _longest(self, owner, q: torch.Tensor) -> tuple[int | None, int]:
        best, m = None, 0
        for key in reversed(self._entries):  # most recent first: it wins ties
            e = self._entries[key]
            if e.owner == owner:
                n = _common_prefix(e.ids, q)
                if n > m:
                    best, m = key, n
        return best, m

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
