"""ONNX export of the engine's decoder with explicit KV-cache inputs and outputs.

    python -m compress export-onnx artifacts/smollm2-135m-instruct-none --out artifacts/smollm2-onnx
    python -m compress export-onnx artifacts/smollm2-135m-instruct-none --int8 --out artifacts/smollm2-onnx-int8

Graph: (input_ids (B, T), past_k, past_v (L, B, n_kv, P, hd)) -> (logits (B, T, V),
present_k, present_v (L, B, n_kv, P + T, hd)); P may be 0 (prefill). The cache grows by
concatenation, the layout ONNX Runtime users know from HF/optimum decoders. `--int8` runs
ONNX Runtime's dynamic quantization (per-channel int8 weights, MatMulInteger with
activations quantized at run time). int8 source artifacts are dequantized first. TFLite
export is out of scope.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from .artifact import WEIGHTS, ArtifactError, load_state, read_manifest, verify, write_artifact

ONNX_FILE = "model.onnx"


class _ConcatCache:
    """KVCache interface over explicit past tensors, growing by concatenation."""

    def __init__(self, past_k: list[torch.Tensor], past_v: list[torch.Tensor]):
        self.k_in, self.v_in = past_k, past_v
        self.k_out: list[torch.Tensor] = [None] * len(past_k)
        self.v_out: list[torch.Tensor] = [None] * len(past_v)
        self.pos = past_k[0].shape[2]

    def update(self, layer, k, v):
        self.k_out[layer] = torch.cat([self.k_in[layer], k], dim=2)
        self.v_out[layer] = torch.cat([self.v_in[layer], v], dim=2)
        return self.k_out[layer], self.v_out[layer]

    def advance(self, n: int) -> None:
        pass


class _Decoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_k, past_v):
        cache = _ConcatCache(list(past_k.unbind(0)), list(past_v.unbind(0)))
        logits = self.model(input_ids, cache)
        return logits, torch.stack(cache.k_out), torch.stack(cache.v_out)


def export_onnx(src: Path, out: Path, int8: bool = False, opset: int = 18, force: bool = False) -> dict:
    from engine.config import ModelArgs
    from engine.loader import build_model
    from engine.quant import dequantize_state

    manifest = verify(src)
    config = json.loads((src / "config.json").read_text())
    args = ModelArgs.from_hf_config(config)
    if args.chai:
        raise ArtifactError("CHAI artifacts keep per-layer head layouts the ONNX graph does not model; "
                            "serve them with the torch engine")
    model = build_model(args, dequantize_state(load_state(src)), max_len=min(args.max_position_embeddings, 8192))
    for block in model.layers:
        block.attn.repeat_kv = True
    dec = _Decoder(model).eval()
    L, nkv, hd = args.n_layers, args.n_kv_heads, args.head_dim
    # Trace with T > 1 and P > 0 so the general (masked) attention path is recorded.
    ids = torch.zeros(1, 3, dtype=torch.long)
    past = torch.zeros(L, 1, nkv, 2, hd)

    def fill(tmp: Path) -> dict:
        target = tmp / ONNX_FILE
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints from shapes
            torch.onnx.export(
                dec, (ids, past, past), str(target), dynamo=False, opset_version=opset,
                input_names=["input_ids", "past_k", "past_v"], output_names=["logits", "present_k", "present_v"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "past_k": {1: "batch", 3: "past"},
                              "past_v": {1: "batch", 3: "past"}, "logits": {0: "batch", 1: "seq"},
                              "present_k": {1: "batch", 3: "total"}, "present_v": {1: "batch", 3: "total"}})
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            fp32 = tmp / "model.fp32.onnx"
            target.rename(fp32)
            quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True)
            fp32.unlink()
        for f in src.iterdir():
            if f.is_file() and f.name not in (WEIGHTS, "manifest.json"):
                shutil.copy2(f, tmp / f.name)
        return {**{k: v for k, v in manifest.items() if k not in ("files", "size_bytes", "created_at", "eval")},
                "name": out.name, "backend": "onnxruntime", "hf_loadable": False,
                "dtype": "int8" if int8 else "float32", "int8_kernel": "ort-dynamic" if int8 else None,
                "steps": manifest["steps"] + [{"name": "onnx", "params": {"opset": opset, "int8": int8}}],
                "recipe": manifest["recipe"] + (",onnx-int8" if int8 else ",onnx"), "eval": {}}

    return write_artifact(out, fill, force=force)


def is_onnx_artifact(root: Path) -> bool:
    return read_manifest(root).get("backend") == "onnxruntime"
