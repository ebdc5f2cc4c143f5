"""Prefix caching through the live server and the official client: the second turn of a chat
reports `usage.prompt_tokens_details.cached_tokens` equal to the prefix it shares with the
first turn's prompt and answer (streamed usage too), the /metrics counters move, and a zero
budget turns it off."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from engine.generate import SamplingParams, generate
from engine.runner import load_model
from server.config import ServerConfig
from tests.live_server import LiveServer

TURN1 = [{"role": "system", "content": "One two three four five six seven eight nine ten."},
         {"role": "user", "content": "Paris is the capital of"}]


def _metrics(url: str) -> dict[str, float]:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {k: float(v) for k, v in (x.split() for x in lines if x.startswith("hybrid_prefix_cache"))}


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture
def served(llama_artifact):
    def start(**kw) -> tuple[LiveServer, OpenAI]:
        srv = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], **kw)).wait()
        started.append(srv)
        return srv, OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    started: list[LiveServer] = []
    yield start
    for srv in started:
        srv.close()


def test_the_second_turn_reports_the_prefix_it_shares_with_the_first_as_cached(served, llama_artifact):
    srv, client = served()
    kw = dict(model="tiny-chat", max_tokens=6, temperature=0)
    first = client.chat.completions.create(messages=TURN1, **kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = TURN1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "The quick brown fox"}]
    stream = client.chat.completions.create(messages=turn2, stream=True, stream_options={"include_usage": True},
                                            **kw)
    chunks = list(stream)
    usage = chunks[-1].usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # what the server holds after turn 1: its prompt and every answer token it fed back (all
    # but the last sampled), from the same greedy decode run here
    lm = load_model(llama_artifact, max_model_len=2048)
    p1, p2 = lm.encode_chat(TURN1)[0], lm.encode_chat(turn2)[0]
    answer = [o.tokens[0] for o in generate(lm.model, p1, SamplingParams(max_tokens=6, temperature=0), lm.eos_ids)]
    shared = _common(p2, p1 + answer[:-1])
    assert shared >= len(p1) and usage.prompt_tokens == len(p2)
    assert usage.prompt_tokens_details.cached_tokens == shared
    again = client.chat.completions.create(messages=turn2, **kw)  # the same turn again: all but its last token
    assert again.usage.prompt_tokens_details.cached_tokens == len(p2) - 1
    assert again.choices[0].message.content == text  # reused KV, same greedy answer
    m = _metrics(srv.url)
    assert m["hybrid_prefix_cache_queries_total"] == 3 and m["hybrid_prefix_cache_hits_total"] == 2
    assert m["hybrid_prefix_cache_query_tokens_total"] == len(p1) + 2 * len(p2)
    assert m["hybrid_prefix_cache_hit_tokens_total"] == shared + len(p2) - 1
    assert 0 < m["hybrid_prefix_cache_bytes"] <= m["hybrid_prefix_cache_budget_bytes"] == 256 * 2**20


def test_completions_report_cached_prompt_tokens(served):
    _, client = served()
    kw = dict(model="tiny-chat", prompt="One two three four five six", max_tokens=3, temperature=0)
    a = client.completions.create(**kw)
    b = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))[-1]
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 1 > 0


def test_a_zero_budget_turns_prefix_caching_off(served):
    srv, client = served(prefix_cache_mb=0)
    kw = dict(model="tiny-chat", messages=TURN1, max_tokens=4, temperature=0)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens_details.cached_tokens == 0
    assert a.choices[0].message.content == b.choices[0].message.content
    m = _metrics(srv.url)
    assert m["hybrid_prefix_cache_queries_total"] == 0 and m["hybrid_prefix_cache_budget_bytes"] == 0
    assert m["hybrid_prefix_cache_bytes"] == 0


def test_the_budget_flag_reaches_the_config_and_refuses_negatives(capsys):
    from server.__main__ import parse_args

    assert parse_args([])[1].prefix_cache_mb == 256
    assert parse_args(["--prefix-cache-mb", "0"])[1].prefix_cache_mb == 0
    with pytest.raises(SystemExit):
        parse_args(["--prefix-cache-mb", "-1"])
    assert "--prefix-cache-mb" in capsys.readouterr().err
