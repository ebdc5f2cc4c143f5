"""The OpenAI wire schema, as pydantic models (one module, fields in the OpenAI docs' order).

Requests ignore unknown top-level fields (clients send many optional ones), but fields we
accept and cannot honour (logit_bias, penalties) are rejected by `unsupported()` with a clear
400 instead of being silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.generate import SamplingParams
from engine.grammar import GrammarSpec

MAX_STOP = 4  # OpenAI's limit on stop sequences


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ParamError(ValueError):
    """A request whose fields parse but cannot be served together; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call this is the result of

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


def _json_value(v):
    """guided_json's schema, given as an object or as its text."""
    if isinstance(v, str):
        import json
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise ParamError(f"guided_json is not valid JSON: {e}", "guided_json") from e
    if not isinstance(v, dict):
        raise ParamError("guided_json must be a JSON schema object", "guided_json")
    return v


def _find_surrogate(obj, loc: str = "") -> str | None:
    """Where a string holds a lone UTF-16 surrogate (JSON allows "\\ud800"; UTF-8 and the
    tokenizers do not), or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return loc or "body"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if (bad := _find_surrogate(v, f"{loc}.{k}" if loc else str(k))) is not None:
                return bad
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if (bad := _find_surrogate(v, f"{loc}.{i}")) is not None:
                return bad
    return None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        bad = _find_surrogate(data)
        if bad is not None:
            raise ValueError(f"{bad} is not valid Unicode text (a lone surrogate such as \\ud800)")
        return data

    model: str
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as vLLM
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # Extensions (vLLM / llama.cpp): not in OpenAI's schema but widely used.
    top_k: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's guided decoding extensions: the output matches a JSON schema, a regex, or one choice
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    def grammar_spec(self) -> tuple[str, GrammarSpec] | None:
        """(the parameter that asked, what the output must match), or None for free text."""
        asked = [k for k in ("guided_json", "guided_regex", "guided_choice") if getattr(self, k) is not None]
        rf = self.response_format if self.response_format is not None and self.response_format.type != "text" \
            else None
        if len(asked) + (rf is not None) > 1:
            raise ParamError("at most one of response_format, guided_json, guided_regex and guided_choice",
                             asked[-1] if asked else "response_format")
        if rf is not None:
            schema = rf.json_schema.schema_ if rf.type == "json_schema" else None
            return "response_format", GrammarSpec("json", schema)
        if self.guided_json is not None:
            return "guided_json", GrammarSpec("json", _json_value(self.guided_json))
        if self.guided_regex is not None:
            return "guided_regex", GrammarSpec("regex", self.guided_regex)
        if self.guided_choice is not None:
            return "guided_choice", GrammarSpec("choice", self.guided_choice)
        return None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for an accepted-but-unimplemented option, else None."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server"
        if self.frequency_penalty or self.presence_penalty:
            return "frequency_penalty", "frequency/presence penalties are not supported by this server"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None

    def logprobs_k(self) -> int | None:
        """None: no logprobs; k: the chosen token's logprob plus the top k."""
        return None

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, n=self.n, stop=list(self.stop or []),
                              ignore_eos=self.ignore_eos, logprobs=self.logprobs_k())


class HybridOptions(BaseModel):
    """Extension: the hybrid loop (large model thinks, memory model condenses). Fields left
    out take the server's defaults; unknown fields are an error, not silently ignored."""
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    loops: int | None = Field(default=None, ge=0, le=16)
    cot_groups: int | None = Field(default=None, ge=0, le=16)  # 0: empty chain-of-thought (a control)
    cot_group_tokens: int | None = Field(default=None, ge=1, le=512)
    condense_tokens: int | None = Field(default=None, ge=1, le=512)
    cot_temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    return_reasoning: bool | None = None
    answer_prefix: str | None = Field(default=None, max_length=200)
    condense_with: Literal["memory_model", "truncate"] | None = None  # "truncate": the no-memory-model control
    stop_at_answer: bool | None = None  # with answer_prefix: a CoT line opening with it ends the loops


class FunctionDef(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema for the arguments object
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


# reasoning_effort -> hybrid loops (none/minimal: answer directly)
REASONING_EFFORT_LOOPS = {"none": 0, "minimal": 0, "low": 1, "medium": 2, "high": 4}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    hybrid: HybridOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self):
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs to be true"
        return super().unsupported()


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) == 0:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError("batched prompts are not supported: send one prompt per request")
                return v[0]
        return v

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def unsupported(self):
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix (fill-in-the-middle) is not supported by this server"
        if self.best_of not in (None, 1, self.n):
            return "best_of", "best_of is not supported by this server"
        return super().unsupported()


# ---- responses -------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (KV of an earlier request)


class StageSeconds(BaseModel):
    cot: float
    condense: float
    answer: float


class ModelTokenUsage(BaseModel):
    prompt_tokens: int  # prefilled
    cached_tokens: int  # reused from the request's KV cache
    completion_tokens: int


class HybridUsage(BaseModel):
    """Extension: per-stage accounting of a hybrid request."""
    loops: int
    large: ModelTokenUsage
    small: ModelTokenUsage
    raw_reasoning_tokens: int
    condensed_tokens: int
    final_prompt_tokens: int
    peak_context_tokens: int
    seconds: StageSeconds


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None
    prompt_tokens_details: PromptTokensDetails | None = None
    hybrid: HybridUsage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]

    @classmethod
    def from_entries(cls, entries: list[TokenLogprob], with_top: bool) -> "CompletionLogprobs":
        offsets, pos = [], 0
        for e in entries:  # offsets into the concatenated token texts
            offsets.append(pos)
            pos += len(e.token)
        return cls(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                   top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries] if with_top else None,
                   text_offset=offsets)


FinishReason = Literal["stop", "length", "tool_calls"]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    # the hybrid loop's reasoning under both names clients read (vLLM/DeepSeek, OpenRouter)
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hybrid-llm"
    parent: str | None = None  # vLLM: the base model a LoRA adapter's name runs on; None for a base model
    max_model_len: int | None = None
    meta: dict | None = None


class ProfileRequest(BaseModel):
    """Extension: body of POST /profile."""
    mode: Literal["plugged", "battery", "auto"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
