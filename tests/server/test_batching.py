"""Continuous batching through the live server: concurrent requests overlap instead of
queueing behind each other, and each gets exactly the text it gets alone."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from server.config import ServerConfig
from tests.live_server import LiveServer

PROMPTS = ["Paris is the capital of", "The quick brown fox", "One two three four", "def add(a, b):"]


def _stream(client, model: str, prompt: str) -> tuple[str, str]:
    kw = dict(model=model, max_tokens=20, temperature=0, stream=True, extra_body={"ignore_eos": True})
    if model == "tiny-chat":
        chunks = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
        parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks if c.choices]
    else:
        chunks = client.completions.create(prompt=prompt, **kw)
        parts = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
    return "".join(t for t, _ in parts), [f for _, f in parts if f][-1]


def test_concurrent_streams_get_the_text_they_get_alone(client):
    # two chat requests on the tiny Llama, two completions on the tiny Gemma-3: two batches
    jobs = [("tiny-chat" if i % 2 == 0 else "tiny-base", p) for i, p in enumerate(PROMPTS)]
    one_at_a_time = [_stream(client, m, p) for m, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: _stream(client, *j), jobs))
    assert together == one_at_a_time
    assert all(finish == "length" for _, finish in together)


def _sse(url: str, body: dict):
    """Open a streaming chat request; yields (time, parsed chunk) per data line."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                yield time.perf_counter(), json.loads(line[6:])


def _metric(url: str, name: str) -> float:
    line = next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def test_a_second_request_is_served_while_the_first_still_streams(llama_artifact):
    srv = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], max_model_len=2048)).wait()
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Paris is"}], "temperature": 0,
            "ignore_eos": True, "stream": True}
    try:
        long_ = _sse(srv.url, {**chat, "max_tokens": 1900})  # seconds of decoding: finishing early is cancellation
        next(long_)  # the role chunk
        next(long_)  # its first token: it is running
        seen = {}

        def short():
            for t, c in _sse(srv.url, {**chat, "max_tokens": 5}):
                seen.setdefault("first", t)
                if c["choices"] and c["choices"][0]["finish_reason"]:
                    seen["done"] = t
        th = threading.Thread(target=short)
        th.start()
        while th.is_alive():  # keep reading the long stream meanwhile
            next(long_)
        th.join()
        _, chunk = next(long_)
        # the short request started and finished while the long one was still streaming
        assert "done" in seen and chunk["choices"][0]["finish_reason"] is None
        long_.close()  # hang up: the long request is cancelled and leaves the batch
        deadline = time.time() + 10
        while _metric(srv.url, "hybrid_requests_running") > 0 and time.time() < deadline:
            time.sleep(0.02)
        assert _metric(srv.url, "hybrid_requests_running") == 0
    finally:
        srv.close()


def test_429_only_when_every_row_and_the_queue_are_full(llama_artifact):
    srv = LiveServer(ServerConfig(artifacts=[str(llama_artifact)], max_model_len=2048, max_queue=1,
                                  max_num_seqs=2)).wait()
    body = {"model": llama_artifact.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1900,
            "ignore_eos": True, "stream": True}
    try:
        streams = [_sse(srv.url, body) for _ in range(2)]
        for s in streams:
            next(s)
            next(s)  # both are generating: the two rows are taken
        waiting = httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30)
        with waiting as w:
            assert w.status_code == 200  # the one queue place
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 429 and r.headers["Retry-After"] == "2"
            assert _metric(srv.url, "hybrid_requests_waiting") == 1 and _metric(srv.url, "hybrid_requests_running") == 2
            streams[0].close()  # a row frees up: the waiting request starts
            lines = w.iter_lines()
            assert any('"content"' in line and '"content":""' not in line.replace(" ", "") for line in lines)
        streams[1].close()
        # more samples than rows: the request runs alone, between batch steps
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4, "n": 3,
                                                               "temperature": 0}, timeout=30)
        assert r.status_code == 200 and len({c["message"]["content"] for c in r.json()["choices"]}) == 1
        assert [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 3
    finally:
        srv.close()


def test_compiled_server_compiles_before_serving_and_streams_the_same_text(client, llama_artifact, mm_checkpoint):
    from openai import OpenAI

    from server.__main__ import build_parser, to_config

    p = build_parser()
    assert to_config(p.parse_args(["--artifact", str(llama_artifact), "--compile"]), p).compile
    cfg = ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], max_model_len=2048, max_num_seqs=3, compile=True,
                       memory_model=str(mm_checkpoint))
    srv = LiveServer(cfg).wait()
    try:
        metrics = httpx.get(srv.url + "/metrics").text.splitlines()
        for model in ("tiny-chat", f"memory-model:{mm_checkpoint.name}"):  # the memory model's draft checks too
            line = next(x for x in metrics if x.startswith(f'hybrid_decode_compile_seconds{{model="{model}"}}'))
            assert float(line.split()[-1]) > 0  # paid at start-up
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-chat", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4,
            "temperature": 0, "hybrid": {"loops": 1, "cot_groups": 1, "cot_group_tokens": 5, "condense_tokens": 6}})
        assert r.status_code == 200 and r.json()["usage"]["hybrid"]["condensed_tokens"] > 0, r.text
        compiled = OpenAI(base_url=srv.url + "/v1", api_key="-")
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda p: _stream(compiled, "tiny-chat", p), PROMPTS[:3]))
        assert together == [_stream(client, "tiny-chat", p) for p in PROMPTS[:3]]  # the eager server's text
    finally:
        srv.close()
