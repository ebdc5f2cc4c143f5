"""Reasoning models: a `<think>...</think>` block in the output goes to reasoning_content, the
rest to content, streamed or not; reasoning_effort none renders the template's no-think switch.
The tiny model's output is scripted with guided_regex."""

from __future__ import annotations

import pytest

from server.think import ThinkSplit, split
from tests.helpers import CHATML, build_artifact, save_tiny_llama
from tests.live_server import LiveServer

# Qwen3's switch: with enable_thinking false the template writes an empty think block itself
THINK_TEMPLATE = CHATML.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


@pytest.mark.parametrize("chunks", [["<think>ab", "c</think>\n\nok"], list("<think>abc</think>\n\nok"),
                                    ["<thi", "nk>abc</th", "ink>", "ok"]])
def test_split_is_the_same_whatever_the_chunking(chunks):
    s, r, c = ThinkSplit(), "", ""
    for ch in chunks:
        a, b = s.feed(ch)
        r, c = r + a, c + b
    a, b = s.close()
    assert (r + a, c + b) == ("abc", "ok")


def test_text_without_think_is_content_and_an_open_block_is_reasoning():
    assert split("<thinking is fun") == ("", "<thinking is fun")
    assert split("plain answer") == ("", "plain answer")
    assert split("still thinking", opened=True) == ("still thinking", "")
    assert split("<think>cut off") == ("cut off", "")
    assert split("<think>done</think>\n\n") == ("done", "")


@pytest.fixture(scope="module")
def think_art(tmp_path_factory):
    from transformers import AutoTokenizer

    d = save_tiny_llama(tmp_path_factory.mktemp("think") / "tiny-think")
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = THINK_TEMPLATE
    tok.save_pretrained(str(d))
    return build_artifact(d, tmp_path_factory.mktemp("art") / "tiny-think")


@pytest.fixture(scope="module")
def srv(think_art):
    from server.config import ServerConfig

    s = LiveServer(ServerConfig(artifacts=[f"tiny-think={think_art}"], max_model_len=512)).wait()
    yield s
    s.close()


@pytest.fixture
def oai(srv):
    return srv.client(timeout=60)


SCRIPT = {"guided_regex": "<think>[a-z]{3}</think>\n\nok"}


def test_think_block_is_reasoning_content_streamed_and_not(oai):
    kw = dict(model="tiny-think", messages=[{"role": "user", "content": "hi"}], max_tokens=60, temperature=1.0,
              seed=3, extra_body=SCRIPT)
    msg = oai.chat.completions.create(**kw).choices[0].message
    assert msg.content == "ok" and len(msg.reasoning_content) == 3 and msg.reasoning_content.isalpha()
    chunks = [c.choices[0].delta for c in oai.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(d.content or "" for d in chunks) == "ok"
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in chunks) == msg.reasoning_content


def test_reasoning_effort_none_uses_the_no_think_switch(oai):
    kw = dict(model="tiny-think", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    thinking = oai.chat.completions.create(**kw)
    off = oai.chat.completions.create(reasoning_effort="none", **kw)
    # the template wrote "<think>\n\n</think>\n\n" into the prompt
    assert off.usage.prompt_tokens > thinking.usage.prompt_tokens
    low = oai.chat.completions.create(reasoning_effort="low", **kw)  # no memory model needed: not the hybrid loop
    assert low.usage.prompt_tokens == thinking.usage.prompt_tokens


def test_hybrid_loop_on_a_reasoning_model_answers_without_thinking_again(think_art):
    """The loop's chain-of-thought is the model's thinking (rendered as usual, <think> tags
    removed before condensing); the answer turn uses the template's no-think switch."""
    import threading

    from engine.batching import drive
    from engine.generate import SamplingParams
    from engine.runner import load_model
    from server.hybrid import HybridParams, hybrid_work, plain_cot

    lm, calls, cots = load_model(think_art), [], []
    render = lm.encode_chat
    lm.encode_chat = lambda messages, **kw: calls.append(kw) or render(messages, **kw)

    def stub(stats):
        return lambda prompt, cot, max_tokens, cancel: cots.append(cot) or "Condensed."

    hp = HybridParams(loops=2, cot_groups=1, cot_group_tokens=4)
    list(drive(hybrid_work(lm, None, [{"role": "user", "content": "hi"}], hp,
                           SamplingParams(max_tokens=3, temperature=0), [], condenser=stub)(threading.Event())))
    assert calls == [{}, {}, {"enable_thinking": False}] and len(cots) == 2
    assert plain_cot("<think>3 + 4 = 7\n</think>\n\nSo 7.") == "3 + 4 = 7\n\n\nSo 7."
