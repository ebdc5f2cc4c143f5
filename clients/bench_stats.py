"""Pure pieces of the latency benchmark: arrival times, one request's timings from its
stream, and the run summary, with the definitions vLLM's `bench serve` uses.

- TTFT: request sent -> first chunk carrying a token of any kind (content or reasoning text).
  A role-only first chunk is not a token (this server sends it before prefill).
  TTFT(content): -> first non-empty answer content (after any reasoning).
- ITL: gaps between consecutive token-bearing chunks.
- TPOT: (E2EL - TTFT) / (output_tokens - 1), per request, output_tokens from the server's usage.
- E2EL: request sent -> end of stream.
- Throughput: completed requests, output tokens, and input + output tokens per second of
  the run's wall time (first send to last completion).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    sent_at: float = 0.0  # seconds since the run started
    prompt_tokens: int = 0
    output_tokens: int = 0
    output_tokens_from_usage: bool = False  # False: counted chunks (server sent no usage)
    ttft: float | None = None
    ttft_content: float | None = None
    itl: list[float] = field(default_factory=list)
    e2el: float | None = None
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.e2el is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        d.pop("text")
        return d


class StreamTimer:
    """Feeds on parsed SSE chunks (OpenAI chat or completions) with their arrival time."""

    def __init__(self, sent: float):
        self.sent, self.last = sent, None
        self.r = RequestResult()
        self.chunks = 0

    def chunk(self, data: dict, t: float) -> None:
        if "error" in data and not data.get("choices"):
            err = data["error"]
            self.r.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        usage = data.get("usage")
        if usage:
            self.r.prompt_tokens = usage.get("prompt_tokens", 0)
            self.r.output_tokens = usage.get("completion_tokens", 0)
            self.r.output_tokens_from_usage = True
        content = reasoning = ""
        for c in data.get("choices") or []:
            delta = c.get("delta")
            if delta is not None:
                content += delta.get("content") or ""
                reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
            else:
                content += c.get("text") or ""
        if not content and not reasoning:
            return
        self.chunks += 1
        self.r.text += content
        if self.r.ttft is None:
            self.r.ttft = t - self.sent
        else:
            self.r.itl.append(t - self.last)
        if content and self.r.ttft_content is None:
            self.r.ttft_content = t - self.sent
        self.last = t

    def finish(self, t: float) -> RequestResult:
        r = self.r
        r.e2el = t - self.sent
        if not r.output_tokens_from_usage:
            r.output_tokens = self.chunks
        r.ok = not r.error and r.ttft is not None
        if not r.ok and not r.error:
            r.error = "the stream ended without a token"
        return r


def arrivals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets (seconds) for n requests: gamma-distributed gaps with mean 1/rate, shape
    `burstiness` (1 = Poisson process, < 1 burstier, > 1 more regular); rate=inf: all at 0."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def describe(xs: list[float], percentiles: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    d = {"n": len(xs), "mean": statistics.fmean(xs), "median": statistics.median(xs),
         "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0}
    for p in percentiles:
        d[f"p{p:g}"] = percentile(xs, p)
    return d


def summarize(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict:
    ok = [r for r in results if r.ok]
    n_in, n_out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error[:200]] = errors.get(r.error[:200], 0) + 1
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "errors": errors, "duration_s": duration,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": n_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (n_in + n_out) / duration if duration > 0 else 0.0,
        "output_tokens_from_usage": all(r.output_tokens_from_usage for r in ok) if ok else None,
        "ttft_s": describe([r.ttft for r in ok], percentiles),
        "ttft_content_s": describe([r.ttft_content for r in ok if r.ttft_content is not None], percentiles),
        "tpot_s": describe([r.tpot for r in ok if r.tpot is not None], percentiles),
        "itl_s": describe([x for r in ok for x in r.itl], percentiles),
        "e2el_s": describe([r.e2el for r in ok], percentiles),
    }
