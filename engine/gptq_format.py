"""GPTQ checkpoint format (the one GPTQModel, AutoGPTQ and transformers read) and its CPU runtime.

Per quantized projection `<module>` (e.g. `model.layers.3.mlp.up_proj`), HF names:
  qweight  int32 (in * bits / 32, out)   `bits`-wide codes packed along the input dim, low bits first
  qzeros   int32 (groups, out * bits / 32)  zero points packed along the output dim, stored minus 1
                                          (the "gptq" v1 checkpoint_format; GPTQModel adds the 1 back)
  scales   fp16  (groups, out)
  g_idx    int32 (in,)                    group of each input column (act-order permutes it)
and w[o, i] = scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o]). Names come from naming.py.

At run time 4-bit weights use torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, the
one gpt-fast/torchao use), whose contract is w = (q - 8) * scale + zero per group with bf16
activations; GPTQ's zero point maps onto it exactly as zero = (8 - z) * scale. Other bit
widths, or group layouts the kernel cannot take, are dequantized to dense float at load.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import naming

SUFFIXES = naming.GPTQ_PARTS  # the four tensors of a module, in the order pack_gptq returns them
KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel accepts


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (R, C) ints in [0, 2^bits) -> int32 (R * bits / 32, C), packed along dim 0."""
    per = 32 // bits
    r, c = codes.shape
    if r % per:
        raise ValueError(f"{r} rows are not a multiple of {per} ({bits}-bit packing)")
    x = codes.to(torch.int64).reshape(r // per, per, c)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, 1)
    packed = (x << shifts).sum(1)  # no overlaps: a sum is an OR
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 (R / per, C) -> int64 codes (R, C)."""
    per = 32 // bits
    x = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, 1)
    codes = (x.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1, packed.shape[1])


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
              bits: int) -> dict[str, torch.Tensor]:
    """codes (out, in) ints, zeros/scales (groups, out), g_idx (in,) -> the four GPTQ tensors."""
    return {
        "qweight": pack_rows(codes.t().contiguous(), bits),
        "qzeros": _pack_cols((zeros.to(torch.int64) - 1) & (2**bits - 1), bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def _pack_cols(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(G, C) -> int32 (G, C * bits / 32), packed along dim 1 (qzeros' layout)."""
    return pack_rows(x.t().contiguous(), bits).t().contiguous()


def unpack_gptq(t: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """GPTQ tensors -> (codes (out, in), zeros (groups, out) with the v1 +1 restored, scales fp32, g_idx)."""
    codes = unpack_rows(t["qweight"], bits).t()
    zeros = (unpack_rows(t["qzeros"].t().contiguous(), bits).t() + 1) & (2**bits - 1)
    return codes, zeros, t["scales"].float(), t["g_idx"].long()


def dequantize_gptq(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Dense fp32 weight (out, in)."""
    codes, zeros, scales, g = unpack_gptq(t, bits)
    return (codes.float() - zeros[g].t().float()) * scales[g].t()


def gptq_modules(state: dict) -> list[str]:
    """Module names (without suffix) stored in GPTQ form."""
    return sorted(naming.gptq_module(k) for k in state if naming.is_gptq_weight(k))


def module_tensors(state: dict, module: str) -> dict[str, torch.Tensor]:
    return {s: state[naming.gptq_name(module, s)] for s in SUFFIXES}


def bits_of(t: dict[str, torch.Tensor]) -> int:
    """Bit width from the shapes: qweight packs in * bits / 32 rows, g_idx has `in` entries."""
    return t["qweight"].shape[0] * 32 // t["g_idx"].numel()


def dequantize_gptq_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPTQ modules replaced by dense fp32 `<module>.weight`; everything else as it was."""
    mods = gptq_modules(state)
    if not mods:
        return state
    out = {k: v for k, v in state.items() if not any(k == naming.gptq_name(m, s) for m in mods for s in SUFFIXES)}
    for m in mods:
        t = module_tensors(state, m)
        out[naming.weight_of(m)] = dequantize_gptq(t, bits_of(t))
    return out


class Int4Linear(nn.Module):
    """4-bit GPTQ weights on torch's CPU int4 kernel. Act-order checkpoints (g_idx not
    sorted) have their input columns permuted once at load so groups are contiguous; the
    input is gathered with the same permutation per call."""

    def __init__(self, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor):
        super().__init__()
        out_f, in_f = codes.shape
        self.out_features = out_f
        perm = torch.argsort(g_idx, stable=True)
        self.perm = None if torch.equal(perm, torch.arange(in_f)) else perm
        if self.perm is not None:
            codes, g_idx = codes[:, perm], g_idx[perm]
        gs = kernel_group_size(g_idx)
        if gs is None:
            raise ValueError("group layout not supported by the int4 kernel")
        # Scales/zeros per kernel group (a GPTQ group of 128 over K=576 ends in a half group:
        # the kernel then runs at group 64 with each GPTQ group's values repeated).
        first = g_idx[::gs]
        s = scales[first]  # (K / gs, out)
        zero = (8 - zeros[first].float()) * s
        self.group_size = gs
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).contiguous(), 1))
        self.register_buffer("scales_zeros", torch.stack([s, zero], dim=-1).to(torch.bfloat16).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                        self.scales_zeros)
        return y.view(*shape[:-1], self.out_features)


def kernel_group_size(g_idx: torch.Tensor) -> int | None:
    """Largest kernel group size such that each kernel group lies inside one GPTQ group
    (g_idx sorted), and the input width is a multiple of it; None if there is none."""
    k = g_idx.numel()
    for gs in KERNEL_GROUPS:
        if k % gs == 0 and bool((g_idx.reshape(-1, gs) == g_idx.reshape(-1, gs)[:, :1]).all()):
            return gs
    return None


def gptq_linear(parts: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> nn.Module:
    """One engine module for one or more GPTQ projections sharing an input (fused by rows)."""
    bits = bits_of(parts[0])
    unpacked = [unpack_gptq(p, bits) for p in parts]
    same_g = all(torch.equal(u[3], unpacked[0][3]) for u in unpacked)
    if bits == 4 and same_g and all(bits_of(p) == 4 for p in parts) and parts[0]["qweight"].device.type == "cpu":
        codes = torch.cat([u[0] for u in unpacked], dim=0)
        zeros = torch.cat([u[1] for u in unpacked], dim=1)
        scales = torch.cat([u[2] for u in unpacked], dim=1)
        try:
            return Int4Linear(codes, zeros, scales, unpacked[0][3])
        except ValueError:
            pass  # fall through to dense
    w = torch.cat([dequantize_gptq(p, bits_of(p)) for p in parts], dim=0)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    return lin
