"""The compiled decode step (engine/compiled.py, `--compile`): the batch engine gives the same
tokens compiled as eager and as each request alone, whoever joins, finishes or is cancelled;
idle rows leave every row's cache intact; after `warm_up` serving never compiles again. With
int8 weights the batch-1 graph sums in another order than the eager kernel (engine/quant.py):
its logits agree with eager ones to the last bits of a sum, and so do the batched graph's."""

from __future__ import annotations

import pytest
import torch

from compress.build import load_hf_dir
from engine.batching import BatchConfig, BatchEngine, Sequence
from engine.compiled import CompiledDecode
from engine.generate import SamplingParams, generate
from engine.config import ModelArgs
from engine.loader import build_model
from engine.quant import Int8WeightOnlyLinear, quantize_per_channel
from tests.engine.test_batching import _prompt, alone, greedy, run
from tests.helpers import int8_state, tiny_chai_model

SLOTS = 3  # batches of 1, 2 and 3 rows: the B = 1 graph and the B >= 2 one


@pytest.fixture(scope="module", params=["llama_dir", "gemma_dir"])
def model(request):
    config, state = load_hf_dir(request.getfixturevalue(request.param))
    m = build_model(ModelArgs.from_hf_config(config), state, max_len=128)
    CompiledDecode(m).warm_up(SLOTS)
    return m


def compiled_engine(model) -> BatchEngine:
    engine = BatchEngine(model, BatchConfig(max_num_seqs=SLOTS, prefill_chunk=64, compile=True))
    assert engine.decoder is not None
    return engine


def test_compiled_batch_equals_each_request_alone(model):
    v = model.args.vocab_size
    specs = [(_prompt(5, v), greedy(12)), (_prompt(17, v), greedy(3)), (_prompt(9, v), greedy(20)),
             (_prompt(30, v), greedy(7)), (_prompt(6, v), greedy(10, n=2))]
    seqs = [Sequence(p, sp, set()) for p, sp in specs]
    got = run(compiled_engine(model), {0: seqs[:3], 4: seqs[3:]})  # late joiners wait for free slots
    for seq, (p, sp) in zip(seqs, specs):
        assert got[seq] == alone(model, p, sp)


def test_cancelled_row_leaves_the_others_exact(model):
    v = model.args.vocab_size
    specs = [(_prompt(6, v), greedy(15)), (_prompt(13, v), greedy(15)), (_prompt(4, v), greedy(6))]
    a, b, c = (Sequence(p, sp, set()) for p, sp in specs)

    def cancel_a(step, outs):
        if step == 3:
            a.cancel.set()

    got = run(compiled_engine(model), {0: [a, b], 2: [c]}, cancel_a)
    assert got[a][0] == alone(model, *specs[0])[0][:4]
    assert got[b] == alone(model, *specs[1]) and got[c] == alone(model, *specs[2])


def test_idle_rows_do_not_touch_valid_positions(model):
    """Slot 0 is being prefilled (not decoding) and holds valid keys; slot 1 decodes. The
    compiled step runs slots [0, 2) and writes slot 0's throw-away token past every row's
    length; slot 2, above the batch, is not touched."""
    v = model.args.vocab_size
    with torch.inference_mode():
        cache = model.new_slot_cache(SLOTS)
        for row, n in [(0, 7), (1, 11), (2, 4)]:
            cache.reserve(n)
            model.forward_rows(torch.tensor([_prompt(n, v)]), cache.view([row]))
        before = [t[:, :, :12].clone() for t in cache.k + cache.v]
        CompiledDecode(model)(cache, {1: 5})
    assert cache.lens == [7, 12, 4]
    for b, t in zip(before, cache.k + cache.v):
        assert torch.equal(t[0, :, :12], b[0]) and torch.equal(t[2, :, :12], b[2])  # rows 0 and 2 unchanged
        assert torch.equal(t[1, :, :11], b[1, :, :11]) and not torch.equal(t[1, :, 11], b[1, :, 11])


def test_serving_after_warm_up_never_compiles(model):
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    v = model.args.vocab_size
    seqs = [Sequence(_prompt(n, v), greedy(9), set()) for n in (3, 40, 12)]
    run(compiled_engine(model), {0: seqs[:1], 2: seqs[1:]})
    assert counters["stats"]["unique_graphs"] == before


def test_decoding_across_the_cache_capacity_never_compiles(llama_dir):
    """A row that grows the slot cache past its starting 256 positions: the engine keeps the
    capacity above the attended length, so the graphs warmed up serve it (the graph traced with
    S below the capacity guards S != capacity: equal, it was a recompile mid-request, and with
    the guards skipped an error)."""
    from torch._dynamo.utils import counters

    config, state = load_hf_dir(llama_dir)
    m = build_model(ModelArgs.from_hf_config(config), state, max_len=300)
    CompiledDecode(m).warm_up(SLOTS)
    before = counters["stats"]["unique_graphs"]
    v = m.args.vocab_size
    specs = [(_prompt(250, v), greedy(12)), (_prompt(40, v), greedy(9))]
    seqs = [Sequence(p, sp, set()) for p, sp in specs]
    got = run(compiled_engine(m), {0: seqs})
    assert counters["stats"]["unique_graphs"] == before
    for seq, (p, sp) in zip(seqs, specs):
        assert got[seq] == alone(m, p, sp)


def test_a_case_no_graph_covers_is_compiled_not_run_on_the_wrong_graph(model):
    """With the guards skipped, an input the traced graph does not cover (here cache tensors
    that are views into wider buffers: other strides) raises in torch before the graph runs;
    the step then compiles it with the guards on, and gives the eager step's logits."""
    v = model.args.vocab_size
    p = _prompt(9, v)
    with torch.inference_mode():
        cache = model.new_slot_cache(SLOTS)
        cache.reserve(len(p) + 2)
        model.forward_rows(torch.tensor([p]), cache.view([0]))
        CompiledDecode(model)(cache, {0: 3})  # traced already by warm_up; guards skipped from here
        cache.lens[0] -= 1
        want = model.forward_rows(torch.tensor([[3]]), cache.view([0]), last_only=True)[0, -1]
        cache.lens[0] -= 1
        for tensors in (cache.k, cache.v):
            for i, t in enumerate(tensors):
                wide = torch.zeros(*t.shape[:2], t.shape[2] + 5, t.shape[3], dtype=t.dtype)
                wide[:, :, :t.shape[2]] = t
                tensors[i] = wide[:, :, :t.shape[2]]
        got = CompiledDecode(model)(cache, {0: 3})[0]
    rel = (got.float() - want.float()).norm() / want.float().norm()
    assert rel < 1e-5, rel


def test_same_shaped_models_keep_their_own_graphs(llama_dir):
    """Two models with the same weights and shapes but other constants (norm epsilon, RoPE
    base), which the graphs hold as constants: each model gets its own compiled function, so
    skipping guards after the first traced call (engine/compiled.py `_Compiled`) never runs
    one model's graph for the other; both give their eager tokens."""
    config, state = load_hf_dir(llama_dir)
    a = build_model(ModelArgs.from_hf_config(config), state, max_len=128)
    b = build_model(ModelArgs.from_hf_config({**config, "rms_norm_eps": 1.0, "rope_theta": 10.0}), state, max_len=128)
    for m in (a, b):
        CompiledDecode(m).warm_up(SLOTS)
    v = a.args.vocab_size
    specs = [(_prompt(8, v), greedy(10)), (_prompt(5, v), greedy(6))]
    for m in (a, b, a):  # back to a: its graph is still its own
        for p, sp in specs:
            seq = Sequence(p, sp, set())
            assert run(compiled_engine(m), {0: [seq]})[seq] == alone(m, p, sp)
    assert alone(a, *specs[0]) != alone(b, *specs[0])  # the two models do differ


def test_chai_models_stay_eager(llama_dir):
    m = tiny_chai_model(llama_dir, 64)
    assert not CompiledDecode.supports(m)
    assert BatchEngine(m, BatchConfig(compile=True)).decoder is None
    with pytest.raises(ValueError, match="CHAI"):
        CompiledDecode(m)


@pytest.fixture(scope="module")
def int8_model(llama_dir):
    config, state = load_hf_dir(llama_dir)
    m = build_model(ModelArgs.from_hf_config(config), int8_state(state), max_len=128, int8_kernel="weight_only")
    CompiledDecode(m).warm_up(SLOTS)
    return m


@pytest.mark.parametrize("rows,k", [(1, 64), (3, 64), (1, 20), (5, 576)])
def test_compiled_int8_product_agrees_with_the_kernel(rows, k):
    """Through the layer itself, so its K padding and its one-row branch are what is compiled."""
    torch.manual_seed(rows + k)
    layer = Int8WeightOnlyLinear(*quantize_per_channel(torch.randn(96, k)))
    x = torch.randn(rows, k).bfloat16()
    with torch.inference_mode():
        got = torch.compile(layer, fullgraph=True)(x)
        want = layer(x)  # eager: `_weight_int8pack_mm`
    # the same fp32 products summed in another order: at most a last-bit difference in bf16
    assert got.dtype == want.dtype and torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)


def test_compiled_int8_logits_agree_with_eager(int8_model):
    v = int8_model.args.vocab_size
    prompts = [_prompt(n, v) for n in (7, 19)]
    with torch.inference_mode():
        cache = int8_model.new_slot_cache(SLOTS)
        eager = []
        for row, p in enumerate(prompts):
            cache.reserve(len(p))
            int8_model.forward_rows(torch.tensor([p[:-1]]), cache.view([row]))
            cache.reserve(len(p))
            eager.append(int8_model.forward_rows(torch.tensor([p[-1:]]), cache.view([row]), last_only=True)[0, -1])
            cache.lens[row] -= 1  # decode the last token again, compiled
        one = CompiledDecode(int8_model)(cache, {0: prompts[0][-1]})  # the batch-1 graph
        cache.lens[0] -= 1
        two = CompiledDecode(int8_model)(cache, {0: prompts[0][-1], 1: prompts[1][-1]})
    for got, want in [(one[0], eager[0]), (two[0], eager[0]), (two[1], eager[1])]:
        rel = (got.float() - want.float()).norm() / want.float().norm()
        assert rel < 5e-3, rel  # intermediates kept in fp32 (inductor's default) gave 1-6%


def _random_adapter(config, projections, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    adapter = {}
    for i in range(config["num_hidden_layers"]):
        for proj, out_f, in_f in projections:
            adapter[f"model.layers.{i}.{proj}.lora_A.weight"] = torch.randn(2, in_f, generator=g)
            adapter[f"model.layers.{i}.{proj}.lora_B.weight"] = torch.randn(out_f, 2, generator=g) * 0.5
    return adapter


def test_adapter_and_mixed_steps_run_compiled(llama_dir, monkeypatch):
    """`warm_up` compiles one row through each per-request adapter and the masked multi-row graph:
    steps of base rows, one adapter's rows, and base rows beside rows of either adapter all
    decode compiled (no eager decode forward), with tokens as each request alone, and nothing
    compiles after warm-up."""
    from torch._dynamo.utils import counters

    config, state = load_hf_dir(llama_dir)
    r = _random_adapter(config, [("self_attn.q_proj", 64, 64), ("mlp.up_proj", 128, 64)], seed=5)
    s = _random_adapter(config, [("self_attn.o_proj", 64, 64), ("mlp.down_proj", 64, 128)], seed=6)
    m = build_model(ModelArgs.from_hf_config(config), state, max_len=128, adapters={"r": r, "s": s})
    CompiledDecode(m).warm_up(SLOTS)
    before = counters["stats"]["unique_graphs"]
    eager_rows = []
    forward_rows = m.forward_rows
    monkeypatch.setattr(m, "forward_rows", lambda ids, *a, **k: eager_rows.append(ids.shape) or forward_rows(ids, *a, **k))
    v = m.args.vocab_size
    specs = {None: (_prompt(7, v), greedy(6)), "r": (_prompt(11, v), greedy(16)), "s": (_prompt(5, v), greedy(9)),
             "r2": (_prompt(8, v), greedy(12))}
    seqs = {k: Sequence(*spec, set(), adapter=k and k[0]) for k, spec in specs.items()}
    # base alone, then base + r + s mixed, then r + r (the masked graph, every row one adapter), then r alone
    got = run(compiled_engine(m), {0: [seqs[None]], 3: [seqs["r"], seqs["s"]], 8: [seqs["r2"]]})
    assert counters["stats"]["unique_graphs"] == before
    assert all(shape[0] == 1 and shape[1] > 1 for shape in eager_rows), eager_rows  # prefill only
    monkeypatch.undo()
    assert got[seqs[None]] == alone(m, *specs[None])
    for k in ("r", "s", "r2"):
        want = [o.tokens[0] for o in generate(m, *specs[k], set(), adapter=k[0])]
        assert got[seqs[k]] == [want] and want != alone(m, *specs[k])[0]


def test_lookup_drafts_are_checked_compiled(model, monkeypatch):
    """Rows with prompt-lookup drafts (the memory model's condensations) check their drafts in a
    compiled graph of T = 1 + lookup_draft tokens a row, warmed up by `warm_up_checks`, and a
    step where no row found a draft runs the one-token graph: the plain greedy tokens, alone and
    two at once beside a plain row, with drafts accepted, no eager forward but prefill, and
    nothing compiled after warm-up."""
    from torch._dynamo.utils import counters

    CompiledDecode(model).warm_up_checks(SLOTS, 1 + 4)  # the module fixture warmed the one-token graphs
    before = counters["stats"]["unique_graphs"]
    eager_rows = []
    forward_rows = model.forward_rows
    monkeypatch.setattr(model, "forward_rows",
                        lambda ids, *a, **k: eager_rows.append(ids.shape) or forward_rows(ids, *a, **k))
    checks = []  # each step's drafts: a step with none runs the one-token graph
    check = BatchEngine._check
    monkeypatch.setattr(BatchEngine, "_check",
                        lambda self, rows, drafts, *a: checks.append(drafts) or check(self, rows, drafts, *a))
    v = model.args.vocab_size
    g = torch.Generator().manual_seed(3)  # prompts of this test's own: which drafts are accepted depends on them

    def prompt(n):
        return torch.randint(3, v, (n,), generator=g).tolist()

    # long greedy runs: a tiny random model's output soon cycles, and lookup drafts then repeat the cycle
    loop = prompt(5)
    specs = [(loop * 4 + prompt(3) + loop[:2], 40), (prompt(4) * 3, 40), (prompt(9), 12)]
    seqs = [Sequence(list(p), SamplingParams(max_tokens=n, temperature=0, lookup_draft=4), set()) for p, n in specs]
    plain = Sequence(prompt(6), greedy(20), set())
    drafted = []
    got = run(compiled_engine(model), {0: [seqs[0]], 6: [seqs[1], plain], 9: [seqs[2]]},
              lambda step, outs: drafted.extend(n for o in outs.values() for n in map(len, o.drafted or [])))
    assert counters["stats"]["unique_graphs"] == before
    monkeypatch.undo()
    assert all(shape[0] == 1 and shape[1] > 1 for shape in eager_rows), eager_rows  # prefill only
    assert sum(drafted) > 0  # some draft tokens were confirmed: the check is not one token a row
    assert any(not any(d) for d in checks) and any(any(d) for d in checks)  # both graphs ran
    for seq, (p, n) in zip(seqs, specs):  # a step's drafted tokens are not in `got`: the sequence has them all
        assert [seq.out[0]] == alone(model, p, greedy(n))
    assert got[plain] == alone(model, plain.prompt_ids, greedy(20))
