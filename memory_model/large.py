"""The large model's side of the hybrid loop, as the memory model's training and evaluation
see it: how its prompts are written, batched greedy generation, and answer scoring.

The large model is any artifact the server can load (`engine.runner.load_model`); the
prompts here are the ones the server's hybrid loop uses, so what REINFORCE optimises is
what is served.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from engine.generate import decode_one_token, prefill
from engine.runner import LoadedModel

from .model import right_pad

COT_INSTRUCTION = "Let's think step by step."
ANSWER_PREFIX = "The answer is"


def cot_messages(context: str) -> list[dict]:
    """Ask for chain-of-thought about the current prompt."""
    return [{"role": "user", "content": f"{context}\n{COT_INSTRUCTION}"}]


def answer_messages(context: str) -> list[dict]:
    return [{"role": "user", "content": context}]


def answer_prompt_ids(lm: LoadedModel, context: str) -> list[int]:
    """Chat prompt for the final answer with the assistant turn opened by ANSWER_PREFIX, so
    the next tokens are the answer itself (scored by log-likelihood, or generated)."""
    ids, _ = lm.encode_chat(answer_messages(context))
    return ids + lm.tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def greedy_batch(lm: LoadedModel, prompts: list[list[int]], max_new: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations (EOS excluded) for many prompts. Prompts of equal length share a
    batch, so no padding or attention mask is needed; generation of a batch stops when all
    its rows hit EOS or max_new."""
    model = lm.model
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    for length, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            rows = idx[s:s + batch_size]
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=model.device)
            cache = model.new_cache(len(rows), length + max_new)
            logits = prefill(model, ids, cache)
            done = [False] * len(rows)
            for step in range(max_new):
                tok = logits.argmax(-1)
                for j, t in enumerate(tok.tolist()):
                    if not done[j]:
                        if t in lm.eos_ids:
                            done[j] = True
                        else:
                            out[rows[j]].append(t)
                if all(done) or step == max_new - 1:
                    break
                logits = decode_one_token(model, tok, cache)
    return out


@torch.inference_mode()
def score_answers(lm: LoadedModel, contexts: list[str], answers: list[int], batch_size: int = 8
                  ) -> list[tuple[float, bool]]:
    """Per context: (mean log-probability per token of ' {answer}' after the answer prompt,
    whether greedy decoding would write exactly those tokens). Teacher-forced, one batched
    forward of right-padded rows: greedy writes the reference iff every reference token is
    the argmax given the ones before it."""
    model = lm.model
    seqs, spans = [], []
    for ctx, ans in zip(contexts, answers):
        p = answer_prompt_ids(lm, ctx)
        a = lm.tokenizer(f" {ans}", add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        spans.append((len(p), len(p) + len(a)))
    out: list[tuple[float, bool]] = []
    for s in range(0, len(seqs), batch_size):
        chunk, sp = seqs[s:s + batch_size], spans[s:s + batch_size]
        ids = right_pad(chunk, 0, model.device)
        logits = model(ids, model.new_cache(*ids.shape)).float()
        for j, (a, b) in enumerate(sp):
            lg = logits[j, a - 1:b - 1]  # position i predicts token i + 1
            tok = ids[j, a:b]
            lp = torch.log_softmax(lg, dim=-1).gather(-1, tok[:, None]).mean().item()
            out.append((lp, bool((lg.argmax(-1) == tok).all())))
    return out


def generate_answers(lm: LoadedModel, contexts: list[str], max_new: int = 8) -> list[str]:
    """Greedy answers after ANSWER_PREFIX, decoded to text."""
    outs = greedy_batch(lm, [answer_prompt_ids(lm, c) for c in contexts], max_new)
    return [lm.tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def generate_cot(lm: LoadedModel, contexts: list[str], max_new: int) -> list[str]:
    prompts = [lm.encode_chat(cot_messages(c))[0] for c in contexts]
    outs = greedy_batch(lm, prompts, max_new)
    return [lm.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
