"""Prefix caching: a prompt that shares a prefix with earlier work reuses its KV and decodes
exactly as a cold run does (greedy tokens, logprobs, seeded samples), on Llama, Gemma-3 (a
sliding window shorter than the prompts) and CHAI; the cache keeps under its byte budget."""

from __future__ import annotations

import pytest
import torch

from compress.build import load_hf_dir
from engine.batching import BatchConfig, BatchEngine, Sequence
from engine.config import ModelArgs
from engine.generate import SamplingParams, generate
from engine.loader import build_model
from engine.prefix_cache import PrefixCache
from tests.engine.test_batching import _prompt, alone, greedy, run
from tests.helpers import tiny_chai_model


@pytest.fixture(scope="module", params=["llama_dir", "gemma_dir", "chai"])
def model(request):
    if request.param == "chai":
        return tiny_chai_model(request.getfixturevalue("llama_dir"), max_len=128)
    # the tiny Gemma-3's window is 4 positions: the reused prefixes are far longer
    config, state = load_hf_dir(request.getfixturevalue(request.param))
    return build_model(ModelArgs.from_hf_config(config), state, max_len=128)


def _engine(model, cache: PrefixCache | None, **kw) -> BatchEngine:
    return BatchEngine(model, BatchConfig(**{"max_num_seqs": 3, "prefill_chunk": 8, **kw}), cache)


def test_a_second_turn_reuses_the_first_and_decodes_like_a_cold_run(model):
    v, cache = model.args.vocab_size, PrefixCache(2**30)
    engine = _engine(model, cache)
    p = _prompt(20, v)
    first = Sequence(p, greedy(6), set())
    answer = run(engine, {0: [first]})[first][0]
    # the next turn: the whole first turn (prompt + answer), then new tokens; decoded next to
    # an unrelated request, so the reused row sits in a batch
    p2 = p + answer + _prompt(7, v)
    sp = greedy(8, logprobs=3)
    second, other = Sequence(p2, sp, set()), Sequence(_prompt(11, v), greedy(10), set())
    lps = []
    got = run(engine, {0: [other], 2: [second]},
              lambda step, outs: second in outs and lps.append(outs[second].logprobs[0]))
    # every position the first turn fed: its prompt and all but its last sample
    assert second.cached_tokens == len(p) + len(answer) - 1
    assert got[second] == alone(model, p2, sp) and got[other] == alone(model, other.prompt_ids, other.params)
    ref = [out.logprobs[0] for out in generate(model, p2, sp, set())]
    assert [[t for t, _ in lp[1]] for lp in lps] == [[t for t, _ in lp[1]] for lp in ref]
    torch.testing.assert_close(torch.tensor([[x for _, x in lp[1]] for lp in lps]),
                               torch.tensor([[x for _, x in lp[1]] for lp in ref]), atol=1e-4, rtol=1e-4)
    assert cache.stats.hits == 1 and cache.stats.hit_tokens == second.cached_tokens


def test_the_same_prompt_again_prefills_only_its_last_token(model):
    p, engine = _prompt(15, model.args.vocab_size), _engine(model, PrefixCache(2**30))
    a, b = Sequence(p, greedy(1), set()), Sequence(p, greedy(5), set())
    run(engine, {0: [a]})
    got = run(engine, {0: [b]})
    assert (a.cached_tokens, b.cached_tokens) == (0, len(p) - 1)  # its logits give the first token
    assert got[b] == alone(model, p, greedy(5))


def test_n_seeded_samples_after_a_hit_equal_a_cold_run(model):
    v = model.args.vocab_size
    p = _prompt(12, v)
    sp = SamplingParams(max_tokens=6, n=2, seed=5, temperature=20.0, ignore_eos=True)
    engine = _engine(model, PrefixCache(2**30))
    run(engine, {0: [Sequence(p + _prompt(3, v), greedy(2), set())]})  # shares p, then diverges
    hit = Sequence(p + _prompt(4, v), sp, set())
    got = run(engine, {0: [hit]})[hit]
    cold = Sequence(hit.prompt_ids, sp, set())
    assert hit.cached_tokens >= len(p) and got == run(_engine(model, None), {0: [cold]})[cold]
    assert cold.cached_tokens == 0 and len({tuple(r) for r in got}) > 1


# ---- the cache alone: fake KV of one layer, 2 heads x 4 dims of fp32 keys and values ------

TOKEN_BYTES = 2 * (2 * 4 * 4)


def _kv(n: int):
    return [torch.zeros(2, n, 4)], [torch.zeros(2, n, 4)]


def test_a_prompt_that_shares_nothing_is_a_miss():
    cache = PrefixCache(2**20)
    cache.store("m", [1, 2, 3], _kv, TOKEN_BYTES)
    assert cache.match("m", [4, 2, 3]) is None and cache.match("other model", [1, 2, 3, 4]) is None
    assert (cache.stats.queries, cache.stats.hits, cache.stats.query_tokens) == (2, 0, 7)


def test_eviction_keeps_the_held_bytes_under_the_budget():
    cache = PrefixCache(100 * TOKEN_BYTES)
    for i in range(10):
        cache.store("m", [1000 + i] + list(range(39)), _kv, TOKEN_BYTES)  # 40 tokens each, no shared prefix
        assert cache.nbytes <= cache.budget
    assert len(cache) == 2 and cache.nbytes == 80 * TOKEN_BYTES and cache.stats.evictions == 8
    assert cache.match("m", [1009, 0, 1, 5]) is not None and cache.match("m", [1000, 0, 1, 5]) is None


def test_the_least_recently_used_entry_is_evicted_first():
    cache = PrefixCache(100 * TOKEN_BYTES)
    cache.store("m", [1] * 40, _kv, TOKEN_BYTES)
    cache.store("m", [2] * 40, _kv, TOKEN_BYTES)
    assert cache.match("m", [1] * 10)[1] == 9  # [1]s used again: [2]s are now the oldest
    cache.store("m", [3] * 40, _kv, TOKEN_BYTES)
    assert cache.match("m", [1] * 10) is not None and cache.match("m", [2] * 10) is None


def test_an_extended_prefix_replaces_its_entry_and_a_covered_one_stores_nothing():
    cache = PrefixCache(2**20)
    cache.store("m", [1, 2, 3], _kv, TOKEN_BYTES)
    cache.store("m", [1, 2, 3, 4, 5], _kv, TOKEN_BYTES)  # the next turn of the same chat
    assert len(cache) == 1 and cache.nbytes == 5 * TOKEN_BYTES

    def must_not_copy(n):
        raise AssertionError("a covered prefix was copied again")

    cache.store("m", [1, 2], must_not_copy, TOKEN_BYTES)
    assert len(cache) == 1 and cache.match("m", [1, 2, 3, 4, 9])[1] == 4


def test_an_entry_over_the_budget_keeps_the_prefix_that_fits():
    cache = PrefixCache(10 * TOKEN_BYTES)
    cache.store("m", list(range(25)), _kv, TOKEN_BYTES)
    assert cache.nbytes == 10 * TOKEN_BYTES and cache.match("m", list(range(25)))[1] == 10


def test_a_zero_budget_is_no_cache():
    with pytest.raises(ValueError):
        PrefixCache(0)
