"""The weight-naming contract: how compressed tensors are named in a state dict and on disk.

Writers (the `compress` steps) and readers (the engine's loader, dequantizers and the
inspector) both go through this module, so a format is spelled in one place. The names
are stored in artifacts: changing a string here breaks every artifact already built.

Base names are Hugging Face's: `model.layers.<i>.<self_attn|mlp>.<proj>.weight`,
`model.embed_tokens.weight`, `lm_head.weight`, norms. A compressed weight `<w>` (a full
name ending in `.weight`) or module `<m>` (the same without `.weight`) may instead carry:

  int8 rows           `<w>` int8 (out, in) + `<w>_scale` fp32 (out,), w ≈ q * scale
  static W8A8         `<w>_act_scale` fp32 scalar: the calibrated input scale
  low-rank (SVD)      `<w>_lr_a` (r, in) and `<w>_lr_b` (out, r), W ≈ B @ A; each factor
                      is itself float or int8 (then with its own `_scale`)
  sparse residual     `<w>_sp_crow`, `<w>_sp_col` (int32), `<w>_sp_val` (fp32): CSR parts of
                      S in W ≈ S + B @ A
  GPTQ                `<m>.qweight`, `<m>.qzeros`, `<m>.scales`, `<m>.g_idx` (engine/gptq_format.py)
  adapter             `<m>.lora_A.weight` (r, in), `<m>.lora_B.weight` (out, r), scaling
                      folded into B; added to the base output at serving

Note that `_scale` is a suffix of `_act_scale`: `is_scale` matches both, `is_int8_scale`
only the per-row int8 scales.
"""

from __future__ import annotations

WEIGHT = ".weight"
LAYERS = "model.layers."
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"

SCALE = "_scale"
ACT_SCALE = "_act_scale"

LOWRANK = "_lr_"  # the mark of both factors (and of their int8 scales)
LR_A = "_lr_a"
LR_B = "_lr_b"

SPARSE_CROW = "_sp_crow"
SPARSE_COL = "_sp_col"
SPARSE_VAL = "_sp_val"

GPTQ_SIDE_PARTS = ("qzeros", "scales", "g_idx")  # zero points, scales, group index: beside the codes
GPTQ_PARTS = ("qweight",) + GPTQ_SIDE_PARTS
QWEIGHT = ".qweight"

ADAPTER = ".lora_"  # the mark of both adapter factors
ADAPTER_A = ".lora_A.weight"
ADAPTER_B = ".lora_B.weight"


# --- layers ---------------------------------------------------------------------------

def in_layer(name: str) -> bool:
    """Whether the tensor belongs to a transformer block (`model.layers.<i>.…`)."""
    return name.startswith(LAYERS)


def layer_index(name: str) -> int | None:
    """'model.layers.3.mlp.up_proj.weight' -> 3; None outside the blocks."""
    return int(name.split(".")[2]) if in_layer(name) else None


def layer_prefix(i: int) -> str:
    """3 -> 'model.layers.3.'"""
    return f"{LAYERS}{i}."


def layer_weight(i: int, proj: str) -> str:
    """(3, 'mlp.up_proj') -> 'model.layers.3.mlp.up_proj.weight'"""
    return f"{layer_prefix(i)}{proj}{WEIGHT}"


def split_layer(name: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight'); None outside the blocks."""
    if not in_layer(name):
        return None
    index, _, rest = name[len(LAYERS):].partition(".")
    return (int(index), rest) if index.isdecimal() and rest else None


def projection_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'up_proj'"""
    return name.split(".")[4]


def bias_of(weight: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.q_proj.bias'"""
    return module_of(weight) + ".bias"


# Phi-3 stores q/k/v and gate/up as one matrix each; split into Llama's names on load, so every
# compress step and the loader see one set of names.
FUSED_HF = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def split_fused(state: dict, q_rows: int, kv_rows: int) -> dict:
    """Phi-3's `qkv_proj` ([q; k; v] rows) and `gate_up_proj` ([gate; up]) as separate weights."""
    out = {}
    for name, t in state.items():
        parts = name.split(".")
        fused = ".".join(parts[3:5]) if name.startswith(LAYERS) else None
        if fused not in FUSED_HF:
            out[name] = t
            continue
        prefix, suffix = ".".join(parts[:3]), ".".join(parts[5:])
        sizes = [q_rows, kv_rows, kv_rows] if fused == "self_attn.qkv_proj" else [t.shape[0] // 2] * 2
        if sum(sizes) != t.shape[0]:
            raise ValueError(f"{name}: {t.shape[0]} rows, expected {sum(sizes)}")
        for proj, piece in zip(FUSED_HF[fused], t.split(sizes, dim=0)):
            out[f"{prefix}.{proj}.{suffix}"] = piece.contiguous()
    return out


def module_of(weight: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj'"""
    return weight[: -len(WEIGHT)]


def weight_of(module: str) -> str:
    return module + WEIGHT


# --- int8 ------------------------------------------------------------------------------

def scale_name(weight: str) -> str:
    """The per-row fp32 scale of an int8 tensor."""
    return weight + SCALE


def act_scale_name(weight: str) -> str:
    """The static (calibrated) input scale of an int8 projection."""
    return weight + ACT_SCALE


def is_scale(name: str) -> bool:
    """An int8 row scale or a static activation scale."""
    return name.endswith(SCALE)


def is_act_scale(name: str) -> bool:
    return name.endswith(ACT_SCALE)


def is_int8_scale(name: str) -> bool:
    """A per-row int8 scale (not an activation scale)."""
    return is_scale(name) and not is_act_scale(name)


def is_quantizable(name: str, t) -> bool:
    """Whether a tensor is rounded by int8 quantization: every 2-D float weight, i.e.
    projections, MLP, embedding (also the tied LM head) and SVD factors. Norm weights are
    1-D and stay in float. Adapters stay in float: they are tiny and their whole point is
    to carry what the quantized base lost."""
    return t.dim() == 2 and name.endswith((WEIGHT, LR_A, LR_B)) and t.is_floating_point() and not is_adapter(name)


# --- low-rank and sparse ---------------------------------------------------------------

def lowrank_names(weight: str) -> tuple[str, str]:
    """(A (r, in), B (out, r)) factor names of a low-rank weight."""
    return weight + LR_A, weight + LR_B


def is_lowrank(name: str) -> bool:
    """A low-rank factor or its int8 scale."""
    return LOWRANK in name


def sparse_names(weight: str) -> tuple[str, str, str]:
    """(crow, col, val) CSR parts of the sparse residual of a low-rank weight."""
    return weight + SPARSE_CROW, weight + SPARSE_COL, weight + SPARSE_VAL


# --- GPTQ --------------------------------------------------------------------------------

def gptq_name(module: str, part: str) -> str:
    """('model.layers.0.mlp.up_proj', 'qweight') -> 'model.layers.0.mlp.up_proj.qweight'"""
    return f"{module}.{part}"


def is_gptq_part(name: str, part: str) -> bool:
    """Whether `name` is the `part` tensor (one of GPTQ_PARTS) of a GPTQ module."""
    return name.endswith("." + part)


def is_gptq_weight(name: str) -> bool:
    """The packed codes of a GPTQ module; its presence marks the module as GPTQ."""
    return is_gptq_part(name, "qweight")


def gptq_module(qweight: str) -> str:
    """'…up_proj.qweight' -> '…up_proj'"""
    return qweight[: -len(QWEIGHT)]


def is_bookkeeping(name: str) -> bool:
    """Scales, zero points and group indices: stored next to weights, not weights themselves
    (a GPTQ `qweight` is the weight)."""
    return is_scale(name) or any(is_gptq_part(name, p) for p in GPTQ_SIDE_PARTS)


# --- adapters ----------------------------------------------------------------------------

def adapter_names(module: str) -> tuple[str, str]:
    """(A (r, in), B (out, r)) names of a module's adapter."""
    return module + ADAPTER_A, module + ADAPTER_B


def is_adapter(name: str) -> bool:
    return ADAPTER in name


def adapter_module(a_name: str) -> str:
    """'…q_proj.lora_A.weight' -> '…q_proj'"""
    return a_name[: -len(ADAPTER_A)]
