"""Prompt-lookup decoding of condensations (engine/lookup.py, server.hybrid._lookup_decode):
the same greedy tokens as one token per forward, in fewer forwards when the output repeats
the input; drafts rejected part-way leave the cache exactly as plain decoding would."""

from __future__ import annotations

import threading

import torch

from engine.lookup import accepted, propose
from server.hybrid import ModelStats, PrefixKV, _decode, _lookup_decode


def test_propose_takes_the_latest_longest_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(ctx, 2) == [7, 8]  # the latest earlier "1 2 3" is followed by 7 8
    assert propose([4, 5, 6, 5], 3) == [6, 5]  # falls back to the last token alone
    assert propose([4, 5, 6], 3) == [] and propose([], 3) == [] and propose([4], 3) == []
    assert accepted([7, 8, 9], [7, 8, 1, 4]) == 2 and accepted([], [3]) == 0 and accepted([5], [6, 1]) == 0


class Steered(torch.nn.Module):
    """A real engine model whose greedy choice is forced to count 20..59 (the previous token + 1,
    20 after 59 or any other token) except after multiples of 13, where the model's own
    logits decide: drafts copied from a counting input are accepted for a while, then
    rejected mid-draft."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, 0
        self.device, self.new_cache = model.device, model.new_cache

    def forward(self, ids, cache=None, last_only=False):
        self.calls += 1
        logits = self.inner(ids, cache, last_only)
        prev = ids[:, -logits.shape[1]:]
        nxt = torch.where((prev >= 20) & (prev < 59), prev + 1, 20)  # counts 20..59, round and round
        bias = torch.nn.functional.one_hot(nxt, logits.shape[-1]) * 1e4
        return logits + bias * (prev % 13 != 0)[..., None]


def _both(model, ids, max_new, eos=frozenset()):
    never = threading.Event()
    plain, fast = Steered(model), Steered(model)
    a = list(_decode(PrefixKV(plain, 256, ModelStats()), ids, max_new, set(eos), lambda lg: int(lg[0].argmax()), never))
    b = list(_lookup_decode(PrefixKV(fast, 256, ModelStats()), ids, max_new, set(eos), never))
    return a, b, plain.calls, fast.calls


def test_lookup_decoding_gives_the_greedy_tokens_in_fewer_forwards(llama_artifact):
    from engine.runner import load_model

    model = load_model(llama_artifact).model
    ids = list(range(20, 60)) + [7, 21]  # the output counts on from 22: the input holds the draft
    with torch.inference_mode():
        a, b, plain_calls, fast_calls = _both(model, ids, 30)
        assert a == b and len(a) == 30
        assert fast_calls < plain_calls / 2  # several tokens per forward
        k = next(i for i in range(8, 30) if a.index(a[i]) == i)  # a token's first appearance
        a, b, _, _ = _both(model, ids, 30, {a[k]})  # an end token stops both there
        assert a == b and len(a) == k
        for n in (1, 2, 7):  # budgets that end inside a draft
            a, b, _, _ = _both(model, ids, n)
            assert a == b and len(a) == n


def test_rejected_drafts_leave_the_cache_as_plain_decoding(llama_artifact):
    from engine.runner import load_model

    model = load_model(llama_artifact).model
    ids = [3, 4, 5, 6, 9, 3, 4, 5, 6, 11, 3, 4, 5]  # "3 4 5" recurs with different continuations
    with torch.inference_mode():
        steered = Steered(model)
        kv = PrefixKV(steered, 256, ModelStats())
        out = list(_lookup_decode(kv, ids, 20, set(), threading.Event()))
        # the cache holds the input and the output (the last token at most not yet fed), nothing rejected
        assert kv.ids == (ids + out)[:len(kv.ids)] and len(kv.ids) >= len(ids) + len(out) - 1
        assert kv.cache.pos == len(kv.ids)
        warm = kv.extend([17])[-1]
        cold = steered(torch.tensor([kv.ids]), model.new_cache(1, 256), last_only=True)[0, -1]
        torch.testing.assert_close(warm, cold, rtol=1e-3, atol=1e-3)
