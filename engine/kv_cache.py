"""Explicit KV cache passed to `Transformer.forward`.

Preallocated per layer as (B, n_kv_heads, max_len, head_dim) so decode never
reallocates; `pos` is the number of positions already written. Sliding-window
layers keep the full history and are masked instead: simpler, exact, and cheap
at the context lengths this CPU server runs.
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
