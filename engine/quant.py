"""INT8 weight formats the engine can run.

Storage: symmetric per-output-channel int8 (`name` int8 + `name_scale` fp32, w ≈ q * scale).
Two runtimes over the same stored weights, chosen at load time:
- "weight_only" (W8A16): bf16 activations, int8 weights (`torch._weight_int8pack_mm`).
- "dynamic" (W8A8): FBGEMM's dynamic-quantized linear (`quantized::linear_dynamic`).
- "static" (W8A8): input scale fixed by calibration (`<name>_act_scale`), `torch._int_mm`.
We call the FBGEMM op directly rather than torch.ao's deprecated eager workflow.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from . import hardware, naming, native


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (q int8 (out, in), scale fp32 (out,)), symmetric, per output row."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def dequantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An all-fp32 copy of a state dict: int8 tensors (`name` + `name_scale`) and GPTQ
    modules (`qweight`/`qzeros`/`scales`/`g_idx`) dequantized to `.weight`."""
    from .gptq_format import dequantize_gptq_state

    state = dequantize_gptq_state(state)
    return {k: (dequantize(v, state[naming.scale_name(k)]) if naming.scale_name(k) in state else v.float())
            for k, v in state.items() if not naming.is_scale(k)}


class Int8DynamicLinear(nn.Module):
    """W8A8: int8 weights, activations quantized per call (per tensor, i.e. per token at
    decode) by FBGEMM. Fastest int8 path on x86, but sensitive to activation outliers."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        out_f, in_f = q.shape
        self.in_features, self.out_features = in_f, out_f
        with warnings.catch_warnings():
            # torch announces the removal of quantized tensor types in a future release; the
            # pinned torch has them, and this is the only handle on FBGEMM's packed weights.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(out_f, dtype=torch.long), axis=0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        # reduce_range (7-bit activations) only exists to avoid int16 overflow in the
        # pre-VNNI AVX2 kernel; with VNNI the full 8-bit range is exact and measurably better.
        self.reduce_range = not {"avx512_vnni", "avx_vnni"} & set(hardware.cpu_flags())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self._packed, self.reduce_range)
        return y.view(*shape[:-1], self.out_features)


class Int8WeightOnlyLinear(nn.Module):
    """W8A16: int8 weights dequantized inside the kernel, bf16 activations. Near-lossless.
    The kernel is the engine's own (engine/native.py: each weight vector converted once for up
    to 8 rows, so a batched decode step costs little more than one row) where this CPU and
    toolchain allow, else `torch._weight_int8pack_mm` (the kernel gpt-fast uses for CPU int8)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features = q.shape[0]
        # The kernel segfaults for more than one row when K is not a multiple of 16 (seen
        # with rank-4 SVD factors): zero-pad K, which leaves the product unchanged.
        self.pad = -q.shape[1] % 16
        # clone: tensors from safetensors can sit at unaligned offsets of one shared buffer,
        # and this kernel's vector loads segfault on them (seen with a tiny 64x64 weight).
        self.register_buffer("q", torch.nn.functional.pad(q, (0, self.pad)).contiguous().clone())
        self.register_buffer("scale", scale.to(act_dtype))
        self.act_dtype = act_dtype
        self.mm = native.op() or torch._weight_int8pack_mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.act_dtype)
        if self.pad:
            x2 = torch.nn.functional.pad(x2, (0, self.pad))
        if x2.shape[0] == 1 and torch.compiler.is_compiling():
            y = _rows_times_int8(x2, self.q, self.scale)
        else:
            y = self.mm(x2, self.q, self.scale)
        return y.view(*shape[:-1], self.out_features)


def _rows_times_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ q (N, K)^T * scale as a broadcast product and sum, for inductor to compile
    into the batch-1 decode graph (engine/compiled.py).

    Why: one row's product is bound by reading the weights, and inductor turns this into one
    vectorized loop per output row that converts int8 as it streams it, fused with what
    surrounds it: SmolLM2's 210 layer projections (2 cores, compiled alone) took 5.9 ms against
    18.9 ms with `_weight_int8pack_mm`. With more rows it gains little or loses (4 / 8 / 16
    rows: 20.6 / 34 / 63 ms against 22.5 / 35 / 53 ms), and compiled for a varying row count
    inductor stored its broadcasts (1 ms a product): batched graphs keep the kernel.
    Accumulates in fp32 like the kernel; results agree with it but for an occasional last-bit
    difference (summation order)."""
    return ((x[:, None, :].float() * q[None]).sum(-1) * scale.float()).to(x.dtype)


class Int8StaticLinear(nn.Module):
    """W8A8 with a static per-tensor input scale fixed at calibration time: the input is
    rounded to int8 with that scale, multiplied on int8 x int8 -> int32 (`torch._int_mm`),
    and rescaled by act_scale * weight_scale per output channel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, act_scale: float):
        super().__init__()
        self.out_features = q.shape[0]
        self.register_buffer("q", q.contiguous().clone())  # clone: see Int8WeightOnlyLinear
        self.act_scale = float(act_scale)
        self.register_buffer("out_scale", scale.float() * self.act_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq = torch.clamp(torch.round(x.reshape(-1, shape[-1]).float() / self.act_scale), -127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.q.t()).float() * self.out_scale
        return y.view(*shape[:-1], self.out_features)


INT8_KERNELS = {"dynamic": Int8DynamicLinear, "weight_only": Int8WeightOnlyLinear, "static": Int8StaticLinear}


def int8_linear(q: torch.Tensor, scale: torch.Tensor, kernel: str = "weight_only",
                act_scale: float | None = None) -> nn.Module:
    if kernel not in INT8_KERNELS:
        raise ValueError(f"unknown int8 kernel {kernel!r}; choose from {sorted(INT8_KERNELS)}")
    if kernel == "static":
        if act_scale is None:
            raise ValueError("the static int8 kernel needs a calibrated activation scale")
        return Int8StaticLinear(q, scale, act_scale)
    return INT8_KERNELS[kernel](q, scale)


def quantize_linears(model: nn.Module, kernel: str = "weight_only") -> nn.Module:
    """Every nn.Linear of a loaded float model replaced, in place, by its int8 form (per-channel
    absmax scales): for checkpoints that are not artifacts, e.g. the memory model, whose
    decode is bound by reading its weights. A head tied to the embedding gets its own int8
    copy; the embedding stays float."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                q, scale = quantize_per_channel(child.weight.detach().float())
                setattr(parent, name, int8_linear(q, scale, kernel))
    return model


class Int8Embedding(nn.Module):
    """Embedding lookup from int8 rows: only the looked-up rows are dequantized."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].float() * self.scale[ids].unsqueeze(-1)
