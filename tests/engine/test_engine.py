"""The engine's own decoder against transformers, and its KV cache against full forwards."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.build import load_hf_dir
from engine.config import ModelArgs
from engine.loader import build_model
from engine.quant import dequantize, int8_linear, quantize_per_channel
from tests.helpers import int8_state


def _pair(model_dir, max_len=128):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config, state = load_hf_dir(model_dir)
    return hf, build_model(ModelArgs.from_hf_config(config), state, max_len=max_len)


@pytest.mark.parametrize("which", ["llama_dir", "gemma_dir"])
def test_full_forward_matches_transformers(which, request):
    hf, eng = _pair(request.getfixturevalue(which))
    ids = torch.randint(0, eng.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, out = hf(ids).logits, eng(ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["llama_dir", "gemma_dir"])
def test_incremental_decode_equals_full_forward(which, request):
    # The tiny Gemma has a sliding window of 4, so this also checks window masking in the cache.
    _, eng = _pair(request.getfixturevalue(which))
    ids = torch.randint(0, eng.args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = eng(ids)
        cache = eng.new_cache(1, 30)
        steps = [eng(ids[:, :10], cache)] + [eng(ids[:, i:i + 1], cache) for i in range(10, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-3, rtol=1e-3)
    assert cache.pos == 30


def test_cache_overflow_is_an_error(llama_dir):
    _, eng = _pair(llama_dir)
    cache = eng.new_cache(1, 4)
    with pytest.raises(ValueError, match="overflow"):
        eng(torch.zeros(1, 5, dtype=torch.long), cache)


def test_cache_prefill_broadcasts_prompt_to_batch(llama_dir):
    _, eng = _pair(llama_dir)
    ids = torch.randint(0, eng.args.vocab_size, (1, 8))
    with torch.inference_mode():
        one = eng.new_cache(1, 16)
        eng(ids, one)
        many = eng.new_cache(3, 16)
        many.prefill(one)
        nxt = torch.tensor([[5], [5], [5]])
        out = eng(nxt, many)
        ref = eng(torch.cat([ids, torch.tensor([[5]])], 1))[:, -1]
    for row in range(3):
        torch.testing.assert_close(out[row, -1], ref[0], atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_refused():
    with pytest.raises(NotImplementedError, match="not supported"):
        ModelArgs.from_hf_config({"model_type": "gpt2", "num_hidden_layers": 1, "num_attention_heads": 1,
                                  "hidden_size": 8, "intermediate_size": 8, "vocab_size": 8, "rms_norm_eps": 1e-5})


def test_per_channel_int8_error_is_bounded():
    w = torch.randn(64, 32) * torch.linspace(0.01, 3, 64)[:, None]  # rows with very different ranges
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8
    # Symmetric rounding: error at most half a quantization step per row.
    assert torch.all((dequantize(q, s) - w).abs() <= s[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("kernel", ["weight_only", "dynamic"])
def test_int8_kernels_approximate_float_linear(kernel):
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(3, 5, 64)
    q, s = quantize_per_channel(w)
    y = int8_linear(q, s, kernel)(x).float()
    ref = x @ dequantize(q, s).T
    assert y.shape == (3, 5, 48)
    rel = (y - ref).norm() / ref.norm()
    assert rel < 0.03, rel


def test_int8_model_stays_close_to_float(llama_dir):
    config, state = load_hf_dir(llama_dir)
    args = ModelArgs.from_hf_config(config)
    q_state = int8_state(state)
    ref = build_model(args, state)
    ids = torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        lf = ref(ids)
        errs = {k: ((build_model(args, q_state, int8_kernel=k)(ids) - lf).norm() / lf.norm()).item()
                for k in ("weight_only", "dynamic")}
    # Both round weights to 8 bits and activations to ~8 significant bits (bf16 or int8);
    # a wrong scale or layout gives errors of order 1.
    assert max(errs.values()) < 0.2, errs


def test_config_roundtrip_is_json(llama_dir):
    args = ModelArgs.from_hf_config(json.loads((llama_dir / "config.json").read_text()))
    assert ModelArgs(**json.loads(json.dumps(args.to_dict()))) == args


@pytest.mark.parametrize("k", [4, 20, 64])
def test_int8_weight_only_handles_any_inner_size(k):
    # K not a multiple of 16 used to crash the kernel for batches of rows (SVD factors).
    torch.manual_seed(0)
    w, x = torch.randn(32, k), torch.randn(8, k)
    q, s = quantize_per_channel(w)
    y = int8_linear(q, s, "weight_only")(x).float()
    ref = x @ dequantize(q, s).T
    assert (y - ref).norm() / ref.norm() < 0.03
