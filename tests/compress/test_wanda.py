"""WANDA width pruning: N:M and unstructured masks, activation-aware scores, artifacts that
load in transformers and the engine alike."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress.recipes import RecipeError
from compress.wanda import nm_mask, row_mask
from engine.runner import load_model

from tests.helpers import build_artifact

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_nm_mask_keeps_the_n_best_of_every_m():
    score = torch.rand(8, 32, generator=torch.Generator().manual_seed(0))
    for n, m in [(1, 2), (2, 4), (4, 8), (1, 8), (8, 16), (1, 16), (12, 16)]:
        keep = nm_mask(score, n, m)
        assert (keep.reshape(8, -1, m).sum(-1) == n).all()
        kept_min = torch.where(keep, score, torch.inf).reshape(8, -1, m).min(-1).values
        dropped_max = torch.where(~keep, score, -torch.inf).reshape(8, -1, m).max(-1).values
        assert (kept_min >= dropped_max).all()


def test_activation_norms_decide_between_equal_weights():
    w = torch.ones(2, 4)
    norm = torch.tensor([1.0, 4.0, 2.0, 3.0])  # |W| * ||X|| : columns 1 and 3 matter most
    keep = nm_mask(w.abs() * norm[None, :], 2, 4)
    assert keep.tolist() == [[False, True, False, True]] * 2
    assert row_mask(w.abs() * norm[None, :], 0.25).tolist() == [[False, True, True, True]] * 2


@pytest.mark.parametrize("recipe,expect", [("wanda(pattern=2:4,calib_samples=2,calib_seq_len=32)", 0.5),
                                           ("wanda(pattern=12:16,calib_samples=2,calib_seq_len=32)", 0.25),
                                           ("wanda(ratio=0.3,calib_samples=2,calib_seq_len=32)", 0.3)])
def test_wanda_artifact_sparsity_and_loading(llama_dir, tmp_path, recipe, expect):
    art = build_artifact(llama_dir, tmp_path / "w", recipe)
    m = json.loads((art / "manifest.json").read_text())
    assert m["steps"][0]["result"]["sparsity"] == pytest.approx(expect, abs=0.01)
    sd = load_file(str(art / "model.safetensors"))
    for k, v in sd.items():
        if any(p in k for p in PROJ):
            assert (v == 0).float().mean().item() == pytest.approx(expect, abs=0.02), k
    lm = load_model(art)
    hf = AutoModelForCausalLM.from_pretrained(art, dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_activation_scores_differ_from_magnitude(llama_dir, tmp_path):
    wa = load_file(str(build_artifact(llama_dir, tmp_path / "w", "wanda(ratio=0.5,calib_samples=2,calib_seq_len=32)")
                       / "model.safetensors"))
    mg = load_file(str(build_artifact(llama_dir, tmp_path / "m", "wanda(ratio=0.5,score=magnitude,calib_samples=2,"
                                                                "calib_seq_len=32)") / "model.safetensors"))
    k = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(wa[k] == 0, mg[k] == 0)
    assert (mg[k] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_wanda_on_gemma_and_then_int8(gemma_dir, tmp_path):
    art = build_artifact(gemma_dir, tmp_path / "g", "wanda(pattern=2:4,calib_samples=2,calib_seq_len=32),int8")
    assert load_model(art).manifest["dtype"] == "int8"


@pytest.mark.parametrize("recipe,match", [("int8,wanda(pattern=2:4)", "before int8"),
                                          ("wanda(pattern=4:2)", "0 < N < M"),
                                          ("wanda(pattern=two)", "N:M"),
                                          ("wanda(pattern=1:3)", "not a multiple of M=3"),
                                          ("wanda(ratio=1.5)", "ratio must be"),
                                          ("wanda(score=random)", "score must be")])
def test_bad_wanda_recipes_are_refused(llama_dir, tmp_path, recipe, match):
    with pytest.raises(RecipeError, match=match):
        build_artifact(llama_dir, tmp_path / "bad", recipe)
