"""Bad input: schemathesis against the server's own OpenAPI schema (valid and invalid
requests generated from it), plus a hand-written table of malformed payloads. Every answer
must be a well-formed OpenAI error or a success, never a 500 and never a hang."""

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from server.config import ServerConfig
from tests.live_server import LiveServer

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_srv(llama_artifact):
    # small limits so that generated requests stay cheap: n_ctx 64, 64 KiB bodies
    srv = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], max_model_len=64, max_queue=8,
                                  max_body_mb=1 / 16, api_keys=[])).wait()
    yield srv
    srv.close()


def check_openai_shaped(response) -> None:
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:300]}"
    if status >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def _operations(url):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [r.ok() for r in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_generated_requests_never_500(fuzz_srv, mode):
    """Hypothesis-driven cases for every operation in /openapi.json (schemathesis' strategies;
    its pytest plugin does not run under this pytest), valid ones and ones that break the schema."""
    ops = _operations(fuzz_srv.url)
    assert {f"{o.method.upper()} {o.path}" for o in ops} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                                              "GET /v1/models", "POST /profile"}
    seen = {}
    negative = mode == schemathesis.GenerationMode.NEGATIVE
    for op in ops:
        if negative and op.method.upper() != "POST":
            continue  # nothing to break in a parameterless GET
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call(base_url=fuzz_srv.url, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            check_openai_shaped(response)

        run()
    assert sum(seen.values()) >= 30
    if negative:  # schema-breaking requests are refused, with the error shape checked above
        assert sum(n for s, n in seen.items() if s in (400, 422)) >= 30, seen


CHAT = [{"role": "user", "content": "hi"}]
MALFORMED = {
    "not json": b"{'model': 'tiny-chat'",
    "non-utf8": b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}',
    "json array": b"[1, 2, 3]",
    "json null": b"null",
    "json string": b'"hello"',
    "empty body": b"",
    "deeply nested": b"[" * 5000 + b"]" * 5000,
    "wrong types": {"model": 7, "messages": "hi", "max_tokens": "many", "temperature": [1]},
    "empty messages": {"model": "tiny-chat", "messages": []},
    "unknown role": {"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]},
    "message not an object": {"model": "tiny-chat", "messages": ["hi"]},
    "content a number": {"model": "tiny-chat", "messages": [{"role": "user", "content": 12}]},
    "lone surrogate": b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "NaN temperature": b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "huge max_tokens": {"model": "tiny-chat", "messages": CHAT, "max_tokens": 10**12},
    "negative max_tokens": {"model": "tiny-chat", "messages": CHAT, "max_tokens": -1},
    "huge n": {"model": "tiny-chat", "messages": CHAT, "n": 10**6},
    "huge seed": {"model": "tiny-chat", "messages": CHAT, "seed": 10**40},
    "unknown model": {"model": "gpt-9", "messages": CHAT},
    "token ids out of range": {"model": "tiny-chat", "prompt": [10**9]},
    "10 MB body": {"model": "tiny-chat", "messages": [{"role": "user", "content": "a" * (10 * 2**20)}]},
}


@pytest.mark.parametrize("name", list(MALFORMED))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_malformed_payloads_get_openai_errors(fuzz_srv, name, path):
    body = MALFORMED[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(fuzz_srv.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    check_openai_shaped(r)
    if name == "10 MB body":
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_chunked_oversized_body_is_refused_while_reading(fuzz_srv):
    def chunks():  # no Content-Length: the limit has to count what arrives
        yield b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"a" * 4096
        yield b'"}]}'

    r = httpx.post(fuzz_srv.url + "/v1/chat/completions", content=chunks(), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = httpx.post(fuzz_srv.url + "/v1/chat/completions", json={"model": "tiny-chat", "messages": CHAT,
                                                                  "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200  # and the server is fine afterwards


def test_wrong_content_type_and_methods(fuzz_srv):
    r = httpx.post(fuzz_srv.url + "/v1/chat/completions", content=b"model=tiny-chat",
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    check_openai_shaped(r)
    assert r.status_code == 400
    r = httpx.get(fuzz_srv.url + "/v1/chat/completions", timeout=30)
    assert r.status_code == 405
    check_openai_shaped(r)
    r = httpx.get(fuzz_srv.url + "/nope", timeout=30)
    assert r.status_code == 404
    check_openai_shaped(r)
