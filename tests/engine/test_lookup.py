"""Prompt-lookup decoding in the batch (engine/lookup.py, `SamplingParams.lookup_draft`): the
same greedy tokens as one token per forward, in fewer forwards when the output repeats the
input, alone or batched with other rows; drafts rejected part-way leave the cache exactly as
plain decoding would."""

from __future__ import annotations

import torch

from engine.batching import BatchConfig, BatchEngine, Sequence
from engine.generate import SamplingParams
from engine.lookup import accepted, propose


def test_propose_takes_the_latest_longest_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(ctx, 2) == [7, 8]  # the latest earlier "1 2 3" is followed by 7 8
    assert propose([4, 5, 6, 5], 3) == [6, 5]  # falls back to the last token alone
    assert propose([4, 5, 6], 3) == [] and propose([], 3) == [] and propose([4], 3) == []
    assert accepted([7, 8, 9], [7, 8, 1, 4]) == 2 and accepted([], [3]) == 0 and accepted([5], [6, 1]) == 0


class Steered:
    """A real engine model whose greedy choice is forced to count 20..59 (the previous token + 1,
    20 after 59 or any other token) except after multiples of 13, where the model's own
    logits decide: drafts copied from a counting input are accepted for a while, then
    rejected mid-draft. Counts forwards."""

    def __init__(self, model):
        self.inner, self.calls = model, 0
        self.device, self.max_len, self.new_slot_cache = model.device, model.max_len, model.new_slot_cache

    def forward_rows(self, ids, rows, last_only=False, adapters=None):
        self.calls += 1
        logits = self.inner.forward_rows(ids, rows, last_only, adapters)
        prev = ids[:, -logits.shape[1]:]
        nxt = torch.where((prev >= 20) & (prev < 59), prev + 1, 20)  # counts 20..59, round and round
        bias = torch.nn.functional.one_hot(nxt, logits.shape[-1]) * 1e4
        return logits + bias * (prev % 13 != 0)[..., None]


def _run(model, prompts, max_new, draft, eos=frozenset(), steps=None):
    """Greedy sequences of `prompts` in one engine (lookup drafts of `draft` tokens, 0: none);
    their outputs, EOS dropped. `steps` stops early (the engine is returned too)."""
    engine = BatchEngine(model, BatchConfig(max_num_seqs=4))
    seqs = [Sequence(list(p), SamplingParams(max_tokens=max_new, temperature=0, lookup_draft=draft), set(eos))
            for p in prompts]
    for s in seqs:
        engine.add(s)
    n = 0
    while engine.has_work and (steps is None or n < steps):
        engine.step()
        n += 1
    return [[t for t in s.out[0] if t not in eos] for s in seqs], engine, seqs


COUNTING = list(range(20, 60)) + [7, 21]  # the output counts on from 22: the input holds the draft


def test_lookup_decoding_gives_the_greedy_tokens_in_fewer_forwards(llama_artifact):
    from engine.runner import load_model

    model = load_model(llama_artifact).model
    plain, fast = Steered(model), Steered(model)
    (a,), _, _ = _run(plain, [COUNTING], 30, 0)
    (b,), _, _ = _run(fast, [COUNTING], 30, 8)
    assert a == b and len(a) == 30
    assert fast.calls < plain.calls / 2  # several tokens per forward
    k = next(i for i in range(8, 30) if a.index(a[i]) == i)  # a token's first appearance
    end = {a[k]}  # an end token stops both there
    (c,), _, _ = _run(Steered(model), [COUNTING], 30, 0, end)
    (d,), _, _ = _run(Steered(model), [COUNTING], 30, 8, end)
    assert c == d == a[:k]
    for n in (1, 2, 7):  # budgets that end inside a draft
        (a,), _, _ = _run(Steered(model), [COUNTING], n, 0)
        (b,), _, _ = _run(Steered(model), [COUNTING], n, 8)
        assert a == b and len(a) == n


def test_lookup_rows_batched_with_others_give_their_tokens_alone(llama_artifact):
    from engine.runner import load_model

    model = load_model(llama_artifact).model
    prompts = [COUNTING, [3, 4, 5, 6, 9, 3, 4, 5, 6, 11, 3, 4, 5], list(range(30, 45)) + [31]]
    alone = [_run(Steered(model), [p], 25, 8)[0][0] for p in prompts]
    together, _, _ = _run(Steered(model), prompts, 25, 8)
    assert together == alone
    # with a plain greedy row in the same engine (its own forward each step)
    engine = BatchEngine(Steered(model), BatchConfig(max_num_seqs=4))
    plain = Sequence(list(prompts[1]), SamplingParams(max_tokens=25, temperature=0), set())
    fast = Sequence(list(prompts[0]), SamplingParams(max_tokens=25, temperature=0, lookup_draft=8), set())
    engine.add(plain)
    engine.add(fast)
    while engine.has_work:
        engine.step()
    assert plain.out[0] == _run(Steered(model), [prompts[1]], 25, 0)[0][0] and fast.out[0] == alone[0]


def test_rejected_drafts_leave_the_cache_as_plain_decoding(llama_artifact):
    from engine.runner import load_model

    model = load_model(llama_artifact).model
    ids = [3, 4, 5, 6, 9, 3, 4, 5, 6, 11, 3, 4, 5]  # "3 4 5" recurs with different continuations
    steered = Steered(model)
    (out,), engine, (seq,) = _run(steered, [ids], 40, 8, steps=8)  # stopped mid-generation
    slot = seq.slots[0]
    n = engine.cache.lens[slot]
    assert n == len(ids) + len(out) - 1  # the input and the output but its last token, nothing rejected
    cold = model.new_cache(1, 256)
    with torch.inference_mode():
        model(torch.tensor([(ids + out)[:n]]), cold)
    for warm, ref in zip(engine.cache.k + engine.cache.v, cold.k + cold.v):
        torch.testing.assert_close(warm[slot, :, :n], ref[0, :, :n], rtol=1e-3, atol=1e-4)


def test_lookup_drafts_are_refused_where_they_would_change_the_output(llama_artifact):
    import pytest

    from engine.runner import load_model

    engine = BatchEngine(load_model(llama_artifact).model)
    for p in (SamplingParams(temperature=0.7, lookup_draft=4), SamplingParams(temperature=0, n=2, lookup_draft=4),
              SamplingParams(temperature=0, logprobs=2, lookup_draft=4)):
        with pytest.raises(ValueError, match="lookup drafts"):
            engine.add(Sequence([1, 2, 3], p, set()))
