"""Depth pruning (Shortened LLaMA, Kim et al. 2024): remove whole transformer blocks.

`depth(n=4, metric=ppl, protect_first=4, protect_last=2)` scores every unprotected block
on calibration text and removes the n least important, producing a genuinely smaller
model: fewer layers, `num_hidden_layers` updated, the kept blocks' tensors renumbered.

Importance of block i (lower = removed first):
  magnitude  sum |W| over the block's weight matrices (the paper's L1 criterion)
  taylor     sum |W * dL/dW| over the block's weights, L = calibration cross-entropy
             (first-order estimate of the loss change from zeroing the block)
  ppl        calibration perplexity with block i skipped (its residual contribution
             removed, as after pruning), one forward pass per candidate; the paper's best
             criterion for zero-shot quality and the default here

Gemma-3 interleaves sliding-window and global layers with different RoPE bases: the config
gets an explicit `layer_types` listing each kept block's own type, so every block keeps the
attention its weights were trained with (the 5:1 pattern is then no longer regular, which
transformers and this repo's engine both take from `layer_types`). Runs on int8 or low-rank
states too: scoring uses a dequantized copy, and pruning only renames tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from engine import naming
from engine.config import ModelArgs
from engine.loader import build_model
from engine.quant import dequantize_state

from .calibration import calibration_loss, step_calibration_ids
from .step import RecipeError, Step

METRICS = ("ppl", "taylor", "magnitude")


class _SkipBlock(nn.Module):
    """Stands in for a block: passes the residual stream through unchanged."""

    def forward(self, x, cos, sin, mask, cache):
        return x


def layer_types_of(config: dict) -> list[str] | None:
    """Per-layer attention types for Gemma-3 configs (explicit or from the pattern), else None."""
    if config.get("model_type") not in ("gemma3_text", "gemma3"):
        return None
    n = config["num_hidden_layers"]
    return list(config.get("layer_types") or [
        "full_attention" if (i + 1) % config.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(n)])


def block_scores(state: dict[str, torch.Tensor], config: dict, candidates: list[int], metric: str,
                 batches: torch.Tensor | None) -> dict[int, float]:
    """Importance per candidate block (ppl also returns the unpruned perplexity under key -1)."""
    if metric == "magnitude":
        float_state = dequantize_state(state)
        scores = {i: 0.0 for i in candidates}
        for k, v in float_state.items():
            at = naming.split_layer(k)
            if at and at[0] in scores and v.dim() == 2:
                scores[at[0]] += v.float().abs().sum().item()
        return scores
    model = build_model(ModelArgs.from_hf_config(config), dequantize_state(state), max_len=batches.shape[1] + 1)
    model.float()
    if metric == "ppl":
        scores = {}
        with torch.inference_mode():
            scores[-1] = math.exp(calibration_loss(model, batches).item())  # the unpruned model, for reference
            for i in candidates:
                block, model.layers[i] = model.layers[i], _SkipBlock()
                scores[i] = math.exp(calibration_loss(model, batches).item())
                model.layers[i] = block
        return scores
    # taylor: gradients of the calibration loss w.r.t. every block weight
    for p in model.parameters():
        p.requires_grad_(True)
    for s in range(0, batches.shape[0], 4):
        (calibration_loss(model, batches[s:s + 4]) * min(4, batches.shape[0] - s) / batches.shape[0]).backward()
    scores = {}
    for i in candidates:
        scores[i] = sum((p * p.grad).abs().sum().item() for p in model.layers[i].parameters() if p.grad is not None)
    return scores


def remove_blocks(state: dict[str, torch.Tensor], config: dict, remove: set[int]) -> tuple[dict, dict]:
    """New (state, config) without the given blocks, the rest renumbered in order."""
    n = config["num_hidden_layers"]
    keep = [i for i in range(n) if i not in remove]
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for k, v in state.items():
        at = naming.split_layer(k)
        if at is None:
            out[k] = v
        elif at[0] in new_index:
            out[naming.layer_prefix(new_index[at[0]]) + at[1]] = v
    config = dict(config)
    types = layer_types_of(config)
    config["num_hidden_layers"] = len(keep)
    if types is not None:
        config["layer_types"] = [types[i] for i in keep]
    if config.get("chai_representatives"):  # CHAI clusters belong to their blocks
        config["chai_representatives"] = [config["chai_representatives"][i] for i in keep]
    if "max_window_layers" in config:  # Qwen2/3: the first N layers use full attention
        config["max_window_layers"] = sum(1 for i in keep if i < config["max_window_layers"])
    return out, config


@dataclass
class DepthPruneStep(Step):
    n: int = 4  # blocks removed
    metric: str = "ppl"  # ppl, taylor or magnitude
    protect_first: int = 4  # never remove the first blocks ...
    protect_last: int = 2  # ... or the last ones (both matter most in the paper's analysis)
    calib_samples: int = 8
    calib_seq_len: int = 256
    stats: dict = field(default_factory=dict, repr=False)

    name = "depth"

    def apply(self, state, ctx):
        if self.metric not in METRICS:
            raise RecipeError(f"depth: metric must be one of {', '.join(METRICS)}")
        config = ctx["config"]
        total = config["num_hidden_layers"]
        candidates = list(range(self.protect_first, total - self.protect_last))
        if self.n < 1 or self.n > len(candidates):
            raise RecipeError(f"depth: n={self.n} but only {len(candidates)} of {total} blocks are unprotected "
                              f"(protect_first={self.protect_first}, protect_last={self.protect_last})")
        batches = None if self.metric == "magnitude" else \
            torch.tensor(step_calibration_ids(ctx, self.calib_samples, self.calib_seq_len))
        scores = block_scores(state, config, candidates, self.metric, batches)
        baseline = scores.pop(-1, None)
        # every metric is "higher = more important" (for ppl: the model does worse without it)
        remove = set(sorted(candidates, key=lambda i: scores[i])[:self.n])
        state, new_config = remove_blocks(state, config, remove)
        ctx["config"].clear()
        ctx["config"].update(new_config)
        self.stats = {"removed": sorted(remove), "layers_before": total, "layers_after": total - len(remove),
                      "scores": {str(i): round(s, 6) for i, s in scores.items()},
                      **({"calibration_ppl_before": round(baseline, 6)} if baseline is not None else {})}
        return state
