"""Recipe steps: one uniform interface for every compression technique.

A step takes an HF-named state dict and returns a new one (gpt-fast's QuantHandler
idea: `apply` creates the compressed state dict; the engine's loader converts it for
runtime). Steps chain left to right, e.g. `--recipe bf16` or later
`--recipe prune,int8`. Each records its parameters in the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from server.engine.quant import quantize_per_channel


class RecipeError(ValueError):
    pass


@dataclass
class Step:
    name = "none"

    def apply(self, state: dict[str, torch.Tensor], ctx: dict) -> dict[str, torch.Tensor]:
        return state

    def record(self) -> dict:
        return {"name": self.name, "params": asdict(self)}


@dataclass
class CastStep(Step):
    dtype: str = "bfloat16"  # "float16" or "bfloat16"

    @property
    def name(self) -> str:
        return {"float16": "fp16", "bfloat16": "bf16"}[self.dtype]

    def apply(self, state, ctx):
        target = getattr(torch, self.dtype)
        ctx["dtype"] = self.dtype
        return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def _is_quantizable(name: str, t: torch.Tensor) -> bool:
    # Every 2-D weight: projections, MLP, embedding (which is also the tied LM head).
    # Norm weights are 1-D and stay in float.
    return t.dim() == 2 and name.endswith(".weight") and t.is_floating_point()


@dataclass
class Int8Step(Step):
    """Symmetric per-output-channel int8 weights. `kernel` picks the runtime:
    weight_only = W8A16 (bf16 activations, near-lossless); dynamic = W8A8 via FBGEMM
    (faster, but per-token activation quantization suffers from LLM activation outliers)."""
    kernel: str = "weight_only"

    @property
    def name(self) -> str:
        return "int8" if self.kernel == "weight_only" else "int8-dynamic"

    def apply(self, state, ctx):
        out = {}
        for k, v in state.items():
            if _is_quantizable(k, v):
                out[k], out[k + "_scale"] = quantize_per_channel(v)
            else:
                out[k] = v.float() if v.is_floating_point() else v
        ctx["dtype"] = "int8"
        ctx["int8_kernel"] = self.kernel
        return out


STEPS = {
    "none": Step,
    "fp16": lambda: CastStep("float16"),
    "bf16": lambda: CastStep("bfloat16"),
    "int8": lambda: Int8Step("weight_only"),
    "int8-dynamic": lambda: Int8Step("dynamic"),
}


def parse_recipe(recipe: str) -> list[Step]:
    names = [n.strip() for n in recipe.split(",") if n.strip()]
    if not names:
        raise RecipeError("empty recipe")
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise RecipeError(f"unknown recipe step(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    steps = [STEPS[n]() for n in names]
    quant = [s for s in steps if isinstance(s, (CastStep, Int8Step))]
    if len(quant) > 1:
        raise RecipeError("a recipe can hold only one precision step (fp16, bf16, int8 or int8-dynamic)")
    return steps
