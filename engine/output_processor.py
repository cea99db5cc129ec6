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
        num_before = len(seq.token_ids)
        seq.token_ids.append(token_id)
        if logprobs is not None and seq.logprobs is not None:
            seq.logprobs.append(token_logprobs(token_id, logprobs, self.text))
        stop_token = token_id in request.stop_ids and num_before >= params.min_tokens
        if stop_token:
            seq.finish_reason = "stop"
            seq.stop_reason = token_id if token_id in params.stop_token_ids else None
        elif len(seq.token_ids) >= request.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if self.text is not None:
            self.text.process(seq, token_id, stop_token)

    def make_output(self, request: Request) -> RequestOutput:
        """A snapshot that later steps do not mutate (cumulative text, ids and logprobs)."""
        return make_output(request)


def make_output(request: Request) -> RequestOutput:
    """A snapshot of a request that later tokens do not mutate (cumulative text, ids and logprobs)."""
    outs = [CompletionOutput(index=s.index, text=s.text[:s.emitted_len], token_ids=list(s.token_ids),
                             finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                             logprobs=list(s.logprobs) if s.logprobs is not None else None)
            for s in request.seqs]
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                         finished=request.finished)
