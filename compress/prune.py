"""Stochastic-consensus pruning and SVD re-densification (the first seed paper's method).

Consensus pruning, per target matrix W (out, in):
  1. split every row into chunks of `chunk_size` consecutive weights;
  2. for each chunk draw `n_masks` random masks that each prune round(mask_sparsity * chunk)
     of its weights, and score every mask by the layer-local reconstruction loss it causes;
  3. keep the `top_k` lowest-loss masks and prune only the weights that *all* of them prune.

What is exact and what is not: a chunk lies in one output row, so the loss of a mask on it
is exactly ‖(W − W')X‖² = v G vᵀ with v the pruned weights of the chunk and G = XᵀX the
Gram matrix of the layer's calibration inputs (compress.calibration). All masks of all
chunks of a row batch are scored in one batched einsum, with no forward passes. Chunks are
scored independently (as in the paper: the loss of two pruned chunks in the same row is not
the sum of their losses), and every G comes from the unpruned model (no sequential
re-calibration). The full-model loss (`score=model`) costs one forward of n_masks x tokens
per chunk, so it is applied to `model_chunks` sampled chunks per matrix (compress.prune_model_loss).

SVD re-densification replaces a (pruned) W by B @ A of rank r, stored as two factors
(`<name>_lr_a` (r, in), `<name>_lr_b` (out, r)) that the engine runs as two linears, so it
is really smaller and faster when r (in + out) < in * out. The sparse + low-rank variant
(`sparse=0.05`) adds S, the largest entries of the residual W - BA, stored as CSR
(`<name>_sp_crow/_sp_col/_sp_val`) and applied with a sparse matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from engine import naming
from engine.quant import dequantize, quantize_per_channel

from .calibration import calibration_stat
from .select import select_weights
from .step import RecipeError, Step


def _take_float(state: dict, name: str) -> tuple[torch.Tensor, bool]:
    """(float weight, was_int8), removing the int8 form from state. Lets pruning/SVD run
    after quantization (the seed's Q⇒P+SV order): they work on the dequantized weights
    and hand back int8 where int8 came in."""
    if naming.scale_name(name) in state:
        return dequantize(state.pop(name), state.pop(naming.scale_name(name))), True
    return state.pop(name).float(), False


def _put(state: dict, name: str, w: torch.Tensor, int8: bool, dtype: torch.dtype) -> None:
    if int8:
        state[name], state[naming.scale_name(name)] = quantize_per_channel(w)
    else:
        state[name] = w.to(dtype).contiguous()


def chunk_mask_losses(w_chunks: torch.Tensor, g_blocks: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Exact layer-local loss ‖ΔW X‖² of each candidate mask, for a batch of rows.

    w_chunks (R, nb, C) weights; g_blocks (nb, C, C) diagonal blocks of G = XᵀX;
    masks (R, nb, M, C) True = pruned -> losses (R, nb, M). A chunk's pruned weights v
    change only its row's output, by X v, so the loss is v G_b vᵀ.
    """
    v = w_chunks[:, :, None, :] * masks
    return torch.einsum("rbmc,bcd,rbmd->rbm", v, g_blocks, v)


@torch.no_grad()
def consensus_mask(w: torch.Tensor, gram: torch.Tensor, chunk: int, n_masks: int, sparsity: float, top_k: int,
                   generator: torch.Generator, row_batch: int = 8) -> torch.Tensor:
    """Boolean (out, in): True where all top_k lowest-loss random masks of the chunk prune."""
    out_f, in_f = w.shape
    nb = math.ceil(in_f / chunk)
    pad = nb * chunk - in_f
    wp = torch.nn.functional.pad(w.float(), (0, pad)).view(out_f, nb, chunk)
    gp = torch.nn.functional.pad(gram.float(), (0, pad, 0, pad))
    idx = torch.arange(nb * chunk).view(nb, chunk)
    g_blocks = gp[idx[:, :, None], idx[:, None, :]]  # (nb, C, C) diagonal blocks of G
    n_prune = max(1, round(sparsity * chunk))
    pruned = torch.empty(out_f, nb, chunk, dtype=torch.bool)
    for r0 in range(0, out_f, row_batch):
        rows = wp[r0:r0 + row_batch]  # (R, nb, C)
        r = rows.shape[0]
        # n_prune random positions per mask: rank of uniform noise < n_prune
        masks = torch.rand(r, nb, n_masks, chunk, generator=generator).argsort(-1) < n_prune  # (R, nb, M, C)
        loss = chunk_mask_losses(rows, g_blocks, masks)
        best = loss.topk(top_k, dim=-1, largest=False).indices  # (R, nb, K)
        chosen = torch.gather(masks, 2, best[..., None].expand(-1, -1, -1, chunk))  # (R, nb, K, C)
        pruned[r0:r0 + r] = chosen.all(dim=2)
    return pruned.view(out_f, nb * chunk)[:, :in_f]


@dataclass
class ConsensusPruneStep(Step):
    chunk_size: int = 15  # weights per chunk (the paper's 15)
    n_masks: int = 500  # random candidate masks per chunk (paper: 500-1000)
    mask_sparsity: float = 0.5  # fraction of a chunk each candidate prunes
    top_k: int = 20  # lowest-loss masks whose intersection is pruned
    modules: str = "mlp"  # "mlp", "attn", "all" or projection names
    layers: str = "all"  # "all", "3", "0-5", "1+4"
    calib_samples: int = 16
    calib_seq_len: int = 256
    seed: int = 0
    score: str = "local"  # "local" (exact layer-local loss) or "model" (full-model loss on a sample of chunks)
    model_chunks: int = 4  # with score=model: chunks per matrix scored by the full-model loss
    model_tokens: int = 64  # with score=model: calibration tokens per candidate forward
    stats: dict = field(default_factory=dict, repr=False)

    name = "prune"

    def apply(self, state, ctx):
        if not 0 < self.mask_sparsity < 1 or self.top_k > self.n_masks or self.chunk_size < 2:
            raise RecipeError("prune: need 0 < mask_sparsity < 1, top_k <= n_masks, chunk_size >= 2")
        if self.score not in ("local", "model"):
            raise RecipeError("prune: score must be 'local' or 'model'")
        names = select_weights(state, self.modules, self.layers)
        grams = calibration_stat(state, ctx, names, self.calib_samples, self.calib_seq_len)
        gen = torch.Generator().manual_seed(self.seed)
        judge = self._model_judge(state, ctx) if self.score == "model" else None
        state = dict(state)
        pruned_total = total = agree = scored = 0
        for n in tqdm(names, desc="consensus pruning", disable=not ctx.get("progress", True)):
            dtype = state[n].dtype
            w, was_int8 = _take_float(state, n)
            mask = consensus_mask(w, grams[n], self.chunk_size, self.n_masks, self.mask_sparsity, self.top_k, gen)
            if judge is not None:
                a, s_ = self._rescore_with_model(judge, n, w, mask, gen)
                agree, scored = agree + a, scored + s_
            _put(state, n, w.masked_fill(mask, 0), was_int8, dtype)
            pruned_total += int(mask.sum())
            total += mask.numel()
        self.stats = {"matrices": len(names), "sparsity": pruned_total / total}
        if judge is not None:
            self.stats.update(model_scored_chunks=scored, model_local_agreement=agree / max(scored, 1))
        return state

    def _model_judge(self, state, ctx):
        from engine.config import ModelArgs
        from engine.loader import build_model
        from engine.quant import dequantize_state

        from .calibration import step_calibration_ids

        args = ModelArgs.from_hf_config(ctx["config"])
        model = build_model(args, dequantize_state(state), max_len=self.model_tokens + 1)
        ids = torch.tensor(step_calibration_ids(ctx, 1, self.model_tokens))
        return model, args, ids

    def _rescore_with_model(self, judge, name, w, mask, gen) -> tuple[int, int]:
        """Replace the consensus of `model_chunks` random chunks by the full-model-loss one;
        return (chunks where both criteria agreed, chunks scored)."""
        from .prune_model_loss import engine_row, mask_model_losses

        model, args, ids = judge
        path, offset = engine_row(name, args)
        out_f, in_f = w.shape
        c = self.chunk_size
        n_prune = max(1, round(self.mask_sparsity * c))
        agree = 0
        for _ in range(self.model_chunks):
            r = int(torch.randint(out_f, (1,), generator=gen))
            b = int(torch.randint(in_f // c, (1,), generator=gen))  # whole chunks only
            cols = torch.arange(b * c, (b + 1) * c)
            masks = torch.rand(self.n_masks, c, generator=gen).argsort(-1) < n_prune
            losses = mask_model_losses(model, path, offset + r, cols, w[r, cols], masks, ids)
            consensus = masks[losses.topk(self.top_k, largest=False).indices].all(0)
            agree += bool(torch.equal(consensus, mask[r, cols]))
            mask[r, cols] = consensus
        return agree, self.model_chunks


@dataclass
class SVDStep(Step):
    rank: int = 4  # kept singular values (the paper's 4)
    energy: float = 0.0  # if > 0: smallest rank keeping this fraction of Σσ², per matrix (overrides rank)
    sparse: float = 0.0  # if > 0: W ≈ S + UV, S = this fraction of the residual's largest entries (CSR)
    modules: str = "mlp"
    layers: str = "all"
    stats: dict = field(default_factory=dict, repr=False)

    name = "svd"

    def apply(self, state, ctx):
        names = select_weights(state, self.modules, self.layers)
        state = dict(state)
        ranks, kept, skipped = [], [], 0
        for n in tqdm(names, desc="svd", disable=not ctx.get("progress", True)):
            dtype = state[n].dtype
            w, was_int8 = _take_float(state, n)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            if self.energy > 0:
                cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
                r = int(torch.searchsorted(cum, torch.tensor(self.energy)).item()) + 1
            else:
                r = self.rank
            r = min(r, s.numel())
            nnz = int(self.sparse * w.numel())
            # stored size in values: factors + CSR (value + column index each, plus row pointers)
            if r * (w.shape[0] + w.shape[1]) + 2 * nnz + w.shape[0] + 1 >= w.numel():
                skipped += 1  # would not be smaller than the matrix
                _put(state, n, w, was_int8, dtype)
                continue
            root = s[:r].sqrt()
            a, b = root[:, None] * vh[:r], u[:, :r] * root
            a_name, b_name = naming.lowrank_names(n)
            _put(state, a_name, a, was_int8, dtype)  # (r, in)
            _put(state, b_name, b, was_int8, dtype)  # (out, r)
            if nnz:
                resid = w - b @ a
                keep = torch.zeros(w.numel(), dtype=torch.bool)
                keep[resid.abs().flatten().topk(nnz).indices] = True
                sp = (resid * keep.view_as(w)).to_sparse_csr()
                crow, col, val = naming.sparse_names(n)
                state[crow] = sp.crow_indices().to(torch.int32)
                state[col] = sp.col_indices().to(torch.int32)
                state[val] = sp.values().float()
            ranks.append(r)
            kept.append(float((s[:r] ** 2).sum() / (s ** 2).sum()))
        self.stats = {"matrices": len(ranks), "skipped_not_smaller": skipped,
                      "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
                      "energy_kept_mean": sum(kept) / len(kept) if kept else None}
        return state
