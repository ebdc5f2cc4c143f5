"""LoRA recovery (peft) and EoRA: what is trained, merged or kept, and how it is served."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress.eora import eora_factors
from compress.recipes import RecipeError
from engine.runner import load_model

from tests.helpers import build_artifact

G = torch.Generator().manual_seed(1)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))


def _weighted(delta, gram):
    return torch.einsum("oi,ij,oj->", delta.double(), gram.double(), delta.double()).item()


def test_eora_beats_plain_svd_in_the_activation_weighted_norm():
    delta = torch.randn(32, 64, generator=G)
    x = torch.randn(1024, 64, generator=G) * (torch.rand(64, generator=G) ** 4)  # a few dominant inputs
    gram = x.T @ x
    a, b = eora_factors(delta, gram, rank=4)
    u, s, vh = torch.linalg.svd(delta)
    svd4 = (u[:, :4] * s[:4]) @ vh[:4]
    assert _weighted(delta - b @ a, gram) < 0.9 * _weighted(delta - svd4, gram)
    a, b = eora_factors(delta, gram, rank=64)  # full rank reproduces the error
    torch.testing.assert_close(b @ a, delta, rtol=1e-3, atol=1e-3)


def test_lora_merge_changes_only_targets_and_records_training(llama_dir, tmp_path):
    base = load_file(str(build_artifact(llama_dir, tmp_path / "b") / "model.safetensors"))
    art = build_artifact(llama_dir, tmp_path / "l", "lora(steps=4,seq_len=32,lr=1e-2,targets=q_proj+v_proj)")
    m = json.loads((art / "manifest.json").read_text())
    r = m["steps"][0]["result"]
    assert r["merged"] and r["tokens"] == 4 * 2 * 32 and r["trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 32))  # q: 64->64, v: 64->2 kv heads x 16
    merged = load_file(str(art / "model.safetensors"))
    for k, v in merged.items():
        changed = not torch.equal(v, base[k])
        assert changed == any(p in k for p in ("q_proj", "v_proj")), k
    assert not (art / "adapter_model.safetensors").exists()


def test_lora_merge_keeps_a_wanda_2_4_pattern(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "wl", "wanda(pattern=2:4,calib_samples=2,calib_seq_len=32),"
                                                      "lora(steps=3,seq_len=32,lr=1e-2,targets=all)")
    r = json.loads((art / "manifest.json").read_text())["steps"][1]["result"]
    assert r["sparsity_before"] == r["sparsity_after"] == pytest.approx(0.5, abs=0.01)
    sd = load_file(str(art / "model.safetensors"))
    w = sd["model.layers.0.mlp.up_proj.weight"]
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_kept_adapter_loads_in_transformers_and_the_engine_alike(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "k", "lora(steps=3,seq_len=32,lr=1e-2,merge=false,targets=all)")
    cfg = json.loads((art / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and set(cfg["target_modules"]) == set(PROJ)
    lm = load_model(art)
    assert type(lm.model.layers[0].mlp.w13).__name__ == "WithAdapter"
    hf = AutoModelForCausalLM.from_pretrained(art, dtype=torch.float32).eval()  # transformers picks up the adapter
    with torch.no_grad():
        ours, theirs = lm.model(IDS), hf(IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_exported_adapter_over_the_base_artifact_serves_what_the_kept_artifact_does(llama_dir, tmp_path):
    import subprocess
    import sys

    kept = build_artifact(llama_dir, tmp_path / "k", "lora(steps=2,seq_len=32,lr=1e-2,merge=false,targets=all),int8")
    base = build_artifact(llama_dir, tmp_path / "b", "int8")
    out = tmp_path / "adapters" / "tuned"
    cli = subprocess.run([sys.executable, "-m", "compress", "export-adapter", str(kept), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "lora-adapter" and m["base_steps"] == ["int8"] and m["source"]["model_dir"]
    assert set(m["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    with torch.no_grad():
        want = load_model(kept).model(IDS)
        got = load_model(base, adapters={"tuned": out}).model(IDS, adapter="tuned")
    torch.testing.assert_close(got, want)
    again = subprocess.run([sys.executable, "-m", "compress", "export-adapter", str(base), "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "keeps no adapter" in again.stderr and not (tmp_path / "x").exists()


def test_lora_with_distillation_runs_against_the_source_teacher(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "kd", "depth(n=1,protect_first=0,protect_last=0,calib_samples=2,"
                                                       "calib_seq_len=32),lora(steps=2,seq_len=32,kd=0.5)")
    m = json.loads((art / "manifest.json").read_text())
    assert m["steps"][0]["result"]["layers_after"] == 1 and m["steps"][1]["params"]["kd"] == 0.5
    assert load_model(art).model.args.n_layers == 1


def test_int8_then_eora_is_served_with_the_adapter(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "ie", "int8,eora(rank=4,calib_samples=2,calib_seq_len=32)")
    r = json.loads((art / "manifest.json").read_text())["steps"][1]["result"]
    assert r["weighted_error_after"] < r["weighted_error_before"]
    assert type(load_model(art).model.layers[1].attn.wo).__name__ == "WithAdapter"


@pytest.mark.parametrize("recipe,match", [("int8,lora", "float weights"),
                                          ("lora(targets=embed)", "unknown target"),
                                          ("lora(kd=2)", "kd must be"),
                                          ("lora(merge=false),depth(n=1)", "keeps an adapter")])
def test_bad_lora_recipes_are_refused(llama_dir, tmp_path, recipe, match):
    with pytest.raises(RecipeError, match=match):
        build_artifact(llama_dir, tmp_path / "bad", recipe)


def test_fused_projection_adds_each_parts_adapter_and_none_where_missing():
    import torch.nn as nn

    from engine.loader import _adapter

    p = "model.layers.0.self_attn."
    state = {p + "q_proj.weight": torch.randn(8, 4, generator=G), p + "k_proj.weight": torch.randn(2, 4, generator=G),
             p + "v_proj.weight": torch.randn(2, 4, generator=G)}
    for proj, out_f in (("q_proj", 8), ("v_proj", 2)):  # k_proj has no adapter
        state[f"{p}{proj}.lora_A.weight"] = torch.randn(3, 4, generator=G)
        state[f"{p}{proj}.lora_B.weight"] = torch.randn(out_f, 3, generator=G)
    names = [p + f"{x}_proj.weight" for x in "qkv"]
    base = nn.Linear(4, 12, bias=False)
    base.weight.data = torch.cat([state[n] for n in names])
    fused = _adapter(state, names, base, torch.float32)

    def eff(proj):
        w = state[f"{p}{proj}.weight"]
        return w + state[f"{p}{proj}.lora_B.weight"] @ state[f"{p}{proj}.lora_A.weight"] \
            if f"{p}{proj}.lora_A.weight" in state else w
    x = torch.randn(2, 4, generator=G)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([x @ eff(f"{c}_proj").T for c in "qkv"], dim=-1))
