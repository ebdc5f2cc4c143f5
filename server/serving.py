"""The serving class: request -> prompt ids -> job on the worker -> OpenAI responses/chunks.

Text (detokenization, stop strings) is produced on the worker thread, next to the
tokens, so a matched stop string ends generation at once; the event loop only formats
JSON and SSE.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError

from . import protocol as P
from .config import ServerConfig
from engine.detok import IncrementalDetokenizer, StopMatcher
from engine.generate import SamplingParams, generate
from .hybrid import HybridParams, context_budget, hybrid_work
from .metrics import Metrics
from .profiles import Profile, ProfileManager
from engine.runner import LoadedModel
from .scheduler import Job, QueueFull, Scheduler


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return P.ErrorResponse(error=P.ErrorDetail(message=self.message, type=self.type, param=self.param,
                                                   code=self.code)).model_dump()


@dataclass
class _Row:
    detok: IncrementalDetokenizer
    stop: StopMatcher
    tokens: int = 0
    finish_reason: str | None = None


def generation_work(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams,
                    on_tokens: Callable[[int], None] = lambda n: None):
    """Build the worker-side generator: yields ("step", [(row, text, finish, logprob entry)], t)
    and ("usage", n).
    `on_tokens` is told of every generated token as it happens, cancelled requests included."""

    def token_entry(token: int, lp: tuple[float, list[tuple[int, float]]]) -> P.TokenLogprob:
        def text(t: int) -> str:
            return lm.tokenizer.decode([t], skip_special_tokens=False)

        tops = [P.TopLogprob(token=(tt := text(t)), logprob=v, bytes=list(tt.encode())) for t, v in lp[1]]
        tok_text = text(token)
        return P.TokenLogprob(token=tok_text, logprob=lp[0], bytes=list(tok_text.encode()), top_logprobs=tops)

    def work(cancel: threading.Event) -> Iterator[tuple]:
        rows = [_Row(IncrementalDetokenizer(lm.tokenizer, prompt_ids), StopMatcher(params.stop)) for _ in range(params.n)]
        finished = [False] * params.n
        for step in generate(lm.model, prompt_ids, params, lm.eos_ids, cancel, finished):
            deltas = []
            for i, r in enumerate(rows):
                if not step.active[i]:
                    continue
                r.tokens += 1
                if step.eos[i]:
                    text = r.stop.feed(r.detok.flush()) + r.stop.flush()
                    r.finish_reason = "stop"
                else:
                    text = r.stop.feed(r.detok.push(step.tokens[i]))
                    if r.stop.stopped:
                        finished[i] = True  # generate() stops decoding this row
                        r.finish_reason = "stop"
                entry = token_entry(step.tokens[i], step.logprobs[i]) if step.logprobs else None
                deltas.append((i, text, r.finish_reason, entry))
            on_tokens(len(deltas))
            yield ("step", deltas, time.perf_counter())
        final = []
        for i, r in enumerate(rows):
            if r.finish_reason is None:  # token budget reached (or cancelled)
                text = r.stop.feed(r.detok.flush()) + r.stop.flush()
                r.finish_reason = "stop" if r.stop.stopped else "length"
                final.append((i, text, r.finish_reason, None))
        if final:
            yield ("step", final, time.perf_counter())
        yield ("usage", sum(r.tokens for r in rows))

    return work


def hybrid_usage(n_prompt: int, n_answer: int, stats) -> P.Usage:
    """OpenAI usage (plain when stats is None); with hybrid stats, reasoning tokens (chain-of-thought + condensed
    prompts) count as completion tokens, as OpenAI counts a reasoning model's."""
    if stats is None:
        return P.Usage(prompt_tokens=n_prompt, completion_tokens=n_answer, total_tokens=n_prompt + n_answer)
    reasoning = stats.raw_reasoning_tokens + stats.condensed_tokens
    completion = n_answer + reasoning
    return P.Usage(prompt_tokens=n_prompt, completion_tokens=completion, total_tokens=n_prompt + completion,
                   completion_tokens_details=P.CompletionTokensDetails(reasoning_tokens=reasoning),
                   hybrid=P.HybridUsage(**stats.to_dict()))


def with_threads(work, profile: Profile, report: Callable[[int], None] = lambda n: None):
    """Run `work` with the profile's torch thread count, set on the worker thread itself (the
    OpenMP thread count is per calling thread) at the start of each job, so a profile switch
    applies from the next request on. `report` is told the count in effect."""

    def run(cancel: threading.Event):
        if profile.threads and torch.get_num_threads() != profile.threads:
            torch.set_num_threads(profile.threads)
        report(torch.get_num_threads())
        yield from work(cancel)

    return run


def default_profiles(cfg: ServerConfig, metrics: Metrics | None = None) -> ProfileManager:
    """plugged = the configured threads (or torch's startup count), the primary artifact, the
    configured loops; battery = half the threads, the battery artifact, `battery_hybrid_loops`."""
    full = cfg.threads or torch.get_num_threads()
    plugged = Profile("plugged", threads=full, model=None, hybrid_loops=None)
    battery = Profile("battery", threads=cfg.battery_threads or max(1, full // 2), model=cfg.battery_model(),
                      hybrid_loops=cfg.battery_hybrid_loops or None)
    return ProfileManager(cfg.profile, plugged, battery, cfg.power_poll_s,
                          on_change=metrics.set_profile if metrics else (lambda a, p: None))


class Serving:
    def __init__(self, models: dict[str, LoadedModel], cfg: ServerConfig, metrics: Metrics, memory=None,
                 profiles: ProfileManager | None = None):
        self.models = models
        self.memory = memory  # memory_model.condense.MemoryModel, or None: no hybrid loop
        self.default_model = next(iter(models))
        self.cfg = cfg
        self.metrics = metrics
        self.scheduler = Scheduler(cfg.max_queue, metrics.set_queue_state)
        self.profiles = profiles or default_profiles(cfg, metrics)

    def model_for(self, name: str) -> LoadedModel:
        """The artifact serving `name`: on battery, requests for the primary model go to the
        battery artifact when one is configured (the response's `model` names it, as OpenAI
        names the snapshot that answered)."""
        prof = self.profiles.refresh()  # one read: a concurrent switch cannot split it
        if name == self.default_model and prof.model:
            return self.models[prof.model]
        if name in self.models:
            return self.models[name]
        raise APIError(404, f"The model '{name}' does not exist; available: {', '.join(self.models)}",
                       param="model", code="model_not_found")

    def model_list(self) -> P.ModelList:
        prof = self.profiles.refresh()
        return P.ModelList(data=[
            P.ModelCard(id=name, created=int(lm.path.stat().st_mtime), max_model_len=lm.max_model_len,
                        meta={"arch": lm.manifest.get("arch"), "recipe": lm.manifest.get("recipe"),
                              "backend": lm.manifest.get("backend", "torch"),
                              "dtype": lm.manifest.get("dtype"), "chat_template": lm.has_chat_template,
                              "n_params": lm.manifest.get("n_params"), "profile": prof.name,
                              "profile_mode": self.profiles.mode,
                              "served_by": (prof.model or name) if name == self.default_model else name})
            for name, lm in self.models.items()])

    # ---- request preparation ----------------------------------------------------------

    def _params(self, req: P.SamplingRequest, lm: LoadedModel, n_prompt: int, extra_stops: list[str]) -> SamplingParams:
        n_ctx = lm.max_model_len
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
        max_tokens = asked or min(room, self.cfg.max_tokens_default or room)
        # The KV cache is preallocated: bound it before admitting the request.
        kv_mb = req.n * (n_prompt + max_tokens) * lm.model.kv_bytes_per_token() / 2**20
        if kv_mb > self.cfg.max_kv_cache_mb:
            raise APIError(400, f"n={req.n} x ({n_prompt} prompt + {max_tokens} max_tokens) tokens need "
                                f"{kv_mb:.0f} MiB of KV cache, over this server's {self.cfg.max_kv_cache_mb} MiB "
                                "per-request limit; lower n or max_tokens", param="max_tokens", code="kv_cache_limit")
        params = req.to_sampling_params(max_tokens)
        params.stop = params.stop + [s for s in extra_stops if s not in params.stop]
        return params

    def _check(self, req: P.SamplingRequest) -> None:
        bad = req.unsupported()
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")

    def _hybrid_params(self, req: P.ChatCompletionRequest) -> HybridParams | None:
        """The request's hybrid settings (server defaults filled in), or None for direct generation."""
        c, h = self.cfg, req.hybrid
        if h is not None:
            on = h.enabled
        elif req.reasoning_effort is not None:
            on = P.REASONING_EFFORT_LOOPS[req.reasoning_effort] > 0
        else:
            on = c.hybrid_default
        if not on:
            return None
        if self.memory is None:
            raise APIError(400, "the hybrid loop was requested but this server has no memory model "
                                "(start it with --memory-model)", param="hybrid", code="hybrid_unavailable")
        if req.n != 1:
            raise APIError(400, "the hybrid loop produces one answer: n must be 1", param="n")
        if req.logprobs:
            raise APIError(400, "logprobs are not available with the hybrid loop", param="logprobs")
        loops = c.hybrid_loops
        if req.reasoning_effort is not None:
            loops = P.REASONING_EFFORT_LOOPS[req.reasoning_effort] or loops
        hp = HybridParams(loops=loops, cot_groups=c.hybrid_cot_groups, cot_group_tokens=c.hybrid_cot_group_tokens,
                          condense_tokens=c.hybrid_condense_tokens)
        if h is not None:
            for k, v in h.model_dump(exclude={"enabled"}).items():
                if v is not None:
                    setattr(hp, k, v)
        cap = self.profiles.active.hybrid_loops
        if cap:  # the battery profile's fewer loops
            hp.loops = min(hp.loops, cap)
        return hp

    def _submit(self, lm: LoadedModel, prompt_ids: list[int], params: SamplingParams, work=None) -> Job:
        counter = self.metrics.generation_tokens.labels(lm.name)
        work = with_threads(work or generation_work(lm, prompt_ids, params, counter.inc), self.profiles.active,
                            self.metrics.threads.set)
        job = Job(work=work, loop=asyncio.get_running_loop())
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server is busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(self.cfg.retry_after_s)}) from e
        return job

    # ---- endpoints --------------------------------------------------------------------

    async def chat(self, req: P.ChatCompletionRequest, request: Request):
        self._check(req)
        lm = self.model_for(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids, stops = lm.encode_chat(messages)
        except TemplateError as e:  # e.g. a template that rejects this role order
            raise APIError(400, f"the model's chat template rejected these messages: {e}", param="messages") from e
        hp = self._hybrid_params(req)
        if hp is not None:
            return await self._respond_hybrid(req, lm, messages, prompt_ids, hp, request)
        params = self._params(req, lm, len(prompt_ids), stops)
        return await self._respond(req, lm, prompt_ids, params, request, chat=True)

    async def completion(self, req: P.CompletionRequest, request: Request):
        self._check(req)
        lm = self.model_for(req.model)
        try:
            prompt_ids = lm.encode_prompt(req.prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        params = self._params(req, lm, len(prompt_ids), [])
        return await self._respond(req, lm, prompt_ids, params, request, chat=False)

    async def _respond(self, req, lm: LoadedModel, prompt_ids, params, request: Request, chat: bool, work=None):
        """Queue the work (plain generation unless `work` is given, e.g. the hybrid loop) and
        answer with a stream or one response body."""
        arrived = time.perf_counter()
        job = self._submit(lm, prompt_ids, params, work)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        created = P.now()
        fp = f"hybrid-llm-{self.profiles.active.name}"  # which power profile served the request
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            sse = self._sse(job, lm, rid, created, len(prompt_ids), params.n, chat, include_usage, arrived,
                            params.logprobs or 0, fp)
            return StreamingResponse(sse, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        try:
            texts, finish, completion_tokens = ["" for _ in range(params.n)], [None] * params.n, 0
            entries: list[list[P.TokenLogprob]] = [[] for _ in range(params.n)]
            reasoning, stats = "", None  # hybrid work only
            async for kind, payload in self._events(job, lm, arrived, len(prompt_ids)):
                if kind == "step":
                    for i, text, fin, entry in payload:
                        texts[i] += text
                        finish[i] = fin or finish[i]
                        if entry is not None:
                            entries[i].append(entry)
                elif kind == "reasoning":
                    reasoning += payload
                elif kind == "hybrid":
                    stats = payload
                elif kind == "usage":
                    completion_tokens = payload
        finally:
            watcher.cancel()
        usage = hybrid_usage(len(prompt_ids), completion_tokens, stats)
        want_lp = params.logprobs is not None
        if chat:
            body = P.ChatCompletionResponse(id=rid, created=created, model=lm.name, usage=usage,
                                            system_fingerprint=fp, choices=[
                P.ChatChoice(index=i, message=P.ResponseMessage(content=t, reasoning_content=reasoning or None,
                                                                reasoning=reasoning or None),
                             finish_reason=f or "length",
                             logprobs=P.ChoiceLogprobs(content=entries[i]) if want_lp else None)
                for i, (t, f) in enumerate(zip(texts, finish))])
        else:
            body = P.CompletionResponse(id=rid, created=created, model=lm.name, usage=usage,
                                        system_fingerprint=fp, choices=[
                P.CompletionChoice(index=i, text=t, finish_reason=f or "length",
                                   logprobs=P.CompletionLogprobs.from_entries(entries[i], bool(params.logprobs))
                                   if want_lp else None)
                for i, (t, f) in enumerate(zip(texts, finish))])
        return JSONResponse(body.model_dump())

    async def _events(self, job: Job, lm: LoadedModel, arrived: float, n_prompt: int,
                      ping_s: float | None = None) -> AsyncIterator[tuple]:
        """Worker events with metrics applied; raises APIError on a worker failure. With
        ping_s, yields ("ping", None) whenever no event came for that long (queueing, or
        hidden hybrid work) so streams can send a keep-alive comment."""
        m, last = self.metrics, None
        while True:
            if ping_s:
                try:
                    event = await asyncio.wait_for(job.events.get(), ping_s)
                except asyncio.TimeoutError:
                    yield "ping", None
                    continue
            else:
                event = await job.events.get()
            kind = event[0]
            if kind == "end":
                m.e2e.labels(lm.name).observe(time.perf_counter() - arrived)
                return
            if kind == "error":
                raise APIError(500, f"generation failed: {event[1]}", type="server_error", code="generation_failed")
            if kind == "step":
                t = event[2]
                if last is None:
                    m.queue_time.labels(lm.name).observe((job.started_at or t) - job.enqueued_at)
                    m.ttft.labels(lm.name).observe(t - arrived)
                    m.prompt_tokens.labels(lm.name).inc(n_prompt)
                else:
                    m.itl.labels(lm.name).observe(t - last)
                last = t
                yield kind, event[1]
            elif kind == "hybrid":
                m.observe_hybrid(lm.name, event[1])
                yield kind, event[1]
            elif kind in ("usage", "reasoning"):
                yield kind, event[1]

    # ---- the hybrid loop ----------------------------------------------------------------

    async def _respond_hybrid(self, req: P.ChatCompletionRequest, lm: LoadedModel, messages: list[dict],
                              prompt_ids: list[int], hp: HybridParams, request: Request):
        if messages[-1]["role"] != "user":
            raise APIError(400, "the hybrid loop needs the last message to be the user's", param="messages")
        n_prompt, n_ctx = len(prompt_ids), lm.max_model_len
        answer_tokens = req.requested_max_tokens() or self.cfg.hybrid_answer_tokens
        capacity = context_budget(n_prompt, hp, answer_tokens)
        if capacity > n_ctx:
            raise APIError(400, f"the hybrid loop needs up to {capacity} tokens of context (prompt {n_prompt}, "
                                f"chain-of-thought {hp.cot_groups * hp.cot_group_tokens}, answer {answer_tokens}) "
                                f"but n_ctx={n_ctx}; lower max_tokens or hybrid.cot_groups",
                           param="max_tokens", code="context_length_exceeded")
        kv_mb = (capacity * lm.model.kv_bytes_per_token()
                 + self.memory.cfg.max_len * self.memory.model.kv_bytes_per_token()) / 2**20
        if kv_mb > self.cfg.max_kv_cache_mb:
            raise APIError(400, f"the hybrid loop needs {kv_mb:.0f} MiB of KV cache, over this server's "
                                f"{self.cfg.max_kv_cache_mb} MiB per-request limit", param="max_tokens",
                           code="kv_cache_limit")
        params = req.to_sampling_params(answer_tokens)
        counter = self.metrics.generation_tokens.labels(lm.name)
        work = hybrid_work(lm, self.memory, messages, hp, params, capacity, params.stop, counter.inc)
        return await self._respond(req, lm, prompt_ids, params, request, chat=True, work=work)

    async def _watch_disconnect(self, request: Request, job: Job) -> None:
        while not job.cancel.is_set():
            if await request.is_disconnected():
                job.cancel.set()
                self.metrics.cancelled.inc()
                return
            await asyncio.sleep(0.1)

    async def _sse(self, job, lm, rid, created, n_prompt, n, chat, include_usage, arrived,
                   top_k: int, fingerprint: str) -> AsyncIterator[str]:
        completed = False

        def chunk(choices, usage=None) -> str:
            if chat:
                obj = P.ChatCompletionChunk(id=rid, created=created, model=lm.name, choices=choices, usage=usage,
                                            system_fingerprint=fingerprint)
            else:
                obj = P.CompletionResponse(id=rid, created=created, model=lm.name, choices=choices, usage=usage,
                                           system_fingerprint=fingerprint)
            d = obj.model_dump()
            if not include_usage:
                d.pop("usage", None)
            for c in d["choices"]:  # OpenAI omits unset delta fields rather than sending nulls
                if "delta" in c:
                    c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        try:
            if chat:  # OpenAI: the first chunk of each choice carries the role
                yield chunk([P.ChatChunkChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))
                             for i in range(n)])
            stats = None
            async for kind, payload in self._events(job, lm, arrived, n_prompt, self.cfg.ping_interval_s):
                if kind == "ping":
                    yield ": ping\n\n"  # SSE comment: keeps proxies and clients from timing out
                elif kind == "reasoning":
                    yield chunk([P.ChatChunkChoice(index=0, delta=P.DeltaMessage(reasoning_content=payload,
                                                                                 reasoning=payload))])
                elif kind == "hybrid":
                    stats = payload
                elif kind == "step":
                    choices = []
                    for i, text, fin, entry in payload:
                        if not text and not fin and entry is None:
                            continue
                        if chat:
                            lp = P.ChoiceLogprobs(content=[entry]) if entry is not None else None
                            choices.append(P.ChatChunkChoice(index=i, delta=P.DeltaMessage(content=text or None),
                                                             finish_reason=fin, logprobs=lp))
                        else:
                            lp = P.CompletionLogprobs.from_entries([entry], top_k > 0) if entry is not None else None
                            choices.append(P.CompletionChoice(index=i, text=text, finish_reason=fin, logprobs=lp))
                    if choices:
                        yield chunk(choices)
                elif kind == "usage" and include_usage:
                    yield chunk([], hybrid_usage(n_prompt, payload, stats))
            completed = True
        except APIError as e:
            completed = True
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            if not completed:  # the client went away: stop the worker within a token
                job.cancel.set()
                self.metrics.cancelled.inc()
        yield "data: [DONE]\n\n"
