"""EoRA (Liu et al. 2024): training-free low-rank compensation of a quantization error,
computed in the eigenspace of the layer's input activations.

For each quantized projection with float weight W and served weight Ŵ, ΔW = W − Ŵ. With
the calibration Gram matrix XᵀX = Q Λ Qᵀ, the error that matters is ΔW X, so project:
Q' = Q Λ^½, take the rank-r SVD ΔW Q' ≈ U_r Σ_r V_rᵀ, and set
  B = U_r Σ_r        (out, r)
  A = V_rᵀ Λ^-½ Qᵀ    (r, in)
so that B A minimises ‖(ΔW − B A) X‖ among rank-r corrections (a plain SVD of ΔW minimises
‖ΔW − B A‖ instead, weighting every input direction alike). The adapter is stored like a
LoRA adapter with scaling 1 (`<module>.lora_A.weight` / `lora_B.weight`; in the artifact as
PEFT's adapter_model.safetensors, as GPTQModel stores EoRA) and added at serving:
y = Ŵx + B(Ax).

`eora(rank=32)` must follow `gptq` or `int8` in the same recipe (they hand over the float
weights they quantized). Calibration runs on the quantized model, as GPTQModel does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine import naming
from engine.quant import dequantize_state

from .calibration import calibration_stat, check_calib, engine_module_for
from .step import RecipeError, Step


def eigenspace(gram: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ^½, Q) of XᵀX = Q Λ Qᵀ; near-null directions are bounded below, not inverted to infinity."""
    lam, q = torch.linalg.eigh(gram.double())
    return lam.clamp(min=eps * lam.max().item()).sqrt(), q


@torch.no_grad()
def eora_factors(delta: torch.Tensor, gram: torch.Tensor, rank: int,
                 eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with B A ≈ delta in the activation-weighted norm."""
    sqrt_lam, q = eig or eigenspace(gram)
    u, s, vh = torch.linalg.svd(delta.double() @ (q * sqrt_lam), full_matrices=False)
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]
    a = (vh[:r] / sqrt_lam) @ q.T
    return a.float(), b.float()


@dataclass
class EoRAStep(Step):
    rank: int = 32  # adapter rank per projection
    calib_samples: int = 32
    calib_seq_len: int = 256
    calib: str = "text"  # as gptq's: text, svamp-train, or a+b (use the data the quantizer saw)
    stats: dict = field(default_factory=dict, repr=False)

    name = "eora"

    def apply(self, state, ctx):
        reference = ctx.get("pre_quant")
        if not reference:
            raise RecipeError("eora compensates a quantization error: put it right after gptq or int8")
        if self.rank < 1:
            raise RecipeError("eora: rank must be >= 1")
        check_calib("eora", self.calib)
        if any(naming.is_adapter(k) for k in state):
            raise RecipeError("eora: the model already carries an adapter (merge the LoRA before quantizing)")
        names = sorted(reference)
        grams = calibration_stat(state, ctx, names, self.calib_samples, self.calib_seq_len, "gram", self.calib)
        served = dequantize_state({k: v for k, v in state.items() if naming.in_layer(k) and not naming.is_adapter(k)})
        before = after = 0.0
        adapter_params = 0
        state = dict(state)
        eig: dict[str, tuple] = {}  # q/k/v (and gate/up) share one input, so one eigendecomposition
        for n in names:
            w, g = reference[n].float(), grams[n].double()
            delta = w - served[n]
            shared = engine_module_for(n)
            if shared not in eig:
                eig[shared] = eigenspace(g)
            a, b = eora_factors(delta, g, self.rank, eig[shared])
            a_name, b_name = naming.adapter_names(naming.module_of(n))
            state[a_name], state[b_name] = a, b
            adapter_params += a.numel() + b.numel()
            # activation-weighted error tr(Δ G Δᵀ) before and after the correction
            before += torch.einsum("oi,ij,oj->", delta.double(), g, delta.double()).item()
            rest = delta.double() - b.double() @ a.double()
            after += torch.einsum("oi,ij,oj->", rest, g, rest).item()
        ctx.pop("pre_quant")
        self.stats = {"adapters": len(names), "rank": self.rank, "adapter_params": adapter_params,
                      "weighted_error_before": round(before, 4), "weighted_error_after": round(after, 4)}
        return state
