"""Engine results -> OpenAI wire objects (the only place events become pydantic models)."""

from __future__ import annotations

import json

from engine.events import TokenLogprob

from . import protocol as P


def logprob_entry(lp: TokenLogprob) -> P.TokenLogprob:
    tops = [P.TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top]
    return P.TokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()), top_logprobs=tops)


def usage(n_prompt: int, n_answer: int, stats=None, cached: int = 0) -> P.Usage:
    """OpenAI usage (plain when stats is None), with the prompt tokens the prefix cache served
    as `prompt_tokens_details.cached_tokens`; with hybrid stats, reasoning tokens
    (chain-of-thought + condensed prompts) count as completion tokens, as OpenAI counts a
    reasoning model's."""
    details = P.PromptTokensDetails(cached_tokens=cached)
    if stats is None:
        return P.Usage(prompt_tokens=n_prompt, completion_tokens=n_answer, total_tokens=n_prompt + n_answer,
                       prompt_tokens_details=details)
    reasoning = stats.raw_reasoning_tokens + stats.condensed_tokens
    completion = n_answer + reasoning
    return P.Usage(prompt_tokens=n_prompt, completion_tokens=completion, total_tokens=n_prompt + completion,
                   completion_tokens_details=P.CompletionTokensDetails(reasoning_tokens=reasoning),
                   prompt_tokens_details=details, hybrid=P.HybridUsage(**stats.to_dict()))


def sse(obj, include_usage: bool) -> str:
    """One SSE event as OpenAI sends it: unset delta fields omitted (not null), usage only when asked."""
    d = obj.model_dump()
    if not include_usage:
        d.pop("usage", None)
    for c in d["choices"]:
        if "delta" in c:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
    return f"data: {_one_line(json.dumps(d, ensure_ascii=False))}\n\n"


# Characters JSON leaves raw that Python's str.splitlines() (httpx's `iter_lines`) breaks
# lines at: a model that writes one would split its SSE event in two for such clients.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _one_line(text: str) -> str:
    for ch, esc in _LINE_BREAKS.items():
        text = text.replace(ch, esc)
    return text


def sse_error(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_PING = ": ping\n\n"  # an SSE comment: keeps proxies and clients from timing out
