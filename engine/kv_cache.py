"""Explicit KV caches passed to the model.

`KVCache` (one sequence, or n rows in lockstep; `Transformer.forward`) is preallocated per
layer as (B, n_kv_heads, max_len, head_dim) so decode never reallocates; `pos` is the number
of positions already written. `SlotKVCache` (continuous batching; `Transformer.forward_rows`)
holds independent rows, each with its own length. Sliding-window layers keep the full
history and are masked instead: simpler, exact, and cheap at the context lengths this CPU
server runs.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 k_heads: list[int] | None = None):
        """k_heads: per layer, how many key heads are cached (CHAI keeps keys only for the KV
        groups its representative heads read); values always keep n_kv_heads."""
        k_heads = k_heads or [n_kv_heads] * n_layers
        self.k = [torch.zeros((batch, k_heads[i], max_len, head_dim), dtype=dtype, device=device)
                  for i in range(n_layers)]
        self.v = [torch.zeros((batch, n_kv_heads, max_len, head_dim), dtype=dtype, device=device)
                  for _ in range(n_layers)]
        self.max_len = max_len
        self.batch = batch
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def rewind(self, pos: int) -> None:
        """Keep only the first `pos` positions: later writes overwrite the rest. Lets a caller
        reuse a cached prefix for a new prompt that shares it."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot rewind to {pos}: the cache holds {self.pos} positions")
        self.pos = pos

    def advance(self, n: int) -> None:
        if self.pos + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} + {n} > {self.max_len}")
        self.pos += n

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at [pos, pos+T) and return the valid prefix [0, pos+T)."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def prefill(self, other: "KVCache") -> None:
        """Copy another cache's valid prefix into this one, broadcasting a batch of 1 to this batch."""
        if other.pos > self.max_len:
            raise ValueError("source cache is longer than this cache")
        if other.batch not in (1, self.batch):
            raise ValueError(f"cannot broadcast batch {other.batch} to {self.batch}")
        for layer in range(len(self.k)):
            self.k[layer][:, :, :other.pos] = other.k[layer][:, :, :other.pos]
            self.v[layer][:, :, :other.pos] = other.v[layer][:, :, :other.pos]
        self.pos = other.pos

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class SlotKVCache:
    """KV cache for continuous batching: `slots` independent rows, each with its own length.

    A row (slot) holds one sequence; `lens[s]` positions of it are valid. Positions past a
    row's length hold stale values of earlier occupants: forwards mask them per row, and
    they are zeros at first (never NaN, which a masked-out softmax weight of 0 would still
    turn into NaN). Storage grows in length on demand (`reserve`), so an idle server does
    not hold slots x max_len of memory.
    """

    INITIAL_LEN = 256  # positions per row allocated up front

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 k_heads: list[int] | None = None, initial_len: int | None = None):
        self.k_heads = k_heads or [n_kv_heads] * n_layers
        self.n_kv, self.hd, self.dtype, self.device = n_kv_heads, head_dim, dtype, device
        self.slots, self.max_len = slots, max_len
        self.lens = [0] * slots
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.initial = min(initial_len or self.INITIAL_LEN, max_len)
        self.reserve(self.initial)

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per row (at least doubling, so growth is rare)."""
        if length > self.max_len:
            raise ValueError(f"KV cache overflow: {length} > {self.max_len}")
        if length <= self.capacity:
            return
        cap = min(self.max_len, max(length, 2 * self.capacity))
        old_k, old_v, old = self.k, self.v, self.capacity

        def grow(heads: int, prev: torch.Tensor | None) -> torch.Tensor:
            t = torch.zeros((self.slots, heads, cap, self.hd), dtype=self.dtype, device=self.device)
            if prev is not None:
                t[:, :, :old] = prev
            return t

        self.k = [grow(h, old_k[i] if old_k else None) for i, h in enumerate(self.k_heads)]
        self.v = [grow(self.n_kv, old_v[i] if old_v else None) for i in range(len(self.k_heads))]
        self.capacity = cap

    def view(self, rows: list[int]) -> "RowsView":
        """The cache as one forward over `rows` sees it (each row at its own length)."""
        return RowsView(self, rows)

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst becomes a copy of row src's valid prefix (n samples of one prompt)."""
        n = self.lens[src]
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]
        self.lens[dst] = n

    def free(self, row: int) -> None:
        self.lens[row] = 0

    def read_row(self, row: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of row's first n positions, per layer k (k_heads, n, hd) and v (n_kv, n, hd):
        what `PrefixCache` keeps once the row is freed."""
        if n > self.lens[row]:
            raise ValueError(f"row {row} holds {self.lens[row]} positions, not {n}")
        return [t[row, :, :n].clone() for t in self.k], [t[row, :, :n].clone() for t in self.v]

    def write_row(self, row: int, k: list[torch.Tensor], v: list[torch.Tensor], n: int) -> None:
        """Row becomes the first n positions of per-layer k, v (a `PrefixCache` hit)."""
        self.reserve(n)
        for dst, src in zip(self.k + self.v, k + v):
            dst[row, :, :n] = src[:, :n]
        self.lens[row] = n

    def token_bytes(self) -> int:
        """Bytes one position takes in one row, over every layer's keys and values."""
        return sum(t.shape[1] * t.shape[3] * t.element_size() for t in self.k + self.v)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class RowsView:
    """`KVCache`'s update/advance interface over some rows of a `SlotKVCache`, each row
    writing its T new positions at its own length: what `Transformer.forward_rows` takes, for
    one forward."""

    def __init__(self, cache: SlotKVCache, rows: list[int]):
        self.cache, self.rows = cache, list(rows)
        self.starts = [cache.lens[r] for r in self.rows]
        lo = self.rows[0]
        # Consecutive rows (the usual case: free slots are taken lowest first) are read as a
        # view of the cache; any other set is gathered, a copy.
        self._slice = slice(lo, lo + len(self.rows)) if self.rows == list(range(lo, lo + len(self.rows))) else None
        self._index = torch.tensor(self.rows, device=cache.device)
        self._pos: torch.Tensor | None = None  # (B, T) write positions, made by the first layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, heads, T, hd), row b at [starts[b], starts[b] + T); return every
        row's keys and values up to the longest row's end (B, heads, S, hd)."""
        t, c = k.shape[2], self.cache
        end = max(self.starts) + t
        if end > c.capacity:
            raise ValueError(f"KV cache overflow: {end} > {c.capacity} reserved")
        if self._pos is None:
            self._pos = torch.tensor(self.starts, device=c.device)[:, None] + torch.arange(t, device=c.device)
        # advanced indices around a slice put their dims first: the target is (B, T, heads, hd)
        c.k[layer][self._index[:, None], :, self._pos] = k.transpose(1, 2)
        c.v[layer][self._index[:, None], :, self._pos] = v.transpose(1, 2)
        return self._read(c.k[layer], end), self._read(c.v[layer], end)

    def _read(self, t: torch.Tensor, end: int) -> torch.Tensor:
        if self._slice is not None:
            return t[self._slice, :, :end]
        return t[:, :, :end].index_select(0, self._index)

    def advance(self, n: int) -> None:
        for r in self.rows:
            self.cache.lens[r] += n
