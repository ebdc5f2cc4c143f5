"""Full-model-loss scoring for consensus pruning: the paper's literal criterion, on a sample.

For one chunk (a run of weights in one row of one projection), every candidate mask is scored
by the model's next-token loss on calibration text with that mask applied. All candidates run
in one batched forward: batch element m carries mask m, and a forward hook subtracts the
pruned weights' contribution from that one output row (pruning a chunk changes only its row),
so no weight copies are made. One forward of n_masks x tokens per chunk is far too slow for
every chunk of a model, so `prune(score=model, model_chunks=N)` scores N random chunks per
matrix this way (the rest stay layer-local) and records how often both criteria agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import naming
from engine.config import ModelArgs
from engine.loader import fused_module_of


def engine_row(hf_name: str, args: ModelArgs) -> tuple[str, int]:
    """(engine module path, row offset of this projection inside the fused matrix)."""
    path, fused = fused_module_of(hf_name)
    kv = args.n_kv_heads * args.head_dim
    rows = {"q_proj": args.n_heads * args.head_dim, "k_proj": kv, "v_proj": kv,
            "gate_proj": args.hidden_dim, "up_proj": args.hidden_dim}
    return path, sum(rows[naming.projection_of(n)] for n in fused[:fused.index(hf_name)])


@torch.no_grad()
def mask_model_losses(model, path: str, row: int, cols: torch.Tensor, w_chunk: torch.Tensor, masks: torch.Tensor,
                      ids: torch.Tensor, micro_batch: int = 64) -> torch.Tensor:
    """Mean next-token loss on `ids` (1, T) for each candidate mask (M, C) -> (M,)."""
    module = model.get_submodule(path)
    losses = []
    for m0 in range(0, masks.shape[0], micro_batch):
        delta = (w_chunk * masks[m0:m0 + micro_batch]).float()  # (m, C) the pruned weights

        def hook(mod, inputs, out, delta=delta):
            x = inputs[0].float()  # (m, T, in)
            corr = (x[..., cols] * delta[:, None, :]).sum(-1)  # (m, T)
            out = out.clone()
            out[..., row] -= corr.to(out.dtype)
            return out

        handle = module.register_forward_hook(hook)
        try:
            x = ids.expand(delta.shape[0], -1)
            logits = model(x)
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").mean(-1)
        finally:
            handle.remove()
        losses.append(loss)
    return torch.cat(losses)
