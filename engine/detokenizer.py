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


def find_stop(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends in text[new_from:] -> (start index, stop string), or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, new_from - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (held back)."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held
