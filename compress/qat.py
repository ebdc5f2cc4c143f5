"""Quantization-aware training: a short fine-tune with fake-quantized projections.

Every projection computes with per-output-channel int8 weights and (act_bits > 0) per-token
symmetric int8 inputs, exactly the rounding the `int8-dynamic` kernel applies, with
straight-through gradients (round() passes the gradient as identity). Training is
next-token cross-entropy on the calibration split (never the eval split), AdamW on the
projection weights only (norms and the tied embedding stay frozen). The result is a float
checkpoint meant to be followed by `int8` or `int8-dynamic`:
`--recipe "qat(steps=50),int8-dynamic"`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from engine import naming
from engine.loader import FUSED_PROJECTIONS, Biased

from .step import RecipeError, Step


def fake_quant_rows(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 round trip with a straight-through gradient."""
    scale = (w.detach().abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8)
    q = torch.clamp(torch.round(w / scale), -127, 127) * scale
    return w + (q - w).detach()


class FakeQuantLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, act_bits: int, weight_bits: int = 8):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.act_bits, self.weight_bits = act_bits, weight_bits

    def forward(self, x):
        if self.act_bits:
            x = fake_quant_rows(x)  # one scale per token, as the dynamic kernel does at decode
        return F.linear(x, fake_quant_rows(self.weight) if self.weight_bits else self.weight)


@dataclass
class QATStep(Step):
    steps: int = 50  # optimizer steps
    lr: float = 1e-5
    batch: int = 2  # sequences per step
    seq_len: int = 256
    act_bits: int = 8  # 8: fake-quantize inputs too (W8A8 target); 0: weights only (W8A16 target)
    weight_bits: int = 8  # 0 disables weight fake-quant: with act_bits=0 a plain fine-tune (the control run)
    seed: int = 0
    stats: dict = field(default_factory=dict, repr=False)

    name = "qat"

    def apply(self, state, ctx):
        if any(k.endswith((naming.SCALE, naming.LR_A)) for k in state):
            raise RecipeError("qat needs dense float weights: put it before int8/int8-dynamic/svd")
        if self.act_bits not in (0, 8) or self.weight_bits not in (0, 8):
            raise RecipeError("qat: act_bits and weight_bits must be 0 or 8")
        from engine.config import ModelArgs
        from engine.loader import build_model

        from .calibration import training_windows

        torch.manual_seed(self.seed)
        args = ModelArgs.from_hf_config(ctx["config"])
        model = build_model(args, {k: v.float() for k, v in state.items()}, max_len=self.seq_len + 1)
        params = []
        for block in model.layers:
            for path in FUSED_PROJECTIONS:
                parent, attr = path.split(".")
                owner = getattr(block, parent)
                mod = getattr(owner, attr)
                fq = FakeQuantLinear(mod.weight, self.act_bits, self.weight_bits)
                if isinstance(mod, Biased):  # the bias stays, beside the fake-quantized matmul
                    mod.base = fq
                else:
                    setattr(owner, attr, fq)
                params.append(fq.weight)
        seqs = training_windows(ctx, self.steps * self.batch, self.seq_len)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        model.train()
        losses, t0 = [], time.perf_counter()
        for step in tqdm(range(self.steps), desc="qat", disable=not ctx.get("progress", True)):
            x = torch.tensor([seqs[(step * self.batch + i) % len(seqs)] for i in range(self.batch)])
            # cosine decay: small, stable updates that stay near the pretrained weights
            for g in opt.param_groups:
                g["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
            logits = model(x)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        state = dict(state)
        for i, block in enumerate(model.layers):
            for path, names in FUSED_PROJECTIONS.items():
                parent, attr = path.split(".")
                w = getattr(getattr(block, parent), attr).weight.detach()
                sizes = [state[naming.layer_weight(i, n)].shape[0] for n in names]
                for n, part in zip(names, w.split(sizes, dim=0)):
                    key = naming.layer_weight(i, n)
                    state[key] = part.to(state[key].dtype).contiguous()
        k = max(1, len(losses) // 5)
        self.stats = {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                      "seconds": time.perf_counter() - t0, "tokens": self.steps * self.batch * self.seq_len}
        return state
