"""Recovery and head clustering do what they claim: LoRA with distillation brings a pruned
model closer to its source than plain LoRA does, and CHAI groups query heads that attend
identically without changing the model's output."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import build_artifact, save_tiny_llama

IDS = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


# --- LoRA with knowledge distillation --------------------------------------------------------

def _kl_to_teacher(teacher, student_dir, ids: torch.Tensor) -> float:
    """Mean per-token KL(teacher ‖ student) of next-token distributions (temperature 1)."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        t = torch.log_softmax(teacher(ids).logits.double(), -1)
        s = torch.log_softmax(student(ids).logits.double(), -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_lora_with_distillation_recovers_more_of_the_source_than_without(llama_dir, tmp_path):
    """Same WANDA-pruned start, same LoRA steps, data and seed; only kd differs. The teacher
    is the unpruned source, and the KL to it is measured on held-out text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import heldout_text

    tok = AutoTokenizer.from_pretrained(llama_dir)
    ids = torch.tensor(tok(heldout_text()[:20000], add_special_tokens=False)["input_ids"][:4 * 64]).view(4, 64)
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    prune = "wanda(pattern=2:4,calib_samples=2,calib_seq_len=32)"
    lora = "lora(steps=60,batch=2,seq_len=32,lr=2e-2,r=8,targets=all,dropout=0,precision=fp32,seed=0"
    kl = {"pruned": _kl_to_teacher(teacher, build_artifact(llama_dir, tmp_path / "p", prune), ids)}
    for kd in ("0", "0.5"):
        art = build_artifact(llama_dir, tmp_path / f"kd{kd}", f"{prune},{lora},kd={kd})")
        kl[kd] = _kl_to_teacher(teacher, art, ids)
    assert kl["pruned"] > 1.0, kl  # pruning opened a gap to recover
    drop_ce, drop_kd = kl["pruned"] - kl["0"], kl["pruned"] - kl["0.5"]
    # (on this random model, plain next-token training on real text pulls *away* from the
    # teacher, whose predictions have nothing to do with text: drop_ce is negative here)
    assert drop_kd > 0.05 * kl["pruned"], kl  # distillation really closes part of the gap
    assert drop_kd > drop_ce + 0.05 * kl["pruned"], kl


# --- CHAI ---------------------------------------------------------------------------------------

def _llama_with_duplicate_heads(path):
    """The tiny Llama (4 query heads over 2 KV heads) with, in every layer, query head 1 a copy
    of head 0 and head 3 a copy of head 2: each pair reads the same key head, so the two
    heads of a pair have the same attention maps exactly, and the pairs differ."""
    from transformers import LlamaForCausalLM

    src = save_tiny_llama(path)
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    hd = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            q = layer.self_attn.q_proj.weight
            q[hd:2 * hd] = q[0:hd]
            q[3 * hd:4 * hd] = q[2 * hd:3 * hd]
    model.save_pretrained(src)
    return src


def _logits(art) -> torch.Tensor:
    from engine.runner import load_model

    with torch.no_grad():
        return load_model(art).model(IDS).float()


def test_chai_groups_duplicate_heads_and_keeps_the_logits(llama_dir, tmp_path):
    src = _llama_with_duplicate_heads(tmp_path / "dup")
    art = build_artifact(src, tmp_path / "chai", "chai(samples=2,seq_len=32)")
    reps = json.loads((art / "config.json").read_text())["chai_representatives"]
    assert len(reps) == 2
    for rep in reps:  # each pair is one cluster with one representative; the pairs stay apart
        assert rep[0] == rep[1] and rep[2] == rep[3] and rep[0] != rep[2], reps
    result = json.loads((art / "manifest.json").read_text())["steps"][0]["result"]
    assert result["clusters"] == [2, 2] and result["query_heads_kept"] == "4/8"
    torch.testing.assert_close(_logits(art), _logits(build_artifact(src, tmp_path / "full")), rtol=1e-4, atol=1e-4)
    # The comparison has teeth: on the original model (distinct heads) the same step merges
    # heads that differ, and the logits move.
    moved = build_artifact(llama_dir, tmp_path / "chai-orig", "chai(samples=2,seq_len=32)")
    assert (_logits(moved) - _logits(build_artifact(llama_dir, tmp_path / "orig"))).abs().max() > 1e-2
