"""Pure sampling functions: logits in, token ids out, no hidden state.

temperature 0 means greedy (argmax); randomness only comes from the explicit
`torch.Generator`, so a seeded request is reproducible.
"""

from __future__ import annotations

import torch


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k logits per row (top_k <= 0 disables)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Mass strictly before each token; a token is dropped once that mass already reaches top_p,
    # so the most likely token always survives.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Only the `allowed` (B, V) bool tokens can be sampled (a grammar's mask); None: all."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,); `allowed` restricts the choice before anything else
    (so top-k / top-p pick among allowed tokens, as in vLLM's structured outputs)."""
    logits = apply_allowed(logits.float(), allowed)
    if temperature <= 0.0:
        return torch.argmax(logits, dim=-1)
    logits = apply_top_p(apply_top_k(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
