"""What the chat and completion endpoints share (vLLM's `OpenAIServing` base): request
budgets, queueing a job on the worker, metrics from its events, collecting a whole
response, and the SSE loop. Each endpoint subclass owns its wire objects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine.events import Delta, Done, Event, Failed, Reasoning, Stats, TokenLogprob, TokenStep, Usage
from engine.generate import SamplingParams
from engine.grammar import GrammarError, GrammarSpec
from engine.runner import LoadedModel
from engine.textgen import TextRequest

from . import protocol as P
from . import wire
from .context import ServingContext
from .errors import APIError
from .profiles import thread_setter
from .scheduler import Job, QueueFull


@dataclass
class Reply:
    """One request's response identity and accounting, shared by its chunks or its body."""
    lm: LoadedModel
    n_prompt: int
    n: int
    id: str
    fingerprint: str  # which power profile served it
    include_usage: bool = False  # streams: a last chunk with usage (stream_options.include_usage)
    stats: object = None  # the hybrid loop's HybridStats, once its Stats event came
    tool_streams: list | None = None  # a chat request with tools: a `tools.CallStream` per choice
    think_streams: list | None = None  # a reasoning model's output: a `think.ThinkSplit` per choice
    arrived: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=P.now)


@dataclass
class Collected:
    """A finished job, gathered for a non-streamed body."""
    texts: list[str]
    finish: list[str | None]
    logprobs: list[list[TokenLogprob]]
    reasoning: str = ""
    stats: object = None  # the hybrid loop's HybridStats
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache served

    @classmethod
    def empty(cls, n: int) -> Collected:
        return cls([""] * n, [None] * n, [[] for _ in range(n)])

    def add(self, ev: Event) -> None:
        if isinstance(ev, TokenStep):
            for d in ev.deltas:
                self.texts[d.index] += d.text
                self.finish[d.index] = d.finish_reason or self.finish[d.index]
                if d.logprob is not None:
                    self.logprobs[d.index].append(d.logprob)
        elif isinstance(ev, Reasoning):
            self.reasoning += ev.text
        elif isinstance(ev, Stats):
            self.stats = ev.stats
        elif isinstance(ev, Usage):
            self.completion_tokens, self.cached_tokens = ev.completion_tokens, ev.cached_tokens


class OpenAIServing:
    id_prefix = "cmpl"

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    # ---- request preparation ----------------------------------------------------------

    def check_supported(self, req: P.SamplingRequest) -> None:
        bad = req.unsupported()
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")

    def sampling_params(self, req: P.SamplingRequest, lm: LoadedModel, n_prompt: int,
                        extra_stops: list[str]) -> SamplingParams:
        """The request's sampling parameters within the context window and KV-cache budget."""
        n_ctx, cfg = lm.max_model_len, self.ctx.cfg
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if n_prompt >= n_ctx:
            raise APIError(400, f"the prompt has {n_prompt} tokens (n_prompt_tokens={n_prompt}) but the context "
                                f"window is {n_ctx} (n_ctx={n_ctx}); shorten the prompt",
                           param="messages", code="context_length_exceeded")
        room = n_ctx - n_prompt
        asked = req.requested_max_tokens()
        if asked is not None and asked > room:
            raise APIError(400, f"max_tokens={asked} plus the prompt's {n_prompt} tokens exceeds the context window "
                                f"n_ctx={n_ctx}; at most {room} tokens can be generated",
                           param="max_tokens", code="context_length_exceeded")
        max_tokens = asked or min(room, cfg.max_tokens_default or room)
        # The KV cache is preallocated: bound it before admitting the request.
        kv_mb = req.n * (n_prompt + max_tokens) * lm.model.kv_bytes_per_token() / 2**20
        if kv_mb > cfg.max_kv_cache_mb:
            raise APIError(400, f"n={req.n} x ({n_prompt} prompt + {max_tokens} max_tokens) tokens need "
                                f"{kv_mb:.0f} MiB of KV cache, over this server's {cfg.max_kv_cache_mb} MiB "
                                "per-request limit; lower n or max_tokens", param="max_tokens", code="kv_cache_limit")
        params = req.to_sampling_params(max_tokens)
        params.stop = params.stop + [s for s in extra_stops if s not in params.stop]
        return params

    def constrain(self, params: SamplingParams, lm: LoadedModel, asked: tuple[str, GrammarSpec] | None) -> None:
        """Compile what the output must match into `params.grammar`; a bad schema / regex /
        choice list (or a JSON-schema keyword the engine cannot enforce) is a 400 naming the
        parameter that asked for it."""
        if asked is None:
            return
        param, spec = asked
        try:
            params.grammar = lm.compile_grammar(spec)
        except GrammarError as e:
            raise APIError(400, f"invalid {param}: {e}", param=param, code="invalid_grammar") from e

    def grammar_spec(self, req: P.SamplingRequest) -> tuple[str, GrammarSpec] | None:
        try:
            return req.grammar_spec()
        except P.ParamError as e:
            raise APIError(400, str(e), param=e.param) from e

    def reply(self, req: P.SamplingRequest, lm: LoadedModel, n_prompt: int, n: int) -> Reply:
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        return Reply(lm, n_prompt, n, P.new_id(self.id_prefix), f"hybrid-llm-{self.ctx.profiles.active.name}",
                     include_usage)

    def submit(self, lm: LoadedModel, work: TextRequest | Callable[..., Iterator[Event]]) -> Job:
        """Queue a plain generation (it joins the batch) or other work (it runs alone) on the
        worker; 429 with Retry-After when every row is busy and the queue is full."""
        start = thread_setter(self.ctx.profiles.active, self.ctx.metrics.threads.set)
        loop = asyncio.get_running_loop()
        job = Job(loop, request=work, start=start) if isinstance(work, TextRequest) else \
            Job(loop, work=work, start=start)
        try:
            self.ctx.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server is busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(self.ctx.cfg.retry_after_s)}) from e
        return job

    def generation(self, lm: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> TextRequest:
        return TextRequest(lm, prompt_ids, params, self.ctx.metrics.generation_tokens.labels(lm.name).inc)

    # ---- consuming a job ----------------------------------------------------------------

    async def events(self, job: Job, r: Reply, ping_s: float | None = None) -> AsyncIterator[Event | None]:
        """The job's events with metrics applied, up to Done; raises APIError on a worker
        failure. With ping_s, yields None whenever no event came for that long (queueing,
        or hidden hybrid work) so a stream can send a keep-alive comment."""
        m, name, last = self.ctx.metrics, r.lm.name, None
        while True:
            try:
                ev = await (asyncio.wait_for(job.events.get(), ping_s) if ping_s else job.events.get())
            except asyncio.TimeoutError:
                yield None
                continue
            if isinstance(ev, Done):
                m.e2e.labels(name).observe(time.perf_counter() - r.arrived)
                return
            if isinstance(ev, Failed):
                raise APIError(500, f"generation failed: {ev.error}", type="server_error", code="generation_failed")
            if isinstance(ev, TokenStep):
                if last is None:
                    m.queue_time.labels(name).observe((job.started_at or ev.t) - job.enqueued_at)
                    m.ttft.labels(name).observe(ev.t - r.arrived)
                    m.prompt_tokens.labels(name).inc(r.n_prompt)
                else:
                    m.itl.labels(name).observe(ev.t - last)
                last = ev.t
            elif isinstance(ev, Stats):
                m.observe_hybrid(name, ev.stats)
                r.stats = ev.stats
            yield ev

    async def collect(self, job: Job, r: Reply, request: Request) -> Collected:
        """Every event of the job, for one response body; a client that disconnects cancels it."""
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        out = Collected.empty(r.n)
        try:
            async for ev in self.events(job, r):
                out.add(ev)
        except asyncio.CancelledError:  # the request task itself was cancelled: Ray Serve's proxy does
            job.cancel.set()  # this when its client goes, instead of an ASGI disconnect message
            self.ctx.metrics.cancelled.inc()
            raise
        finally:
            watcher.cancel()
        return out

    async def sse(self, job: Job, r: Reply, head: list[str],
                  chunks: Callable[[Event, Reply], list[str]]) -> AsyncIterator[str]:
        """`head` chunks, then `chunks(event)` per event, then [DONE]. A worker failure is an
        error event; a client gone mid-stream cancels the job within a token."""
        completed = False
        try:
            for c in head:
                yield c
            async for ev in self.events(job, r, self.ctx.cfg.ping_interval_s):
                if ev is None:
                    yield wire.SSE_PING
                    continue
                for c in chunks(ev, r):
                    yield c
            completed = True
        except APIError as e:
            completed = True
            yield wire.sse_error(e.body())
        finally:
            if not completed:
                job.cancel.set()
                self.ctx.metrics.cancelled.inc()
        yield wire.SSE_DONE

    @staticmethod
    def streaming_response(body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _watch_disconnect(self, request: Request, job: Job) -> None:
        while not job.cancel.is_set():
            if await request.is_disconnected():
                job.cancel.set()
                self.ctx.metrics.cancelled.inc()
                return
            await asyncio.sleep(0.1)


def visible(deltas: list[Delta]) -> list[Delta]:
    """Deltas worth a chunk: with text, a finish reason or a logprob."""
    return [d for d in deltas if not d.empty]
