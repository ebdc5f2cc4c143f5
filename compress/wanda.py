"""WANDA width pruning (Sun et al. 2023): prune weights by |W_ij| * ||X_j||_2.

`wanda(pattern=2:4)` keeps N of every M consecutive input weights of each output row
(NVIDIA's N:M convention: 2:4 keeps 2 of 4, 50% sparse; 12:16 keeps 12 of 16, 25%; 1:16
keeps 1 of 16, 94%); `wanda(ratio=0.5)` is unstructured, removing that fraction of each
output row (WANDA's per-output comparison group).

Calibration follows the paper: layer by layer, the block's inputs are the outputs of the
already-pruned blocks before it; hooks on the block's projections accumulate the squared
norm of every input channel, the block is pruned, then re-run to produce the next block's
inputs. q/k/v and gate/up read the same input, so they share its norms.

Storage: zeros are stored densely, so on CPU the artifact is no smaller and no faster;
sparsity pays only with compressed storage or sparse kernels (2:4 on Ampere+ GPUs via
torch semi-structured sparsity, not wired into this CPU engine). Run it before any int8
step (it prunes float weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine import naming
from engine.config import ModelArgs
from engine.loader import FUSED_PROJECTIONS, build_model

from .calibration import step_calibration_ids
from .step import RecipeError, Step


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask (out, in): the n highest scores in each group of m inputs."""
    out_f, in_f = score.shape
    if in_f % m:
        raise RecipeError(f"wanda: {in_f} input features are not a multiple of M={m}")
    groups = score.reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean keep-mask removing the `ratio` lowest scores of every output row."""
    k = int(score.shape[1] * ratio)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


def pruned_mask(w: torch.Tensor) -> torch.Tensor | None:
    """Keep-mask (w != 0) of a pruned matrix (over 10% exact zeros), None for a dense one: a
    few exact zeros in a dense matrix are not a pattern later steps should preserve."""
    zero = w == 0
    return ~zero if zero.float().mean().item() > 0.1 else None


def parse_pattern(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise RecipeError(f"wanda: pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise RecipeError(f"wanda: pattern {pattern!r} needs 0 < N < M")
    return n, m


@dataclass
class WandaStep(Step):
    pattern: str = ""  # N:M, e.g. 2:4; empty for unstructured
    ratio: float = 0.5  # unstructured: fraction of each row removed (ignored with a pattern)
    modules: str = "all"  # "all", "mlp" or "attn"
    score: str = "wanda"  # "wanda" (|W| * ||X_j||) or "magnitude" (|W| alone: the baseline WANDA improves on)
    calib_samples: int = 16
    calib_seq_len: int = 256
    stats: dict = field(default_factory=dict, repr=False)

    name = "wanda"

    def _mask(self, score: torch.Tensor) -> torch.Tensor:
        if self.pattern:
            return nm_mask(score, *parse_pattern(self.pattern))
        return row_mask(score, self.ratio)

    @torch.inference_mode()
    def apply(self, state, ctx):
        if self.pattern:
            parse_pattern(self.pattern)
        elif not 0 < self.ratio < 1:
            raise RecipeError("wanda: ratio must be in (0, 1)")
        if self.score not in ("wanda", "magnitude"):
            raise RecipeError("wanda: score must be wanda or magnitude")
        if self.modules not in ("all", "mlp", "attn"):
            raise RecipeError("wanda: modules must be all, mlp or attn")
        if any(naming.is_scale(k) or naming.is_lowrank(k) for k in state):
            raise RecipeError("wanda: run it before int8/svd steps (it prunes float weights)")
        config = ctx["config"]
        args = ModelArgs.from_hf_config(config)
        state = dict(state)
        ids = torch.tensor(step_calibration_ids(ctx, self.calib_samples, self.calib_seq_len))
        model = build_model(args, {k: v.float() for k, v in state.items()}, max_len=ids.shape[1] + 1)
        x = model.embed(ids).float()
        per_layer = model.layer_inputs(0, ids.shape[1], ids.device)
        paths = [p for p in FUSED_PROJECTIONS if self.modules == "all" or p.startswith(self.modules)]
        zeros = total = 0
        for layer, (block, (cos, sin, mask)) in enumerate(zip(model.layers, per_layer)):
            sq: dict[str, torch.Tensor] = {}
            hooks = []
            for path in paths:
                module = block.get_submodule(path)

                def hook(mod, inputs, output, path=path):
                    xi = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                    sq[path] = sq.get(path, 0) + (xi * xi).sum(0)
                hooks.append(module.register_forward_hook(hook))
            block(x, cos, sin, mask, None)  # statistics of this block's (already pruned-upstream) inputs
            for h in hooks:
                h.remove()
            for path in paths:
                norm = sq[path].sqrt().float() if self.score == "wanda" else torch.ones_like(sq[path]).float()
                names = [naming.layer_weight(layer, p) for p in FUSED_PROJECTIONS[path]]
                for name in names:
                    w = state[name]
                    keep = self._mask(w.float().abs() * norm[None, :])
                    state[name] = w * keep.to(w.dtype)
                    zeros += int((~keep).sum())
                    total += keep.numel()
                fused = torch.cat([state[n].float() for n in names], dim=0)
                block.get_submodule(path).weight.copy_(fused)
            x = block(x, cos, sin, mask, None)  # the pruned block's outputs feed the next block
        self.stats = {"sparsity": round(zeros / max(total, 1), 4), "pruned_weights": zeros,
                      "matrices_weights": total, "stored": "dense"}
        return state
