"""Task fine-tuning: `lora(data=svamp-train)` trains on SVAMP chain-of-thought replies in the
served chat format, loss on the reply only; evaluation splits are refused."""

import pytest

from compress.recipes import RecipeError
from compress.task_data import collate, task_examples
from engine.runner import encode_chat, encode_reply
from tasks.cot import cot_target
from tasks.data import load
from tests.helpers import build_artifact, make_tokenizer


def test_reply_follows_the_served_prompt_and_ends_the_turn():
    tok = make_tokenizer()
    msgs = [{"role": "user", "content": "Sam has 3 apples. How many?"}]
    prompt, reply = encode_reply(tok, msgs, "3 + 0 = 3.\nThe answer is 3.")
    assert prompt == encode_chat(tok, msgs)[0]  # exactly what the server prefills
    assert tok.decode(reply) == "3 + 0 = 3.\nThe answer is 3.<|im_end|>\n"  # CHATML closes the turn


def test_plain_transcript_models_get_the_reply_and_eos():
    tok = make_tokenizer(chat_template=None)
    prompt, reply = encode_reply(tok, [{"role": "user", "content": "Hi"}], "Hello.")
    assert tok.decode(prompt).endswith("Assistant:") and reply[-1] == tok.eos_token_id
    assert tok.decode(reply[:-1]) == " Hello.\n"


def test_svamp_examples_mask_the_prompt():
    tok = make_tokenizer()
    examples, skipped = task_examples(tok, "svamp-train")
    assert len(examples) + skipped == 700 and skipped == 1  # one SVAMP row's equation contradicts its answer
    ids, mask, labels = collate(examples[:3], pad_id=0)
    for i, e in enumerate(examples[:3]):
        assert (labels[i, :e.n_prompt] == -100).all() and (labels[i, e.n_prompt:len(e.ids)] == ids[i, e.n_prompt:len(e.ids)]).all()
        assert mask[i].sum() == len(e.ids) and (labels[i, len(e.ids):] == -100).all()
    assert "The answer is" in tok.decode(examples[0].ids[examples[0].n_prompt:])


def _valid_svamp_train():
    for p in load("svamp-train"):
        try:
            cot_target(p.equation, p.answer)
        except ValueError:
            continue
        yield p


def test_continuation_examples_reply_with_the_rest_of_the_reasoning():
    tok = make_tokenizer()
    first, _ = task_examples(tok, "svamp-train")
    cont, skipped = task_examples(tok, "svamp-continue")
    assert skipped == 1 and len(cont) > len(first)  # one example per known step: multi-step problems give more
    prompts = [tok.decode(e.ids[:e.n_prompt]) for e in cont]
    replies = [tok.decode(e.ids[e.n_prompt:]) for e in cont]
    assert all(" Known: " in p for p in prompts) and all("The answer is" in r for r in replies)
    # every problem with a step once has all its steps known: the reply is then the answer alone
    with_steps = sum(len(cot_target(p.equation, p.answer).split("\n")) > 1 for p in _valid_svamp_train())
    assert sum(r.lstrip().startswith("The answer is") for r in replies) == with_steps == len(first) - 1
    both, _ = task_examples(tok, "svamp-train+svamp-continue")
    assert len(both) == len(first) + len(cont)
    steps, _ = task_examples(tok, "svamp-steps")  # the examples with a step still to write
    assert [e.ids for e in steps] == [e.ids for e, r in zip(cont, replies) if not r.lstrip().startswith("The answer is")]
    assert 0 < len(steps) < len(cont) - len(steps)


def test_task_tuning_lowers_the_reply_loss_and_records_the_data(llama_dir, tmp_path):
    import json

    art = build_artifact(llama_dir, tmp_path / "a",
                         "lora(data=svamp-train,steps=20,batch=2,r=16,targets=all,lr=0.03,dropout=0)")
    step = json.loads((art / "manifest.json").read_text())["steps"][0]["result"]
    assert step["data"] == "svamp-train" and step["examples"] == 699 and step["skipped"] == 1
    assert step["loss_last"] < 0.8 * step["loss_first"], step


@pytest.mark.parametrize("data", ["svamp-dev", "gsm8k", "nonsense"])
def test_evaluation_data_is_never_trained_on(llama_dir, tmp_path, data):
    with pytest.raises(RecipeError, match="data must be calibration or one or more of svamp-train"):
        build_artifact(llama_dir, tmp_path / "a", f"lora(data={data},steps=1)")


def test_chat_replay_answers_general_prompts_with_the_model_itself():
    from compress.task_data import whole_sentences
    from tasks.chat_prompts import chat_prompts

    tok = make_tokenizer()
    prompts = chat_prompts()
    assert len(prompts) == len(set(prompts)) == 300
    assert not any(w in p.lower() for p in prompts for w in ("capital", "continent", "currency", "country"))
    seen = []

    def reply(ps):
        seen.extend(ps)
        return ["It is useful. More" if i % 2 else None for i in range(len(ps))]

    examples, skipped = task_examples(tok, "svamp-train+chat-replay", reply)
    assert seen == prompts and skipped == 1 + 150 and len(examples) == 699 + 150
    last = examples[-1]
    assert tok.decode(last.ids[last.n_prompt:]) == "It is useful. More<|im_end|>\n"
    assert whole_sentences("Bees make honey. They also") == "Bees make honey."
    assert whole_sentences("no end at all") is None
    with pytest.raises(Exception, match="needs the model's own replies"):
        task_examples(tok, "chat-replay")


def test_chat_replay_trains_through_the_lora_step(llama_dir, tmp_path):
    import json

    art = build_artifact(llama_dir, tmp_path / "a", "lora(data=svamp-train+chat-replay,steps=2,batch=2)")
    step = json.loads((art / "manifest.json").read_text())["steps"][0]["result"]
    assert step["data"] == "svamp-train+chat-replay" and step["examples"] + step["skipped"] == 700 + 300
