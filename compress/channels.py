"""Structured MLP channel pruning: remove whole intermediate channels, giving smaller dense layers.

Channel j of a gated MLP is row j of gate_proj and up_proj and column j of down_proj. Its
contribution to the block output is down[:, j] * h_j with h = act(gate x) * up x, so its
calibration importance is ‖down[:, j]‖ * sqrt(Σ h_j²) (the diagonal of the Gram matrix of
down_proj's input, from compress.calibration). The same fraction is removed in every layer
so `intermediate_size` stays one number and the artifact remains loadable by transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine import naming

from .calibration import calibration_stat
from .select import select_weights
from .step import RecipeError, Step


@dataclass
class ChannelPruneStep(Step):
    ratio: float = 0.25  # fraction of MLP channels removed in every layer
    multiple_of: int = 16  # kept channel count rounded to this (int8 kernels want K % 16 == 0)
    calib_samples: int = 16
    calib_seq_len: int = 256
    stats: dict = field(default_factory=dict, repr=False)

    name = "channels"

    def apply(self, state, ctx):
        if not 0 < self.ratio < 1:
            raise RecipeError("channels: ratio must be in (0, 1)")
        if any(naming.is_lowrank(k) for k in state):
            raise RecipeError("channels: run it before svd (it slices dense MLP matrices)")
        downs = select_weights(state, "down_proj", "all")
        grams = calibration_stat(state, ctx, downs, self.calib_samples, self.calib_seq_len)
        hidden = state[downs[0]].shape[1]
        keep_n = max(self.multiple_of, int(round(hidden * (1 - self.ratio) / self.multiple_of)) * self.multiple_of)
        state = dict(state)
        for down in downs:
            prefix = down[: -len("down_proj.weight")]
            down_scale = naming.scale_name(down)
            w_down = state[down].float() * (state[down_scale][:, None] if down_scale in state else 1)
            importance = w_down.norm(dim=0) * grams[down].diagonal().clamp(min=0).sqrt()
            keep = importance.topk(keep_n).indices.sort().values  # keep channel order
            for proj in ("gate_proj", "up_proj"):  # rows
                name = naming.weight_of(prefix + proj)
                scale = naming.scale_name(name)
                for key in (name, scale, naming.bias_of(name)):  # int8 scales and biases follow their rows
                    if key in state:
                        state[key] = state[key][keep].contiguous()
            state[down] = state[down][:, keep].contiguous()  # columns; row scales unchanged
        ctx["config"]["intermediate_size"] = keep_n
        self.stats = {"intermediate_size_before": hidden, "intermediate_size_after": keep_n,
                      "layers": len(downs)}
        return state
