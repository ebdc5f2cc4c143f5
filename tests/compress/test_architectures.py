"""Every compress step on each bring-your-own architecture (tiny random Qwen2, Qwen3, Llama 3,
Phi-3, Mistral): it builds an artifact the engine serves, or refuses with a reason."""

from __future__ import annotations

import pytest
import torch

from compress.build import build
from compress.step import RecipeError
from engine.artifact import load_engine_model
from tests.engine import test_architectures as A
from tests.helpers import make_tokenizer

RECIPES = ["int8", "gptq(group_size=32)", "wanda(pattern=2:4)", "depth(n=1,protect_first=0,protect_last=0)",
           "channels(ratio=0.25)", "svd(rank=4)", "chai(samples=2,seq_len=16)", "qat(steps=2)",
           "smooth,int8-dynamic", "int8,eora(rank=4)", "lora(steps=2)"]
REFUSED = {("phi3", "lora(steps=2)"): "Phi-3 is not supported by the LoRA"}


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama3", "phi3", "mistral"])
def hf_dir(request, tmp_path_factory):
    tok = make_tokenizer()
    path = tmp_path_factory.mktemp(request.param) / request.param
    vocab = A.BASE["vocab_size"]
    A.BASE["vocab_size"] = len(tok)  # calibration text is tokenized with this tokenizer
    try:
        A._hf_model(request.param, path)
    finally:
        A.BASE["vocab_size"] = vocab
    tok.save_pretrained(path)
    return request.param, path


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_step_builds_a_servable_artifact_or_refuses(hf_dir, recipe, tmp_path):
    arch, path = hf_dir
    if (arch, recipe) in REFUSED:
        with pytest.raises(RecipeError, match=REFUSED[(arch, recipe)]):
            build(path, tmp_path / "a", recipe, {"model_dir": str(path)}, progress=False)
        return
    manifest = build(path, tmp_path / "a", recipe, {"model_dir": str(path)}, progress=False)
    assert manifest["model_type"] == arch.replace("llama3", "llama")
    model, _ = load_engine_model(tmp_path / "a", max_len=64)
    build(path, tmp_path / "f", "none", {"model_dir": str(path)}, progress=False)
    ref, _ = load_engine_model(tmp_path / "f", max_len=64)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    got, want = model(ids)[0, -1], ref(ids)[0, -1]
    assert torch.isfinite(got).all()
    if recipe == "int8":  # lossless enough to keep the next-token ranking's top
        assert torch.cosine_similarity(got, want, dim=0) > 0.99
