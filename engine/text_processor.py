"""From a sample's token ids to the text users see: incremental detokenization, stop strings, hold-back.

Runs where the text is needed: inside EngineCore for LLM and the in-process AsyncLLM, in the API server
processes when the engine core runs in its own (engine/core_client.py), so the core's step never decodes.
A stop string ends the sample ("stop", stop_reason the string): the text is cut before it, or after it
with include_stop_str_in_output. While a sample runs, a tail of the text that could still become a stop
string is held back (emitted_len), so streamed text is never retracted.
"""

from __future__ import annotations

from .detokenizer import Decoder, IncrementalDetokenizer, StopStrings
from .request import Request, Sequence


class TextProcessor:
    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self._detok: dict[int, IncrementalDetokenizer] = {}  # seq_id -> detokenizer
        self._stops: dict[str, StopStrings] = {}  # request_id -> its stop strings' automaton
        self._stop_state: dict[int, int] = {}  # seq_id -> automaton state after the sequence's text
        self._token_text: dict[int, str] = {}  # token id -> its text, for logprobs

    def add(self, request: Request) -> None:
        if request.params.stop:
            self._stops[request.request_id] = request.stop_strings or StopStrings(request.params.stop)
        for seq in request.seqs:
            self._stop_state[seq.seq_id] = 0
            self._detok[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, request.params.skip_special_tokens)

    def release(self, request: Request) -> None:
        self._stops.pop(request.request_id, None)
        for seq in request.seqs:
            self._detok.pop(seq.seq_id, None)
            self._stop_state.pop(seq.seq_id, None)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def process(self, seq: Sequence, token_id: int, stop_token: bool) -> None:
        """The text of the token just appended to seq.token_ids. A stop token (stop_token) adds none: the
        text held back is flushed instead; a sample that ended at its length ("length") is flushed too."""
        detok = self._detok[seq.seq_id]
        matched = self._add_text(seq, detok.flush() if stop_token else detok.step(token_id))
        if not matched and seq.finish_reason == "length":
            self._add_text(seq, detok.flush())
        self._update_emitted(seq)

    def finish(self, seq: Sequence) -> None:
        """A sample that ended for a reason outside its text (its grammar): the text held back goes out."""
        self._add_text(seq, self._detok[seq.seq_id].flush())
        self._update_emitted(seq)

    def _update_emitted(self, seq: Sequence) -> None:
        stops = self._stops.get(seq.request.request_id)
        held = 0 if seq.finished or stops is None else stops.held(self._stop_state[seq.seq_id])
        seq.emitted_len = max(seq.emitted_len, len(seq.text) - held)

    def _add_text(self, seq: Sequence, delta: str) -> bool:
        """Append text; True when it completes a stop string (the sample then ends with "stop")."""
        if not delta:
            return False
        start = len(seq.text)
        seq.text += delta
        stops = self._stops.get(seq.request.request_id)
        if stops is None:
            return False
        state, match = stops.feed(self._stop_state[seq.seq_id], delta)
        self._stop_state[seq.seq_id] = state
        if match is None:
            return False
        end, s = match
        cut = start + end - (0 if seq.request.params.include_stop_str_in_output else len(s))
        seq.text = seq.text[:cut]
        seq.finish_reason, seq.stop_reason = "stop", s
        return True
