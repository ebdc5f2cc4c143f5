"""Bring-your-own-model architectures against transformers: tiny random Qwen2 (q/k/v bias),
Qwen3 (q/k norm, explicit head_dim, attention_bias), Mistral (sliding window), Llama 3 (RoPE
scaling, untied head, MLP bias) and Phi-3 (fused qkv / gate_up, sliding window), saved as HF
directories, loaded by our engine: fp32 logits equal within float tolerance and greedy
tokens equal."""

from __future__ import annotations

import pytest
import torch

from compress.build import load_hf_dir
from engine.config import ModelArgs
from engine.generate import SamplingParams, generate
from engine.loader import build_model

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config
    return {
        "qwen2": Qwen2Config(**BASE, tie_word_embeddings=True, rope_theta=1e6),
        "qwen3": Qwen3Config(**BASE, head_dim=32, attention_bias=True, tie_word_embeddings=False),
        "mistral": MistralConfig(**BASE, sliding_window=8, tie_word_embeddings=False),
        "llama3": LlamaConfig(**BASE, tie_word_embeddings=False, mlp_bias=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "phi3": Phi3Config(**BASE, sliding_window=8, tie_word_embeddings=False, pad_token_id=0),
    }


def _hf_model(name: str, path, **overrides):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = _configs()[name]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # biases and norms random too: HF initialises them to 0 / 1
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 2 else 0.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "mistral", "llama3", "phi3"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = _hf_model(request.param, path)
    config, state = load_hf_dir(path)
    ours = build_model(ModelArgs.from_hf_config(config), state, max_len=256)
    return request.param, hf, ours


def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))  # > the sliding windows
    with torch.no_grad():
        want = hf(ids).logits
    got = ours(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{name}: logits differ")


def test_greedy_tokens_match_transformers(pair):
    name, hf, ours = pair
    prompt = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = [out.tokens[0] for out in generate(ours, prompt[0].tolist(), SamplingParams(max_tokens=16, temperature=0,
                                                                                      ignore_eos=True), set())]
    assert got == want[0, 12:].tolist(), name


@pytest.mark.parametrize("patch,needle", [
    ({"model_type": "qwen2", "use_sliding_window": True}, "layer_types"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.75}, "partial_rotary_factor"),
    ({"model_type": "gpt2"}, "gpt2"),
])
def test_unsupported_features_are_named(patch, needle):
    cfg = {**{k: v for k, v in BASE.items()}, "intermediate_size": 128, **patch}
    with pytest.raises(NotImplementedError, match=needle):
        ModelArgs.from_hf_config(cfg)
