"""From sampled token ids to what users see: detokenized text, stop conditions, logprobs, RequestOutputs.

A sample stops on a stop token id (or EOS unless ignore_eos) once min_tokens are out -- the token stays
in token_ids but not in the text --, on a stop string (the text is cut before it, or after it with
include_stop_str_in_output), or at max_tokens ("length"). While a sample runs, a tail of the text
that could still become a stop string is held back, so streamed text is never retracted.
"""

from __future__ import annotations

from .detokenizer import Decoder, IncrementalDetokenizer, StopStrings
from .outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from .request import Request, Sequence
from .sampler import RowLogprobs


class OutputProcessor:
    def __init__(self, tokenizer: Decoder, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
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
            if request.params.logprobs is not None:
                seq.logprobs = []

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

    def process(self, seq: Sequence, token_id: int, logprobs: RowLogprobs | None) -> None:
        """Append one sampled token to a running sequence; sets finish_reason when it ends."""
        request, params = seq.request, seq.request.params
        num_before = len(seq.token_ids)
        seq.token_ids.append(token_id)
        if logprobs is not None and seq.logprobs is not None:
            top = [Logprob(i, v, self.token_text(i)) for i, v in zip(logprobs.top_ids, logprobs.top_logprobs,
                                                                      strict=True)]
            sampled = Logprob(token_id, logprobs.sampled, self.token_text(token_id))
            seq.logprobs.append(TokenLogprobs(sampled, top))
        if token_id in request.stop_ids and num_before >= params.min_tokens:
            seq.finish_reason = "stop"
            seq.stop_reason = token_id if token_id in params.stop_token_ids else None
            self._add_text(seq, self._detok[seq.seq_id].flush())
        else:
            self._add_text(seq, self._detok[seq.seq_id].step(token_id))
        full = len(seq.token_ids) >= request.max_tokens or seq.num_tokens >= self.max_model_len
        if not seq.finished and full:
            seq.finish_reason = "length"
            self._add_text(seq, self._detok[seq.seq_id].flush())
        self._update_emitted(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a running sequence for a reason found outside the text (its grammar is complete or stuck)."""
        if seq.finished:
            return
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._add_text(seq, self._detok[seq.seq_id].flush())
        self._update_emitted(seq)

    def _add_text(self, seq: Sequence, delta: str) -> None:
        if not delta:
            return
        start = len(seq.text)
        seq.text += delta
        stops = self._stops.get(seq.request.request_id)
        if stops is None:
            return
        state, match = stops.feed(self._stop_state[seq.seq_id], delta)
        self._stop_state[seq.seq_id] = state
        if match is not None:
            end, s = match
            cut = start + end - (0 if seq.request.params.include_stop_str_in_output else len(s))
            seq.text = seq.text[:cut]
            seq.finish_reason, seq.stop_reason = "stop", s

    def _update_emitted(self, seq: Sequence) -> None:
        stops = self._stops.get(seq.request.request_id)
        held = 0 if seq.finished or stops is None else stops.held(self._stop_state[seq.seq_id])
        seq.emitted_len = max(seq.emitted_len, len(seq.text) - held)

    def make_output(self, request: Request) -> RequestOutput:
        """A snapshot that later steps do not mutate (cumulative text, ids and logprobs)."""
        outs = [CompletionOutput(index=s.index, text=s.text[:s.emitted_len], token_ids=list(s.token_ids),
                                 finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                                 logprobs=list(s.logprobs) if s.logprobs is not None else None)
                for s in request.seqs]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                             finished=request.finished, num_cached_tokens=request.num_cached_tokens)
