"""Build an engine `Transformer` from Hugging Face-named weights (float or int8).

HF checkpoints keep q/k/v and gate/up as separate matrices; the engine fuses them at
load time. Int8 tensors arrive as `<name>` (int8) + `<name>_scale` (fp32 per row),
the format `compress` writes for the `int8-dynamic` step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelArgs
from .model import Transformer, rope_tables
from .quant import Int8Embedding, int8_linear

_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."


def _get(state: dict, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (tensor, scale or None); missing names raise a clear KeyError."""
    if name not in state:
        raise KeyError(f"weight {name!r} missing from checkpoint")
    return state[name], state.get(name + "_scale")


def _fused(state: dict, names: list[str]):
    parts = [_get(state, n) for n in names]
    w = torch.cat([p[0] for p in parts], dim=0)
    scales = [p[1] for p in parts]
    if any(s is None for s in scales):
        if any(s is not None for s in scales):
            raise ValueError(f"mixed int8/float weights in {names}")
        return w, None
    return w, torch.cat(scales, dim=0)


def _set_linear(parent: nn.Module, attr: str, w: torch.Tensor, scale: torch.Tensor | None, dtype, kernel: str):
    if scale is None:
        getattr(parent, attr).weight = nn.Parameter(w.to(dtype), requires_grad=False)
    else:
        setattr(parent, attr, int8_linear(w, scale, kernel))


def _set_param(module: nn.Module, w: torch.Tensor):
    module.weight = nn.Parameter(w.to(module.weight.dtype), requires_grad=False)


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                max_len: int | None = None, int8_kernel: str = "weight_only") -> Transformer:
    """state: HF-named tensors. dtype applies to float weights. Int8 weights stay int8 and
    fix the activation dtype to their kernel's contract: bf16 for "weight_only", fp32 for
    "dynamic"."""
    any_int8 = any(k.endswith("_scale") for k in state)
    if any_int8:
        compute = torch.bfloat16 if int8_kernel == "weight_only" else torch.float32
    else:
        compute = dtype
    # Build on the meta device so no memory is spent on random init, then materialise.
    with torch.device("meta"):
        model = Transformer(args, max_len=max_len)
    model = model.to_empty(device="cpu").to(compute)
    for name, buf in rope_buffers(args, model.max_len).items():
        setattr(model, name, buf)  # fp32 tables, cast per forward like HF does
    for i, block in enumerate(model.layers):
        a, m = _ATTN.format(i=i), _MLP.format(i=i)
        _set_linear(block.attn, "wqkv", *_fused(state, [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]), compute, int8_kernel)
        _set_linear(block.attn, "wo", *_get(state, a + "o_proj.weight"), compute, int8_kernel)
        _set_linear(block.mlp, "w13", *_fused(state, [m + "gate_proj.weight", m + "up_proj.weight"]), compute, int8_kernel)
        _set_linear(block.mlp, "w2", *_get(state, m + "down_proj.weight"), compute, int8_kernel)
        p = f"model.layers.{i}."
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
    emb, emb_scale = _get(state, "model.embed_tokens.weight")
    head_name = "model.embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"
    head, head_scale = _get(state, head_name)
    if emb_scale is None:
        model.tok_embeddings.weight = nn.Parameter(emb.to(compute), requires_grad=False)
    else:
        model.tok_embeddings = Int8Embedding(emb, emb_scale)
    if args.tie_embeddings and emb_scale is None:
        model.output.weight = model.tok_embeddings.weight
    else:
        _set_linear(model, "output", head, head_scale, compute, int8_kernel)
    return model.eval()


def rope_buffers(args: ModelArgs, max_len: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, theta in enumerate(sorted(set(args.rope_theta))):
        cos, sin = rope_tables(args.head_dim, theta, max_len)
        out[f"rope_cos_{i}"], out[f"rope_sin_{i}"] = cos, sin
    return out
