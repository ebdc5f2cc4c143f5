"""Grammar-constrained decoding in the engine: the mask is exact, every row follows its own
matcher, a constrained request samples the same tokens alone or in a batch, and a complete
document ends the row."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from compress.build import load_hf_dir
from engine.batching import BatchConfig, BatchEngine, Sequence
from engine.config import ModelArgs
from engine.generate import SamplingParams, generate
from engine.grammar import GrammarError, GrammarSpec, compile_grammar, grammar_tokenizer, unpack_bitmask
from engine.loader import build_model
from engine.sampling import sample
from tests.engine.test_batching import run

SCHEMA = {"type": "object", "properties": {"k": {"enum": ["ab", "cd"]}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 50}},
          "required": ["k", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def setup(llama_dir):
    from transformers import AutoTokenizer
    config, state = load_hf_dir(llama_dir)
    model = build_model(ModelArgs.from_hf_config(config), state, max_len=256)
    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    eos = {tok.eos_token_id}
    return model, tok, grammar_tokenizer(tok, model.args.vocab_size, eos), eos


def _grammar(setup, spec):
    model, _, gt, _ = setup
    return compile_grammar(gt, spec, model.args.vocab_size)


def test_unpack_bitmask_is_bit_j_of_word_w():
    bits = torch.tensor([[-(2**31) + 1, 0, 1 << 4]], dtype=torch.int32)  # 0x80000001: tokens 0, 31; then 68
    allowed = unpack_bitmask(bits, 70)
    assert allowed.shape == (1, 70) and allowed[0].nonzero().flatten().tolist() == [0, 31, 68]


def test_sampling_never_leaves_the_allowed_set():
    logits = torch.randn(4, 50)
    allowed = torch.zeros(4, 50, dtype=torch.bool)
    allowed[:, [3, 17]] = True
    g = torch.Generator().manual_seed(0)
    for temp in (0.0, 1.0, 5.0):
        assert set(sample(logits, temp, top_k=2, top_p=0.5, generator=g, allowed=allowed).tolist()) <= {3, 17}


def _texts(setup, params, prompt):
    _, tok, _, eos = setup
    rows = [[] for _ in range(params.n)]
    ended = [False] * params.n
    for out in generate(setup[0], prompt, params, eos, threading.Event()):
        for i, a in enumerate(out.active):
            if a and not out.eos[i]:
                rows[i].append(out.tokens[i])
            ended[i] = ended[i] or out.eos[i] or bool(out.ended and out.ended[i])
    return [tok.decode(r) for r in rows], ended


def test_every_row_of_a_constrained_request_is_a_valid_document(setup):
    g = _grammar(setup, GrammarSpec("json", SCHEMA))
    texts, ended = _texts(setup, SamplingParams(max_tokens=120, temperature=1.5, seed=3, n=4, grammar=g), [5, 6, 7])
    assert all(ended)
    docs = [json.loads(t) for t in texts]
    assert all(d["k"] in ("ab", "cd") and 0 <= d["n"] <= 50 and set(d) == {"k", "n"} for d in docs)


def test_a_complete_choice_ends_the_row_without_waiting_for_eos(setup):
    g = _grammar(setup, GrammarSpec("choice", ["yes", "no"]))
    texts, ended = _texts(setup, SamplingParams(max_tokens=50, temperature=1.0, seed=1, n=3, ignore_eos=True,
                                                grammar=g), [9, 10])
    assert all(ended) and set(texts) <= {"yes", "no"}


def test_constrained_request_in_a_batch_equals_alone(setup):
    model = setup[0]
    g = _grammar(setup, GrammarSpec("regex", "[a-z]{3,8}( [a-z]{2,5}){0,3}"))
    p = SamplingParams(max_tokens=40, temperature=0.8, seed=5, n=2, grammar=g)
    ref = run(BatchEngine(model, BatchConfig(max_num_seqs=4)), {0: [Sequence([4, 5, 6], p, setup[3])]})
    other = Sequence([7, 8, 9, 10], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), set())
    mine = Sequence([4, 5, 6], p, setup[3])
    got = run(BatchEngine(model, BatchConfig(max_num_seqs=4)), {0: [other], 2: [mine]})
    assert got[mine] == next(iter(ref.values()))


@pytest.mark.parametrize("spec,needle", [
    (GrammarSpec("json", {"type": "strin"}), "strin"),
    (GrammarSpec("json", {"type": "array", "uniqueItems": True}), "uniqueItems"),
    (GrammarSpec("regex", "(a"), "unclosed"),
    (GrammarSpec("choice", []), "non-empty"),
    (GrammarSpec("lark", "start: undefined_rule"), "undefined_rule"),
])
def test_invalid_or_unenforceable_grammars_are_refused(setup, spec, needle):
    with pytest.raises(GrammarError, match=needle):
        _grammar(setup, spec)
