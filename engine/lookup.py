"""Prompt-lookup drafts for greedy decoding (vLLM's `ngram` speculative method, "prompt lookup
decoding"): where the output repeats its input — a condensed prompt restating the question —
the tokens that followed the latest earlier occurrence of the output's last n-gram are a
draft; one forward over the draft checks them all, and every draft token the model would
have chosen greedily anyway is kept. The output is the plain greedy one; only the number of
forwards changes (a CPU forward over a few tokens costs about what one token costs: the
weights are read once).
"""

from __future__ import annotations


def propose(context: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens,
    trying the longest n first; [] when nothing matches."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):  # latest first, never the tail itself
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


def accepted(draft: list[int], greedy: list[int]) -> int:
    """How many draft tokens the model confirms: greedy[i] is its choice after draft[:i]."""
    m = 0
    while m < len(draft) and draft[m] == greedy[m]:
        m += 1
    return m
