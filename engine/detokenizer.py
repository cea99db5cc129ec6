"""Incremental detokenization for streaming, and stop-string matching on the streamed text.

Byte-level BPE splits UTF-8 characters across tokens, so text is decoded over a sliding window of
token ids (a few tokens of context, then the unread ones) and new text is released only once it no
longer ends in U+FFFD, the replacement character an incomplete byte sequence decodes to. The window
starts on the tail of the prompt so the first generated token is decoded in context (leading spaces).
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded with the first generated ones


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """One per sequence: `step(token_id)` returns the text that token completes (maybe "")."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])  # the window's token ids (context + output)
        self.prefix_offset = 0  # window start: context already shown
        self.read_offset = len(self.ids)  # ids before this are already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""  # nothing new yet, or an incomplete character: wait for more bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back (may contain U+FFFD if truly invalid)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class StopStrings:
    """An Aho-Corasick automaton over a request's stop strings, built once per request.

    Feeding text costs O(len(text)) whatever the number or length of the stop strings, so the engine's
    per-token work does not grow with what a request asks for. A state is the longest suffix of the text
    fed so far that is a prefix of some stop string; its depth is how much text to hold back.
    """

    def __init__(self, stops: list[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]  # state -> next state by character
        self.depth: list[int] = [0]  # state -> length of the prefix it stands for
        self.match: list[str | None] = [None]  # state -> longest stop string ending here
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][ch] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.match.append(None)
                state = nxt
            self.match[state] = stop
        self.fail = [0] * len(self.goto)  # state -> longest proper suffix that is also a state
        queue = list(self.goto[0].values())
        for state in queue:  # breadth first: a state's fail link is known before its children's
            for ch, nxt in self.goto[state].items():
                f = self.fail[state]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[nxt] = self.goto[f].get(ch, 0) if self.goto[f].get(ch) != nxt else 0
                if self.match[nxt] is None:
                    self.match[nxt] = self.match[self.fail[nxt]]
                queue.append(nxt)

    def feed(self, state: int, text: str) -> tuple[int, tuple[int, str] | None]:
        """Advance `state` over `text` -> (new state, (end offset in text, stop string) of the first
        match, or None)."""
        goto, fail, match = self.goto, self.fail, self.match
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state] is not None:
                return state, (i + 1, match[state])  # type: ignore[return-value]
        return state, None

    def held(self, state: int) -> int:
        """Characters at the end of the text that could still become a stop string."""
        return self.depth[state]
