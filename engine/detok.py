"""Token ids -> text deltas for one output row: UTF-8-safe detokenization and stop strings.

Incremental decoding keeps a small window of already-emitted ids as left context (the
prefix/read offset scheme of vLLM and TGI), so SentencePiece leading spaces and
multi-token UTF-8 characters come out right; a delta that would end in U+FFFD (an
incomplete byte sequence) is held until the character completes.

Stop strings are matched on text, not tokens: text that could still grow into a stop
string is held back, and text from the stop string on is never emitted.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens used as left context for the first deltas


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        ctx = prompt_ids[-_CONTEXT_TOKENS:]
        self.ids = list(ctx)
        self.prefix_offset = 0
        self.read_offset = len(ctx)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


class StopMatcher:
    """Feed text deltas; get back the part that is safe to emit and whether a stop hit."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # received but not yet emitted
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = self._partial_len()
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def _partial_len(self) -> int:
        """Longest suffix of pending that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
