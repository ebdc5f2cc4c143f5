"""GPTQ: the algorithm beats round-to-nearest on its own objective, the checkpoint format
round-trips, the int4 kernel matches the dequantized weights, and artifacts serve."""

from __future__ import annotations

import json

import pytest
import torch

from compress.artifact import load_state
from compress.gptq import _group_params, gptq_quantize
from compress.recipes import RecipeError
from engine.gptq_format import Int4Linear, dequantize_gptq, gptq_linear, pack_gptq, unpack_gptq
from engine.loader import build_model
from engine.quant import dequantize_state
from engine.runner import load_model

from tests.helpers import build_artifact

G = torch.Generator().manual_seed(0)


def _correlated_inputs(n_in: int, n_tok: int = 2048) -> torch.Tensor:
    """Inputs with a few strong, correlated channels, like real activations."""
    mix = torch.randn(n_in, n_in, generator=G) * (torch.rand(n_in, generator=G) ** 3)[None, :]
    return torch.randn(n_tok, n_in, generator=G) @ mix + 0.1 * torch.randn(n_tok, n_in, generator=G)


def _rtn(w: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    """Round-to-nearest with the same group quantizer: the baseline GPTQ improves on."""
    out = torch.empty_like(w)
    for s in range(0, w.shape[1], gs):
        scale, zero = _group_params(w[:, s:s + gs], bits, sym=True)
        q = torch.clamp(torch.round(w[:, s:s + gs] / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
        out[:, s:s + gs] = scale[:, None] * (q - zero[:, None])
    return out


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_has_lower_output_error_than_round_to_nearest(desc_act):
    w = torch.randn(64, 128, generator=G)
    x = _correlated_inputs(128)
    h = 2 * x.T @ x / x.shape[0]
    r = gptq_quantize(w, h, bits=4, group_size=32, desc_act=desc_act)
    err_gptq = ((r["weight"] - w) @ x.T).pow(2).sum()
    err_rtn = ((_rtn(w, 4, 32) - w) @ x.T).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn
    # what is returned is exactly what the stored format decodes to
    packed = pack_gptq(r["codes"], r["zeros"], r["scales"], r["g_idx"], 4)
    torch.testing.assert_close(dequantize_gptq(packed, 4), r["weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_format_round_trips(bits):
    out_f, in_f, gs = 16, 96, 32
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=G)
    zeros = torch.randint(0, 2**bits, (in_f // gs, out_f), generator=G)
    scales = torch.rand(in_f // gs, out_f, generator=G).half().float()
    g_idx = torch.arange(in_f)[torch.randperm(in_f, generator=G)] // gs
    t = pack_gptq(codes, zeros, scales, g_idx, bits)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (in_f * bits // 32, out_f)
    assert t["qzeros"].shape == (in_f // gs, out_f * bits // 32) and t["scales"].dtype == torch.float16
    c, z, s, g = unpack_gptq(t, bits)
    assert torch.equal(c, codes) and torch.equal(z, zeros) and torch.equal(g, g_idx) and torch.equal(s, scales)


def test_v1_checkpoint_stores_zero_points_minus_one():
    """GPTQModel's 'gptq' checkpoint_format: symmetric 4-bit zero 8 is stored as 7."""
    t = pack_gptq(torch.zeros(8, 32, dtype=torch.long), torch.full((1, 8), 8), torch.ones(1, 8), torch.zeros(32), 4)
    assert t["qzeros"].item() == 0x77777777


@pytest.mark.parametrize("in_f,gs,act_order,kernel", [(128, 32, False, True),
                                                      (192, 128, False, True),  # half last group, as K=576, g=128
                                                      (96, 32, True, True),
                                                      (144, 64, False, False)])  # no kernel group fits: dense
def test_int4_module_matches_dequantized_weight(in_f, gs, act_order, kernel):
    out_f = 48
    codes = torch.randint(0, 16, (out_f, in_f), generator=G)
    n_groups = -(-in_f // gs)
    zeros = torch.randint(0, 16, (n_groups, out_f), generator=G)
    scales = (torch.rand(n_groups, out_f, generator=G) * 0.05).half().float()
    g_idx = torch.arange(in_f) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=G)]
    t = pack_gptq(codes, zeros, scales, g_idx, 4)
    module = gptq_linear([t], torch.float32)
    assert isinstance(module, Int4Linear) == kernel
    x = torch.randn(5, in_f, generator=G)
    ref = x @ dequantize_gptq(t, 4).T
    torch.testing.assert_close(module(x).float(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_gptq_artifact_is_served_and_close_to_float(llama_dir, tmp_path):
    build_artifact(llama_dir, tmp_path / "base")
    art = build_artifact(llama_dir, tmp_path / "q", "gptq(group_size=32,calib_samples=4,calib_seq_len=64)")
    m = json.loads((art / "manifest.json").read_text())
    cfg = json.loads((art / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["checkpoint_format"] == "gptq"
    assert m["hf_requires"] == ["optimum", "gptqmodel"] and m["n_params"] == m["source_n_params"]
    assert m["size_bytes"] < 0.5 * json.loads((tmp_path / "base" / "manifest.json").read_text())["size_bytes"]
    lm = load_model(art)
    assert isinstance(lm.model.layers[0].mlp.w13, Int4Linear)
    # the served int4 model computes what its stored weights say (bf16 activations aside)
    dense = build_model(lm.model.args, dequantize_state(load_state(art)))
    ids = torch.randint(3, 200, (1, 16), generator=G)
    with torch.no_grad():
        ref, out = dense(ids), lm.model(ids)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_gptq_then_eora_reduces_the_weighted_error(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "e", "gptq(group_size=32,calib_samples=4,calib_seq_len=64),"
                                                     "eora(rank=8,calib_samples=4,calib_seq_len=64)")
    m = json.loads((art / "manifest.json").read_text())
    r = m["steps"][1]["result"]
    assert r["weighted_error_after"] < 0.8 * r["weighted_error_before"]
    assert (art / "adapter_model.safetensors").is_file() and m["adapter"]["modules"] == r["adapters"]
    peft_cfg = json.loads((art / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["lora_alpha"] == peft_cfg["r"] == 8
    assert type(load_model(art).model.layers[0].attn.wqkv).__name__ == "WithAdapter"


@pytest.mark.parametrize("recipe,match", [("gptq(bits=3)", "bits must be"),
                                          ("gptq(group_size=12)", "group_size"),
                                          ("int8,gptq", "only one precision step"),
                                          ("gptq(desc_act=maybe)", "not a valid bool"),
                                          ("eora(rank=4)", "right after gptq or int8"),
                                          ("gptq,eora,wanda(pattern=2:4)", "keeps an adapter"),
                                          ("gptq(calib=svamp-dev)", "calib part 'svamp-dev'"),
                                          ("gptq,eora(calib=text+gsm8k)", "calib part 'gsm8k'")])
def test_bad_gptq_recipes_are_refused(llama_dir, tmp_path, recipe, match):
    with pytest.raises(RecipeError, match=match):
        build_artifact(llama_dir, tmp_path / "bad", recipe)


def test_gptq_keeps_a_sparsity_mask():
    w = torch.randn(32, 64, generator=G)
    keep = torch.rand(32, 64, generator=G) > 0.5
    w = w * keep
    x = _correlated_inputs(64, 512)
    r = gptq_quantize(w, 2 * x.T @ x / 512, group_size=32, keep=keep)
    assert (r["weight"][~keep] == 0).all()
    assert (r["weight"][keep] != 0).float().mean() > 0.8  # kept weights are mostly non-zero codes
    unmasked = gptq_quantize(w, 2 * x.T @ x / 512, group_size=32)
    assert (unmasked["weight"][~keep] != 0).any()  # without the mask the error feedback fills the holes


def test_wanda_2_4_then_gptq_artifact_stays_2_4_sparse(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "wg", "wanda(pattern=2:4,calib_samples=2,calib_seq_len=32),"
                                                      "gptq(group_size=32,calib_samples=2,calib_seq_len=32)")
    r = json.loads((art / "manifest.json").read_text())["steps"][1]["result"]
    assert r["sparsity"] >= 0.5
    w = dequantize_state(load_state(art))["model.layers.0.mlp.down_proj.weight"]
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_server_streams_a_gptq_eora_artifact_through_the_openai_client(llama_dir, tmp_path):
    from openai import OpenAI

    from server.config import ServerConfig
    from tests.live_server import LiveServer

    art = build_artifact(llama_dir, tmp_path / "tiny-gptq", "gptq(group_size=32,calib_samples=2,calib_seq_len=32),"
                                                            "eora(rank=4,calib_samples=2,calib_seq_len=32)")
    srv = LiveServer(ServerConfig(artifacts=[str(art)], max_model_len=64)).wait()
    try:
        client = OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Paris is the capital of"}]
        body = client.chat.completions.create(model="tiny-gptq", messages=msgs, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
        chunks = client.chat.completions.create(model="tiny-gptq", messages=msgs, max_tokens=6, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert body.usage.completion_tokens == 6 and streamed == body.choices[0].message.content
    finally:
        srv.close()


def test_ragged_groups_are_served_but_not_claimed_hf_loadable(llama_dir, tmp_path):
    """GPTQModel's kernels refuse in_features % group_size != 0 (SmolLM2: 576 with group 128);
    the engine serves such artifacts, the manifest says why transformers will not."""
    art = build_artifact(llama_dir, tmp_path / "r", "gptq(group_size=48,calib_samples=2,calib_seq_len=32)")
    m = json.loads((art / "manifest.json").read_text())
    assert m["hf_loadable"] is False and "divisible by group_size 48" in m["hf_blocker"]
    assert "hf_requires" not in m
    load_model(art)


def test_task_calibration_windows_are_the_served_task_prompts():
    from compress.calibration import CalibConfig, calibration_ids, task_calibration_ids
    from tests.helpers import make_tokenizer

    tok = make_tokenizer()
    wins = task_calibration_ids(tok, "svamp-train", CalibConfig(samples=4, seq_len=64))
    assert [len(w) for w in wins] == [64] * 4 and wins == task_calibration_ids(tok, "svamp-train", CalibConfig(4, 64))
    text = tok.decode([t for w in wins for t in w])
    assert "The answer is" in text and "<|im_start|>user" in text  # chat-formatted CoT examples, packed
    assert wins != calibration_ids(tok, CalibConfig(samples=4, seq_len=64))
    with pytest.raises(ValueError, match="calibration tokens"):
        task_calibration_ids(tok, "svamp-train", CalibConfig(samples=10_000, seq_len=256))


def test_gptq_calibrated_on_the_task_quantizes_differently(llama_dir, tmp_path):
    """calib=svamp-train changes the Hessian GPTQ spreads errors with, so the codes; a mix splits the windows."""
    from compress.calibration import step_calibration_ids

    mixed = step_calibration_ids({"model_dir": llama_dir}, 5, 32, "text+svamp-train")
    assert len(mixed) == 5 and mixed[:3] == step_calibration_ids({"model_dir": llama_dir}, 3, 32, "text")
    assert mixed[3:] == step_calibration_ids({"model_dir": llama_dir}, 2, 32, "svamp-train")
    arts = {c: build_artifact(llama_dir, tmp_path / c, f"gptq(group_size=32,calib_samples=4,calib_seq_len=64,calib={c})")
            for c in ("text", "svamp-train")}
    states = {c: load_state(a) for c, a in arts.items()}
    qw = [k for k in states["text"] if k.endswith(".qweight")]
    assert qw and any(not torch.equal(states["text"][k], states["svamp-train"][k]) for k in qw)
    step = json.loads((arts["svamp-train"] / "manifest.json").read_text())["steps"][0]
    assert step["params"]["calib"] == "svamp-train"
