"""Token-level generation: prefill, decode_one_token, and a generator loop.

The engine yields token ids only; text, stop strings and HTTP belong to the server.
`prefill` and `decode_one_token` are separate so benchmarks (and torch.compile) can
target each phase.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .grammar import Grammar, RowGrammars
from .kv_cache import KVCache
from .model import Transformer
from .sampling import sample


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus the top k
    grammar: Grammar | None = None  # structured output: every row's text must match it
    # prompt-lookup draft tokens checked per step (engine.lookup; BatchEngine only): greedy, one
    # row, no grammar or logprobs; the same tokens, several per forward where the output copies
    # its input (a condensed prompt). 0: one token a step
    lookup_draft: int = 0


@dataclass
class StepOutput:
    """One decode step for all n rows. A row's token counts only where `active` (the row
    had not finished before this step); `eos` marks rows this token finished."""
    tokens: list[int]
    active: list[bool]
    eos: list[bool]
    # per row: (logprob of the chosen token, [(token, logprob)] top alternatives), when asked;
    # None for an inactive row
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    # per row: the grammar ended the row with this (non-EOS) token; its text counts, then "stop"
    ended: list[bool] | None = None
    # per row: tokens confirmed from a prompt-lookup draft this step, which came before
    # `tokens[i]` (SamplingParams.lookup_draft); None when the sequence has no drafts
    drafted: list[list[int]] | None = None


def row_end(token: int, grammar_ended: bool, eos_ids: set[int], ignore_eos: bool) -> tuple[bool, bool]:
    """(eos, ended) for a sampled token: EOS finishes the row unless ignore_eos, but a grammar
    whose document is complete ends it even then; `ended` is left only for a non-EOS token
    that completed the grammar (its text counts)."""
    eos = token in eos_ids and (not ignore_eos or grammar_ended)
    return eos, grammar_ended and not eos


def constrained_sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator,
                       grammars: RowGrammars | None, rows: list[int]) -> tuple[torch.Tensor, list[bool]]:
    """Sample `rows` (logits (len(rows), V)) within their grammars, if any; (tokens, per row:
    the grammar ended it)."""
    allowed = grammars.allowed(rows, logits.device) if grammars is not None else None
    tok = sample(logits, params.temperature, params.top_k, params.top_p, gen, allowed)
    ended = grammars.advance(rows, tok.tolist()) if grammars is not None else [False] * len(rows)
    return tok, ended


@torch.inference_mode()
def prefill(model: Transformer, ids: torch.Tensor, cache: KVCache, adapter: str | None = None) -> torch.Tensor:
    """Run the prompt (B, T) through the model (with a per-request LoRA adapter if named),
    filling the cache; returns last logits (B, V)."""
    return model(ids, cache, last_only=True, **_adapter_kw(adapter))[:, -1]


@torch.inference_mode()
def decode_one_token(model: Transformer, tok: torch.Tensor, cache: KVCache, adapter: str | None = None) -> torch.Tensor:
    """tok (B,) -> next-token logits (B, V), advancing the cache by one position."""
    return model(tok[:, None], cache, last_only=True, **_adapter_kw(adapter))[:, -1]


def _adapter_kw(adapter: str | None) -> dict:
    # only named when used: ONNX Runtime sessions (engine.ort_backend), which `generate` also
    # serves, take no adapter argument
    return {} if adapter is None else {"adapter": adapter}


def token_logprobs(logits: torch.Tensor, tok: torch.Tensor, top: int | None):
    """Log-probabilities under the model's own distribution (before temperature/top-k/top-p,
    as vLLM reports them by default) of the chosen tokens and of the `top` most likely."""
    if top is None:
        return None
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tok[:, None]).squeeze(-1).tolist()
    if top > 0:
        vals, idx = lp.topk(top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in chosen]
    return list(zip(chosen, tops))


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams, eos_ids: set[int],
             cancel: threading.Event | None = None, finished_rows: list[bool] | None = None,
             adapter: str | None = None) -> Iterator[StepOutput]:
    """Yield one StepOutput per generated position for n parallel samples of one prompt.

    The prompt is prefilled once at batch 1 and its cache broadcast to n rows. A row
    finishes on an EOS token (not yielded as text: the caller sees it in `finished`) or
    when the caller marks it in `finished_rows` (e.g. a stop string matched); generation
    ends when all rows finish, max_tokens is reached, or `cancel` is set. `adapter`: a
    per-request LoRA adapter of the model (engine.adapters) for every forward.
    """
    n = params.n
    total = len(prompt_ids) + params.max_tokens
    gen = make_generator(params.seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    prompt_cache = model.new_cache(1, total)
    logits = prefill(model, ids, prompt_cache, adapter)
    if n > 1:
        cache = model.new_cache(n, total)
        cache.prefill(prompt_cache)
        del prompt_cache
        logits = logits.expand(n, -1)
    else:
        cache = prompt_cache
    finished = finished_rows if finished_rows is not None else [False] * n
    grammars = RowGrammars(params.grammar, n) if params.grammar is not None else None
    for step in range(params.max_tokens):
        if cancel is not None and cancel.is_set():
            return
        active = [not f for f in finished]
        live = [i for i in range(n) if active[i]]
        tok, ended_live = constrained_sample(logits[live], params, gen, grammars, live)
        toks, ended = [0] * n, [False] * n
        for j, i in enumerate(live):
            toks[i], ended[i] = int(tok[j]), ended_live[j]
        eos = [False] * n
        for i in live:
            eos[i], ended[i] = row_end(toks[i], ended[i], eos_ids, params.ignore_eos)
        for i in range(n):
            finished[i] = finished[i] or eos[i] or ended[i]
        full = torch.tensor(toks, device=logits.device)
        yield StepOutput(toks, active, eos, token_logprobs(logits, full, params.logprobs),
                         ended if grammars is not None else None)
        if all(finished) or step == params.max_tokens - 1:
            return
        logits = decode_one_token(model, full, cache, adapter)
