"""The chat client against the live server, driven through its stdin like a person would."""

import subprocess
import sys

import httpx
import pytest

from clients.chat import ChatError, stream_chat


def test_stream_chat_yields_the_server_text(live):
    with httpx.Client(base_url=live.url) as c:
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                "temperature": 0}
        streamed = "".join(t for kind, t in stream_chat(c, body) if kind == "content")
        full = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert streamed == full


def test_stream_chat_surfaces_server_errors(live):
    with httpx.Client(base_url=live.url) as c, pytest.raises(ChatError, match="HTTP 404.*does not exist"):
        list(stream_chat(c, {"model": "missing", "messages": [{"role": "user", "content": "hi"}]}))


def test_interactive_session_with_reset(live):
    script = "hello\n/reset\nagain\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "clients.chat", "--url", live.url, "--model", "tiny-chat",
                        "--max-tokens", "5"], input=script, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "chatting with tiny-chat" in r.stdout and "(history cleared)" in r.stdout


def test_unreachable_server_is_a_one_line_error():
    r = subprocess.run([sys.executable, "-m", "clients.chat", "--url", "http://127.0.0.1:9"], input="",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.startswith("error: cannot reach")
