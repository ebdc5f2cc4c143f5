"""Pruning does what it claims: WANDA's activation-aware mask beats magnitude pruning where
activations are uneven, and the model-loss consensus mask stored in an artifact is exactly
the one its seed and definition give."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.helpers import build_artifact, save_tiny_llama

LOUD = [3, 17, 40, 51]  # input channels of layer 0's MLP made 10x larger than the rest


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama_with_loud_mlp_inputs(path):
    """The tiny Llama with a few large-norm MLP input channels in layer 0 (through the
    post-attention RMSNorm gain, as LLMs' outlier features arise)."""
    from transformers import LlamaForCausalLM

    src = save_tiny_llama(path)
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[LOUD] = 10.0
    model.save_pretrained(src)
    return src


def _mlp_inputs(model_dir, n_windows: int = 4, seq_len: int = 64) -> torch.Tensor:
    """Layer 0's MLP inputs X (tokens, 64) on held-out text (not the calibration split the
    step saw), from transformers' forward: what the pruned gate/up projections must reproduce."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import heldout_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(heldout_text()[:20000], add_special_tokens=False)["input_ids"][:n_windows * seq_len]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    xs = []
    hook = hf.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, 64)))
    with torch.no_grad():
        hf(torch.tensor(ids).view(n_windows, seq_len))
    hook.remove()
    return torch.cat(xs)


@pytest.mark.parametrize("shape", ["ratio=0.5", "pattern=2:4"])
def test_wanda_mask_reconstructs_uneven_activations_better_than_magnitude(tmp_path, shape):
    src = _llama_with_loud_mlp_inputs(tmp_path / "src")
    x = _mlp_inputs(src)
    assert x[:, LOUD].norm(dim=0).min() > 5 * x.norm(dim=0).median()  # the setup: a few loud channels
    common = f"modules=mlp,calib_samples=4,calib_seq_len=64,{shape}"
    wanda = load_file(str(build_artifact(src, tmp_path / "wanda", f"wanda({common})") / "model.safetensors"))
    mag = load_file(str(build_artifact(src, tmp_path / "mag", f"wanda({common},score=magnitude)")
                        / "model.safetensors"))
    dense = load_file(str(src / "model.safetensors"))
    for proj in ("gate_proj", "up_proj"):
        name = f"model.layers.0.mlp.{proj}.weight"
        w = dense[name]
        assert int((wanda[name] == 0).sum()) == int((mag[name] == 0).sum()) == w.numel() // 2  # equal sparsity
        err_wanda = ((w - wanda[name]) @ x.T).norm().item()  # ‖(W − W')X‖ on the layer's real inputs
        err_mag = ((w - mag[name]) @ x.T).norm().item()
        assert err_wanda < 0.7 * err_mag, (proj, err_wanda, err_mag)


def test_model_scored_consensus_mask_in_the_artifact_is_recomputed_exactly(llama_dir, tmp_path):
    """prune(score=model): per matrix (in name order), the layer-local consensus mask, then
    `model_chunks` random chunks re-decided by the full-model loss of each candidate mask.
    Recomputed here from the seed with transformers (weights really zeroed, no hook trick),
    the mask must be the artifact's zeros, and the recorded agreement must be what happened."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.build import load_hf_dir
    from compress.calibration import CalibConfig, calibration_ids, collect_grams
    from compress.prune import consensus_mask

    p = dict(chunk_size=8, n_masks=16, mask_sparsity=0.5, top_k=3, model_chunks=2, model_tokens=16,
             calib_samples=2, calib_seq_len=32, seed=3)
    art = build_artifact(llama_dir, tmp_path / "pm", "prune(score=model,modules=mlp,layers=0,"
                         + ",".join(f"{k}={v}" for k, v in p.items()) + ")")
    stored = load_file(str(art / "model.safetensors"))
    result = json.loads((art / "manifest.json").read_text())["steps"][0]["result"]

    config, state = load_hf_dir(llama_dir)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    names = [f"model.layers.0.mlp.{n}_proj.weight" for n in ("down", "gate", "up")]  # the step's (sorted) order
    grams = collect_grams(config, state, calibration_ids(tok, CalibConfig(p["calib_samples"], p["calib_seq_len"])),
                          names, progress=False)
    ids = torch.tensor(calibration_ids(tok, CalibConfig(1, p["model_tokens"])))
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()

    def model_loss(name, row, cols, pruned):  # the unpruned model with only these weights zeroed
        weight = hf.get_parameter(name)
        keep = weight[row, cols].clone()
        weight[row, cols] = keep.masked_fill(pruned, 0)
        loss = F.cross_entropy(hf(ids).logits[0, :-1], ids[0, 1:]).item()
        weight[row, cols] = keep
        return loss

    c, k = p["chunk_size"], p["top_k"]
    n_prune = round(p["mask_sparsity"] * c)
    gen = torch.Generator().manual_seed(p["seed"])
    agree = 0
    with torch.no_grad():
        for name in names:
            w = state[name].float()
            mask = consensus_mask(w, grams[name], c, p["n_masks"], p["mask_sparsity"], k, gen)
            for _ in range(p["model_chunks"]):
                r = int(torch.randint(w.shape[0], (1,), generator=gen))
                b = int(torch.randint(w.shape[1] // c, (1,), generator=gen))
                cols = torch.arange(b * c, (b + 1) * c)
                masks = torch.rand(p["n_masks"], c, generator=gen).argsort(-1) < n_prune
                losses = torch.tensor([model_loss(name, r, cols, m) for m in masks])
                order = losses.argsort()
                inside, outside = masks[order[k - 1]], masks[order[k]]  # top-k is not decided by rounding:
                assert torch.equal(inside, outside) or losses[order[k]] - losses[order[k - 1]] > 1e-5  # (a repeat ties)
                consensus = masks[order[:k]].all(0)
                agree += bool(torch.equal(consensus, mask[r, cols]))
                mask[r, cols] = consensus
            assert torch.equal(stored[name] == 0, mask), name
    scored = len(names) * p["model_chunks"]
    assert result["model_scored_chunks"] == scored
    assert result["model_local_agreement"] == pytest.approx(agree / scored)
    assert agree < scored  # the model loss overruled the local one somewhere: the comparison has teeth
    assert result["sparsity"] == pytest.approx(sum(int((stored[n] == 0).sum()) for n in names)
                                               / sum(stored[n].numel() for n in names))
