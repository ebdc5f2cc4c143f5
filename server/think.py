"""Reasoning models (Qwen3, DeepSeek-R1 distills): their `<think>...</think>` output goes to
`reasoning_content` (and `reasoning`), the rest to `content` - the same fields the hybrid loop
fills. A model counts as one when its chat template writes `<think>`; `reasoning_effort: none`
(or `minimal`) renders the template with `enable_thinking=False`, Qwen3's no-think switch.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def thinks(chat_template: str | None) -> bool:
    return bool(chat_template) and OPEN in chat_template


class ThinkSplit:
    """One choice's streamed text split into (reasoning, content). The text is held back while
    it may still be the start of `<think>` (or, inside, of `</think>`). `opened`: the prompt
    already ends with `<think>` (some templates open the block for the model)."""

    def __init__(self, opened: bool = False):
        self.buf = ""
        self.opened = opened
        self.mode = "think" if opened else None  # None: undecided, "think", "after" (</think> seen), "content"

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        while True:
            if self.mode is None:
                head = self.buf.lstrip()
                if head.startswith(OPEN):
                    self.mode, self.buf = "think", head[len(OPEN):]
                elif head and not OPEN.startswith(head):
                    self.mode = "content"
                else:
                    return reasoning, content
            if self.mode == "after":  # the blank lines after </think> are not content
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return reasoning, content
                self.mode = "content"
            if self.mode == "content":
                content, self.buf = content + self.buf, ""
                return reasoning, content
            end = self.buf.find(CLOSE)
            if end < 0:  # keep back what may be the start of </think>
                keep = _partial_suffix(self.buf, CLOSE)
                reasoning += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return reasoning, content
            reasoning += self.buf[:end]
            self.buf = self.buf[end + len(CLOSE):]
            self.mode = "after"

    def close(self) -> tuple[str, str]:
        """What is still held back at the end."""
        out, self.buf = self.buf, ""
        if self.mode == "after":  # only blank lines followed </think>
            return "", ""
        return (out, "") if self.mode == "think" else ("", out)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split(text: str, opened: bool = False) -> tuple[str, str]:
    """A whole output as (reasoning, content)."""
    s = ThinkSplit(opened)
    r1, c1 = s.feed(text)
    r2, c2 = s.close()
    return r1 + r2, c1 + c2
