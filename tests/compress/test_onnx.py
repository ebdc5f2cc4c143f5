"""ONNX export with KV-cache I/O and the ONNX Runtime backend."""

import json

import pytest
import torch

from engine.artifact import load_engine_model
from compress.onnx_export import export_onnx
from engine.generate import SamplingParams, generate
from tests.helpers import build_artifact

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", params=["llama_dir", "gemma_dir"])
def onnx_pair(request, tmp_path_factory):
    src = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp("onnx")
    art = build_artifact(src, root / "float")
    return art, export_onnx(art, root / "onnx") and root / "onnx"


def test_onnx_prefill_and_cached_decode_match_the_engine(onnx_pair):
    art, onnx_art = onnx_pair
    ref, _ = load_engine_model(art, max_len=64)
    ort_model, manifest = load_engine_model(onnx_art, max_len=64)
    assert manifest["backend"] == "onnxruntime" and manifest["steps"][-1]["name"] == "onnx"
    ids = torch.randint(0, ref.args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = ref(ids)
    cache = ort_model.new_cache(1, 12)
    steps = [ort_model(ids[:, :7], cache)] + [ort_model(ids[:, i:i + 1], cache) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-3, rtol=1e-3)


def test_onnx_backend_generates_the_same_greedy_tokens(onnx_pair):
    art, onnx_art = onnx_pair
    ref, _ = load_engine_model(art, max_len=64)
    ort_model, _ = load_engine_model(onnx_art, max_len=64)
    params = SamplingParams(max_tokens=10, temperature=0.0, n=2, ignore_eos=True)
    a = [s.tokens for s in generate(ref, [5, 6, 7], params, set())]
    b = [s.tokens for s in generate(ort_model, [5, 6, 7], params, set())]
    assert a == b


def test_int8_onnx_is_smaller_and_close(llama_artifact, tmp_path):
    f32 = export_onnx(llama_artifact, tmp_path / "f")
    i8 = export_onnx(llama_artifact, tmp_path / "q", int8=True)
    assert i8["size_bytes"] < f32["size_bytes"] and i8["dtype"] == "int8"
    ref, _ = load_engine_model(tmp_path / "f", max_len=32)
    q, _ = load_engine_model(tmp_path / "q", max_len=32)
    ids = torch.randint(0, ref.args.vocab_size, (1, 16))
    lf, lq = ref(ids), q(ids)
    assert ((lq - lf).norm() / lf.norm()) < 0.2
