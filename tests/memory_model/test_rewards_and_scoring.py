"""REINFORCE rewards and the "correct" flag, checked against values worked out by hand.

The large models here are the tiny test Llama with hand-set weights, so what they write is
known in advance:
- a *bigram* model (attention and MLP outputs zeroed, an untied head that maps each token's
  embedding to a chosen next token): after the answer prompt it writes a chosen string;
- a *copying* model (one layer of uniform attention that adds the mean of the context's
  embeddings to the residual, a head that reads it back): tokens present in the context
  become likelier, which is what a reward for "the condensed prompt keeps the answer" has
  to see (a random model has no reason to: the plain tiny Llama fails this property).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from memory_model import problems as P
from memory_model.large import ANSWER_PREFIX
from memory_model.reinforce import ReinforceConfig, rewards

from tests.helpers import build_artifact, save_tiny_llama


def _edited_large_model(path, edit):
    """The tiny Llama with `edit(hf_model, tokenizer)` applied, as a served artifact."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from engine.runner import load_model

    src = save_tiny_llama(path / "hf", tie=False)  # an untied head to set by hand
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        edit(model, tok)
    model.save_pretrained(src)
    return load_model(build_artifact(src, path / "art"))


def _one(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def bigram_model(path, writes: list[str]):
    """A large model whose greedy answer after ANSWER_PREFIX is the pieces `writes`, then EOS.
    Each piece must be one token and no token may repeat (a bigram model has one successor)."""

    def edit(model, tok):
        for layer in model.model.layers:  # the residual stream stays the token's own embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        chain = [tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"][-1]]
        chain += [_one(tok, w) for w in writes] + [tok.eos_token_id]
        assert len(set(chain)) == len(chain)
        emb = model.model.embed_tokens.weight
        head = torch.zeros_like(model.lm_head.weight)
        for cur, nxt in zip(chain, chain[1:]):
            h = emb[cur] / emb[cur].pow(2).mean().sqrt()  # what the final RMSNorm hands the head
            head[nxt] += 5.0 * h / h.norm()  # logit 5 * |h| = 40 for the successor, ~N(0, 5) for others
        model.lm_head.weight.copy_(head)

    return _edited_large_model(path, edit)


def copying_model(path, strength: float = 10.0):
    """A large model that favours tokens present in its context (the copying model above)."""

    def edit(model, tok):
        hd = model.config.head_dim  # 16: 4 query heads over 2 KV heads
        l0 = model.model.layers[0]
        l0.self_attn.q_proj.weight.zero_()  # all scores 0: uniform attention over the prefix
        v = torch.zeros_like(l0.self_attn.v_proj.weight)  # (2 hd, 64): KV head g reads dims g*hd..
        v[:, :2 * hd] = torch.eye(2 * hd)
        l0.self_attn.v_proj.weight.copy_(v)
        o = torch.zeros_like(l0.self_attn.o_proj.weight)  # query heads 0 and 2 write their KV head back
        o[:hd, :hd] = strength * torch.eye(hd)
        o[hd:2 * hd, 2 * hd:3 * hd] = strength * torch.eye(hd)
        l0.self_attn.o_proj.weight.copy_(o)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        # the head scores each token by how much of its (normed) embedding the copied dims hold
        e = model.model.embed_tokens.weight
        head = torch.zeros_like(model.lm_head.weight)
        head[:, :2 * hd] = (e / e.pow(2).mean(-1, keepdim=True).sqrt())[:, :2 * hd]
        model.lm_head.weight.copy_(head)

    return _edited_large_model(path, edit)


# --- the reward ------------------------------------------------------------------------------

def _hand_reward(path, text: str, answer: int, rc: ReinforceConfig) -> tuple[float, bool, int]:
    """The reward of one condensed prompt, recomputed with transformers (not the engine) from
    its definition: mean log p(' answer' | chat(text) + ANSWER_PREFIX) + bonus * [greedy
    writes the answer] - length_penalty * (tokens of text) / 100."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    prompt = tok(chat, add_special_tokens=False)["input_ids"]
    prompt += tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    ans = tok(f" {answer}", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + ans])).logits[0].double(), -1)
        lp = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ans)) / len(ans)
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ok = P.is_correct(tok.decode(out[0, len(prompt):], skip_special_tokens=True), answer)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    return lp + rc.correct_bonus * ok - rc.length_penalty * n / 100, ok, n


def test_reward_is_answer_logprob_plus_bonus_minus_length_penalty(tmp_path):
    lm = bigram_model(tmp_path, [" ", "1", "2"])  # greedy answer: " 12"
    rc = ReinforceConfig(correct_bonus=2.5, length_penalty=7.0)  # unusual weights: each term must be scaled
    texts = ["Sam has 12 apples.", "Sam has 12 apples and then buys more of them later on.", "Q?"]
    answers = [12, 47, 12]
    got = rewards(lm, texts, answers, rc)
    for text, answer, g in zip(texts, answers, got):
        want, ok, n = _hand_reward(lm.path, text, answer, rc)
        assert g["correct"] == ok and g["large_tokens"] == n
        assert g["reward"] == pytest.approx(want, abs=1e-4), (text, answer)
    assert [g["correct"] for g in got] == [True, False, True]  # both sides of the bonus are exercised
    assert got[1]["answer_logp"] < -10 < got[0]["answer_logp"]  # and a real log-prob, not ~0 everywhere


def test_reinforce_step_reward_subtracts_kl_coef_times_kl(tmp_path, mm_checkpoint):
    """The reward the policy gradient uses is rewards() minus kl_coef * KL(pi || pi_ref). At
    step 1 pi == pi_ref (KL 0); after one large update the logged step-2 means must obey
    reward = answer_logp + bonus * accuracy - length_penalty * large_tokens / 100 - kl_coef * kl."""
    from memory_model.condense import MemoryModel
    from memory_model.checkpoint import read_log
    from memory_model.reinforce import reinforce

    lm = bigram_model(tmp_path, [" ", "1", "2"])
    rows = [{**p.to_dict(), "cot": P.template_cot(p)} for p in P.generate(12, 3)]
    rows[4]["answer"] = rows[6]["answer"] = 12  # some rewards carry the bonus
    rc = ReinforceConfig(steps=2, prompts_per_step=4, samples_per_prompt=2, max_new=6, lr=3e-2, kl_coef=2.0,
                         correct_bonus=1.5, length_penalty=3.0, eval_every=100, eval_size=2, save_every=100)
    mm = MemoryModel(mm_checkpoint, max_prompt=40, max_cot=60)
    log = reinforce(mm, lm, rows, rc, tmp_path / "rl", {"stage": "test"}, progress=False)
    step1, step2 = log[1], log[2]
    assert step1["kl"] == 0

    def without_kl(s):
        return s["answer_logp"] + rc.correct_bonus * s["accuracy"] - rc.length_penalty * s["large_tokens"] / 100

    assert step1["reward"] == pytest.approx(without_kl(step1), abs=2e-3)
    assert abs(rc.kl_coef * step2["kl"]) > 0.05  # the KL term is large enough to be seen
    assert step2["reward"] == pytest.approx(without_kl(step2) - rc.kl_coef * step2["kl"], abs=2e-3)
    assert read_log(tmp_path / "rl")[-1]["step"] == 2


def test_a_context_that_keeps_the_answer_earns_more_reward(tmp_path):
    lm = copying_model(tmp_path)
    rc = ReinforceConfig()
    with12, with47 = "Sam has 12 apples. How many?", "Sam has 47 apples. How many?"
    r = rewards(lm, [with12, with47, with12, with47], [12, 12, 47, 47], rc)
    assert r[0]["large_tokens"] == r[1]["large_tokens"]  # same length: only the answer term differs
    assert r[0]["reward"] > r[1]["reward"] + 0.5  # answer 12: the context holding 12 wins
    assert r[3]["reward"] > r[2]["reward"] + 0.5  # answer 47: the context holding 47 wins


# --- the correct flag --------------------------------------------------------------------------

@pytest.mark.parametrize("text,ok", [("12", True), ("12.0", True), ("The answer is 12.", True), (" 12 apples", True),
                                     ("$12.", True), ("123", False), ("12.5", False), ("-12", False),
                                     ("120", False), ("12,000", False), ("", False)])
def test_is_correct_needs_the_whole_number(text, ok):
    assert P.is_correct(text, 12) is ok


@pytest.mark.parametrize("writes,ok", [([" ", "1", "2"], True),  # ' 12' then EOS
                                       ([" ", "1", "2", "."], True),  # ' 12.'
                                       ([" ", "1", "2", ".", "0"], True),  # ' 12.0'
                                       ([" ", "1", "2", "3"], False),  # ' 123': ' 12' is only a prefix
                                       ([" ", "1", "2", ".", "5"], False),  # ' 12.5'
                                       ([" ", "1", "2", ",", "5"], False),  # ' 12,5' reads as 125
                                       ([" ", "-", "1", "2"], False)])  # ' -12'
def test_reward_correct_flag_is_the_whole_greedy_answer_not_a_prefix(tmp_path, writes, ok):
    """rewards()'s `correct` (the bonus) must agree with how evaluation judges the greedy answer
    (`is_correct` of what the large model writes), not only check that the answer's tokens come
    first: ' 123' is no correct answer to 12."""
    from memory_model.large import generate_answers

    lm = bigram_model(tmp_path, writes)
    written = generate_answers(lm, ["Q?"])[0]
    assert written == "".join(writes)  # the model writes what it was built to write
    assert P.is_correct(written, 12) is ok
    (r,) = rewards(lm, ["Q?"], [12], ReinforceConfig())
    assert r["correct"] is ok
    if ok:
        assert math.isclose(r["answer_logp"], 0.0, abs_tol=1e-3)  # the answer tokens themselves are certain
    json.dumps(r)  # rewards are logged as JSON: plain Python values


def test_fidelity_counts_the_question_words_kept_in_order():
    from memory_model.reinforce import fidelity

    q = "Sam had 12 apples. He ate 3 of them. How many are left?"
    assert fidelity(q, q + " Known: 12 - 3 = 9.") == 1.0  # equations added around it cost nothing
    assert fidelity(q, "Sam had 12 apples. How many are left? Known: 12 - 3 = 9.") == pytest.approx(8 / 13)
    assert fidelity(q, "Sam had 12 push-apples. He ate 3 of them. How many are left?") == 1.0  # kept in order
    assert fidelity(q, "Sam had 21 apples. He ate 3 of them. How many are left?") == pytest.approx(12 / 13)
    assert fidelity(q, "they they they they") == 0.0 and fidelity("", "x") == 1.0


def test_fidelity_term_prices_a_dropped_clause(tmp_path):
    lm = copying_model(tmp_path)
    q = "Sam has 12 apples and buys 3 more. How many?"
    texts = [q, "Sam has 12 apples. How many?"]
    plain = rewards(lm, texts, [12, 12], ReinforceConfig(), [q, q])
    priced = rewards(lm, texts, [12, 12], ReinforceConfig(fidelity_coef=2.0), [q, q])
    assert plain[0]["fidelity"] == 1.0 and plain[1]["fidelity"] == pytest.approx(6 / 10)
    assert priced[0]["reward"] == pytest.approx(plain[0]["reward"])
    assert priced[1]["reward"] == pytest.approx(plain[1]["reward"] - 2.0 * (1 - 6 / 10))
