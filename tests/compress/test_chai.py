"""CHAI clustered-head attention: clustering, the elbow, exactness of the serving path when
clustered heads really attend alike, key-cache reduction under GQA, and the recipe step."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from compress.chai import choose_k, cluster_heads, elbow, kmeans
from compress.recipes import RecipeError
from engine.config import ModelArgs
from engine.loader import build_model
from engine.runner import load_model

from tests.helpers import build_artifact

G = torch.Generator().manual_seed(0)


def test_kmeans_and_elbow_find_three_clear_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(4, 2, generator=G) for c in centres])
    inertias = [kmeans(x, k)[2] for k in range(1, 9)]
    assert all(a >= b - 1e-6 for a, b in zip(inertias, inertias[1:]))
    assert elbow(inertias) == 3
    rep, _ = cluster_heads(x)
    assert len(set(rep)) == 3 and all(rep[r] == r for r in rep)
    assert len({rep[i] for i in range(4)}) == 1 and rep[0] != rep[4] != rep[8]


def test_min_clusters_and_max_residual_raise_the_elbow():
    # A curve whose elbow is at 2 but which still holds 40% of the spread there.
    inertias = [100.0, 40.0, 30.0, 20.0, 8.0, 0.0]
    assert elbow(inertias) == 2
    assert choose_k(inertias) == 2
    assert choose_k(inertias, min_k=3) == 3
    assert choose_k(inertias, max_residual=0.25) == 4  # first k with inertia <= 25
    assert choose_k(inertias, max_residual=0.05) == 6
    assert choose_k(inertias, min_k=9) == 6  # never above n


def _tiny_args_and_state(llama_dir):
    from compress.build import load_hf_dir

    config, state = load_hf_dir(llama_dir)
    return config, ModelArgs.from_hf_config(config), state


def test_clustered_attention_is_exact_when_clustered_heads_attend_alike(llama_dir):
    """4 query heads over 2 KV groups. Make heads 2 and 3 attend exactly like head 0 (same q rows,
    key group 1 = key group 0): CHAI with one representative (head 0) must then reproduce the
    full model, while storing one key group instead of two."""
    config, args, state = _tiny_args_and_state(llama_dir)
    hd = args.head_dim
    st = dict(state)
    for layer in range(args.n_layers):
        p = f"model.layers.{layer}.self_attn."
        q, k = st[p + "q_proj.weight"].clone(), st[p + "k_proj.weight"].clone()
        q[2 * hd:3 * hd] = q[0:hd]
        q[3 * hd:4 * hd] = q[0:hd]
        k[hd:2 * hd] = k[0:hd]
        st[p + "q_proj.weight"], st[p + "k_proj.weight"] = q, k
    full = build_model(args, st, max_len=64)
    chai_args = replace(args, chai=[[0, 1, 0, 0]] * args.n_layers)
    reduced = dict(st)
    for layer in range(args.n_layers):
        p = f"model.layers.{layer}.self_attn."
        reduced[p + "q_proj.weight"] = st[p + "q_proj.weight"][:2 * hd]  # heads 0 and 1 are the representatives
        reduced[p + "k_proj.weight"] = st[p + "k_proj.weight"][:hd]  # both read key group 0
    clustered = build_model(chai_args, reduced, max_len=64)
    ids = torch.randint(3, 200, (1, 20), generator=G)
    with torch.no_grad():
        torch.testing.assert_close(clustered(ids), full(ids), rtol=1e-4, atol=1e-4)
        cache = clustered.new_cache(1, 32)
        steps = [clustered(ids[:, :12], cache)] + [clustered(ids[:, i:i + 1], cache) for i in range(12, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full(ids), rtol=1e-4, atol=1e-4)
    assert cache.k[0].shape[1] == 1 and cache.v[0].shape[1] == 2  # keys of one group, values of both
    assert clustered.kv_bytes_per_token() == 3 * full.kv_bytes_per_token() // 4


def test_chai_step_writes_reduced_projections_and_serves(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "c", "chai(samples=2,seq_len=32)")
    m = json.loads((art / "manifest.json").read_text())
    reps = json.loads((art / "config.json").read_text())["chai_representatives"]
    r = m["steps"][0]["result"]
    assert m["hf_loadable"] is False and len(reps) == 2 and r["clusters"] == [len(set(x)) if x else 4 for x in reps]
    sd = load_file(str(art / "model.safetensors"))
    for layer, rep in enumerate(reps):
        if rep:
            assert sd[f"model.layers.{layer}.self_attn.q_proj.weight"].shape[0] == len(set(rep)) * 16
    lm = load_model(art)
    with torch.no_grad():
        assert torch.isfinite(lm.model(torch.randint(3, 200, (1, 8), generator=G))).all()


def test_depth_after_chai_keeps_each_blocks_clusters(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "cd", "chai(samples=2,seq_len=32),depth(n=1,protect_first=0,"
                                                      "protect_last=0,metric=magnitude)")
    cfg = json.loads((art / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and len(cfg["chai_representatives"]) == 1
    load_model(art)


def test_onnx_export_refuses_chai(llama_dir, tmp_path):
    from compress.artifact import ArtifactError
    from compress.onnx_export import export_onnx

    art = build_artifact(llama_dir, tmp_path / "co", "chai(samples=2,seq_len=32)")
    with pytest.raises(ArtifactError, match="CHAI"):
        export_onnx(art, tmp_path / "co-onnx")


@pytest.mark.parametrize("recipe,match", [("int8,chai", "float weights"),
                                          ("chai(samples=2,seq_len=32),chai(samples=2,seq_len=32)",
                                           "already clustered"),
                                          ("chai(max_residual=1.5)", "max_residual"),
                                          ("chai(min_clusters=0)", "min_clusters")])
def test_bad_chai_recipes_are_refused(llama_dir, tmp_path, recipe, match):
    with pytest.raises(RecipeError, match=match):
        build_artifact(llama_dir, tmp_path / "bad", recipe)


def test_select_layers_bands():
    from compress.sensitivity import select_layers

    scores = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]  # most sensitive: 1, 4, 2, 3, 5, 0
    assert select_layers(scores, 0.34, "high") == [1, 4]
    assert select_layers(scores, 0.34, "medium") == [2, 3]
    assert select_layers(scores, 0.34, "low") == [0, 5]


@pytest.mark.parametrize("metric", ["perturb", "attention"])
def test_chai_quant_keeps_the_critical_layer_in_16_bit(llama_dir, tmp_path, metric):
    art = build_artifact(llama_dir, tmp_path / "cq", f"chai-quant(critical=0.5,metric={metric},samples=2,seq_len=32)")
    r = json.loads((art / "manifest.json").read_text())["steps"][0]["result"]
    (crit,) = r["critical_layers"]
    assert r["scores"][crit] == max(r["scores"]) and 0 < r["memory_reduction_vs_16bit"] < 0.5
    sd = load_file(str(art / "model.safetensors"))
    other = 1 - crit
    assert sd[f"model.layers.{crit}.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert sd[f"model.layers.{other}.mlp.up_proj.weight"].dtype == torch.int8
    assert sd["model.embed_tokens.weight"].dtype == torch.int8
    lm = load_model(art)
    with torch.no_grad():
        assert torch.isfinite(lm.model(torch.randint(3, 200, (1, 8), generator=G))).all()


def test_chai_target_trains_only_the_chosen_band(llama_dir, tmp_path):
    base = load_file(str(build_artifact(llama_dir, tmp_path / "b") / "model.safetensors"))
    art = build_artifact(llama_dir, tmp_path / "t", "lora(layers=high,fraction=0.5,steps=3,seq_len=32,lr=1e-2,"
                                                     "targets=q_proj)")
    r = json.loads((art / "manifest.json").read_text())["steps"][0]["result"]
    (layer,) = r["layers_trained"]
    assert r["sensitivity"][layer] == max(r["sensitivity"])
    sd = load_file(str(art / "model.safetensors"))
    for i in range(2):
        key = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(sd[key], base[key]) == (i != layer)


def test_clusters_metric_needs_chai(llama_dir, tmp_path):
    with pytest.raises(RecipeError, match="needs a chai step"):
        build_artifact(llama_dir, tmp_path / "x", "chai-quant(metric=clusters)")
    build_artifact(llama_dir, tmp_path / "y", "chai(samples=2,seq_len=32),chai-quant(metric=clusters,critical=0.5)")


@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_hf_chai_model_matches_the_engine(llama_dir, gemma_dir, tmp_path, model):
    """CHAI-Target/KD fine-tune the clustered model in transformers: its logits must be the
    engine's (same clusters, reduced projections, sliding windows on Gemma-3)."""
    from compress.build import load_hf_dir
    from compress.lora import hf_model_from_state

    src = llama_dir if model == "llama" else gemma_dir
    art = build_artifact(src, tmp_path / "c", "chai(samples=2,seq_len=32,max_clusters=2)")
    config, state = load_hf_dir(art)
    assert any(config["chai_representatives"])
    hf = hf_model_from_state(config, {k: v.float() for k, v in state.items()}).eval()
    engine = load_model(art).model.float()
    ids = torch.randint(3, 200, (1, 24), generator=G)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, engine(ids).float(), rtol=1e-4, atol=1e-4)


def test_chai_target_and_kd_fine_tune_the_clustered_model(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "tk", "chai(samples=2,seq_len=32,max_clusters=2),"
                         "lora(layers=high,fraction=0.5,steps=4,seq_len=32,lr=1e-2,targets=all,kd=0.5)")
    m = json.loads((art / "manifest.json").read_text())
    chai, lora = m["steps"][0]["result"], m["steps"][1]["result"]
    (trained,) = lora["layers_trained"]
    reps = json.loads((art / "config.json").read_text())["chai_representatives"]
    sd = load_file(str(art / "model.safetensors"))
    before = load_file(str(build_artifact(llama_dir, tmp_path / "c", "chai(samples=2,seq_len=32,max_clusters=2)")
                           / "model.safetensors"))
    for layer, rep in enumerate(reps):  # the clustered shapes survive the merge; only the band trained
        key = f"model.layers.{layer}.self_attn.q_proj.weight"
        assert sd[key].shape[0] == (len(set(rep)) if rep else 4) * 16
        assert torch.equal(sd[key], before[key]) == (layer != trained)
    assert chai["clusters"] == [len(set(x)) if x else 4 for x in reps]
    with torch.no_grad():
        assert torch.isfinite(load_model(art).model(torch.randint(3, 200, (1, 8), generator=G))).all()
