"""Recipe steps: one uniform interface for every compression technique.

A step takes an HF-named state dict and returns a new one (gpt-fast's QuantHandler
idea: `apply` creates the compressed state dict; the engine's loader converts it for
runtime). Steps chain left to right, e.g. `--recipe bf16` or later
`--recipe prune,int8`. Each records its parameters in the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from engine.quant import quantize_per_channel


class RecipeError(ValueError):
    pass


@dataclass
class Step:
    name = "none"

    def apply(self, state: dict[str, torch.Tensor], ctx: dict) -> dict[str, torch.Tensor]:
        return state

    def record(self) -> dict:
        params = asdict(self)
        result = params.pop("stats", None)  # what a step measured while running (sparsity, ranks...)
        return {"name": self.name, "params": params, **({"result": result} if result is not None else {})}


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
    # Every 2-D weight: projections, MLP, embedding (which is also the tied LM head), and
    # SVD factors. Norm weights are 1-D and stay in float.
    # Adapters (`.lora_A.weight`/`.lora_B.weight`) stay in float: they are tiny and their
    # whole point is to carry what the quantized base lost.
    return (t.dim() == 2 and name.endswith((".weight", "_lr_a", "_lr_b")) and t.is_floating_point()
            and ".lora_" not in name)


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
        out = quantize_int8(state, ctx)
        ctx["int8_kernel"] = self.kernel
        return out


def quantize_int8(state: dict[str, torch.Tensor], ctx: dict, skip=lambda name: False) -> dict[str, torch.Tensor]:
    """Every quantizable weight not skipped -> int8 rows + `_scale`; other float tensors fp32.
    The float layer projections it rounds are left in ctx["pre_quant"] for an `eora` step."""
    out = {}
    ctx["pre_quant"] = {}
    for k, v in state.items():
        if _is_quantizable(k, v) and not skip(k):
            out[k], out[k + "_scale"] = quantize_per_channel(v)
            if k.startswith("model.layers.") and k.endswith(".weight"):
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

    def apply(self, state, ctx):
        from .calibration import calibration_stat
        from .prune import select_weights

        names = select_weights(state, "all", "all")
        amax = calibration_stat(state, ctx, names, self.calib_samples, self.calib_seq_len, "absmax")
        out = super().apply(state, ctx)
        for n in names:
            out[n + "_act_scale"] = (amax[n].max().float() / 127.0).clamp(min=1e-8).reshape(())
        return out


def _registry() -> dict:
    from .channels import ChannelPruneStep  # these import Step from here
    from .chai import ChaiQuantStep, ChaiStep
    from .depth import DepthPruneStep
    from .eora import EoRAStep
    from .gptq import GPTQStep
    from .lora import LoRAStep
    from .wanda import WandaStep
    from .prune import ConsensusPruneStep, SVDStep
    from .qat import QATStep
    from .smooth import SmoothStep

    return {
        "none": Step,
        "fp16": lambda **kw: CastStep("float16", **kw),
        "bf16": lambda **kw: CastStep("bfloat16", **kw),
        "int8": lambda **kw: Int8Step(kernel="weight_only", **kw),
        "int8-dynamic": lambda **kw: Int8Step(kernel="dynamic", **kw),
        "int8-static": Int8StaticStep,
        "prune": ConsensusPruneStep,
        "svd": SVDStep,
        "channels": ChannelPruneStep,
        "depth": DepthPruneStep,
        "wanda": WandaStep,
        "smooth": SmoothStep,
        "qat": QATStep,
        "lora": LoRAStep,
        "gptq": GPTQStep,
        "eora": EoRAStep,
        "chai": ChaiStep,
        "chai-quant": ChaiQuantStep,
    }


STEP_NAMES = ["none", "fp16", "bf16", "int8", "int8-dynamic", "int8-static", "prune", "svd", "channels", "depth", "wanda",
              "smooth", "qat", "lora", "gptq", "eora", "chai", "chai-quant"]


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses: 'prune(n_masks=200,layers=0-3),svd' -> 2 items."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            raise RecipeError(f"unbalanced parentheses in recipe {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise RecipeError(f"unbalanced parentheses in recipe {text!r}")
    return [p.strip() for p in parts + [cur] if p.strip()]


def _parse_bool(text: str) -> bool:
    # bool("false") is True: spell the accepted words out
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(text)


def _make(name: str, args: str, factory) -> Step:
    kwargs = {}
    probe = factory()
    types = {f.name: type(getattr(probe, f.name)) for f in fields(probe)}
    for item in _split_top(args):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types or key == "stats":
            raise RecipeError(f"step {name}: unknown parameter {key!r}; known: "
                              f"{', '.join(k for k in types if k != 'stats') or 'none'}")
        try:
            kwargs[key] = _parse_bool(value.strip()) if types[key] is bool else types[key](value.strip())
        except ValueError as e:
            raise RecipeError(f"step {name}: {key}={value.strip()!r} is not a valid {types[key].__name__}") from e
    return factory(**kwargs)


def parse_recipe(recipe: str) -> list[Step]:
    """'prune(n_masks=200,layers=0-3),svd(rank=8),int8' -> steps; lists inside a value use '+'."""
    items = _split_top(recipe)
    if not items:
        raise RecipeError("empty recipe")
    registry = _registry()
    steps = []
    for item in items:
        name, _, rest = item.partition("(")
        name = name.strip()
        if name not in registry:
            raise RecipeError(f"unknown recipe step(s) {name}; known: {', '.join(STEP_NAMES)}")
        if rest and not rest.endswith(")"):
            raise RecipeError(f"malformed step {item!r}")
        steps.append(_make(name, rest[:-1], registry[name]))
    from .chai import ChaiQuantStep
    from .gptq import GPTQStep

    quant = [s for s in steps if isinstance(s, (CastStep, Int8Step, GPTQStep, ChaiQuantStep))]
    if len(quant) > 1:
        raise RecipeError("a recipe can hold only one precision step (fp16, bf16, int8, int8-dynamic, int8-static, "
                          "gptq or chai-quant)")
    adapter_at = [i for i, s in enumerate(steps) if s.name == "eora" or (s.name == "lora" and not s.merge)]
    if adapter_at and any(not (isinstance(s, (CastStep, Int8Step)) and not isinstance(s, Int8StaticStep))
                          for s in steps[adapter_at[0] + 1:]):
        raise RecipeError("after a step that keeps an adapter (eora, lora(merge=false)) only fp16, bf16, int8 or "
                          "int8-dynamic may follow")
    if any(isinstance(s, Int8StaticStep) for s in steps[:-1]):
        raise RecipeError("int8-static must be the last step: its activation scales are calibrated on the final model")
    return steps
