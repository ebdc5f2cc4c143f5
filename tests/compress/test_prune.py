"""Stochastic-consensus pruning and SVD re-densification."""

import json

import pytest
import torch

from engine.artifact import load_engine_model
from compress.build import load_hf_dir
from compress.prune import chunk_mask_losses, consensus_mask, select_weights
from compress.recipes import RecipeError, parse_recipe
from engine.config import ModelArgs
from engine.loader import build_model
from tests.helpers import build_artifact


def test_batched_mask_loss_equals_direct_reconstruction_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=g)
    w = torch.randn(3, 12, generator=g)
    chunk = 4
    masks = torch.rand(3, 3, 5, chunk, generator=g) < 0.5  # (R, nb, M, C)
    gram = x.T @ x
    idx = torch.arange(12).view(3, chunk)
    blocks = gram[idx[:, :, None], idx[:, None, :]]
    losses = chunk_mask_losses(w.view(3, 3, chunk), blocks, masks)
    for r in range(3):
        for b in range(3):
            for m in range(5):
                pruned = torch.zeros_like(w, dtype=torch.bool)
                pruned[r, b * chunk:(b + 1) * chunk] = masks[r, b, m]
                direct = ((w - w.masked_fill(pruned, 0)) @ x.T).pow(2).sum()
                assert torch.allclose(losses[r, b, m], direct, rtol=1e-4, atol=1e-4)


def _layer_problem(seed=0, out_f=16, in_f=30):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, in_f, generator=g) * torch.linspace(0.1, 3, in_f)  # uneven input scales
    return torch.randn(out_f, in_f, generator=g), x


def test_top1_prunes_exactly_the_mask_sparsity_and_consensus_prunes_less():
    w, x = _layer_problem()
    one = consensus_mask(w, x.T @ x, 15, 50, 0.4, 1, torch.Generator().manual_seed(0))
    assert one.sum().item() == 16 * 2 * 6  # 2 chunks of 15 per row, 6 of each pruned
    many = consensus_mask(w, x.T @ x, 15, 300, 0.4, 3, torch.Generator().manual_seed(0))
    assert 0 < many.sum() < one.sum()


def test_consensus_beats_random_pruning_at_equal_sparsity():
    w, x = _layer_problem(1)
    mask = consensus_mask(w, x.T @ x, 15, 300, 0.5, 5, torch.Generator().manual_seed(0))
    loss = lambda m: ((w - w.masked_fill(m, 0)) @ x.T).pow(2).sum().item()  # noqa: E731
    g = torch.Generator().manual_seed(5)
    rand = []
    for _ in range(20):
        r = torch.zeros(w.numel(), dtype=torch.bool)
        r[torch.randperm(w.numel(), generator=g)[: int(mask.sum())]] = True
        rand.append(loss(r.view_as(w)))
    assert loss(mask) < min(rand)


def test_recipe_parameters_are_parsed_and_checked():
    steps = parse_recipe("prune(n_masks=40,top_k=4,layers=0+1,modules=up_proj+down_proj),svd(rank=8),int8")
    assert [s.name for s in steps] == ["prune", "svd", "int8"]
    assert steps[0].n_masks == 40 and steps[0].layers == "0+1" and steps[1].rank == 8
    with pytest.raises(RecipeError, match="unknown parameter 'bogus'"):
        parse_recipe("prune(bogus=1)")
    with pytest.raises(RecipeError, match="not a valid int"):
        parse_recipe("svd(rank=four)")
    # the name fixes these (int8 = weight-only kernel, bf16 = bfloat16): a clear refusal, not a TypeError
    with pytest.raises(RecipeError, match="unknown parameter 'kernel'"):
        parse_recipe("int8(kernel=dynamic)")
    with pytest.raises(RecipeError, match="unknown parameter 'dtype'"):
        parse_recipe("bf16(dtype=float16)")


def test_select_weights_by_module_and_layer(llama_dir):
    _, state = load_hf_dir(llama_dir)
    names = select_weights(state, "up_proj+down_proj", "1")
    assert names == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(RecipeError, match="no weights match"):
        select_weights(state, "mlp", "7")


def test_prune_and_svd_after_int8_keep_int8(llama_dir, tmp_path):
    # The seed's Q⇒P+SV order: work on dequantized weights, hand back int8.
    from safetensors.torch import load_file

    art = build_artifact(llama_dir, tmp_path / "qps",
                         "int8,prune(n_masks=20,top_k=2,calib_samples=2,calib_seq_len=32,layers=0),svd(rank=4,layers=0)")
    st = load_file(str(art / "model.safetensors"))
    a = "model.layers.0.mlp.up_proj.weight_lr_a"
    assert st[a].dtype == torch.int8 and a + "_scale" in st
    assert "model.layers.0.mlp.up_proj.weight" not in st
    assert st["model.layers.1.mlp.up_proj.weight"].dtype == torch.int8
    engine, _ = load_engine_model(art, max_len=32)
    with torch.inference_mode():
        assert torch.isfinite(engine(torch.randint(0, engine.args.vocab_size, (1, 8)))).all()


def test_svd_factors_run_as_two_linears_matching_the_dense_product(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "svd", "svd(rank=8,modules=mlp)")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["steps"][0]["result"]["matrices"] == 6 and manifest["hf_loadable"] is False
    assert manifest["n_params"] < manifest["source_n_params"]
    engine, _ = load_engine_model(art, max_len=64)
    assert type(engine.layers[0].mlp.w2).__name__ == "LowRank"
    # Same model with the products B @ A materialised as dense weights.
    from safetensors.torch import load_file

    config, _ = load_hf_dir(llama_dir)
    state = load_file(str(art / "model.safetensors"))
    dense = {}
    for k, v in state.items():
        if k.endswith("_lr_a"):
            base = k[: -len("_lr_a")]
            dense[base] = state[base + "_lr_b"] @ v
        elif not k.endswith("_lr_b"):
            dense[k] = v
    ref = build_model(ModelArgs.from_hf_config(config), dense, max_len=64)
    ids = torch.randint(0, engine.args.vocab_size, (1, 16))
    with torch.inference_mode():
        torch.testing.assert_close(engine(ids), ref(ids), atol=1e-4, rtol=1e-4)


def test_svd_is_the_best_rank_r_approximation(llama_dir, tmp_path):
    from safetensors.torch import load_file

    _, src = load_hf_dir(llama_dir)
    art = build_artifact(llama_dir, tmp_path / "svd2", "svd(rank=5,modules=down_proj,layers=0)")
    st = load_file(str(art / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    w, approx = src[name], st[name + "_lr_b"] @ st[name + "_lr_a"]
    s = torch.linalg.svdvals(w)
    assert torch.allclose((w - approx).norm(), s[5:].pow(2).sum().sqrt(), rtol=1e-3)


def test_energy_threshold_picks_rank_per_matrix(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "svd3", "svd(energy=0.5,modules=mlp)")
    res = json.loads((art / "manifest.json").read_text())["steps"][0]["result"]
    assert res["energy_kept_mean"] >= 0.5 and res["rank_min"] >= 1


def test_prune_svd_int8_artifact_serves(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "psq",
                         "prune(n_masks=30,top_k=3,calib_samples=2,calib_seq_len=32),svd(rank=4),int8")
    m = json.loads((art / "manifest.json").read_text())
    assert [s["name"] for s in m["steps"]] == ["prune", "svd", "int8"]
    assert 0 < m["steps"][0]["result"]["sparsity"] < 0.5
    engine, _ = load_engine_model(art, max_len=32)
    with torch.inference_mode():
        logits = engine(torch.randint(0, engine.args.vocab_size, (1, 8)))
    assert torch.isfinite(logits).all()


def test_channel_pruning_shrinks_mlp_and_stays_hf_loadable(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    art = build_artifact(llama_dir, tmp_path / "ch", "channels(ratio=0.5,calib_samples=2,calib_seq_len=32)")
    m = json.loads((art / "manifest.json").read_text())
    assert m["steps"][0]["result"] == {"intermediate_size_before": 128, "intermediate_size_after": 64, "layers": 2}
    assert json.loads((art / "config.json").read_text())["intermediate_size"] == 64
    hf = AutoModelForCausalLM.from_pretrained(art).eval()
    engine, _ = load_engine_model(art, max_len=32)
    ids = torch.randint(0, engine.args.vocab_size, (1, 10))
    with torch.inference_mode():
        torch.testing.assert_close(engine(ids), hf(ids).logits, atol=1e-3, rtol=1e-3)


def test_channel_pruning_keeps_the_important_channels(llama_dir):
    # Removing channels by importance must hurt the layer output less than removing at random.
    from compress.calibration import CalibConfig, calibration_ids, collect_grams
    from transformers import AutoTokenizer

    config, state = load_hf_dir(llama_dir)
    down = "model.layers.0.mlp.down_proj.weight"
    g = collect_grams(config, state, calibration_ids(AutoTokenizer.from_pretrained(llama_dir),
                                                     CalibConfig(4, 32)), [down], progress=False)[down]
    w = state[down]
    imp = w.norm(dim=0) * g.diagonal().sqrt()
    err = lambda keep: torch.trace((w[:, ~keep]) @ g[~keep][:, ~keep] @ w[:, ~keep].T).item()  # noqa: E731
    best = torch.zeros(128, dtype=torch.bool)
    best[imp.topk(64).indices] = True
    rand = torch.zeros(128, dtype=torch.bool)
    rand[torch.randperm(128, generator=torch.Generator().manual_seed(0))[:64]] = True
    assert err(best) < err(rand)


def test_sparse_plus_lowrank_beats_lowrank_alone_and_runs(llama_dir, tmp_path):
    from safetensors.torch import load_file

    _, src = load_hf_dir(llama_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    lr = build_artifact(llama_dir, tmp_path / "lr", "svd(rank=4,modules=down_proj,layers=0)")
    slr = build_artifact(llama_dir, tmp_path / "slr", "svd(rank=4,modules=down_proj,layers=0,sparse=0.1)")
    st_lr, st = load_file(str(lr / "model.safetensors")), load_file(str(slr / "model.safetensors"))
    low = st[name + "_lr_b"] @ st[name + "_lr_a"]
    s = torch.sparse_csr_tensor(st[name + "_sp_crow"].long(), st[name + "_sp_col"].long(), st[name + "_sp_val"],
                                size=low.shape).to_dense()
    assert st[name + "_sp_val"].numel() == int(0.1 * low.numel())
    err_lr = (src[name] - st_lr[name + "_lr_b"] @ st_lr[name + "_lr_a"]).norm()
    assert (src[name] - (low + s)).norm() < err_lr
    engine, _ = load_engine_model(slr, max_len=32)
    assert type(engine.layers[0].mlp.w2).__name__ == "SparseLowRank"
    config, _ = load_hf_dir(llama_dir)
    dense = {k: v for k, v in st.items() if "_lr_" not in k and "_sp_" not in k}
    dense[name] = low + s
    ref = build_model(ModelArgs.from_hf_config(config), dense, max_len=32)
    ids = torch.randint(0, engine.args.vocab_size, (1, 10))
    with torch.inference_mode():
        torch.testing.assert_close(engine(ids), ref(ids), atol=1e-4, rtol=1e-4)


def test_batched_model_loss_equals_loss_of_the_pruned_model(llama_dir):
    # The hook trick (subtract the pruned weights' contribution from one output row) must give
    # the same loss as actually zeroing those weights.
    from compress.prune_model_loss import engine_row, mask_model_losses

    config, state = load_hf_dir(llama_dir)
    args = ModelArgs.from_hf_config(config)
    model = build_model(args, state, max_len=32)
    name = "model.layers.1.mlp.up_proj.weight"
    path, offset = engine_row(name, args)
    ids = torch.randint(0, args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    cols = torch.arange(15, 30)
    masks = torch.rand(3, 15, generator=torch.Generator().manual_seed(1)) < 0.5
    losses = mask_model_losses(model, path, offset + 7, cols, state[name][7, cols], masks, ids)
    for m in range(3):
        pruned = dict(state)
        w = state[name].clone()
        w[7, cols] = w[7, cols].masked_fill(masks[m], 0)
        pruned[name] = w
        logits = build_model(args, pruned, max_len=32)(ids)
        ref = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        assert torch.allclose(losses[m], ref, atol=1e-4)


def test_prune_with_model_score_records_agreement(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "pm", "prune(score=model,model_chunks=2,model_tokens=16,n_masks=40,"
                                                     "top_k=3,calib_samples=2,calib_seq_len=32,layers=0)")
    res = json.loads((art / "manifest.json").read_text())["steps"][0]["result"]
    assert res["model_scored_chunks"] == 6 and 0 <= res["model_local_agreement"] <= 1
