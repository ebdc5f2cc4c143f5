"""Per-request LoRA adapters (engine/adapters.py): PEFT directories read with PEFT's scaling,
applied to the rows that name them, in one batch with rows that do not, against peft itself."""

from __future__ import annotations

import json

import pytest
import torch

from engine.adapters import AdapterError, read_peft_adapter
from engine.batching import BatchConfig, BatchEngine, Sequence
from engine.generate import SamplingParams, generate
from engine.prefix_cache import PrefixCache
from engine.runner import load_model
from tests.helpers import save_peft_adapter

IDS = torch.tensor([[5, 9, 2, 7, 11, 3, 8]])


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = save_peft_adapter(llama_dir, root / "a", seed=1, rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 2})
    b = save_peft_adapter(llama_dir, root / "b", seed=2, use_rslora=True, target_modules=["k_proj", "o_proj"])
    return {"a": (root / "a", a), "b": (root / "b", b)}


@pytest.fixture(scope="module")
def lm(llama_artifact, adapters):
    return load_model(llama_artifact, adapters={k: p for k, (p, _) in adapters.items()})


def test_each_adapter_matches_peft_and_no_adapter_matches_the_base(lm, adapters):
    with torch.no_grad():
        for name, (_, peft_model) in adapters.items():
            torch.testing.assert_close(lm.model(IDS, adapter=name), peft_model(IDS).logits, rtol=1e-4, atol=1e-4)
            with peft_model.disable_adapter():
                base = peft_model(IDS).logits
        torch.testing.assert_close(lm.model(IDS), base, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(lm.model(IDS, adapter="a"), base, atol=1e-2)  # the adapters do something


def test_rows_of_one_forward_use_their_own_adapter(lm):
    ids = IDS.repeat(3, 1)
    cache = lm.model.new_slot_cache(3)
    cache.reserve(ids.shape[1])
    with torch.no_grad():
        mixed = lm.model.forward_rows(ids, cache.view([0, 1, 2]), adapters=["b", None, "a"])
        for row, name in enumerate(["b", None, "a"]):
            torch.testing.assert_close(mixed[row], lm.model(IDS, adapter=name)[0], rtol=1e-4, atol=1e-4)


def _greedy(adapter):
    return SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_batch_engine_serves_adapter_and_base_rows_together_like_each_alone(lm):
    prompt = IDS[0].tolist()
    alone = {name: [o.tokens[0] for o in generate(lm.model, prompt, _greedy(name), set(), adapter=name)]
             for name in ("a", None, "b")}
    assert alone["a"] != alone[None]
    prefix = PrefixCache(2**24)
    engine = BatchEngine(lm.model, BatchConfig(max_num_seqs=4), prefix)
    seqs = {name: Sequence(prompt, _greedy(name), set(), adapter=name) for name in ("a", None, "b")}
    for s in seqs.values():
        engine.add(s)
    while engine.has_work:
        engine.step()
    assert {name: s.out[0] for name, s in seqs.items()} == alone
    # the prefix cache keeps each adapter's KV apart: a later base request reuses only base KV
    again = Sequence(prompt + alone[None][:2], _greedy(None), set())
    engine.add(again)
    while engine.has_work:
        engine.step()
    assert again.cached_tokens >= len(prompt)
    entries = [e.owner for e in prefix._entries.values()]
    assert lm.model in entries and (lm.model, "a") in entries and (lm.model, "b") in entries


def test_unknown_adapter_is_refused_by_the_engine(lm):
    with pytest.raises(ValueError, match="no adapter 'c'"):
        BatchEngine(lm.model).add(Sequence([1, 2], _greedy(None), set(), adapter="c"))
    with pytest.raises(ValueError, match="no adapter"):
        lm.with_adapter("x", "c")


def test_peft_scaling_is_folded_into_b(adapters):
    path, _ = adapters["a"]
    f = read_peft_adapter(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors.torch import load_file
    raw = load_file(str(path / "adapter_model.safetensors"))
    key = "model.layers.0.mlp.up_proj.lora_B.weight"
    torch.testing.assert_close(f[key], raw["base_model.model." + key] * (2 / 4))  # alpha_pattern: 2, r 4
    key = "model.layers.0.mlp.down_proj.lora_B.weight"
    assert f[key.replace("lora_B", "lora_A")].shape[0] == 2  # rank_pattern
    torch.testing.assert_close(f[key], raw["base_model.model." + key] * (8 / 2))


def _write(path, config: dict, tensors: dict):
    from safetensors.torch import save_file
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 2}
STRAY = {"base_model.model.lm_head.other": torch.zeros(1)}


@pytest.mark.parametrize("config,tensors,match", [
    ({"peft_type": "LORA", "use_dora": True}, STRAY, "use_dora"),
    ({"peft_type": "PREFIX_TUNING"}, STRAY, "not LORA"),
    ({**LORA, "bias": "all"}, STRAY, "bias=all"),
    (LORA, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)}, "no lora_B"),
    (LORA, {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)}, "no lora_A"),
    (LORA, STRAY, "not LoRA factors"),
    (LORA, {}, "no LoRA factors"),
])
def test_bad_adapter_directories_are_refused(tmp_path, config, tensors, match):
    _write(tmp_path / "x", config, tensors)
    with pytest.raises(AdapterError, match=match):
        read_peft_adapter(tmp_path / "x")
    with pytest.raises(AdapterError, match="needs adapter_config.json"):
        read_peft_adapter(tmp_path)


@pytest.mark.parametrize("module,a_shape,b_shape,match", [
    ("model.layers.0.self_attn.q_proj", (2, 63), (64, 2), "do not fit"),
    ("model.layers.9.self_attn.q_proj", (2, 64), (64, 2), "not a projection of this model"),
    ("model.embed_tokens", (2, 64), (64, 2), "not a projection of this model"),
])
def test_adapters_that_do_not_fit_the_model_are_refused(llama_artifact, tmp_path, module, a_shape, b_shape, match):
    p = "base_model.model." + module
    _write(tmp_path / "x", {"peft_type": "LORA", "r": 2, "lora_alpha": 2},
           {p + ".lora_A.weight": torch.zeros(a_shape), p + ".lora_B.weight": torch.zeros(b_shape)})
    with pytest.raises(AdapterError, match=match):
        load_model(llama_artifact, adapters={"x": tmp_path / "x"})
