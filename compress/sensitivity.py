"""Per-layer sensitivity, for CHAI-Quant (which layers stay 16-bit) and CHAI-Target (which
layers are fine-tuned).

Metrics, all on the calibration split:
  perturb    calibration loss increase when only that layer's projections are rounded to
             int8 (per-output-channel, round to nearest): how much the layer resists
             quantization noise
  attention  mean |pre-softmax attention score| of the layer's heads (CHAI-KTQ's
             attention-magnitude signal: layers with sharp, large scores are treated as critical)
  clusters   number of CHAI clusters in the layer / heads (diverse heads = critical);
             needs a `chai` step before
"""

from __future__ import annotations

import torch

from engine.config import ModelArgs
from engine.loader import build_model
from engine.quant import dequantize, quantize_per_channel

from .calibration import calibration_loss, step_calibration_ids
from .step import RecipeError

METRICS = ("perturb", "attention", "clusters")


def _loss(model, ids: torch.Tensor) -> float:
    return calibration_loss(model, ids).item()


@torch.inference_mode()
def layer_sensitivity(state: dict, ctx: dict, metric: str, samples: int = 4, seq_len: int = 256) -> list[float]:
    """One score per layer, higher = more sensitive."""
    if metric not in METRICS:
        raise RecipeError(f"sensitivity metric must be one of {', '.join(METRICS)}")
    config = ctx["config"]
    args = ModelArgs.from_hf_config(config)
    if metric == "clusters":
        if not args.chai:
            raise RecipeError("sensitivity metric 'clusters' needs a chai step before")
        return [len(set(r)) / args.n_heads if r else 1.0 for r in args.chai]
    ids = torch.tensor(step_calibration_ids(ctx, samples, seq_len))
    model = build_model(args, {k: v.float() for k, v in state.items()}, max_len=ids.shape[1] + 1)
    if metric == "attention":
        x = model.embed(ids).float()
        scores = []
        for block, (cos, sin, mask) in zip(model.layers, model.layer_inputs(0, ids.shape[1], ids.device)):
            q, k, _ = block.attn.project(block.attn_norm(x), cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1) if block.attn.chai is None else \
                k[:, [block.attn.chai.k_groups.index(r // block.attn.chai.per) for r in block.attn.chai.reps]]
            s = (q @ k.transpose(-1, -2)) * block.attn.scale
            scores.append(s.masked_select(mask).abs().mean().item())
            x = block(x, cos, sin, mask, None)
        return scores
    base = _loss(model, ids)
    out = []
    for block in model.layers:
        saved = {}
        for name, mod in block.named_modules():
            if isinstance(mod, torch.nn.Linear):
                saved[name] = mod.weight.detach().clone()
                mod.weight.copy_(dequantize(*quantize_per_channel(mod.weight)))
        out.append(_loss(model, ids) - base)
        for name, w in saved.items():
            block.get_submodule(name).weight.copy_(w)
    return out


def select_layers(scores: list[float], fraction: float, band: str) -> list[int]:
    """Layer indices of the `band` ("high", "medium" or "low") `fraction` of layers by score."""
    if not 0 < fraction <= 1:
        raise RecipeError("fraction must be in (0, 1]")
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)  # most sensitive first
    n = max(1, round(fraction * len(scores)))
    start = {"high": 0, "medium": (len(order) - n) // 2, "low": len(order) - n}.get(band)
    if start is None:
        raise RecipeError("band must be high, medium or low")
    return sorted(order[start:start + n])
