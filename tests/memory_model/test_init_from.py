"""A memory model initialised from a large model's float artifact (`python -m memory_model init`):
same function as the artifact on its vocabulary, the large model's tokenizer plus control
tokens, a checkpoint that trains, exports and condenses like the sentencepiece ones."""

from __future__ import annotations

import json

import pytest
import torch

from engine.artifact import load_engine_model
from memory_model.__main__ import main
from memory_model.checkpoint import export_checkpoint, load_checkpoint
from memory_model.condense import MemoryModel
from memory_model.data import condense_examples
from memory_model.hf_tokenizer import HFTokenizer
from memory_model.init_from import import_artifact
from memory_model.model import MemoryModelConfig, build_model, n_params
from memory_model.tokenizer import CONTROL

from tests.helpers import build_artifact


@pytest.fixture(scope="module")
def imported(llama_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("mm-import") / "init"
    assert main(["init", "--artifact", str(llama_artifact), "--out", str(out), "--max-len", "256"]) == 0
    return out


def test_imported_model_computes_what_the_artifact_does(llama_artifact, imported):
    model, cfg, tok, meta = load_checkpoint(imported)
    engine, _ = load_engine_model(llama_artifact)
    base_vocab = engine.tok_embeddings.weight.shape[0]
    assert cfg.vocab_size == base_vocab + len(CONTROL) == tok.vocab_size
    assert cfg.n_kv_heads == 2 and cfg.n_heads == 4  # GQA kept, not widened to MHA
    ids = torch.tensor([tok.encode("Sam has 17 apples and buys 25 more.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :base_vocab], engine(ids), atol=1e-4, rtol=1e-4)
    # the control tokens start at the mean embedding
    emb = model.tok_embeddings.weight
    torch.testing.assert_close(emb[base_vocab:], emb[:base_vocab].mean(0, keepdim=True).expand(3, -1))
    assert meta["stage"] == "init" and meta["source_artifact"] == str(llama_artifact)


def test_shared_tokenizer_frames_and_decodes(llama_artifact, imported):
    _, cfg, tok, _ = load_checkpoint(imported)
    assert isinstance(tok, HFTokenizer)
    from transformers import AutoTokenizer
    large = AutoTokenizer.from_pretrained(str(llama_artifact))
    text = "Known: 17 + 25 = 42."
    assert tok.encode(text) == large(text, add_special_tokens=False)["input_ids"]  # the large model's ids
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (large.bos_token_id, large.eos_token_id, large.pad_token_id)
    ids = tok.condense_input("How many?", "17 + 25 = 42.", 50, 50)
    assert ids[0] == cfg.bos_id and ids[1] == tok.prompt_id and ids[-1] == tok.condensed_id
    assert tok.cot_id in ids and len({tok.prompt_id, tok.cot_id, tok.condensed_id}) == 3
    assert tok.decode(ids) == "How many?17 + 25 = 42."  # control and special tokens dropped


def test_imported_checkpoint_trains_exports_and_condenses(imported, tmp_path):
    from memory_model.cot import write_jsonl
    rows = [{"question": f"Tom has {a} pens and buys {b}. How many pens?", "cot": f"{a} + {b} = {a + b}.\n"
             f"The answer is {a + b}.", "answer": a + b} for a, b in [(3, 4), (10, 7), (21, 5), (8, 8)]]
    write_jsonl(tmp_path / "train.jsonl", rows)
    _, _, tok, _ = load_checkpoint(imported)
    ex = condense_examples(rows, tok, 64, 64, 32, "extractive")
    assert ex[0][0][ex[0][1]:][-1] == tok.eos_id
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(imported), "--data", str(tmp_path / "train.jsonl"), "--synthetic", "0",
                 "--target", "extractive", "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--eval-every", "2", "--quiet", "--max-prompt", "64", "--max-cot", "64"]) == 0
    before, _, _, _ = load_checkpoint(imported)
    after, _, tok2, meta = load_checkpoint(out)
    assert isinstance(tok2, HFTokenizer) and meta["init"] == str(imported)
    assert not torch.equal(before.layers[0].attn.wqkv.weight, after.layers[0].attn.wqkv.weight)
    shipped = tmp_path / "shipped"
    assert export_checkpoint(out, shipped, torch.bfloat16) == ["sft", "init"]
    assert (shipped / "tokenizer.json").is_file() and not (shipped / "tokenizer.model").exists()
    size = (shipped / "model.safetensors").stat().st_size
    assert size < 0.6 * (out / "model.safetensors").stat().st_size  # bf16 on disk
    mm = MemoryModel(shipped, max_prompt=64, max_cot=64)
    assert mm.model.layers[0].attn.wqkv.weight.dtype == torch.float32  # computed in fp32
    torch.testing.assert_close(mm.model.layers[0].attn.wqkv.weight,
                               after.layers[0].attn.wqkv.weight.bfloat16().float())
    c = mm.condense("Tom has 3 pens and buys 4. How many pens?", "3 + 4 = 7.", max_new=8)
    assert c.input_tokens == len(mm.input_ids("Tom has 3 pens and buys 4. How many pens?", "3 + 4 = 7."))
    assert 1 <= len(c.token_ids) <= 8 and c.text == tok2.decode(c.token_ids).strip()


def test_refuses_what_it_cannot_import(gemma_artifact, llama_dir, tmp_path, capsys):
    assert main(["init", "--artifact", str(gemma_artifact), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the memory model is a llama-style decoder") and "qk_norm" in err
    assert "\n" not in err
    int8 = build_artifact(llama_dir, tmp_path / "int8", "int8")
    with pytest.raises(ValueError, match="needs a float artifact"):
        import_artifact(int8)
    assert main(["init", "--artifact", str(tmp_path / "nothing"), "--out", str(tmp_path / "n")]) == 2
    assert "not an artifact" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "n").exists()


def test_seventy_million_shape():
    """The shipped 70M route: SmolLM2-135M's shape (GQA 9/3 heads, SwiGLU 1536, tied 49152
    vocabulary + 3 control tokens) at 12 of its 30 blocks."""
    cfg = MemoryModelConfig(vocab_size=49152 + 3, dim=576, n_layers=12, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                            max_len=1024, rope_theta=100000.0)
    with torch.device("meta"):
        model = build_model(cfg, seed=None)
    assert 65e6 < n_params(model) < 75e6
    assert n_params(model) * 2 <= 150e6  # shipped as bf16 safetensors within the 150 MB
    assert json.loads(json.dumps(cfg.to_dict()))["n_kv_heads"] == 3
