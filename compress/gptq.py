"""GPTQ weight quantization (Frantar et al. 2023), implemented here for the CPU.

`gptq(bits=4, group_size=128, desc_act=false, sym=true, damp=0.01)` quantizes every
projection of every block to `bits`-bit integers with one scale/zero point per group of
`group_size` input columns, column by column, each column's rounding error spread onto
the columns not yet quantized through the inverse Hessian H = 2XᵀX/N (+ damp · mean diag)
of the projection's calibration inputs: Cholesky of H⁻¹, lazy batch updates in blocks of
128 columns, optional act-order (desc_act: columns in decreasing diag(H)).

Calibration is sequential, as in GPTQModel: block by block on the already-quantized model,
and inside a block one projection group at a time (q/k/v, o, gate/up, down: "true
sequential"), each seeing the inputs the quantized projections before it produce.

Why not gptqmodel: GPTQModel 7.7 requires torch >= 2.14.1, while this project pins the CPU
wheel 2.13.0 (the newest torch here); the artifact is written in GPTQModel's own "gptq"
checkpoint format (gptq_format.py) with the `quantization_config` transformers reads, so
transformers + optimum + gptqmodel load it, and this repo's engine serves it with torch's
CPU int4 kernel. Embedding, norms (and an untied LM head) stay in `dtype`, as GPTQModel
leaves them, or int8 with `embed=int8` (smaller, but then only this engine serves it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from engine import naming
from engine.config import ModelArgs
from engine.gptq_format import pack_gptq
from engine.loader import FUSED_PROJECTIONS, build_model
from engine.quant import quantize_per_channel

from .calibration import check_calib, step_calibration_ids
from .step import RecipeError, Step
from .wanda import pruned_mask


def _group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for the columns w (out, g), GPTQ's min/max quantizer.
    Scales are rounded to fp16 first: the stored format keeps fp16 scales, and the error
    feedback must see exactly the values that will be served."""
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).half().float()
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: int = 128, desc_act: bool = False,
                  sym: bool = True, damp: float = 0.01, block: int = 128, keep: torch.Tensor | None = None) -> dict:
    """Quantize w (out, in) given the Hessian h (in, in). Returns codes (out, in), zeros and
    scales (groups, out), g_idx (in,), the dequantized weight and the GPTQ loss Σ(w-q)²/d²/2.

    keep (out, in) bool: a sparsity mask to preserve (WANDA's N:M zeros); the error feedback
    only lands on kept weights, and a weight held at 0 quantizes to exactly 0 (its code is
    the zero point), as SparseGPT keeps its mask through quantization."""
    w, h = w.clone().float(), h.clone().float()
    keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.clone()
    out_f, n = w.shape
    maxq = 2**bits - 1
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if desc_act else torch.arange(n)
    w, h, keep = w[:, perm], h[perm][:, perm], keep[:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    gs = group_size if group_size > 0 else n
    codes = torch.zeros(out_f, n, dtype=torch.int64)
    deq = torch.zeros_like(w)
    scales, zeros = [], []
    loss = torch.zeros((), dtype=torch.float64)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # a new group: parameters from its columns as they stand now
                scale, zero = _group_params(torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :gs], bits, sym)
                scales.append(scale)
                zeros.append(zero)
            x, d = w1[:, i], hinv1[i, i]
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            dq = scale * (q - zero)
            codes[:, col], deq[:, col] = q.long(), dq
            loss += ((x - dq) ** 2).sum().double() / d.double() ** 2 / 2
            e = (x - dq) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i + 1:] *= keep[:, col + 1:i2]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        w[:, i2:] *= keep[:, i2:]
    inv = torch.argsort(perm)
    g_idx = (torch.arange(n) // gs)[inv]
    return {"codes": codes[:, inv], "zeros": torch.stack(zeros), "scales": torch.stack(scales), "g_idx": g_idx,
            "weight": deq[:, inv], "loss": float(loss)}


@dataclass
class GPTQStep(Step):
    bits: int = 4  # 2, 4 or 8 (the engine's int4 kernel serves 4; other widths are dequantized at load)
    group_size: int = 128  # input columns per scale/zero; -1 = one group per row
    desc_act: bool = False  # act-order: quantize columns in decreasing Hessian diagonal
    sym: bool = True  # symmetric (zero point fixed at 2^(bits-1)) as GPTQModel's default
    damp: float = 0.01  # Hessian dampening, fraction of its mean diagonal
    calib_samples: int = 32
    calib_seq_len: int = 256
    calib: str = "text"  # calibration data: text (pydoc), svamp-train (the task's chat examples), or a+b
    dtype: str = "bfloat16"  # storage of the unquantized tensors (embedding, norms): bfloat16 or float16
    embed: str = "keep"  # "keep" (in `dtype`, HF-loadable) or "int8" (engine only, smaller)
    keep_mask: bool = True  # a pruned (>10% zeros) matrix keeps its zeros through quantization
    stats: dict = field(default_factory=dict, repr=False)

    name = "gptq"

    def _check(self, state):
        if self.bits not in (2, 4, 8):
            raise RecipeError("gptq: bits must be 2, 4 or 8")
        if self.group_size != -1 and (self.group_size < 8 or self.group_size % 8):
            raise RecipeError("gptq: group_size must be -1 or a positive multiple of 8")
        if self.dtype not in ("bfloat16", "float16"):
            raise RecipeError("gptq: dtype must be bfloat16 or float16")
        if self.embed not in ("keep", "int8"):
            raise RecipeError("gptq: embed must be keep or int8")
        if not 0 <= self.damp < 1:
            raise RecipeError("gptq: damp must be in [0, 1)")
        check_calib("gptq", self.calib)
        if any(naming.is_scale(k) or naming.is_gptq_weight(k) or naming.is_lowrank(k) for k in state):
            raise RecipeError("gptq quantizes float weights: put it after pruning/LoRA and instead of int8/svd")

    @torch.inference_mode()
    def apply(self, state, ctx):
        self._check(state)
        config = ctx["config"]
        args = ModelArgs.from_hf_config(config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        ids = torch.tensor(step_calibration_ids(ctx, self.calib_samples, self.calib_seq_len, self.calib))
        model = build_model(args, state, max_len=ids.shape[1] + 1)
        x = model.embed(ids).float()
        per_layer = model.layer_inputs(0, ids.shape[1], ids.device)
        reference, losses = {}, {}
        zeros_after = total = 0
        for layer, (block, (cos, sin, mask)) in enumerate(tqdm(list(zip(model.layers, per_layer)), desc="gptq",
                                                                disable=not ctx.get("progress", True))):
            for path, projs in FUSED_PROJECTIONS.items():
                module = block.get_submodule(path)
                gram: list[torch.Tensor] = []

                def hook(mod, inputs, output):
                    xi = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                    gram.append(xi.T @ xi)
                handle = module.register_forward_hook(hook)
                block(x, cos, sin, mask, None)  # inputs of `path` given the quantized projections before it
                handle.remove()
                h = (2 * sum(gram) / (ids.numel())).float()
                parts = []
                for p in projs:
                    weight = naming.layer_weight(layer, p)
                    name = naming.module_of(weight)
                    w = state.pop(weight)
                    reference[weight] = w
                    keep = pruned_mask(w) if self.keep_mask else None
                    r = gptq_quantize(w, h, self.bits, self.group_size, self.desc_act, self.sym, self.damp, keep=keep)
                    zeros_after += int((r["weight"] == 0).sum())
                    total += w.numel()
                    for part, t in pack_gptq(r["codes"], r["zeros"], r["scales"], r["g_idx"], self.bits).items():
                        state[naming.gptq_name(name, part)] = t
                    losses[f"{name}"] = r["loss"]
                    parts.append(r["weight"])
                module.weight.copy_(torch.cat(parts, dim=0))
            x = block(x, cos, sin, mask, None)  # the quantized block's outputs feed the next one
        ragged = sorted({t.numel() for k, t in state.items() if naming.is_gptq_part(k, "g_idx")
                         if self.group_size > 0 and t.numel() % self.group_size})
        if ragged:  # this engine serves them; GPTQModel's kernels refuse them (checked with 7.7)
            ctx["hf_blocker"] = (f"GPTQModel kernels need in_features divisible by group_size {self.group_size}; "
                                 f"this model has in_features {ragged}")
        state = self._store_rest(state, args, ctx)
        ctx["pre_quant"] = reference  # float weights before quantization, for eora
        ctx["dtype"], ctx["float_dtype"] = "int4" if self.bits == 4 else f"int{self.bits}", self.dtype
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
            "sym": self.sym, "damp_percent": self.damp, "true_sequential": True, "static_groups": False,
            "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": False,
            "meta": {"quantizer": ["hybrid-llm compress.gptq (CPU)"]}}
        self.stats = {"quantized_matrices": len(losses), "gptq_loss_total": round(sum(losses.values()), 4),
                      "sparsity": round(zeros_after / max(total, 1), 4),
                      "worst": sorted(((round(v, 4), k) for k, v in losses.items()), reverse=True)[:3]}
        return state

    def _store_rest(self, state, args, ctx):
        """Unquantized tensors in `dtype`; with embed=int8 the embedding (and untied head) as int8 rows."""
        target = getattr(torch, self.dtype)
        out = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
        if self.embed == "int8":
            for k in (naming.EMBED, naming.LM_HEAD):
                if k in state:
                    out[k], out[naming.scale_name(k)] = quantize_per_channel(state[k])
            ctx["int8_kernel"] = "weight_only"
        return out
