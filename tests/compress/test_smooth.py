"""SmoothQuant smoothing: function-preserving in float, and it rescues W8A8 from outlier channels."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.artifact import load_engine_model
from tests.helpers import build_artifact


@pytest.mark.parametrize("which", ["llama_dir", "gemma_dir"])
def test_smoothing_preserves_the_float_model(which, request, tmp_path):
    src = request.getfixturevalue(which)
    plain = build_artifact(src, tmp_path / "plain")
    smooth = build_artifact(src, tmp_path / "smooth", "smooth(alpha=0.5,calib_samples=2,calib_seq_len=32)")
    a, _ = load_engine_model(plain, max_len=32)
    b, _ = load_engine_model(smooth, max_len=32)
    ids = torch.randint(0, a.args.vocab_size, (1, 12))
    with torch.inference_mode():
        torch.testing.assert_close(b(ids), a(ids), atol=2e-3, rtol=2e-3)
    res = json.loads((smooth / "manifest.json").read_text())["steps"][0]["result"]
    assert res["groups"] == 3 * (2 if which == "llama_dir" else 3)


def test_smoothing_reduces_w8a8_error_with_outlier_channels(llama_dir, tmp_path):
    # Give a few hidden channels 30x larger activations, like real LLMs have.
    import shutil

    outlier = tmp_path / "outlier"
    shutil.copytree(llama_dir, outlier)
    st = load_file(str(outlier / "model.safetensors"))
    for k in st:
        if k.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            st[k][[3, 17, 40]] *= 30
    save_file(st, str(outlier / "model.safetensors"), metadata={"format": "pt"})
    ref, _ = load_engine_model(build_artifact(outlier, tmp_path / "f"), max_len=32)
    dyn, _ = load_engine_model(build_artifact(outlier, tmp_path / "d", "int8-dynamic"), max_len=32)
    smo, _ = load_engine_model(build_artifact(outlier, tmp_path / "s", "smooth(calib_samples=4,calib_seq_len=32),int8-dynamic"),
                               max_len=32)
    ids = torch.randint(0, ref.args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lf = ref(ids)
        err = lambda m: ((m(ids) - lf).norm() / lf.norm()).item()  # noqa: E731
        assert err(smo) < 0.9 * err(dyn), (err(smo), err(dyn))


def test_static_int8_uses_calibrated_scales_and_stays_close(llama_dir, tmp_path):
    from compress.recipes import RecipeError, parse_recipe
    from engine.quant import Int8StaticLinear

    ref, _ = load_engine_model(build_artifact(llama_dir, tmp_path / "f"), max_len=32)
    art = build_artifact(llama_dir, tmp_path / "s", "smooth(calib_samples=4,calib_seq_len=32),"
                                                    "int8-static(calib_samples=4,calib_seq_len=32)")
    m = json.loads((art / "manifest.json").read_text())
    assert m["int8_kernel"] == "static" and m["steps"][-1]["name"] == "int8-static"
    st = load_file(str(art / "model.safetensors"))
    assert st["model.layers.0.mlp.down_proj.weight_act_scale"].dim() == 0
    model, _ = load_engine_model(art, max_len=32)
    assert isinstance(model.layers[0].mlp.w2, Int8StaticLinear)
    ids = torch.randint(0, ref.args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lf = ref(ids)
        assert ((model(ids) - lf).norm() / lf.norm()).item() < 0.3
    with pytest.raises(RecipeError, match="must be the last step"):
        parse_recipe("int8-static,svd")


def test_static_int8_linear_matches_its_definition():
    from engine.quant import Int8StaticLinear, dequantize, quantize_per_channel

    torch.manual_seed(0)
    w, x = torch.randn(24, 32), torch.randn(5, 32)
    q, s = quantize_per_channel(w)
    act = x.abs().max().item() / 127
    y = Int8StaticLinear(q, s, act)(x)
    xq = torch.clamp(torch.round(x / act), -127, 127)
    torch.testing.assert_close(y, (xq * act) @ dequantize(q, s).T, atol=1e-3, rtol=1e-4)
