"""LoRA adapters chosen per request, over one set of base weights (vLLM's `--lora-modules`).

    bank = model.adapter_bank                    # names registered at load (engine.loader)
    model.forward_rows(ids, rows, adapters=["svamp", None])   # row 0 with the adapter, row 1 without

An adapter is PEFT's directory: `adapter_config.json` + `adapter_model.safetensors`
(`PeftModel.save_pretrained`, or an artifact built with `lora(merge=false)`). Its factors are read
with PEFT's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA; rank_pattern / alpha_pattern per
module) folded into B, so the engine adds B(A x) and never needs the config again.

Why rows, not one adapter per batch: requests with and without an adapter share the continuous
batch (and its single weight pass), as in vLLM/Punica; a projection adds each adapter's low-rank
product to the rows that asked for it. With few adapters (the case here) a loop over the
adapters in use is as fast as a gathered batched kernel and needs none.

Why a row mask, not a gather: each adapter in a step computes its product for every row and a
(B, 1, 1) 0/1 mask keeps the rows that asked for it. The low-rank product is a few percent of
the projection's work, so the rows computed for nothing cost less than the gather and scatter
they replace (2 base + 2 adapter rows, SmolLM2 int8 eager, benchmarks/lora_overhead.py: 36.0
against 39.8 ms a step), and the step keeps one shape whatever the rows ask for, so one compiled
graph serves every mix (engine/compiled.py; with many adapters in use it would pay each one's
product on every row, and a gathered kernel would win).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from . import naming

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B(A x), computed in the factors' dtype: what a LoRA adapter adds to a projection's output
    (the caller casts it to that output's dtype)."""
    x = x.to(a.dtype)
    # One row in a compiled graph: products and sums, which inductor fuses into loops with what
    # surrounds them (as engine/quant.py `_rows_times_int8`), where two matmul kernel calls per
    # projection cost SmolLM2's batch-1 step 15.1 vs 9.8 ms merged (now 11.8 vs 9.1)
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
        return ((x[..., None, :] * a).sum(-1)[..., None, :] * b).sum(-1)
    return (x @ a.t()) @ b.t()


class AdapterError(ValueError):
    """An adapter directory that cannot be served: missing files, an unsupported PEFT config,
    or factors that do not fit the model."""


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module's full name or its
    dotted suffix (peft.tuners.tuners_utils: `re.match(rf"(.*\\.)?{key}$", name)`)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _check_config(cfg: dict, where: Path) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("use_dora", "modules_to_save", "fan_in_fan_out") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    if unsupported:
        raise AdapterError(f"{where}: unsupported LoRA options {', '.join(map(str, unsupported))} "
                           f"(plain LoRA on linear projections only)")


def read_peft_adapter(root: str | Path) -> dict[str, torch.Tensor]:
    """`<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r) fp32 tensors under
    the model's own names, PEFT's scaling folded into B. Safetensors only: never unpickles."""
    from safetensors.torch import load_file

    root = Path(root)
    weights, config = root / ADAPTER_WEIGHTS, root / ADAPTER_CONFIG
    if not weights.is_file() or not config.is_file():
        raise AdapterError(f"{root} is not a LoRA adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config} is not valid JSON: {e}") from e
    _check_config(cfg, config)
    raw = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
    out = {}
    for a_name in [k for k in raw if k.endswith(naming.ADAPTER_A)]:
        module = naming.adapter_module(a_name)
        b_name = naming.adapter_names(module)[1]
        if b_name not in raw:
            raise AdapterError(f"{weights}: {module} has lora_A but no lora_B")
        a, b = raw[a_name].float(), raw[b_name].float()
        r = a.shape[0]
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[a_name], out[b_name] = a.contiguous(), (b * scale).contiguous()
    lone_b = [k for k in raw if k.endswith(naming.ADAPTER_B) and k not in out]
    if lone_b:
        raise AdapterError(f"{weights}: {lone_b[0].removesuffix(naming.ADAPTER_B)} has lora_B but no lora_A")
    stray = [k for k in raw if not k.endswith((naming.ADAPTER_A, naming.ADAPTER_B))]
    if stray or not out:
        raise AdapterError(f"{weights}: " + (f"tensors that are not LoRA factors ({stray[:3]})" if stray
                                              else "no LoRA factors"))
    return out


class AdapterBank:
    """The adapters a model was loaded with, by name, and which rows of the forward now running
    use which (set by `Transformer._run` through `select`; every `SwitchedAdapters` reads it)."""

    def __init__(self, names: list[str] | None = None):
        self.names = list(names or [])
        # (adapter, rows' 0/1 mask (B, 1, 1); None = every row) of the forward now running
        self.groups: list[tuple[int, torch.Tensor | None]] | None = None

    def __contains__(self, name) -> bool:
        return name in self.names

    def masks(self, rows: list[str | None], every: bool = False, device=None) -> list[tuple[int, torch.Tensor | None]]:
        """The groups for rows[b] = row b's adapter (None: the base model): the adapters in use,
        a mask each unless every row uses it; with `every`, all loaded adapters, each with a
        mask (the compiled multi-row graph's fixed structure)."""
        unknown = {r for r in rows if r is not None and r not in self.names}
        if unknown:
            raise KeyError(f"unknown adapter(s) {sorted(unknown)}; loaded: {self.names}")
        groups = []
        for k, name in enumerate(self.names):
            use = [r == name for r in rows]
            if every or (any(use) and not all(use)):
                groups.append((k, torch.tensor(use, dtype=torch.float32, device=device)[:, None, None]))
            elif all(use):
                groups.append((k, None))
        return groups

    @contextmanager
    def select(self, groups: list[tuple[int, torch.Tensor | None]]) -> Iterator[None]:
        """For the forward inside: the adapters of `groups` (from `masks`) on their rows."""
        self.groups = groups or None
        try:
            yield
        finally:
            self.groups = None


class SwitchedAdapters(nn.Module):
    """y = base(x) + B_k(A_k x) for the rows whose adapter is k (all rows, or those its mask
    keeps). For a fused projection A_k stacks the parts' A rows and B_k is block-diagonal (zero
    blocks for parts the adapter leaves alone)."""

    def __init__(self, base: nn.Module, bank: AdapterBank, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.base, self.bank = base, bank
        self.present = sorted(factors)
        for k, (a, b) in factors.items():
            # fp32: skinny matmuls measured ~5x slower in bf16 on CPU (engine.loader.WithAdapter)
            self.register_buffer(f"a{k}", a.float().contiguous())  # (r_total, in)
            self.register_buffer(f"b{k}", b.float().contiguous())  # (out_total, r_total)

    @property
    def weight(self) -> torch.Tensor:  # calibration reads the base weight through wrappers
        return self.base.weight

    def forward(self, x):
        y = self.base(x)
        if self.bank.groups is None:  # no row uses an adapter (and the compiled decode step)
            return y
        for k, mask in self.bank.groups:
            if k not in self.present:
                continue
            delta = lora_delta(x, getattr(self, f"a{k}"), getattr(self, f"b{k}"))
            y = y + (delta if mask is None else delta * mask).to(y.dtype)
        return y
