"""Build an engine `Transformer` from Hugging Face-named weights (float, int8, low-rank).

HF checkpoints keep q/k/v and gate/up as separate matrices; the engine fuses them at
load time. Int8 tensors arrive as `<name>` (int8) + `<name>_scale` (fp32 per row);
low-rank factors as `<name>_lr_a` / `<name>_lr_b` (the SVD step), themselves float or int8;
GPTQ modules as `<module>.qweight/qzeros/scales/g_idx` (gptq_format.py). A projection may also
carry a low-rank adapter (LoRA kept unmerged, or EoRA): `<module>.lora_A.weight` (r, in) and
`<module>.lora_B.weight` (out, r) with the scaling folded into B, added to the base output.
The names are naming.py's contract; this module only reads them through it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import naming
from .adapters import AdapterBank, AdapterError, SwitchedAdapters, lora_delta
from .config import ModelArgs
from .gptq_format import gptq_linear, module_tensors
from .model import Transformer, rope_tables
from .quant import Int8Embedding, int8_linear

# Engine module of each layer -> the HF projections fused into it, in row order. The one
# place that knows the fusion; calibration, QAT and pruning derive their mappings from it.
FUSED_PROJECTIONS = {
    "attn.wqkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.wo": ["self_attn.o_proj"],
    "mlp.w13": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.w2": ["mlp.down_proj"],
}


def fused_module_of(hf_name: str) -> tuple[str, list[str]]:
    """'model.layers.3.mlp.up_proj.weight' -> ('layers.3.mlp.w13', [fused HF weight names])."""
    parts = hf_name.split(".")
    layer, proj = parts[2], ".".join(parts[3:5])
    for path, projs in FUSED_PROJECTIONS.items():
        if proj in projs:
            return f"layers.{layer}.{path}", [naming.layer_weight(layer, p) for p in projs]
    raise KeyError(f"{hf_name!r} is not a fused projection weight")


def _get(state: dict, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (tensor, scale or None); missing names raise a clear KeyError."""
    if name not in state:
        raise KeyError(f"weight {name!r} missing from checkpoint")
    return state[name], state.get(naming.scale_name(name))


def _kind(state: dict, name: str) -> str:
    if naming.lowrank_names(name)[0] in state:
        return "lowrank"
    if naming.gptq_name(naming.module_of(name), "qweight") in state:
        return "gptq"
    return "int8" if naming.scale_name(name) in state else "float"


class LowRank(nn.Module):
    """W ≈ B @ A stored as two linears (rank r): in -> r -> out."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.b(self.a(x))


class SparseLowRank(nn.Module):
    """W ≈ S + B @ A: the low-rank path plus a CSR sparse residual (sparse @ dense matmul)."""

    def __init__(self, lowrank: LowRank, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape):
        super().__init__()
        self.lowrank = lowrank
        # Invariants checked once at load: malformed indices would otherwise crash the kernel.
        self.register_buffer("s", torch.sparse_csr_tensor(crow.long(), col.long(), val.float(), size=shape,
                                                          check_invariants=True))

    def forward(self, x):
        y = self.lowrank(x)
        flat = x.reshape(-1, x.shape[-1]).float()
        sparse = (self.s @ flat.T).T.reshape(*x.shape[:-1], -1)
        return y + sparse.to(y.dtype)


class WithAdapter(nn.Module):
    """y = base(x) + B(A x): a low-rank adapter beside any base projection. For fused
    projections A stacks the parts' A rows and B is block-diagonal, so it stays two matmuls."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, dtype):
        super().__init__()
        self.base = base
        # fp32 on CPU: these skinny matmuls measured ~5x slower in bf16 (no fast small bf16 GEMM)
        dtype = torch.float32 if a.device.type == "cpu" else dtype
        self.register_buffer("a", a.to(dtype).contiguous())  # (r_total, in)
        self.register_buffer("b", b.to(dtype).contiguous())  # (out_total, r_total)

    def forward(self, x):
        y = self.base(x)
        return y + lora_delta(x, self.a, self.b).to(y.dtype)


def _factors(state: dict, names: list[str], adapter: dict | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A stacked (r_total, in), B block-diagonal (out_total, r_total)) of the adapter factors
    `adapter` (default: `state` itself) holds for the parts `names` of one fused projection of
    `state`; None if it holds none. A part without factors gets a rank-0 block. Factors that do
    not fit their part raise ValueError."""
    adapter = state if adapter is None else adapter
    pairs = [naming.adapter_names(naming.module_of(n)) for n in names]
    if not any(a in adapter for a, _ in pairs):
        return None
    a_parts, b_parts = [], []
    for (a, b), n in zip(pairs, names):
        out_f, in_f = _out_features(state, n), _in_features(state, n)
        if a in adapter:
            if adapter[a].shape[1] != in_f or adapter[b].shape != (out_f, adapter[a].shape[0]):
                raise AdapterError(f"adapter for {naming.module_of(n)}: A {tuple(adapter[a].shape)} and B "
                                 f"{tuple(adapter[b].shape)} do not fit its ({out_f}, {in_f}) weight")
            a_parts.append(adapter[a].float())
            b_parts.append(adapter[b].float())
        else:
            a_parts.append(torch.zeros(0, in_f))
            b_parts.append(torch.zeros(out_f, 0))
    return torch.cat(a_parts, dim=0), torch.block_diag(*b_parts)


def _adapter(state: dict, names: list[str], base: nn.Module, dtype) -> nn.Module:
    """Wrap `base` (the fused module of `names`) with the parts' adapters, if any."""
    factors = _factors(state, names)
    return base if factors is None else WithAdapter(base, *factors, dtype)


def _switched(state: dict, names: list[str], base: nn.Module, adapters: list[dict], bank: AdapterBank) -> nn.Module:
    """Wrap `base` with the per-request adapters (bank order) that touch it, if any."""
    factors = {k: f for k, adapter in enumerate(adapters) if (f := _factors(state, names, adapter)) is not None}
    return SwitchedAdapters(base, bank, factors) if factors else base


def _out_features(state: dict, name: str) -> int:
    if _kind(state, name) == "gptq":
        return state[naming.gptq_name(naming.module_of(name), "scales")].shape[1]
    if _kind(state, name) == "lowrank":
        return state[naming.lowrank_names(name)[1]].shape[0]
    return state[name].shape[0]


def _in_features(state: dict, name: str) -> int:
    if _kind(state, name) == "gptq":
        return state[naming.gptq_name(naming.module_of(name), "g_idx")].numel()
    if _kind(state, name) == "lowrank":
        return state[naming.lowrank_names(name)[0]].shape[1]
    return state[name].shape[1]


class Parallel(nn.Module):
    """Projections that cannot share one matmul (e.g. low-rank q next to dense k, v):
    run each and concatenate, matching the fused layout the model splits."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _dense(w: torch.Tensor, scale: torch.Tensor | None, dtype, kernel: str,
           act_scale: torch.Tensor | None = None) -> nn.Module:
    if scale is not None:
        if act_scale is not None:  # calibrated static W8A8, whatever kernel the caller prefers
            return int8_linear(w, scale, "static", float(act_scale))
        return int8_linear(w, scale, "dynamic" if kernel == "static" else kernel)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    return lin


def _linear(state: dict, name: str, dtype, kernel: str) -> nn.Module:
    """One projection: dense float, int8 (`name` + `name_scale`), or low-rank
    (`name_lr_a` (r, in) and `name_lr_b` (out, r), each float or int8)."""
    if _kind(state, name) == "gptq":
        return gptq_linear([module_tensors(state, naming.module_of(name))], dtype)
    if _kind(state, name) == "lowrank":
        a, b = naming.lowrank_names(name)
        lr = LowRank(_linear(state, a, dtype, kernel), _linear(state, b, dtype, kernel))
        crow, col, val = naming.sparse_names(name)
        if val not in state:
            return lr
        out_f = state[crow].numel() - 1
        in_f = state[a].shape[1]
        return SparseLowRank(lr, state[crow], state[col], state[val], (out_f, in_f))
    return _dense(*_get(state, name), dtype, kernel, state.get(naming.act_scale_name(name)))


def _projection(state: dict, names: list[str], dtype, kernel: str) -> nn.Module:
    """Fuse same-kind dense parts into one matmul (rows concatenated; int8 scales are per
    row, so they concatenate too); otherwise run the parts side by side. Adapters wrap the result."""
    return _adapter(state, names, _base_projection(state, names, dtype, kernel), dtype)


def _base_projection(state: dict, names: list[str], dtype, kernel: str) -> nn.Module:
    kinds = {_kind(state, n) for n in names}
    if kinds == {"gptq"}:
        return gptq_linear([module_tensors(state, naming.module_of(n)) for n in names], dtype)
    if len(names) == 1 or kinds == {"lowrank"} or len(kinds) > 1:
        parts = [_linear(state, n, dtype, kernel) for n in names]
        return parts[0] if len(parts) == 1 else Parallel(parts)
    ws, scales = zip(*(_get(state, n) for n in names))
    acts = [state.get(naming.act_scale_name(n)) for n in names]  # parts share one input, so one scale
    act = torch.stack(acts).max() if all(a is not None for a in acts) else None
    return _dense(torch.cat(ws, dim=0), None if kinds == {"float"} else torch.cat(scales, dim=0), dtype, kernel, act)


class Biased(nn.Module):
    """y = base(x) + bias: projection biases (Qwen2's q/k/v, Llama's attention_bias) beside
    any base kind (float, int8, int4, low-rank), in the output dtype."""

    def __init__(self, base: nn.Module, bias: torch.Tensor, dtype):
        super().__init__()
        self.base = base
        self.register_buffer("bias", bias.to(dtype))

    @property
    def weight(self) -> torch.Tensor:  # calibration steps read and write the base's weight through it
        return self.base.weight

    def forward(self, x):
        y = self.base(x)
        return y + self.bias.to(y.dtype)


def _with_bias(state: dict, names: list[str], module: nn.Module, dtype) -> nn.Module:
    """Wrap a fused projection with its parts' biases (zeros for parts without one), if any."""
    biases = [state.get(naming.bias_of(n)) for n in names]
    if all(b is None for b in biases):
        return module
    return Biased(module, torch.cat([b.float() if b is not None else torch.zeros(_out_features(state, n))
                                     for b, n in zip(biases, names)]), dtype)


def _set_param(module: nn.Module, w: torch.Tensor):
    module.weight = nn.Parameter(w.to(module.weight.dtype), requires_grad=False)


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                max_len: int | None = None, int8_kernel: str = "weight_only",
                adapters: dict[str, dict[str, torch.Tensor]] | None = None) -> Transformer:
    """state: HF-named tensors. dtype applies to float weights. Int8 weights stay int8 and
    fix the activation dtype to their kernel's contract: bf16 for "weight_only", fp32 for
    "dynamic". adapters: name -> LoRA factors (engine.adapters.read_peft_adapter) that a
    forward applies to the rows that name them (`model.adapter_bank`)."""
    adapters = adapters or {}
    for name, adapter in adapters.items():
        _check_covers(name, adapter, args.n_layers)
    any_int8 = any(naming.is_int8_scale(k) for k in state)
    any_int4 = any(naming.is_gptq_weight(k) for k in state)
    if any_int4 and (not any_int8 or int8_kernel == "weight_only"):
        compute = torch.bfloat16  # the CPU int4 kernel's activation dtype
    elif any_int8:
        # bf16 activations only for the weight-only kernel; W8A8 kernels take fp32 input
        static = any(naming.is_act_scale(k) for k in state)
        compute = torch.bfloat16 if int8_kernel == "weight_only" and not static else torch.float32
    else:
        compute = dtype
    # Build on the meta device so no memory is spent on random init, then materialise.
    with torch.device("meta"):
        model = Transformer(args, max_len=max_len)
    model = model.to_empty(device="cpu").to(compute)
    model.adapter_bank.names = list(adapters)
    for name, buf in rope_buffers(args, model.max_len).items():
        setattr(model, name, buf)  # fp32 tables, cast per forward like HF does
    for i, block in enumerate(model.layers):
        for path, projs in FUSED_PROJECTIONS.items():
            parent, attr = path.split(".")
            names = [naming.layer_weight(i, p) for p in projs]
            module = _projection(state, names, compute, int8_kernel)
            module = _switched(state, names, module, list(adapters.values()), model.adapter_bank)
            setattr(getattr(block, parent), attr, _with_bias(state, names, module, compute))
        p = naming.layer_prefix(i)
        a = p + "self_attn."
        _set_param(block.attn_norm, state[p + "input_layernorm.weight"])
        if args.sandwich_norm:
            _set_param(block.post_attn_norm, state[p + "post_attention_layernorm.weight"])
            _set_param(block.mlp_norm, state[p + "pre_feedforward_layernorm.weight"])
            _set_param(block.post_mlp_norm, state[p + "post_feedforward_layernorm.weight"])
        else:
            _set_param(block.mlp_norm, state[p + "post_attention_layernorm.weight"])
        if args.qk_norm:
            _set_param(block.attn.q_norm, state[a + "q_norm.weight"])
            _set_param(block.attn.k_norm, state[a + "k_norm.weight"])
    _set_param(model.norm, state["model.norm.weight"])
    emb, emb_scale = _get(state, naming.EMBED)
    head_name = naming.EMBED if args.tie_embeddings else naming.LM_HEAD
    head, head_scale = _get(state, head_name)
    if emb_scale is None:
        model.tok_embeddings.weight = nn.Parameter(emb.to(compute), requires_grad=False)
    else:
        model.tok_embeddings = Int8Embedding(emb, emb_scale)
    if args.tie_embeddings and emb_scale is None:
        model.output.weight = model.tok_embeddings.weight
    else:
        model.output = _dense(head, head_scale, compute, int8_kernel)
    return model.eval()


def _check_covers(name: str, adapter: dict, n_layers: int) -> None:
    """Every factor of a per-request adapter must sit on a projection the engine builds."""
    projs = {p for parts in FUSED_PROJECTIONS.values() for p in parts}
    for module in {naming.adapter_module(k) for k in adapter if k.endswith(naming.ADAPTER_A)}:
        parts = module.split(".")
        ok = (len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
              and int(parts[2]) < n_layers and ".".join(parts[3:]) in projs)
        if not ok:
            raise AdapterError(f"adapter {name!r}: {module} is not a projection of this model "
                               f"(LoRA on q/k/v/o and gate/up/down of layers 0-{n_layers - 1} only)")


def rope_buffers(args: ModelArgs, max_len: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, theta in enumerate(sorted(set(args.rope_theta))):
        cos, sin = rope_tables(args.head_dim, theta, max_len, args.rope_scaling)
        out[f"rope_cos_{i}"], out[f"rope_sin_{i}"] = cos, sin
    return out
