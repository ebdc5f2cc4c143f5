"""Tool calling: the request's tools into the prompt, `tool_choice` into a grammar, the output
text back into OpenAI `tool_calls` (whole, or as stream deltas).

Prompt format (SmolLM2's and Gemma's templates have none; this is Qwen2.5's / Hermes', which
small models tuned for tools know): the tool list goes at the end of the system message,

    # Tools
    You may call one or more functions to assist with the user query.
    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {"type": "function", "function": {...}}
    </tools>
    For each function call, return a json object with function name and arguments within
    <tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

an assistant turn that called tools is rendered as those `<tool_call>` blocks, and a `tool`
message as a user turn `<tool_response>\\n...\\n</tool_response>`. With `tool_choice: "none"`
the tools are left out of the prompt (vLLM's exclude_tools_when_tool_choice_none), so the
model answers in text.

Output grammar (llguidance Lark; `%json` checks the arguments against each function's schema):
`required` / a named function: one call (or several, `parallel_tool_calls`), nothing else;
`auto`: either such calls or text that does not start with `<tool_call>`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from engine.grammar import JSON_OPTIONS, GrammarSpec

from . import protocol as P

OPEN, CLOSE = "<tool_call>", "</tool_call>"

TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


@dataclass
class ToolPlan:
    """What the request's tools mean for this generation."""
    tools: list[P.Tool]
    choice: str  # "auto" | "required" | a function name
    parallel: bool

    @classmethod
    def of(cls, req: P.ChatCompletionRequest) -> ToolPlan | None:
        """None when the output is plain text (no tools, or tool_choice none)."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise P.ParamError("tool_choice needs tools", "tool_choice")
            return None
        if choice == "none":
            return None
        names = [t.function.name for t in req.tools]
        if len(set(names)) != len(names):
            raise P.ParamError("tool names must be unique", "tools")
        if isinstance(choice, P.NamedToolChoice):
            if choice.function.name not in names:
                raise P.ParamError(f"tool_choice names {choice.function.name!r}, which is not among the tools "
                                f"({', '.join(names)})", "tool_choice")
            choice = choice.function.name
        if req.grammar_spec() is not None:
            raise P.ParamError("response_format / guided decoding cannot be combined with tools", "response_format")
        return cls(req.tools, choice or "auto", req.parallel_tool_calls)

    # ---- prompt -------------------------------------------------------------------------------

    def system_text(self) -> str:
        lines = [json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in self.tools]
        return "\n".join([TOOLS_HEADER, *lines, TOOLS_FOOTER])

    # ---- grammar ------------------------------------------------------------------------------

    def grammar(self) -> GrammarSpec:
        tools = [t for t in self.tools if self.choice in ("auto", "required") or t.function.name == self.choice]
        call = {"anyOf": [_call_schema(t) for t in tools], "x-guidance": JSON_OPTIONS}
        calls = "call (\"\\n\" call)*" if self.parallel else "call"
        rules = [f"calls: {calls}",
                 f"call: {json.dumps(OPEN + chr(10))} call_json {json.dumps(chr(10) + CLOSE)}",
                 f"call_json: %json {json.dumps(call)}"]
        if self.choice == "auto":
            rules = ["start: calls | TEXT", f"TEXT: /{not_prefix_regex(OPEN)}/"] + rules
        else:
            rules = ["start: calls"] + rules
        return GrammarSpec("lark", "\n".join(rules))


def _call_schema(t: P.Tool) -> dict:
    params = t.function.parameters if t.function.parameters is not None else {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def _lit(ch: str) -> str:
    return f"\\x{{{ord(ch):X}}}"  # a regex literal for any character, with nothing to escape


def not_prefix_regex(prefix: str) -> str:
    """A regex (Rust syntax) for text that does not start with `prefix`: a proper prefix of it,
    or text that leaves it at some character (then anything)."""
    alts = ["".join(_lit(c) for c in prefix[:k]) for k in range(len(prefix))]  # "", "<", "<t", ...
    alts += ["".join(_lit(c) for c in prefix[:k]) + f"[^{_lit(prefix[k])}](?s:.*)" for k in range(len(prefix))]
    return "(" + "|".join(alts) + ")"


# ---- history -------------------------------------------------------------------------------

def render_messages(messages: list[P.ChatMessage], plan: ToolPlan | None) -> list[dict]:
    """The request's messages as the chat template's plain {role, content} turns."""
    out, prev_tool = [], False
    for m in messages:
        role, text = ("system" if m.role == "developer" else m.role), m.text()
        if m.role == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
            if prev_tool:  # consecutive tool results: one user turn, as Qwen's template does
                out[-1]["content"] += "\n" + text
                continue
            role = "user"
        elif m.tool_calls:
            blocks = [f"{OPEN}\n{json.dumps(_call_dict(c), ensure_ascii=False)}\n{CLOSE}" for c in m.tool_calls]
            text = "\n".join(([text] if text else []) + blocks)
        prev_tool = m.role == "tool"
        out.append({"role": role, "content": text})
    if plan is not None:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{plan.system_text()}"
        else:
            out.insert(0, {"role": "system", "content": plan.system_text()})
    return out


def _call_dict(c: P.ToolCall) -> dict:
    try:
        args = json.loads(c.function.arguments)
    except json.JSONDecodeError:
        args = c.function.arguments  # kept as the client sent it
    return {"name": c.function.name, "arguments": args}


# ---- output --------------------------------------------------------------------------------

def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_block(block: str) -> P.ToolCall | None:
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return None
    return P.ToolCall(id=new_call_id(), function=P.FunctionCall(
        name=obj["name"], arguments=json.dumps(obj["arguments"], ensure_ascii=False)))


def parse_calls(text: str) -> list[P.ToolCall] | None:
    """The tool calls a whole output holds, or None when it is text (or an unfinished call)."""
    calls, rest = [], text.strip()
    if not rest.startswith(OPEN):
        return None
    while rest.startswith(OPEN):
        end = rest.find(CLOSE)
        if end < 0:
            return None
        call = _parse_block(rest[len(OPEN):end].strip())
        if call is None:
            return None
        calls.append(call)
        rest = rest[end + len(CLOSE):].strip()
    return calls if not rest else None


class CallStream:
    """One choice's streamed text split into content and whole tool calls: text is held back
    while it could still be the start of `<tool_call>`; each call goes out as one delta (id,
    name and all its arguments) when its closing tag arrives."""

    def __init__(self):
        self.buf = ""
        self.mode: str | None = None  # None: undecided, "text", "calls"
        self.n_calls = 0

    def feed(self, text: str) -> tuple[str, list[P.ToolCallDelta]]:
        """(content to send, tool-call deltas to send)."""
        self.buf += text
        if self.mode is None:
            head = self.buf.lstrip()
            if head.startswith(OPEN):
                self.mode = "calls"
            elif head and not OPEN.startswith(head):
                self.mode = "text"
        if self.mode == "text":
            out, self.buf = self.buf, ""
            return out, []
        return "", self._complete_calls() if self.mode == "calls" else []

    def _complete_calls(self) -> list[P.ToolCallDelta]:
        out = []
        while (end := self.buf.find(CLOSE)) >= 0:
            block, self.buf = self.buf[:end], self.buf[end + len(CLOSE):]
            call = _parse_block(block.strip()[len(OPEN):].strip())
            if call is None:  # cannot happen under the grammar; keep the text rather than lose it
                self.buf = block + CLOSE + self.buf
                break
            out.append(P.ToolCallDelta(index=self.n_calls, id=call.id, type="function", function=P.FunctionCallDelta(
                name=call.function.name, arguments=call.function.arguments)))
            self.n_calls += 1
        return out

    def close(self) -> str:
        """Text still held back at the end (an unfinished call, or a short text)."""
        out, self.buf = self.buf, ""
        return out.strip() if self.n_calls and self.mode == "calls" else out
