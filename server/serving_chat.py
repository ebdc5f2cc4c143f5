"""/v1/chat/completions: messages -> the chat template -> direct generation or the hybrid
loop on the worker -> a `chat.completion` body or its stream (vLLM's `OpenAIServingChat`)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from jinja2 import TemplateError

from engine.events import Event, Reasoning, TokenStep, Usage
from engine.runner import LoadedModel

from . import protocol as P
from . import wire
from .errors import APIError
from .hybrid import HybridParams, context_budget, hybrid_work
from .serving_base import Collected, OpenAIServing, Reply, visible
from .think import ThinkSplit, split, thinks
from .tools import CallStream, ToolPlan, parse_calls, render_messages


class ChatServing(OpenAIServing):
    id_prefix = "chatcmpl"

    async def create(self, req: P.ChatCompletionRequest, request: Request):
        self.check_supported(req)
        lm = self.ctx.model_for(req.model)
        try:
            plan = ToolPlan.of(req)
        except P.ParamError as e:
            raise APIError(400, str(e), param=e.param) from e
        messages = render_messages(req.messages, plan)
        thinking = thinks(getattr(lm.tokenizer, "chat_template", None))
        no_think = thinking and req.reasoning_effort in ("none", "minimal")
        try:
            prompt_ids, stops = lm.encode_chat(messages, **({"enable_thinking": False} if no_think else {}))
        except TemplateError as e:  # e.g. a template that rejects this role order
            raise APIError(400, f"the model's chat template rejected these messages: {e}", param="messages") from e
        asked = ("tools", plan.grammar()) if plan is not None else self.grammar_spec(req)
        hp = self.hybrid_params(req, thinking)
        if hp is None:
            params = self.sampling_params(req, lm, len(prompt_ids), stops)
            self.constrain(params, lm, asked)
            work = self.generation(lm, prompt_ids, params)
        else:
            if asked is not None and hp.answer_prefix:
                raise APIError(400, "hybrid.answer_prefix cannot be combined with structured output or tools: "
                                    "the prefix would not match the grammar", param="hybrid")
            params, work = self._hybrid_job(req, lm, messages, len(prompt_ids), hp, asked)
        r = self.reply(req, lm, len(prompt_ids), params.n)
        if plan is not None:
            r.tool_streams = [CallStream() for _ in range(params.n)]
        if thinking and hp is None:
            opened = lm.tokenizer.decode(prompt_ids[-3:]).rstrip().endswith("<think>")  # the template opened it
            r.think_streams = [ThinkSplit(opened) for _ in range(params.n)]
        job = self.submit(lm, work)
        if req.stream:
            head = [self._chunk(r, [P.ChatChunkChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))
                                    for i in range(params.n)])]  # OpenAI: the first chunk carries the role
            return self.streaming_response(self.sse(job, r, head, self._chunks))
        return JSONResponse(self._body(await self.collect(job, r, request), r, params.logprobs is not None)
                            .model_dump())

    # ---- the hybrid loop ------------------------------------------------------------------

    def hybrid_params(self, req: P.ChatCompletionRequest, thinking: bool = False) -> HybridParams | None:
        """The request's hybrid settings (server defaults filled in), or None for direct generation.
        On a reasoning model (`thinking`) reasoning_effort sets its own thinking, not the loop."""
        c, h = self.ctx.cfg, req.hybrid
        if h is not None:
            on = h.enabled
        elif req.reasoning_effort is not None and not thinking:
            on = P.REASONING_EFFORT_LOOPS[req.reasoning_effort] > 0
        else:
            on = c.hybrid_default
        if not on:
            return None
        needs_memory = h is None or h.condense_with != "truncate"
        if self.ctx.memory is None and needs_memory:
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
        cap = self.ctx.profiles.active.hybrid_loops
        if cap:  # the battery profile's fewer loops
            hp.loops = min(hp.loops, cap)
        return hp

    def _hybrid_job(self, req: P.ChatCompletionRequest, lm: LoadedModel, messages: list[dict], n_prompt: int,
                    hp: HybridParams, asked):
        """(sampling params of the answer, the worker job) within the context and KV budgets."""
        if messages[-1]["role"] != "user":
            raise APIError(400, "the hybrid loop needs the last message to be the user's", param="messages")
        if not hasattr(lm.model, "forward_rows"):  # its stages are sequences in the model's batch
            raise APIError(400, f"the hybrid loop needs a model with a batched forward; {lm.name} runs on "
                                f"{lm.manifest.get('backend', 'torch')}", param="hybrid")
        cfg, mm, n_ctx = self.ctx.cfg, self.ctx.memory, lm.max_model_len
        answer_tokens = req.requested_max_tokens() or cfg.hybrid_answer_tokens
        capacity = context_budget(n_prompt, hp, answer_tokens)
        if capacity > n_ctx:
            raise APIError(400, f"the hybrid loop needs up to {capacity} tokens of context (prompt {n_prompt}, "
                                f"chain-of-thought {hp.cot_groups * hp.cot_group_tokens}, answer {answer_tokens}) "
                                f"but n_ctx={n_ctx}; lower max_tokens or hybrid.cot_groups",
                           param="max_tokens", code="context_length_exceeded")
        mm_kv = mm.cfg.max_len * mm.model.kv_bytes_per_token() if mm is not None else 0
        kv_mb = (capacity * lm.model.kv_bytes_per_token() + mm_kv) / 2**20
        if kv_mb > cfg.max_kv_cache_mb:
            raise APIError(400, f"the hybrid loop needs {kv_mb:.0f} MiB of KV cache, over this server's "
                                f"{cfg.max_kv_cache_mb} MiB per-request limit", param="max_tokens",
                           code="kv_cache_limit")
        params = req.to_sampling_params(answer_tokens)
        self.constrain(params, lm, asked)  # the answer stage is the constrained one
        counter = self.ctx.metrics.generation_tokens.labels(lm.name)
        return params, hybrid_work(self.ctx.hybrid_model(lm), mm, messages, hp, params, params.stop, counter.inc)

    # ---- wire objects ---------------------------------------------------------------------

    def _chunk(self, r: Reply, choices: list[P.ChatChunkChoice], usage: P.Usage | None = None) -> str:
        return wire.sse(P.ChatCompletionChunk(id=r.id, created=r.created, model=r.lm.name, choices=choices,
                                              usage=usage, system_fingerprint=r.fingerprint), r.include_usage)

    def _chunks(self, ev: Event, r: Reply) -> list[str]:
        if isinstance(ev, Reasoning):
            delta = P.DeltaMessage(reasoning_content=ev.text, reasoning=ev.text)
            return [self._chunk(r, [P.ChatChunkChoice(index=0, delta=delta)])]
        if isinstance(ev, TokenStep):
            choices = [self._chunk_choice(d, r) for d in visible(ev.deltas)]
            choices = [c for c in choices if c is not None]
            return [self._chunk(r, choices)] if choices else []
        if isinstance(ev, Usage) and r.include_usage:
            return [self._chunk(r, [], wire.usage(r.n_prompt, ev.completion_tokens, r.stats, ev.cached_tokens))]
        return []

    @staticmethod
    def _chunk_choice(d, r: Reply) -> P.ChatChunkChoice | None:
        """A delta's chunk choice. A reasoning model's text first goes through the choice's
        ThinkSplit (<think> text as reasoning), then, with tools, through its CallStream (held
        back while it may start a call, whole calls as tool_calls deltas)."""
        lp = P.ChoiceLogprobs(content=[wire.logprob_entry(d.logprob)]) if d.logprob is not None else None
        text, calls, finish, reasoning = d.text, None, d.finish_reason, ""
        if r.think_streams is not None:
            ts = r.think_streams[d.index]
            reasoning, text = ts.feed(text)
            if finish is not None:
                more_r, more_t = ts.close()
                reasoning, text = reasoning + more_r, text + more_t
        if r.tool_streams is not None:
            cs = r.tool_streams[d.index]
            text, calls = cs.feed(text)
            if finish is not None:
                text += cs.close()
                finish = "tool_calls" if cs.n_calls and finish == "stop" else finish
        if not text and not calls and not reasoning and finish is None and lp is None:
            return None
        return P.ChatChunkChoice(index=d.index, delta=P.DeltaMessage(
            content=text or None, tool_calls=calls or None, reasoning_content=reasoning or None,
            reasoning=reasoning or None), finish_reason=finish, logprobs=lp)

    def _body(self, c: Collected, r: Reply, want_lp: bool) -> P.ChatCompletionResponse:
        reasoning = c.reasoning or None
        choices = []
        for i, (t, f) in enumerate(zip(c.texts, c.finish)):
            if r.think_streams is not None:  # a reasoning model's own <think> block
                own, t = split(t, r.think_streams[i].opened)
                reasoning = own or None
            msg = P.ResponseMessage(content=t, reasoning_content=reasoning, reasoning=reasoning)
            calls = parse_calls(t) if r.tool_streams is not None else None
            if calls:
                msg.content, msg.tool_calls, f = None, calls, "tool_calls" if f == "stop" else f
            choices.append(P.ChatChoice(index=i, finish_reason=f or "length", message=msg, logprobs=P.ChoiceLogprobs(
                content=[wire.logprob_entry(e) for e in c.logprobs[i]]) if want_lp else None))
        return P.ChatCompletionResponse(
            id=r.id, created=r.created, model=r.lm.name, system_fingerprint=r.fingerprint,
            usage=wire.usage(r.n_prompt, c.completion_tokens, c.stats, c.cached_tokens), choices=choices)
