"""Precision steps: float casts (fp16, bf16) and per-channel int8 (weight-only, dynamic,
static W8A8), plus `quantize_int8`, the int8 rounding CHAI-Quant reuses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import naming
from engine.quant import quantize_per_channel

from .calibration import calibration_stat
from .select import select_weights
from .step import Step


@dataclass
class CastStep(Step):
    dtype: str = "bfloat16"  # "float16" or "bfloat16"

    @property
    def name(self) -> str:
        return {"float16": "fp16", "bfloat16": "bf16"}[self.dtype]

    @classmethod
    def recipe_names(cls) -> dict[str, dict]:
        return {"fp16": {"dtype": "float16"}, "bf16": {"dtype": "bfloat16"}}

    def apply(self, state, ctx):
        target = getattr(torch, self.dtype)
        ctx["dtype"] = self.dtype
        return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


@dataclass
class Int8Step(Step):
    """Symmetric per-output-channel int8 weights. `kernel` picks the runtime:
    weight_only = W8A16 (bf16 activations, near-lossless); dynamic = W8A8 via FBGEMM
    (faster, but per-token activation quantization suffers from LLM activation outliers)."""
    kernel: str = "weight_only"

    @property
    def name(self) -> str:
        return "int8" if self.kernel == "weight_only" else "int8-dynamic"

    @classmethod
    def recipe_names(cls) -> dict[str, dict]:
        return {"int8": {"kernel": "weight_only"}, "int8-dynamic": {"kernel": "dynamic"}}

    def apply(self, state, ctx):
        out = quantize_int8(state, ctx)
        ctx["int8_kernel"] = self.kernel
        return out


def quantize_int8(state: dict[str, torch.Tensor], ctx: dict, skip=lambda name: False) -> dict[str, torch.Tensor]:
    """Every quantizable weight not skipped -> int8 rows + `_scale`; other float tensors fp32.
    The float layer projections it rounds are left in ctx["pre_quant"] for an `eora` step."""
    out = {}
    ctx["pre_quant"] = {}
    for k, v in state.items():
        if naming.is_quantizable(k, v) and not skip(k):
            out[k], out[naming.scale_name(k)] = quantize_per_channel(v)
            if naming.in_layer(k) and k.endswith(naming.WEIGHT):
                ctx["pre_quant"][k] = v.float()
        else:
            out[k] = v.float() if v.is_floating_point() else v
    ctx["dtype"] = "int8"
    return out


@dataclass
class Int8StaticStep(Int8Step):
    """W8A8 with static activation scales: one per projection input, from the largest
    absolute calibration activation (absmax / 127). Pair it with `smooth` first: a
    per-tensor static scale is set by the outlier channels."""
    kernel: str = "static"
    calib_samples: int = 16
    calib_seq_len: int = 256

    @property
    def name(self) -> str:
        return "int8-static"

    @classmethod
    def recipe_names(cls) -> dict[str, dict]:
        return {"int8-static": {}}  # not Int8Step's two names: the kernel stays a parameter here

    def apply(self, state, ctx):
        names = select_weights(state, "all", "all")
        amax = calibration_stat(state, ctx, names, self.calib_samples, self.calib_seq_len, "absmax")
        out = super().apply(state, ctx)
        for n in names:
            out[naming.act_scale_name(n)] = (amax[n].max().float() / 127.0).clamp(min=1e-8).reshape(())
        return out
