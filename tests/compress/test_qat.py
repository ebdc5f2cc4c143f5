"""Quantization-aware training."""

import json

import torch

from engine.artifact import load_engine_model
from compress.qat import fake_quant_rows
from tests.helpers import build_artifact


def test_fake_quant_rounds_forward_and_passes_gradient_straight_through():
    w = torch.randn(4, 10, requires_grad=True)
    y = fake_quant_rows(w)
    scale = w.detach().abs().amax(1, keepdim=True) / 127
    assert torch.allclose(y / scale, torch.round(y / scale), atol=1e-4)  # on the int8 grid
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qat_lowers_the_training_loss_and_serves_as_int8(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "qat", "qat(steps=30,lr=0.003,batch=2,seq_len=32),int8-dynamic")
    m = json.loads((art / "manifest.json").read_text())
    res = m["steps"][0]["result"]
    assert res["loss_last"] < res["loss_first"]
    assert [s["name"] for s in m["steps"]] == ["qat", "int8-dynamic"]
    model, _ = load_engine_model(art, max_len=32)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randint(0, model.args.vocab_size, (1, 8)))).all()
