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
from tasks.cot import ANSWER_PREFIX, cot_prompt  # one prompt format for task training, serving and evaluation

from .model import right_pad
from .problems import NUMBER_RE, is_correct


def cot_messages(context: str) -> list[dict]:
    """Ask for chain-of-thought about the current prompt."""
    return [{"role": "user", "content": cot_prompt(context)}]


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


# Greedy tokens read past the reference answer to see whether the number goes on (' 12' ->
# ' 123', ' 12.5'): enough for a separator and a digit, or an end.
ANSWER_LOOKAHEAD = 4


def _number_ended(text: str) -> bool:
    """Whether the first number of `text` can no longer grow: something that cannot continue
    it follows ('12 apples', '12.\n'), unlike '12', '12.' or '12,' (more digits may come)."""
    m = NUMBER_RE.search(text)
    return m is None or text[m.end():] not in ("", ".")


@torch.inference_mode()
def score_answers(lm: LoadedModel, contexts: list[str], answers: list[int], batch_size: int = 8
                  ) -> list[tuple[float, bool]]:
    """Per context: (mean log-probability per token of ' {answer}' after the answer prompt,
    whether greedy decoding answers correctly). Teacher-forced, one batched forward of
    right-padded rows: greedy writes the reference iff every reference token is the argmax
    given the ones before it. That alone would accept a prefix (' 12' of ' 123'), so where it
    holds, the greedy continuation is read on until the number ends, and the answer is judged
    as evaluation judges it (`is_correct` of the text)."""
    model = lm.model
    seqs, spans = [], []
    for ctx, ans in zip(contexts, answers):
        p = answer_prompt_ids(lm, ctx)
        a = lm.tokenizer(f" {ans}", add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        spans.append((len(p), len(p) + len(a)))
    logps: list[float] = []
    after: dict[int, list[int]] = {}  # row -> greedy tokens after the reference, where greedy writes it
    for s in range(0, len(seqs), batch_size):
        chunk, sp = seqs[s:s + batch_size], spans[s:s + batch_size]
        ids = right_pad(chunk, 0, model.device)
        logits = model(ids, model.new_cache(*ids.shape)).float()
        for j, (a, b) in enumerate(sp):
            lg = logits[j, a - 1:b - 1]  # position i predicts token i + 1
            tok = ids[j, a:b]
            logps.append(torch.log_softmax(lg, dim=-1).gather(-1, tok[:, None]).mean().item())
            if bool((lg.argmax(-1) == tok).all()):
                after[s + j] = [int(logits[j, b - 1].argmax())]
    correct = _judge_greedy_answers(lm, seqs, spans, answers, after, batch_size)
    return [(lp, correct.get(i, False)) for i, lp in enumerate(logps)]


def _judge_greedy_answers(lm: LoadedModel, seqs: list[list[int]], spans: list[tuple[int, int]], answers: list[int],
                          after: dict[int, list[int]], batch_size: int) -> dict[int, bool]:
    """is_correct of the greedy answer (reference tokens + what follows them) for the rows in
    `after`, extending each row's continuation greedily until EOS or its number ends (at most
    ANSWER_LOOKAHEAD more tokens, one batched forward each over the rows still open: usually
    none, or one after a '.')."""
    model = lm.model
    out: dict[int, bool] = {}
    for extend in range(ANSWER_LOOKAHEAD + 1):
        open_rows = []
        for i, cont in after.items():
            if i in out:
                continue
            ended = cont[-1] in lm.eos_ids
            text = lm.tokenizer.decode(seqs[i][spans[i][0]:] + (cont[:-1] if ended else cont),
                                       skip_special_tokens=True)
            if ended or _number_ended(text) or extend == ANSWER_LOOKAHEAD:  # (last: judge what is there)
                out[i] = is_correct(text, answers[i])
            else:
                open_rows.append(i)
        for s in range(0, len(open_rows), batch_size):
            rows = open_rows[s:s + batch_size]
            ids = right_pad([seqs[i] + after[i] for i in rows], 0, model.device)
            logits = model(ids, model.new_cache(*ids.shape)).float()
            for j, i in enumerate(rows):
                after[i].append(int(logits[j, len(seqs[i]) + len(after[i]) - 1].argmax()))
    return out


def generate_answers(lm: LoadedModel, contexts: list[str], max_new: int = 8) -> list[str]:
    """Greedy answers after ANSWER_PREFIX, decoded to text."""
    outs = greedy_batch(lm, [answer_prompt_ids(lm, c) for c in contexts], max_new)
    return [lm.tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def generate_cot(lm: LoadedModel, contexts: list[str], max_new: int) -> list[str]:
    prompts = [lm.encode_chat(cot_messages(c))[0] for c in contexts]
    outs = greedy_batch(lm, prompts, max_new)
    return [lm.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
