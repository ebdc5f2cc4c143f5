"""/v1/completions: a prompt (text or token ids) -> one job on the worker -> a
`text_completion` body or its stream (vLLM's `OpenAIServingCompletion`)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from engine.events import Event, TokenStep, Usage

from . import protocol as P
from . import wire
from .errors import APIError
from .serving_base import Collected, OpenAIServing, Reply, visible


class CompletionServing(OpenAIServing):
    id_prefix = "cmpl"

    async def create(self, req: P.CompletionRequest, request: Request):
        self.check_supported(req)
        lm = self.ctx.model_for(req.model)
        try:
            prompt_ids = lm.encode_prompt(req.prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        params = self.sampling_params(req, lm, len(prompt_ids), [])
        self.constrain(params, lm, self.grammar_spec(req))
        r = self.reply(req, lm, len(prompt_ids), params.n)
        job = self.submit(lm, self.generation(lm, prompt_ids, params))
        with_top = bool(params.logprobs)
        if req.stream:
            return self.streaming_response(self.sse(job, r, [], lambda ev, r: self._chunks(ev, r, with_top)))
        body = self._body(await self.collect(job, r, request), r, params.logprobs is not None, with_top)
        return JSONResponse(body.model_dump())

    def _chunk(self, r: Reply, choices: list[P.CompletionChoice], usage: P.Usage | None = None) -> str:
        return wire.sse(P.CompletionResponse(id=r.id, created=r.created, model=r.lm.name, choices=choices,
                                             usage=usage, system_fingerprint=r.fingerprint), r.include_usage)

    def _chunks(self, ev: Event, r: Reply, with_top: bool) -> list[str]:
        if isinstance(ev, TokenStep):
            choices = [P.CompletionChoice(
                index=d.index, text=d.text, finish_reason=d.finish_reason,
                logprobs=P.CompletionLogprobs.from_entries([wire.logprob_entry(d.logprob)], with_top)
                if d.logprob is not None else None) for d in visible(ev.deltas)]
            return [self._chunk(r, choices)] if choices else []
        if isinstance(ev, Usage) and r.include_usage:
            return [self._chunk(r, [], wire.usage(r.n_prompt, ev.completion_tokens, cached=ev.cached_tokens))]
        return []

    def _body(self, c: Collected, r: Reply, want_lp: bool, with_top: bool) -> P.CompletionResponse:
        return P.CompletionResponse(
            id=r.id, created=r.created, model=r.lm.name, system_fingerprint=r.fingerprint,
            usage=wire.usage(r.n_prompt, c.completion_tokens, c.stats, c.cached_tokens),
            choices=[P.CompletionChoice(index=i, text=t, finish_reason=f or "length",
                                        logprobs=P.CompletionLogprobs.from_entries(
                                            [wire.logprob_entry(e) for e in c.logprobs[i]], with_top)
                                        if want_lp else None)
                     for i, (t, f) in enumerate(zip(c.texts, c.finish))])
