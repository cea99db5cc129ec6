"""From sampled token ids to what users see: stop conditions, logprobs, text (TextProcessor), RequestOutputs.

A sample stops on a stop token id (or EOS unless ignore_eos) once min_tokens are out -- the token stays
in token_ids but not in the text --, on a stop string (TextProcessor), or at max_tokens ("length").
With detokenize=False (the engine-core process, whose API servers detokenize) only the token-level
conditions are checked here, and texts stay empty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .detokenizer import Decoder
from .outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from .request import Request, Sequence
from .text_processor import TextProcessor

if TYPE_CHECKING:  # the sampler imports torch; the API server processes import this module without it
    from .sampler import RowLogprobs


def token_logprobs(token_id: int, row: RowLogprobs, text: TextProcessor | None) -> TokenLogprobs:
    """One token's logprob entry; token texts empty without a TextProcessor (filled where the text is)."""
    name = text.token_text if text is not None else (lambda _: "")
    top = [Logprob(i, v, name(i)) for i, v in zip(row.top_ids, row.top_logprobs, strict=True)]
    return TokenLogprobs(Logprob(token_id, row.sampled, name(token_id)), top)


class OutputProcessor:
    def __init__(self, tokenizer: Decoder, max_model_len: int, detokenize: bool = True) -> None:
        self.max_model_len = max_model_len
        self.text = TextProcessor(tokenizer) if detokenize else None

    def add(self, request: Request) -> None:
        if self.text is not None:
            self.text.add(request)
        if request.params.logprobs is not None:
            for seq in request.seqs:
                seq.logprobs = []

    def release(self, request: Request) -> None:
        if self.text is not None:
            self.text.release(request)

    def process(self, seq: Sequence, token_id: int, logprobs: RowLogprobs | None) -> None:
        """Append one sampled token to a running sequence; sets finish_reason when it ends."""
        request, params = seq.request, seq.request.params
        stop_token = is_stop_token(seq, token_id)
        seq.token_ids.append(token_id)
        if logprobs is not None and seq.logprobs is not None:
            seq.logprobs.append(token_logprobs(token_id, logprobs, self.text))
        if stop_token:
            seq.finish_reason = "stop"
            seq.stop_reason = token_id if token_id in params.stop_token_ids else None
        elif len(seq.token_ids) >= request.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if self.text is not None:
            self.text.process(seq, token_id, stop_token)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a running sequence for a reason found outside the text (its grammar is complete or stuck)."""
        if seq.finished:
            return
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if self.text is not None:
            self.text.finish(seq)

    def make_output(self, request: Request) -> RequestOutput:
        """A snapshot that later steps do not mutate (cumulative text, ids and logprobs)."""
        return make_output(request)


def is_stop_token(seq: Sequence, token_id: int) -> bool:
    """Whether token_id, about to be appended to seq, ends it: a stop token id (or EOS unless ignore_eos)
    once min_tokens are out. Such a token stays in token_ids but adds no text."""
    return token_id in seq.request.stop_ids and len(seq.token_ids) >= seq.request.params.min_tokens


def make_output(request: Request) -> RequestOutput:
    """A snapshot of a request that later tokens do not mutate (cumulative text, ids and logprobs)."""
    outs = [CompletionOutput(index=s.index, text=s.text[:s.emitted_len], token_ids=list(s.token_ids),
                             finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                             logprobs=list(s.logprobs) if s.logprobs is not None else None)
            for s in request.seqs]
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                         finished=request.finished, num_cached_tokens=request.num_cached_tokens)
