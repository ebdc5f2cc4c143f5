"""Interactive streaming chat against any OpenAI-compatible server (httpx, no SDK).

Run:
    python -m clients.chat                                  # http://127.0.0.1:8000, first listed model
    python -m clients.chat --url http://host:8000 --model NAME --api-key KEY --system "Be brief."
    python -m clients.chat --reasoning-effort medium       # this server's hybrid loop (2 loops)
    python -m clients.chat --hybrid-loops 4                # same, with an explicit loop count
Commands inside the chat: /reset clears the history, /quit (or Ctrl-D) exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

import httpx


class ChatError(RuntimeError):
    pass


def error_message(r: httpx.Response) -> str:
    """'HTTP <status>: <message>' from an OpenAI error body (the body must have been read)."""
    try:
        return f"HTTP {r.status_code}: {r.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}: {r.text[:200]}"


def _raise_for_error(r: httpx.Response) -> None:
    if r.status_code >= 400:
        r.read()
        raise ChatError(error_message(r))


def first_model(client: httpx.Client) -> str:
    r = client.get("/v1/models")
    _raise_for_error(r)
    data = r.json()["data"]
    if not data:
        raise ChatError("the server lists no models")
    return data[0]["id"]


def stream_chat(client: httpx.Client, body: dict) -> Iterator[tuple[str, str]]:
    """Yield ("content" | "reasoning", text) deltas from an SSE chat completion."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        _raise_for_error(r)
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue  # blank separators and ': ping' comments
            payload = line[len("data: "):]
            if payload == "[DONE]":
                return
            chunk = json.loads(payload)
            if "error" in chunk:
                raise ChatError(chunk["error"].get("message", "stream error"))
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    yield "reasoning", reasoning
                if delta.get("content"):
                    yield "content", delta["content"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.chat", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (default: the server's first)")
    p.add_argument("--api-key")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--reasoning-effort", choices=["none", "minimal", "low", "medium", "high"],
                   help="sent as reasoning_effort (standard OpenAI field)")
    p.add_argument("--hybrid-loops", type=int, help="this server's hybrid-loop extension: loops per answer")
    a = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    with httpx.Client(base_url=a.url, headers=headers, timeout=httpx.Timeout(300, connect=5)) as client:
        try:
            model = a.model or first_model(client)
        except (ChatError, httpx.HTTPError) as e:
            print(f"error: cannot reach {a.url}: {e}", file=sys.stderr)
            return 1
        system = [{"role": "system", "content": a.system}] if a.system else []
        history: list[dict] = []
        print(f"chatting with {model} at {a.url} (/reset, /quit)")
        while True:
            try:
                user = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not user:
                continue
            if user in ("/quit", "/exit"):
                return 0
            if user == "/reset":
                history = []
                print("(history cleared)")
                continue
            history.append({"role": "user", "content": user})
            body = {"model": model, "messages": system + history, "max_tokens": a.max_tokens,
                    "temperature": a.temperature}
            if a.reasoning_effort:
                body["reasoning_effort"] = a.reasoning_effort
            if a.hybrid_loops is not None:
                body["hybrid"] = {"loops": a.hybrid_loops}
            reply, in_reasoning = [], False
            try:
                for kind, text in stream_chat(client, body):
                    if kind == "reasoning":
                        print(f"{dim}{text}" if not in_reasoning else text, end="", flush=True)
                        in_reasoning = True
                        continue
                    if in_reasoning:
                        print(reset)
                        in_reasoning = False
                    reply.append(text)
                    print(text, end="", flush=True)
                print(reset if in_reasoning else "")
                history.append({"role": "assistant", "content": "".join(reply)})
            except (ChatError, httpx.HTTPError) as e:
                history.pop()
                print(f"\nerror: {e}", file=sys.stderr)
            except KeyboardInterrupt:  # stop this answer, keep the session
                history.pop()
                print("\n(interrupted)")


if __name__ == "__main__":
    sys.exit(main())
