"""Memory model: problems, tokenizer, model + KV cache, checkpoints, and one tiny step of
each kind of training (pretrain, sft, reinforce) through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memory_model import problems as P
from memory_model.checkpoint import load_checkpoint, read_log
from memory_model.data import condense_examples, pad_batch, reference_condensation
from memory_model.model import PRESETS, MemoryModelConfig, build_model, from_preset, n_params
from memory_model.tokenizer import Tokenizer

from tests.helpers import save_tiny_memory_model


def test_problems_are_deterministic_disjoint_and_correct():
    a = P.make_splits({"train": 200, "heldout": 50})
    b = P.make_splits({"train": 200, "heldout": 50})
    assert a == b
    assert not {p.question for p in a["train"]} & {p.question for p in a["heldout"]}
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for p in a["train"] + a["heldout"]:
        for op, x, y, r in p.steps:
            assert ops[op](x, y) == r
        assert p.steps[-1][3] == p.answer
        assert P.is_correct(P.template_cot(p), p.answer) is (P.extract_answer(P.template_cot(p)) == p.answer)


def test_pretraining_problems_never_include_train_or_heldout():
    reserved = P.make_splits(dict(P.RESERVED))
    pre = P.make_splits({"pretrain": 3000})["pretrain"]
    held = {p.question for p in reserved["heldout"]} | {p.question for p in reserved["train"]}
    assert not held & {p.question for p in pre}
    assert {p.question for p in pre} <= P.pretrain_draws(6000)
    with pytest.raises(ValueError, match="limited"):
        P.make_splits({"heldout": P.RESERVED["heldout"] + 1})


def test_answer_extraction_and_equations():
    assert P.extract_answer(" 1,234 apples") == 1234
    assert P.extract_answer(" $12.") == 12
    assert P.extract_answer(" 2.5") is None
    assert P.extract_answer(" none") is None
    cot = "First 3 + 4 = 7 apples. Then 7 * 2 = 14. So 14 - 5 = 9."
    assert P.equations(cot) == ["3 + 4 = 7", "7 * 2 = 14", "14 - 5 = 9"]
    assert reference_condensation("Q?", cot) == "Q? Known: 7 * 2 = 14; 14 - 5 = 9."
    assert reference_condensation("Q?", "no arithmetic here") == "Q?"
    # a later loop: P is already condensed; its known results and the new CoT's merge, the last two kept
    assert reference_condensation("Q? Known: 3 + 4 = 7.", "7 * 2 = 14.") == "Q? Known: 3 + 4 = 7; 7 * 2 = 14."
    assert reference_condensation("Q? Known: 3 + 4 = 7; 7 * 2 = 14.", "14 - 5 = 9.") == "Q? Known: 7 * 2 = 14; 14 - 5 = 9."
    assert reference_condensation("Q? Known: 3 + 4 = 7.", "The answer is 7.") == "Q? Known: 3 + 4 = 7."


def test_tokenizer_round_trips_and_frames_the_task(mm_tokenizer):
    tok = Tokenizer(mm_tokenizer)
    text = "Zoë has 17 apples. 17 + 25 = 42 — naïve café ✓"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing becomes <unk>
    assert [tok.sp.id_to_piece(i) for i in tok.encode("42")][-2:] == ["4", "2"]  # digits split
    ids = tok.condense_input("a b c d e f g h", "1 2 3 4 5 6 7 8 9", max_prompt=4, max_cot=5)
    assert ids[:2] == [tok.bos_id, tok.prompt_id] and ids[-1] == tok.condensed_id
    assert ids.count(tok.cot_id) == 1
    p = ids[2:ids.index(tok.cot_id)]
    c = ids[ids.index(tok.cot_id) + 1:-1]
    assert len(p) == 4 and len(c) == 5
    assert c == tok.encode("1 2 3 4 5 6 7 8 9")[-5:]  # the latest reasoning is kept


def test_tokenizer_without_control_tokens_is_refused(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(P.template_cot(p) for p in P.generate(300, 0)),
                                   model_prefix=str(tmp_path / "plain"), vocab_size=60, minloglevel=2)
    with pytest.raises(ValueError, match="control tokens"):
        Tokenizer(tmp_path / "plain.model")


def test_presets_sizes():
    with torch.device("meta"):
        counts = {name: n_params(build_model(from_preset(name, vocab_size=16384), seed=None))
                  for name in PRESETS}
    assert 65e6 < counts["mm-70m"] < 75e6
    assert counts["mm-tiny"] < counts["mm-8m"] < counts["mm-70m"]
    with pytest.raises(ValueError, match="unknown preset"):
        from_preset("mm-1b")
    with pytest.raises(ValueError, match="unknown memory-model config"):
        MemoryModelConfig.from_dict({"dim": 8, "bogus": 1})


def test_incremental_decode_equals_full_forward():
    cfg = from_preset("mm-tiny", vocab_size=97)
    model = build_model(cfg, seed=3).eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        parts = [model(ids[:, :5], cache)]
        parts += [model(ids[:, t:t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.pos == 12


def test_checkpoint_round_trip_is_exact(mm_tokenizer, tmp_path):
    path = save_tiny_memory_model(tmp_path / "ck", mm_tokenizer, seed=5)
    model, cfg, tok, meta = load_checkpoint(path)
    ref = build_model(cfg, seed=5).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
    assert model.output.weight is model.tok_embeddings.weight  # tied after loading
    assert meta["stage"] == "random"
    assert not list(tmp_path.glob(".ck*"))  # no temporary directory left behind
    # a second save replaces the first atomically
    save_tiny_memory_model(path, mm_tokenizer, seed=6)
    assert not torch.equal(load_checkpoint(path)[0].tok_embeddings.weight, model.tok_embeddings.weight)


def test_checkpoint_with_wrong_tokenizer_is_refused(mm_tokenizer, tmp_path):
    path = save_tiny_memory_model(tmp_path / "ck", mm_tokenizer)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["vocab_size"] += 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer has"):
        load_checkpoint(path)


def test_sft_batches_train_only_on_the_target(mm_tokenizer):
    tok = Tokenizer(mm_tokenizer)
    rows = [{"question": "Sam has 3 apples. How many?", "cot": "3 + 4 = 7. So 7."}]
    (ids, start), = condense_examples(rows, tok, 64, 64, 32)
    x, y = pad_batch([(ids, start), (ids[:start + 2], start)], tok.pad_id)
    assert ids[start - 1] == tok.condensed_id and ids[-1] == tok.eos_id
    assert (y[0, :start - 1] == -100).all() and (y[0, start - 1:] != -100).all()
    assert tok.decode(y[0, start - 1:].tolist()) == reference_condensation(rows[0]["question"], rows[0]["cot"])
    assert (y[1] != -100).sum() == 2  # the shorter row's padding is ignored


def test_advantages_leave_one_out_and_mean():
    from memory_model.reinforce import advantages

    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    loo = advantages(r, "loo", normalize=False)
    torch.testing.assert_close(loo, torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3]]))
    mean = advantages(r, "mean", normalize=False)
    torch.testing.assert_close(mean, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))
    assert advantages(r, "loo", normalize=True).std().item() == pytest.approx(1.0, abs=1e-4)


def _cot_jsonl(path, n=24):
    rows = [{**p.to_dict(), "cot": P.template_cot(p)} for p in P.generate(n, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pretrain_step_checkpoint_and_resume(mm_tokenizer, tmp_path):
    from memory_model.__main__ import main

    out = tmp_path / "pre"
    common = ["pretrain", "--preset", "mm-tiny", "--tokenizer", str(mm_tokenizer), "--data", "problems:200",
              "--out", str(out), "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--save-every", "2",
              "--warmup", "1", "--log-every", "1", "--quiet"]
    assert main(common + ["--steps", "3"]) == 0
    log = read_log(out)
    assert [r["step"] for r in log][-1] == 3 and all(r["tok_per_s"] > 0 for r in log)
    assert main(common + ["--steps", "3"]) == 2  # exists: refuses to overwrite without --force/--resume
    assert main(common + ["--steps", "5", "--resume"]) == 0
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 6))
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 5 and meta["complete"] and meta["stage"] == "pretrain"


def test_pretraining_reduces_loss(mm_tokenizer, tmp_path):
    from memory_model.__main__ import main

    out = tmp_path / "pre"
    assert main(["pretrain", "--preset", "mm-tiny", "--tokenizer", str(mm_tokenizer), "--data", "problems:300",
                 "--out", str(out), "--steps", "40", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3",
                 "--warmup", "5", "--eval-every", "40", "--quiet"]) == 0
    log = read_log(out)
    uniform = math.log(Tokenizer(mm_tokenizer).vocab_size)  # the loss of an untrained model
    assert log[-1]["val_loss"] < 0.7 * uniform


def test_sft_and_reinforce_steps(mm_checkpoint, llama_artifact, tmp_path):
    from memory_model.__main__ import main

    data = _cot_jsonl(tmp_path / "train.jsonl")
    sft = tmp_path / "sft"
    assert main(["sft", "--init", str(mm_checkpoint), "--data", str(data), "--synthetic", "20", "--out", str(sft),
                 "--steps", "2", "--batch-size", "4", "--warmup", "1", "--quiet"]) == 0
    assert json.loads((sft / "config.json").read_text())["stage"] == "sft"
    rl = tmp_path / "rl"
    more = _cot_jsonl(tmp_path / "loops.jsonl")  # later-loop rows come as a second file
    assert main(["reinforce", "--init", str(sft), "--large", str(llama_artifact), "--data", f"{data},{more}",
                 "--out", str(rl), "--steps", "2", "--prompts", "2", "--samples", "3", "--max-new", "8",
                 "--temperature", "1.5", "--eval-every", "2", "--eval-size", "4", "--quiet"]) == 0
    meta = json.loads((rl / "config.json").read_text())
    assert meta["data"] == f"{data},{more}" and meta["reinforce_config"]["temperature"] == 1.5
    log = read_log(rl)
    assert log[0]["step"] == 0 and "eval_accuracy" in log[0]
    assert "eval_empty_cot_accuracy" in log[0] and "eval_empty_cot_answer_logp" in log[-1]  # the control
    step = log[-1]
    assert step["step"] == 2 and "eval_reward" in step
    for key in ("reward", "answer_logp", "accuracy", "large_tokens", "kl", "entropy"):
        assert key in step
    assert 0 < step["policy_tokens"] <= 8
    assert 1 <= step["distinct"] <= 3  # distinct samples of a prompt, of K = 3
    # export for shipping: no optimizer state, the logs of every stage in the lineage
    from memory_model.checkpoint import export_checkpoint

    ship = tmp_path / "ship"
    assert export_checkpoint(rl, ship) == ["reinforce", "sft", "random"]
    assert sorted(f.name for f in ship.iterdir()) == ["config.json", "log-reinforce.jsonl", "log-sft.jsonl",
                                                      "model.safetensors", "tokenizer.model"]
    torch.testing.assert_close(load_checkpoint(ship)[0].tok_embeddings.weight,
                               load_checkpoint(rl)[0].tok_embeddings.weight)
    before, _, _, _ = load_checkpoint(sft)
    after, _, _, _ = load_checkpoint(rl)
    assert not torch.equal(before.tok_embeddings.weight, after.tok_embeddings.weight)  # the policy moved


def test_reinforce_raises_the_rewarded_action():
    """Toy bandit: REINFORCE with a leave-one-out baseline moves probability to the token
    that earns reward, through the same sequence_logprobs/advantages code."""
    from memory_model.model import sequence_logprobs
    from memory_model.reinforce import advantages

    cfg = from_preset("mm-tiny", vocab_size=8)
    model = build_model(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.tensor([[1, 2]])

    def p_good():
        with torch.no_grad():
            return torch.softmax(model(prompt)[0, -1], -1)[5].item()

    before = p_good()
    for _ in range(30):
        with torch.no_grad():
            probs = torch.softmax(model(prompt)[0, -1], -1)
        acts = torch.multinomial(probs, 8, replacement=True, generator=gen)
        ids = torch.cat([prompt.expand(8, -1), acts[:, None]], dim=1)
        logp, _, _ = sequence_logprobs(model, ids, torch.full((8,), 2), torch.full((8,), 3))
        r = (acts == 5).float().view(1, -1)
        adv = advantages(r, "loo", normalize=False).view(-1)
        (-(adv * logp).mean()).backward()
        opt.step()
        opt.zero_grad()
    assert p_good() > max(0.5, 3 * before)


def test_sequence_logprobs_are_those_of_the_tempered_policy():
    """REINFORCE samples at a temperature; the log-probs it differentiates must be those of
    softmax(logits / T), the distribution the samples came from, over generated positions only."""
    from memory_model.model import sequence_logprobs

    model = build_model(from_preset("mm-tiny", vocab_size=12), seed=0)
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 6, 7, 0, 0]])
    start, length = torch.tensor([2, 1]), torch.tensor([5, 3])
    with torch.no_grad():
        logp2, _, _ = sequence_logprobs(model, ids, start, length, temperature=2.0)
        logp1, _, _ = sequence_logprobs(model, ids, start, length)
        lp = torch.log_softmax(model(ids[:, :-1]).float() / 2.0, -1)
    want = [sum(lp[0, i - 1, ids[0, i]] for i in (2, 3, 4)), sum(lp[1, i - 1, ids[1, i]] for i in (1, 2))]
    torch.testing.assert_close(logp2, torch.stack(want))
    assert not torch.allclose(logp1, logp2)
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(model, ids, start, length, temperature=0.0)
    from memory_model.reinforce import ReinforceConfig

    with pytest.raises(ValueError, match="temperature"):
        ReinforceConfig(temperature=0.0)


def test_condense_samples_and_stops(mm_checkpoint):
    from memory_model.condense import MemoryModel

    mm = MemoryModel(mm_checkpoint, max_prompt=40, max_cot=80)
    outs = mm.sample("Sam has 3 apples.", "3 + 4 = 7.", n=3, max_new=6, temperature=1.0, seed=1)
    assert len(outs) == 3 and all(len(o.token_ids) <= 6 for o in outs)
    assert all(o.stopped == (o.token_ids[-1] == mm.cfg.eos_id) for o in outs if o.token_ids)
    g1 = mm.condense("Sam has 3 apples.", "3 + 4 = 7.", max_new=6)
    g2 = mm.condense("Sam has 3 apples.", "3 + 4 = 7.", max_new=6)
    assert g1.text == g2.text  # greedy is deterministic
    with pytest.raises(ValueError, match="max_prompt"):
        MemoryModel(mm_checkpoint, max_prompt=400, max_cot=200)


def test_evaluate_reports_every_condition(mm_checkpoint, llama_artifact, tmp_path):
    from memory_model.__main__ import main

    data = _cot_jsonl(tmp_path / "heldout.jsonl", n=3)
    out = tmp_path / "eval.json"
    assert main(["eval", "--large", str(llama_artifact), "--data", str(data), "--policy", f"rl={mm_checkpoint}",
                 "--max-new", "6", "--json", str(out), "--exclude-pretrain-draws", "0", "--quiet"]) == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"question", "full-cot", "rl", "rl-empty-cot", "rule", "truncate-head", "truncate-tail"}
    for r in res.values():
        assert r["n"] == 3 and 0 <= r["accuracy"] <= 1 and r["answer_logp"] < 0 and r["seconds"] > 0
    assert res["full-cot"]["context_tokens"] > res["question"]["context_tokens"]


def test_empty_cot_control_feeds_the_memory_model_no_reasoning(mm_checkpoint, llama_artifact, monkeypatch):
    from engine.runner import load_model
    from memory_model import evaluate as ev
    from memory_model.condense import MemoryModel

    seen = []
    mm = MemoryModel(mm_checkpoint)
    real = mm.condense
    monkeypatch.setattr(mm, "condense", lambda q, cot, **kw: seen.append(cot) or real(q, cot, **kw))
    rows = [{"question": "Sam has 3 apples. How many?", "cot": "3 + 0 = 3.", "answer": 3}]
    res = ev.evaluate(load_model(llama_artifact), rows, {"mm": mm}, max_new=4)
    assert "mm-empty-cot" in res and seen == ["3 + 0 = 3.", ""]


def test_task_rows_carry_the_equation_steps_as_refined_targets():
    from memory_model.cot import task_rows
    from memory_model.data import refined_condensation

    rows = task_rows("svamp-train")
    assert len(rows) == 699 and all(isinstance(r["answer"], int) for r in rows)  # one contradictory row left out
    two_step = next(r for r in rows if len(r["steps"]) == 2)
    target = refined_condensation(two_step["question"], two_step["steps"])
    assert target.startswith(two_step["question"] + " Known: ") and target.endswith(f"= {two_step['answer']}.")
    assert not {r["id"] for r in rows} & {p.id for p in __import__("tasks.data").data.load("svamp-dev")}


def test_make_task_data_holds_out_the_tail_and_writes_the_models_cot(llama_artifact, tmp_path, monkeypatch):
    from engine.runner import load_model
    from memory_model import cot, large
    from memory_model.cot import make_task_cot_data, read_jsonl

    original = cot.task_rows
    monkeypatch.setattr(cot, "task_rows", lambda task: original(task)[:6])  # six problems keep it fast
    lm = load_model(llama_artifact)
    stats = make_task_cot_data(lm, tmp_path, "svamp-train", n_val=2, max_new=3)
    train, held = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "heldout.jsonl")
    assert (len(train), len(held)) == (4, 2) and stats["train"] == 4
    assert [r["id"] for r in train + held] == [r["id"] for r in original("svamp-train")[:6]]
    assert train[0]["cot"] == large.generate_cot(lm, [train[0]["question"]], 3)[0]


def test_int8_memory_model_swaps_every_linear_and_stays_close_to_float(mm_checkpoint):
    from engine.quant import Int8WeightOnlyLinear
    from memory_model.condense import MemoryModel

    f, q = MemoryModel(mm_checkpoint), MemoryModel(mm_checkpoint, quant="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in q.model.modules())
    assert sum(isinstance(m, Int8WeightOnlyLinear) for m in q.model.modules()) == 4 * len(q.model.layers) + 1  # wqkv, wo, w13, w2; the head
    assert q.model.tok_embeddings.weight.dtype == torch.float32  # the tied embedding keeps its float rows
    ids = torch.tensor([f.input_ids("Sam has 3 apples and buys 4.", "3 + 4 = 7")])
    with torch.inference_mode():
        lf, lq = f.model(ids).float(), q.model(ids).float()
    assert (lq - lf).norm() / lf.norm() < 0.05
    assert (lq.argmax(-1) == lf.argmax(-1)).float().mean() > 0.9
    assert isinstance(q.condense("Sam has 3 apples and buys 4.", "3 + 4 = 7", max_new=6).text, str)
    with pytest.raises(ValueError, match="int8"):
        MemoryModel(mm_checkpoint, quant="int4")
