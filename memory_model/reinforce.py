"""REINFORCE post-training of the memory model (the seed's policy-gradient stage).

Policy: the memory model. State: (prompt, the large model's chain-of-thought). Action: a
condensed prompt, sampled token by token. Reward, from the large model reading only the
condensed prompt (the same answer prompt the hybrid loop serves):

    r = mean log p_large(' answer' | condensed)  +  correct_bonus * [greedy writes the answer]
        - length_penalty * (condensed length in large-model tokens) / 100
        - fidelity_coef * (1 - share of the question's words kept, in order)
        - kl_coef * sum_t (log pi(a_t) - log pi_ref(a_t))          (pi_ref: the starting policy)

K samples per prompt; advantage = r_i - mean of the other K-1 rewards (leave-one-out) or
- mean of all K (`baseline=mean`), optionally divided by the batch's std; loss =
-mean(A_i * log pi(sample_i)) - entropy_coef * mean token entropy, pi (and pi_ref) being
softmax(logits / temperature), the distribution sampled. Reward, answer log-likelihood, greedy
accuracy, length, KL, entropy and distinct samples per prompt are logged every step; a fixed
validation set is condensed greedily every `eval_every` steps.
"""

from __future__ import annotations

import copy
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.runner import LoadedModel

from . import large
from .checkpoint import load_train_state, read_log, save_checkpoint
from .condense import MemoryModel
from .model import right_pad, sequence_logprobs


@dataclass
class ReinforceConfig:
    steps: int = 80  # policy updates
    prompts_per_step: int = 8
    samples_per_prompt: int = 4  # K
    max_new: int = 100  # condensed-prompt budget (memory-model tokens)
    # The policy trained is softmax(logits / temperature). A warm start that imitated a
    # deterministic target is near one-hot at 1.0 (entropy 0.003 nats a token for the 70M model:
    # most of K samples identical, nothing to compare); a higher temperature explores, and greedy
    # serving is unchanged by it.
    temperature: float = 1.0
    top_k: int = 0
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    baseline: str = "loo"  # "loo" (leave-one-out) or "mean"
    normalize_advantages: bool = True
    kl_coef: float = 0.05
    entropy_coef: float = 0.01
    length_penalty: float = 0.1  # reward lost per 100 large-model tokens of condensed prompt
    correct_bonus: float = 1.0
    # The answer reward cannot see the restated question once "Known:" carries the result (a
    # run at temperature 1.5 learned to garble it: 19.7% vs 21.7% over 4 loops); this prices a
    # dropped or mangled question word directly.
    fidelity_coef: float = 0.0
    eval_every: int = 20
    eval_size: int = 32
    save_every: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.baseline not in ("loo", "mean"):
            raise ValueError("baseline must be 'loo' or 'mean'")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: REINFORCE samples its actions")
        if self.baseline == "loo" and self.samples_per_prompt < 2:
            raise ValueError("a leave-one-out baseline needs samples_per_prompt >= 2")


def rewards(lm: LoadedModel, texts: list[str], answers: list[int], rc: ReinforceConfig,
            questions: list[str] | None = None) -> list[dict]:
    """Each condensation's reward and its parts; `questions` (what each condensed) for the
    fidelity term (without them fidelity counts as 1: no term)."""
    scored = large.score_answers(lm, texts, answers)
    out = []
    for i, (text, (lp, ok)) in enumerate(zip(texts, scored)):
        n_large = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        fid = fidelity(questions[i], text) if questions is not None else 1.0
        r = lp + rc.correct_bonus * ok - rc.length_penalty * n_large / 100 - rc.fidelity_coef * (1 - fid)
        out.append({"reward": r, "answer_logp": lp, "correct": ok, "large_tokens": n_large, "fidelity": fid})
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+(?:\.\d+)?", text.lower())


def fidelity(question: str, text: str) -> float:
    """Share of the question's words (and numbers) the condensation keeps in their order: the
    longest common subsequence of the two word lists over the question's length. Dropped or
    mangled words lower it; words added around them (the "Known:" equations) do not."""
    q, c = _words(question), _words(text)
    if not q:
        return 1.0
    prev = [0] * (len(c) + 1)
    for w in q:
        cur = [0]
        for j, v in enumerate(c):
            cur.append(prev[j] + 1 if w == v else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(q)


def distinct_per_prompt(texts: list[str], k: int) -> float:
    """Mean number of distinct texts among each prompt's K consecutive samples."""
    return sum(len(set(texts[i:i + k])) for i in range(0, len(texts), k)) / (len(texts) // k)


def advantages(r: torch.Tensor, baseline: str, normalize: bool) -> torch.Tensor:
    """r (P, K) -> advantages (P, K)."""
    k = r.shape[1]
    if baseline == "loo":
        b = (r.sum(1, keepdim=True) - r) / (k - 1)
    else:
        b = r.mean(1, keepdim=True)
    a = r - b
    if normalize:
        a = a / (a.std() + 1e-6)
    return a


@torch.no_grad()
def evaluate_policy(mm: MemoryModel, lm: LoadedModel, rows: list[dict], rc: ReinforceConfig) -> dict:
    """The policy's greedy condensations scored like the reward, and the empty-CoT control: the
    same policy given the question and no chain-of-thought. A policy that learns to answer
    alone raises the control too; one that learns to condense widens the gap."""
    out = {}
    for prefix, cot in (("eval_", lambda r: r["cot"]), ("eval_empty_cot_", lambda r: "")):
        texts = [mm.condense(r["question"], cot(r), max_new=rc.max_new).text for r in rows]
        rs = rewards(lm, texts, [r["answer"] for r in rows], rc, [r["question"] for r in rows])
        n = len(rs)
        out |= {f"{prefix}accuracy": sum(x["correct"] for x in rs) / n,
                f"{prefix}fidelity": sum(x["fidelity"] for x in rs) / n,
                f"{prefix}answer_logp": sum(x["answer_logp"] for x in rs) / n,
                f"{prefix}large_tokens": sum(x["large_tokens"] for x in rs) / n,
                f"{prefix}reward": sum(x["reward"] for x in rs) / n}
    return out


def reinforce(mm: MemoryModel, lm: LoadedModel, rows: list[dict], rc: ReinforceConfig, out: Path, meta: dict,
              resume: bool = False, progress: bool = True) -> list[dict]:
    policy = mm.model
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=rc.lr, betas=(0.9, 0.95), weight_decay=rc.weight_decay)
    rng = random.Random(rc.seed)
    eval_rows = rows[:rc.eval_size]  # fixed; sampled training prompts come from the rest
    train_rows = rows[rc.eval_size:] or rows
    step, log = 0, []
    if resume:
        state = load_train_state(out)
        if state is None:
            raise FileNotFoundError(f"--resume: {out} has no train_state.pt")
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        rng.seed(rc.seed * 1_000_003 + step)  # a fresh but deterministic prompt order after resume
        log = read_log(out)
        ref_weights = state.get("ref_weights")
        if ref_weights is not None:
            ref.load_state_dict(ref_weights)
    meta = {**meta, "reinforce_config": asdict(rc)}

    def save(final: bool = False) -> None:
        ts = {"optimizer": opt.state_dict(), "step": step,
              "ref_weights": {k: v for k, v in ref.state_dict().items() if k != "output.weight"}}
        save_checkpoint(out, policy, mm.cfg, mm.tok, {**meta, "step": step, "complete": final},
                        train_state=ts, log=log)

    if step == 0:
        log.append({"step": 0, **evaluate_policy(mm, lm, eval_rows, rc)})
    bar = tqdm(total=rc.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    k = rc.samples_per_prompt
    while step < rc.steps:
        t0 = time.perf_counter()
        batch = [train_rows[rng.randrange(len(train_rows))] for _ in range(rc.prompts_per_step)]
        policy.eval()
        seqs, starts, texts, answers, questions = [], [], [], [], []
        for i, r in enumerate(batch):
            samples = mm.sample(r["question"], r["cot"], n=k, max_new=rc.max_new, temperature=rc.temperature,
                                top_k=rc.top_k, seed=rc.seed * 1_000_003 + step * 97 + i)
            ids = mm.input_ids(r["question"], r["cot"])
            for c in samples:
                seqs.append(ids + c.token_ids)
                starts.append(len(ids))
                texts.append(c.text)
                answers.append(r["answer"])
                questions.append(r["question"])
        t_sample = time.perf_counter() - t0
        rs = rewards(lm, texts, answers, rc, questions)
        t_score = time.perf_counter() - t0 - t_sample
        policy.train()
        dev = next(policy.parameters()).device
        ids = right_pad(seqs, mm.cfg.pad_id, dev)
        start = torch.tensor(starts, device=dev)
        length = torch.tensor([len(s) for s in seqs], device=dev)
        logp, ent, tok_logp = sequence_logprobs(policy, ids, start, length, rc.temperature)
        with torch.no_grad():
            _, _, ref_tok_logp = sequence_logprobs(ref, ids, start, length, rc.temperature)
            kl = (tok_logp - ref_tok_logp).sum(-1)  # sampled-token estimate of KL(pi || pi_ref)
            r = torch.tensor([x["reward"] for x in rs], device=dev) - rc.kl_coef * kl
            adv = advantages(r.view(-1, k), rc.baseline, rc.normalize_advantages).view(-1)
        loss = -(adv * logp).mean() - rc.entropy_coef * ent.mean()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), rc.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        n = len(rs)
        rec = {"step": step, "reward": round(r.mean().item(), 4),
               "answer_logp": round(sum(x["answer_logp"] for x in rs) / n, 4),
               "accuracy": round(sum(x["correct"] for x in rs) / n, 4),
               "large_tokens": round(sum(x["large_tokens"] for x in rs) / n, 1),
               "fidelity": round(sum(x["fidelity"] for x in rs) / n, 4),
               "policy_tokens": round(float((length - start).float().mean()), 1),
               # exploration: distinct condensations among a prompt's K samples (1 = nothing to compare)
               "distinct": round(distinct_per_prompt(texts, k), 2),
               "kl": round(kl.mean().item(), 4), "entropy": round(ent.mean().item(), 4),
               "grad_norm": round(gnorm, 3), "sample_s": round(t_sample, 2), "score_s": round(t_score, 2),
               "step_s": round(time.perf_counter() - t0, 2)}
        if step % rc.eval_every == 0 or step == rc.steps:
            policy.eval()
            rec.update(evaluate_policy(mm, lm, eval_rows, rc))
        log.append(rec)
        bar.update(1)
        bar.set_postfix(r=f"{rec['reward']:.2f}", acc=f"{rec['accuracy']:.2f}", len=f"{rec['large_tokens']:.0f}",
                        kl=f"{rec['kl']:.2f}")
        if step % rc.save_every == 0 and step < rc.steps:
            save()
    bar.close()
    policy.eval()
    save(final=True)
    return log
