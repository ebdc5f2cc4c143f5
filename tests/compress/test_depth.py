"""Depth pruning: each metric finds a block that does nothing, the result is a genuinely
smaller model that transformers and the engine load identically, Gemma-3's per-layer
attention types follow their blocks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from compress.recipes import RecipeError, parse_recipe
from engine.runner import load_model

from tests.helpers import build_artifact, save_tiny_gemma3, save_tiny_llama


def _silence_block(model_dir, layer: int) -> None:
    """Zero a block's output projections: it then adds nothing to the residual stream."""
    f = model_dir / "model.safetensors"
    sd = load_file(str(f))
    for k in list(sd):
        if k.startswith(f"model.layers.{layer}.") and (k.endswith("o_proj.weight") or k.endswith("down_proj.weight")):
            sd[k] = torch.zeros_like(sd[k])
    save_file(sd, str(f), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llama6(tmp_path_factory):
    d = save_tiny_llama(tmp_path_factory.mktemp("l6") / "llama6", n_layers=6, seed=1)
    _silence_block(d, 3)
    return d


def _engine_vs_hf(art):
    lm = load_model(art, verify=True)
    hf = AutoModelForCausalLM.from_pretrained(art, dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    return lm


@pytest.mark.parametrize("metric", ["ppl", "taylor", "magnitude"])
def test_each_metric_removes_the_block_that_does_nothing(llama6, tmp_path, metric):
    art = build_artifact(llama6, tmp_path / metric, f"depth(n=1,metric={metric},protect_first=1,"
                                                   f"protect_last=1,calib_samples=2,calib_seq_len=32)")
    m = json.loads((art / "manifest.json").read_text())
    stats = m["steps"][0]["result"]
    scores = stats["scores"]
    assert sorted(scores) == ["1", "2", "3", "4"]  # protected blocks are never scored
    assert stats["removed"] == [int(min(scores, key=scores.get))] and stats["layers_after"] == 5
    if metric == "ppl":
        # skipping the silent block leaves perplexity exactly as it was; in a random model
        # skipping another block may even lower it, so the silent one is not always the pick
        assert scores["3"] == pytest.approx(stats["calibration_ppl_before"], rel=1e-4)
    else:
        assert stats["removed"] == [3]
    assert json.loads((art / "config.json").read_text())["num_hidden_layers"] == 5
    assert not any(k.startswith("model.layers.5.") for k in load_file(str(art / "model.safetensors")))


def test_removing_a_silent_block_leaves_the_function_unchanged(llama6, tmp_path):
    full = build_artifact(llama6, tmp_path / "full", "none")
    cut = build_artifact(llama6, tmp_path / "cut", "depth(n=1,metric=taylor,protect_first=1,protect_last=1,"
                                                    "calib_samples=2,calib_seq_len=32)")
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(cut).model(ids), load_model(full).model(ids), rtol=1e-4, atol=1e-4)
    _engine_vs_hf(cut)
    assert load_model(cut).manifest["n_params"] < load_model(full).manifest["n_params"]


def test_gemma_keeps_each_blocks_attention_type(tmp_path):
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
             "full_attention"]
    src = save_tiny_gemma3(tmp_path / "g6", layer_types=types, seed=2)
    _silence_block(src, 2)  # the first global layer
    art = build_artifact(src, tmp_path / "gd", "depth(n=1,metric=taylor,protect_first=1,protect_last=1,"
                                               "calib_samples=2,calib_seq_len=32)")
    cfg = json.loads((art / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    assert cfg["layer_types"] == [t for i, t in enumerate(types) if i != 2]
    lm = _engine_vs_hf(art)
    assert lm.model.args.sliding_window.count(None) == 1  # one global layer left, in its place


def test_depth_then_int8_serves(llama6, tmp_path):
    art = build_artifact(llama6, tmp_path / "d8", "depth(n=2,metric=magnitude,protect_first=1,protect_last=1),int8")
    lm = load_model(art)
    assert lm.model.args.n_layers == 4 and lm.manifest["dtype"] == "int8"


@pytest.mark.parametrize("recipe,match", [
    ("depth(n=5,protect_first=1,protect_last=1)", "only 4 of 6 blocks are unprotected"),
    ("depth(metric=entropy)", "metric must be one of"),
])
def test_bad_depth_recipes_are_refused(llama6, tmp_path, recipe, match):
    with pytest.raises(RecipeError, match=match):
        build_artifact(llama6, tmp_path / "bad", recipe)
    assert parse_recipe("depth(n=2),int8")[0].n == 2
