"""SmoothQuant-style activation smoothing, calibrated (Xiao et al., 2023).

W8A8 quantizes activations per token, and a few input channels of LLM projections carry
outliers 10-100x larger than the rest, so most channels lose their precision. Smoothing
moves that range into the weights: for a group of projections sharing an input X,
s_j = max|X_j|^α / max|W_:,j|^(1-α); X/s is folded into the operation producing X and
W·s into the projections, leaving the float model's function unchanged:
  q/k/v   <- input_layernorm weight (RMSNorm gain, Gemma's (1 + w) form handled)
  gate/up <- the pre-MLP norm weight
  down    <- up_proj rows (h = act(gate x) * up x is linear in up's rows)
o_proj is left alone: with grouped-query attention one v channel feeds several o inputs.
Run it before int8-dynamic: `--recipe "smooth(alpha=0.5),int8-dynamic"`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine import naming

from .calibration import calibration_stat
from .select import select_weights
from .step import RecipeError, Step


@dataclass
class SmoothStep(Step):
    alpha: float = 0.5  # migration strength: 0 = all range stays in activations, 1 = all moves to weights
    calib_samples: int = 16
    calib_seq_len: int = 256
    stats: dict = field(default_factory=dict, repr=False)

    name = "smooth"

    def apply(self, state, ctx):
        if any(k.endswith((naming.SCALE, naming.LR_A)) for k in state):
            raise RecipeError("smooth needs dense float weights: put it before int8/int8-dynamic/svd")
        heads = select_weights(state, "q_proj+gate_proj+down_proj", "all")
        amax = calibration_stat(state, ctx, heads, self.calib_samples, self.calib_seq_len, "absmax")
        gemma = ctx["config"].get("model_type", "").startswith("gemma")
        offset = 1.0 if gemma else 0.0
        state = dict(state)
        ratios = []
        for head in heads:
            layer = naming.layer_prefix(naming.layer_index(head))
            proj = naming.projection_of(head)
            if proj == "q_proj":
                group = [layer + f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
                norm = layer + "input_layernorm.weight"
            elif proj == "gate_proj":
                group = [layer + f"mlp.{p}.weight" for p in ("gate_proj", "up_proj")]
                norm = layer + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")
            else:
                group, norm = [head], None
            w_max = torch.stack([state[n].float().abs().amax(dim=0) for n in group]).amax(dim=0)
            x_max = amax[head].float().clamp(min=1e-5)
            s = (x_max.pow(self.alpha) / w_max.clamp(min=1e-5).pow(1 - self.alpha)).clamp(min=1e-5)
            for n in group:
                state[n] = (state[n].float() * s).to(state[n].dtype)
            if norm is not None:
                g = state[norm].float() + offset
                state[norm] = (g / s - offset).to(state[norm].dtype)
            else:  # down_proj: divide the rows of up_proj that produce its input channels
                up = layer + "mlp.up_proj.weight"
                state[up] = (state[up].float() / s[:, None]).to(state[up].dtype)
            ratios.append(float((x_max.max() / x_max.median()).item()))
        self.stats = {"groups": len(heads), "input_outlier_ratio_median": sorted(ratios)[len(ratios) // 2]}
        return state
