"""The HTTP contract, through the official `openai` client against a live loopback server."""

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from server.config import ServerConfig
from tests.live_server import LiveServer
from tests.helpers import build_artifact

CHAT = [{"role": "user", "content": "Paris is the capital of"}]


def test_models_lists_both_artifacts(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-chat", "tiny-base"}
    assert models["tiny-chat"].max_model_len == 128


def test_chat_completion_shape_and_usage(client):
    r = client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 1 <= u.completion_tokens <= 8


def test_streamed_text_equals_non_streamed_at_temperature_zero(client):
    kw = dict(model="tiny-chat", messages=CHAT, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    # the same usage, but for cached_tokens: the streamed request reuses the first one's KV
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == \
        full.usage.model_dump(exclude={"prompt_tokens_details"})


def test_max_tokens_gives_length_and_exact_count(client):
    r = client.chat.completions.create(model="tiny-chat", messages=CHAT, max_completion_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_n_choices_with_seed_are_reproducible(client):
    kw = dict(model="tiny-chat", messages=CHAT, max_tokens=10, temperature=1.0, n=3, seed=123)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens <= 30


def test_stop_string_truncates_and_finishes(client):
    base = client.completions.create(model="tiny-base", prompt="One two", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 4
    stop = base[2:4]
    r = client.completions.create(model="tiny-base", prompt="One two", max_tokens=20, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[:base.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_text_completion_stream_matches(client):
    kw = dict(model="tiny-base", prompt="The quick brown", max_tokens=12, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full


def test_chat_on_base_model_uses_plain_transcript(client):
    r = client.chat.completions.create(model="tiny-base", messages=CHAT, max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens > 0 and "User:" not in (r.choices[0].message.content or "")


def _post(live, path, body, **kw):
    return httpx.post(live.url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=30, **kw)


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny-chat"}, "messages"),
    ({"model": "tiny-chat", "messages": []}, "messages"),
    ({"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "tiny-chat", "messages": CHAT, "temperature": 5}, "temperature"),
    ({"model": "tiny-chat", "messages": CHAT, "max_tokens": "many"}, "max_tokens"),
    ({"model": "tiny-chat", "messages": CHAT, "n": 0}, "n"),
    ({"model": "tiny-chat", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "tiny-chat", "messages": CHAT, "tools": [{"type": "function"}]}, "tools.0.function"),
    ({"model": "tiny-chat", "messages": CHAT, "tools": [{"type": "function", "function": {}}]},
     "tools.0.function.name"),
    ({"model": "tiny-chat", "messages": CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools.0.function.name"),
    ({"model": "tiny-chat", "messages": CHAT + [{"role": "tool", "content": "4"}]}, "messages.1"),
    ({"model": "tiny-chat", "messages": CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"model": "tiny-chat", "messages": CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"model": "tiny-chat", "messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"model": "tiny-chat", "messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_payloads_get_openai_errors(live, body, param):
    r = _post(live, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_invalid_json_is_400_and_server_keeps_working(live, client):
    r = _post(live, "/v1/chat/completions", b'{"model": "tiny-chat", "messages": [')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=2).choices


def test_prompt_over_context_window_names_both_lengths(client):
    long = [{"role": "user", "content": "one two three " * 200}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=long, max_tokens=4)
    msg = e.value.body["message"]
    assert "n_prompt_tokens=" in msg and "n_ctx=128" in msg and e.value.body["code"] == "context_length_exceeded"


def test_max_tokens_beyond_window_is_rejected_not_truncated(client):
    with pytest.raises(openai.BadRequestError, match="exceeds the context window"):
        client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=500)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=CHAT)


def test_health_and_metrics(live, client):
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=3)
    text = httpx.get(live.url + "/metrics").text
    assert 'hybrid_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "hybrid_time_to_first_token_seconds_bucket" in text
    assert "hybrid_inter_token_latency_seconds_count" in text
    assert "hybrid_requests_running 0.0" in text


def _metric(srv, name):
    lines = [l for l in httpx.get(srv.url + "/metrics").text.splitlines() if l.startswith(name)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_client_disconnect_cancels_generation(llama_artifact):
    # A long budget (2000 tokens, seconds of work even for the tiny model) so that
    # finishing early can only be the cancellation.
    srv = LiveServer(ServerConfig(artifacts=[str(llama_artifact)], max_model_len=2048)).wait()
    try:
        body = {"model": llama_artifact.name, "messages": CHAT, "max_tokens": 2000, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    break  # first real token, then hang up
        deadline = time.time() + 10
        while _metric(srv, "hybrid_requests_cancelled_total") < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert _metric(srv, "hybrid_requests_cancelled_total") == 1
        while _metric(srv, "hybrid_requests_running") > 0 and time.time() < deadline:
            time.sleep(0.02)
        assert _metric(srv, "hybrid_requests_running") == 0  # the worker is free again
        produced = _metric(srv, 'hybrid_generation_tokens_total{model="%s"}' % llama_artifact.name)
        assert 1 <= produced < 1000, produced
        # and it serves the next request
        r = _post(srv, "/v1/chat/completions", {"model": llama_artifact.name, "messages": CHAT, "max_tokens": 3})
        assert r.status_code == 200
    finally:
        srv.close()


def test_api_keys_are_enforced(llama_artifact):
    srv = LiveServer(ServerConfig(artifacts=[str(llama_artifact)], api_keys=["k1", "k2"], max_model_len=64)).wait()
    try:
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401
        for key in ("k1", "k2"):
            assert httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
    finally:
        srv.close()


def test_tampered_artifact_is_refused_at_load(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "bad")
    with open(art / "config.json", "a") as f:
        f.write(" ")
    srv = LiveServer(ServerConfig(artifacts=[str(art)])).wait(status=503)
    try:
        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "error" and "checksum mismatch in config.json" in health["message"]
        r = _post(srv, "/v1/chat/completions", {"model": "bad", "messages": CHAT})
        assert r.status_code == 503 and r.json()["error"]["code"] == "load_failed"
    finally:
        srv.close()
    cli = subprocess.run([sys.executable, "-m", "server", "--artifact", str(art)], capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 2 and "checksum mismatch in config.json" in cli.stderr


def test_full_queue_answers_429_with_retry_after(llama_artifact):
    # one row (no batching) and one queue place; test_batching.py has the same with two rows
    srv = LiveServer(ServerConfig(artifacts=[str(llama_artifact)], max_model_len=2048, max_queue=1,
                                  max_num_seqs=1)).wait()
    body = {"model": llama_artifact.name, "messages": CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as running:
            lines = running.iter_lines()  # keep a reference: a dropped iterator closes the response
            next(lines)  # first request occupies the worker
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as waiting:
                assert waiting.status_code == 200  # queued (one waiting slot)
                r = _post(srv, "/v1/chat/completions", body)
                assert r.status_code == 429 and r.headers["Retry-After"] == "2"
                assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        srv.close()


def test_kv_cache_budget_bounds_n_times_length(llama_artifact):
    srv = LiveServer(ServerConfig(artifacts=[str(llama_artifact)], max_model_len=2048, max_kv_cache_mb=1)).wait()
    try:
        r = _post(srv, "/v1/chat/completions", {"model": llama_artifact.name, "messages": CHAT, "n": 16,
                                                "max_tokens": 2000})
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_cache_limit"
        assert "MiB" in r.json()["error"]["message"]
        ok = _post(srv, "/v1/chat/completions", {"model": llama_artifact.name, "messages": CHAT, "max_tokens": 4})
        assert ok.status_code == 200
    finally:
        srv.close()


def test_server_serves_an_onnx_artifact(llama_artifact, mm_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    from compress.onnx_export import export_onnx

    onnx_art = tmp_path / "tiny-onnx"
    export_onnx(llama_artifact, onnx_art)
    srv = LiveServer(ServerConfig(artifacts=[str(llama_artifact), str(onnx_art)], max_model_len=64,
                                  memory_model=str(mm_checkpoint))).wait()
    try:
        body = {"messages": CHAT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        a = _post(srv, "/v1/chat/completions", {"model": llama_artifact.name, **body}).json()
        b = _post(srv, "/v1/chat/completions", {"model": "tiny-onnx", **body}).json()
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        cards = {m["id"]: m for m in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert cards["tiny-onnx"]["meta"]["backend"] == "onnxruntime"
        # the hybrid loop's stages are sequences in a batch: a model without a batched forward says so
        h = _post(srv, "/v1/chat/completions", {"model": "tiny-onnx", **body, "hybrid": {"loops": 1}})
        assert h.status_code == 400 and h.json()["error"]["param"] == "hybrid", h.text
        assert "batched forward" in h.json()["error"]["message"]
    finally:
        srv.close()


def test_chat_logprobs_match_the_tokens_and_are_consistent(client):
    kw = dict(model="tiny-chat", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    streamed = [c.choices[0].logprobs.content[0] for c in client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completion_logprobs_legacy_format(client):
    r = client.completions.create(model="tiny-base", prompt="One two", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_sse_event_stays_one_line_whatever_the_model_writes():
    # U+0085/U+2028/U+2029 are raw in JSON but line breaks to httpx's iter_lines (str.splitlines)
    from server import protocol as P
    from server.wire import sse

    text = "a\x85b\u2028c\u2029d é"
    chunk = P.CompletionResponse(id="x", created=0, model="m", choices=[P.CompletionChoice(index=0, text=text)])
    event = sse(chunk, include_usage=False)
    line = event.removesuffix("\n\n")
    assert line.splitlines() == [line] and json.loads(line[6:])["choices"][0]["text"] == text


def test_chat_page_is_served_self_contained_and_can_be_turned_off(live, llama_artifact):
    from server.config import ServerConfig

    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and "<title>hybrid-llm chat</title>" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http" not in r.text.replace("http-equiv", "")  # nothing from outside this server
    js = httpx.get(live.url + "/ui/app.js")
    assert js.status_code == 200 and "/v1/chat/completions" in js.text
    off = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], ui=False)).wait()
    try:
        assert httpx.get(off.url + "/").status_code == 404
    finally:
        off.close()


def test_memory_model_flag_takes_a_shipped_checkpoints_name(tmp_path):
    from server.__main__ import DEFAULT_MEMORY_MODEL, _memory_model_path

    assert _memory_model_path("svamp-70m") == str(DEFAULT_MEMORY_MODEL.parent / "svamp-70m")
    assert _memory_model_path(None) == str(DEFAULT_MEMORY_MODEL) and _memory_model_path("None") is None
    assert _memory_model_path(str(tmp_path)) == str(tmp_path)  # a directory is taken as it is
    assert _memory_model_path("no-such-model") == "no-such-model"  # left for the checkpoint check to refuse
