"""Continuous batching: rows at different positions in one forward give each request exactly
what it gets alone (greedy tokens, seeded samples, logprobs), whoever joins, finishes or is
cancelled around it; chunked prefill equals one whole prefill."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from compress.build import load_hf_dir
from engine.batching import BatchConfig, BatchEngine, Sequence
from engine.config import ModelArgs
from engine.generate import SamplingParams, generate
from engine.loader import build_model
from tests.helpers import tiny_chai_model

G = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module", params=["llama_dir", "gemma_dir"])
def model(request):
    # The tiny Gemma-3 has a sliding window of 4: every prompt here is longer, so rows are
    # masked per row by window as well as by length.
    config, state = load_hf_dir(request.getfixturevalue(request.param))
    return build_model(ModelArgs.from_hf_config(config), state, max_len=128)


def _prompt(n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=G).tolist()


def alone(model, prompt: list[int], params: SamplingParams, eos=frozenset()) -> list[list[int]]:
    """Tokens per row from `generate`, the request by itself (the reference)."""
    rows = [[] for _ in range(params.n)]
    for out in generate(model, prompt, params, set(eos)):
        for i, a in enumerate(out.active):
            if a:
                rows[i].append(out.tokens[i])
    return rows


def run(engine: BatchEngine, joins: dict[int, list[Sequence]], on_step=lambda step, outs: None):
    """Step until idle, adding `joins[k]` before step k; tokens per sequence and row."""
    got, step = {}, 0
    while engine.has_work or any(k >= step for k in joins):
        for seq in joins.get(step, []):
            engine.add(seq)
            got[seq] = [[] for _ in range(seq.params.n)]
        outs = engine.step()
        for seq, out in outs.items():
            for i, a in enumerate(out.active):
                if a:
                    got[seq][i].append(out.tokens[i])
        on_step(step, outs)
        step += 1
    return got


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_batched_greedy_decode_equals_each_request_alone(model):
    v = model.args.vocab_size
    # mixed prompt lengths, budgets that end rows at different steps, two late joiners
    specs = [(_prompt(5, v), greedy(12)), (_prompt(17, v), greedy(3)), (_prompt(9, v), greedy(20)),
             (_prompt(30, v), greedy(7)), (_prompt(6, v), greedy(10))]
    seqs = [Sequence(p, sp, set()) for p, sp in specs]
    engine = BatchEngine(model, BatchConfig(max_num_seqs=4, prefill_chunk=64))
    got = run(engine, {0: seqs[:3], 4: seqs[3:]})  # the 5th waits for the 2nd's slot
    for seq, (p, sp) in zip(seqs, specs):
        assert got[seq] == alone(model, p, sp)
    assert not engine.has_work and sorted(engine.free) == [0, 1, 2, 3]
    assert engine.cache is not None and engine.cache.capacity == engine.cache.initial  # kept: not grown


def test_an_idle_engine_reuses_its_cache_and_gives_back_a_grown_one(model, monkeypatch):
    """Requests after idle reuse the starting-size cache (its rows hold earlier requests' stale
    keys) and still equal the request alone; a cache grown past its starting size is dropped."""
    from engine.kv_cache import SlotKVCache

    monkeypatch.setattr(SlotKVCache, "INITIAL_LEN", 32)  # the tiny model's max_len is 128
    v = model.args.vocab_size
    engine = BatchEngine(model, BatchConfig(max_num_seqs=2, prefill_chunk=64))
    run(engine, {0: [Sequence(_prompt(20, v), greedy(6), set())]})
    kept = engine.cache
    assert kept is not None and kept.capacity == 32
    p, sp = _prompt(9, v), greedy(8)
    second = Sequence(p, sp, set())
    assert run(engine, {0: [second]})[second] == alone(model, p, sp) and engine.cache is kept
    run(engine, {0: [Sequence(_prompt(30, v), greedy(10), set())]})  # 40 positions: the rows grow
    assert engine.cache is None


def test_a_long_prompt_from_the_prefix_cache_grows_the_cache_once(model, monkeypatch):
    """Admission reserves the prompt and its first tokens at once: growing for the prefix-cache
    copy and again for the prefill re-zeroed and copied every slot twice (a 1k-token second
    chat turn paid ~300 ms for it)."""
    from engine.kv_cache import SlotKVCache
    from engine.prefix_cache import PrefixCache

    monkeypatch.setattr(SlotKVCache, "INITIAL_LEN", 32)
    grown, reserve = [], SlotKVCache.reserve

    def counting(self, length):
        before = self.capacity
        reserve(self, length)
        if before and self.capacity != before:  # a growth, not the first allocation
            grown.append(self.capacity)
    monkeypatch.setattr(SlotKVCache, "reserve", counting)
    v = model.args.vocab_size
    engine = BatchEngine(model, BatchConfig(max_num_seqs=2, prefill_chunk=16), PrefixCache(2**24))
    first = Sequence(_prompt(50, v), greedy(5), set())
    run(engine, {0: [first]})
    p, sp = first.prompt_ids + first.out[0] + _prompt(20, v), greedy(10)
    second = Sequence(p, sp, set())
    grown.clear()
    assert run(engine, {0: [second]})[second] == alone(model, p, sp)
    assert second.cached_tokens >= 50 and grown == [len(p) + 10]


def test_eos_finishes_only_its_row(model):
    v = model.args.vocab_size
    p, q = _prompt(8, v), _prompt(11, v)
    first = alone(model, p, greedy(10))[0]
    eos = {first[3]}  # the 4th token of p's answer ends p (and q's row wherever it appears)
    sp = SamplingParams(max_tokens=10, temperature=0.0)
    a, b = Sequence(p, sp, eos), Sequence(q, sp, eos)
    got = run(BatchEngine(model, BatchConfig(max_num_seqs=2)), {0: [a, b]})
    assert got[a] == alone(model, p, sp, eos) and len(got[a][0]) <= 4
    assert got[b] == alone(model, q, sp, eos)


def test_a_row_marked_finished_stops_while_its_sibling_continues(model):
    # what the text layer does when one sample's stop string matches
    p = _prompt(7, model.args.vocab_size)
    sp = greedy(8, n=2)
    seq = Sequence(p, sp, set())
    engine = BatchEngine(model, BatchConfig(max_num_seqs=2))

    def stop_row_1(step, outs):
        if step == 2:
            seq.finished[1] = True

    got = run(engine, {0: [seq]}, stop_row_1)
    ref = alone(model, p, sp)
    assert got[seq][0] == ref[0] and got[seq][1] == ref[1][:3]


def test_cancelling_one_request_frees_its_slot_and_the_others_continue(model):
    v = model.args.vocab_size
    specs = [(_prompt(6, v), greedy(15)), (_prompt(13, v), greedy(15)), (_prompt(4, v), greedy(6))]
    a, b, c = (Sequence(p, sp, set()) for p, sp in specs)
    engine = BatchEngine(model, BatchConfig(max_num_seqs=2))

    def cancel_a(step, outs):
        if step == 3:
            a.cancel.set()

    got = run(engine, {0: [a, b, c]}, cancel_a)  # c waits until a's slot is freed
    assert a.done and len(got[a][0]) == 4 and got[a][0] == alone(model, *specs[0])[0][:4]
    assert got[b] == alone(model, *specs[1]) and got[c] == alone(model, *specs[2])


def test_chunked_prefill_equals_whole_prefill(model):
    p = torch.tensor([_prompt(23, model.args.vocab_size)])
    with torch.inference_mode():
        whole = model(p)[:, -1]
        cache = model.new_slot_cache(3)
        model.forward_rows(torch.tensor([_prompt(9, model.args.vocab_size)]), cache.view([0]))  # another row's
        for a in range(0, 23, 5):
            cache.reserve(a + 5)
            last = model.forward_rows(p[:, a:a + 5], cache.view([2]), last_only=True)[:, -1]
    torch.testing.assert_close(last, whole, atol=1e-4, rtol=1e-4)
    assert cache.lens == [9, 0, 23]


def test_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_emitting(model):
    v = model.args.vocab_size
    short, long_ = (_prompt(4, v), greedy(12)), (_prompt(40, v), greedy(5))
    a, b = Sequence(*short, set()), Sequence(*long_, set())
    emitted = []
    got = run(BatchEngine(model, BatchConfig(max_num_seqs=2, prefill_chunk=8)), {0: [a], 2: [b]},
              lambda step, outs: emitted.append((a in outs, b in outs)))
    # b's 40 prompt tokens take 5 steps of 8 (steps 2-6); a emits at every one of them
    assert emitted[2:7] == [(True, False)] * 4 + [(True, True)]
    assert got[a] == alone(model, *short) and got[b] == alone(model, *long_)


def test_seeded_sampling_in_a_batch_equals_the_same_seed_alone(model):
    v = model.args.vocab_size
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7, ignore_eos=True,
                             logprobs=2)
    # hot enough to differ per row even on the tiny Gemma, whose distributions are nearly one-hot
    three = replace(sampled, n=3, seed=11, temperature=20.0, top_k=0, top_p=1.0)
    p, q = _prompt(9, v), _prompt(14, v)
    solo = BatchEngine(model, BatchConfig(max_num_seqs=4))
    ref = run(solo, {0: [Sequence(p, sampled, set())]})
    ref3 = run(BatchEngine(model, BatchConfig(max_num_seqs=4)), {0: [Sequence(q, three, set())]})
    a, b, c = Sequence(p, sampled, set()), Sequence(q, three, set()), Sequence(_prompt(5, v), greedy(4), set())
    got = run(BatchEngine(model, BatchConfig(max_num_seqs=5)), {0: [c], 1: [b], 3: [a]})
    assert got[a] == next(iter(ref.values())) and got[b] == next(iter(ref3.values()))
    assert got[a] == alone(model, p, sampled) and got[b] == alone(model, q, three)
    assert len({tuple(r) for r in got[b]}) > 1  # three different samples, not one copied


def test_logprobs_in_a_batch_equal_alone(model):
    v = model.args.vocab_size
    sp = greedy(5, logprobs=3)
    p = _prompt(10, v)
    ref = [out.logprobs[0] for out in generate(model, p, sp, set())]
    seq = Sequence(p, sp, set())
    engine, lps = BatchEngine(model, BatchConfig(max_num_seqs=3)), []
    engine.add(Sequence(_prompt(20, v), greedy(9), set()))
    engine.step()
    engine.add(seq)
    while not seq.done:
        out = engine.step().get(seq)
        if out:
            lps.append(out.logprobs[0])
    assert [[t for t, _ in lp[1]] for lp in lps] == [[t for t, _ in lp[1]] for lp in ref]
    torch.testing.assert_close(torch.tensor([lp[0] for lp in lps]), torch.tensor([lp[0] for lp in ref]),
                               atol=1e-4, rtol=1e-4)


def test_chai_model_batches_like_it_runs_alone(llama_dir):
    chai = tiny_chai_model(llama_dir, max_len=64)
    args = chai.args
    specs = [(_prompt(5, args.vocab_size), greedy(9)), (_prompt(12, args.vocab_size), greedy(6))]
    seqs = [Sequence(p, sp, set()) for p, sp in specs]
    got = run(BatchEngine(chai, BatchConfig(max_num_seqs=2)), {0: seqs[:1], 2: seqs[1:]})
    assert [got[s] for s in seqs] == [alone(chai, p, sp) for p, sp in specs]


def test_requests_the_engine_cannot_hold_are_refused(model):
    engine = BatchEngine(model, BatchConfig(max_num_seqs=2))
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add(Sequence([5, 6], greedy(4, n=3), set()))
    with pytest.raises(ValueError, match="max_len"):
        engine.add(Sequence([5] * 100, greedy(40), set()))
