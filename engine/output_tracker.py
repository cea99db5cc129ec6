"""An API server's view of its requests in the engine core: each sample as the core's token ids arrive,
turned into text here (engine/text_processor.py), and when each request's reader is due to be woken.

A stop string ends its sample here at once; the tracker reports it so the core can be told (a stop),
and drops the tokens the core samples past it. A request's holder only says "there is news": the reader
builds its snapshot when it takes it (engine/output_processor.py: make_output), so a slow reader gets
every step since its last take merged and nothing queues. With stream_interval K a reader is woken every
K tokens of its longest sample, and for the first token and the end at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EngineError, InvalidRequestError, QueueFullError, RequestFailedError
from .messages import RequestDelta, SampleDelta
from .output_holder import OutputHolder
from .output_processor import is_stop_token
from .outputs import TokenLogprobs
from .request import Request
from .text_processor import TextProcessor
from .tokenizer import Tokenizer


@dataclass(eq=False)
class Tracked:
    request: Request  # this side's copy: each sample's token ids, text and logprobs so far
    holder: OutputHolder[bool]  # news for the reader (True), or the exception that ends the request
    delivered: int = 0  # tokens of the longest sample when the reader was last woken


class OutputTracker:
    def __init__(self, tokenizer: Tokenizer, stream_interval: int = 1) -> None:
        self.text = TextProcessor(tokenizer)
        self.stream_interval = stream_interval
        self.requests: dict[str, Tracked] = {}
        self._news: set[str] = set()  # requests with news since the readers were last woken

    def add(self, request: Request) -> Tracked:
        tracked = self.requests[request.request_id] = Tracked(request, OutputHolder())
        self.text.add(request)
        if request.params.logprobs is not None:
            for seq in request.seqs:
                seq.logprobs = []
        return tracked

    def remove(self, request_id: str) -> None:
        tracked = self.requests.pop(request_id, None)
        if tracked is not None:
            self.text.release(tracked.request)

    def fail_all(self, error: BaseException) -> None:
        for tracked in self.requests.values():
            tracked.holder.put(0, error)

    def apply(self, delta: RequestDelta) -> list[tuple[str, int]]:
        """One request's news from the core; the samples that hit a stop string here (for the core)."""
        tracked = self.requests.get(delta.request_id)
        if tracked is None:  # its reader is gone already
            return []
        if delta.error is not None:
            if delta.rejected == "queue_full":
                error: EngineError = QueueFullError(delta.error)
            elif delta.rejected is not None:
                error = InvalidRequestError(delta.error)
            else:
                error = RequestFailedError(delta.error)
            tracked.holder.put(0, error)
            return []
        request = tracked.request
        request.num_cached_tokens = delta.num_cached_tokens
        stops = [(request.request_id, s.index) for s in delta.samples if self._apply_sample(request, s)]
        if delta.finished:  # whatever a sample still lacks (an abort before its first token)
            for seq in request.live_seqs:
                seq.finish_reason = "abort"
        self._news.add(request.request_id)
        return stops

    def _apply_sample(self, request: Request, delta: SampleDelta) -> bool:
        """Append a sample's new tokens; True if a stop string ended it here (the core has not seen it).
        The core's finish comes with its last token; as in EngineCore, a stop token adds no text, and a
        sample its grammar ended has its held-back text flushed (a dead end's token never arrives)."""
        seq = request.seqs[delta.index]
        if seq.finished:  # ended here by a stop string: the tokens the core sampled past it are dropped
            return False
        last = len(delta.token_ids) - 1
        for j, token_id in enumerate(delta.token_ids):
            stop_token = j == last and delta.finish_reason == "stop" and is_stop_token(seq, token_id)
            seq.token_ids.append(token_id)
            if delta.logprobs is not None and seq.logprobs is not None:
                seq.logprobs.append(self._named(delta.logprobs[j]))
            if j == last and (stop_token or delta.finish_reason == "length"):
                seq.finish_reason, seq.stop_reason = delta.finish_reason, delta.stop_reason
            self.text.process(seq, token_id, stop_token)
            if seq.finished and j < last:
                return True
        if seq.finished or delta.finish_reason is None:
            return seq.finished and delta.finish_reason is None
        seq.finish_reason, seq.stop_reason = delta.finish_reason, delta.stop_reason
        if delta.finish_reason not in ("abort", "error"):  # a grammar ended it
            self.text.finish(seq)
        return False

    def _named(self, entry: TokenLogprobs) -> TokenLogprobs:
        """The core's logprob entry with its token texts."""
        entry.sampled.token = self.text.token_text(entry.sampled.token_id)
        for lp in entry.top:
            lp.token = self.text.token_text(lp.token_id)
        return entry

    def wake_readers(self) -> None:
        """After a batch of messages: wake each reader with news that is due, once."""
        news, self._news = self._news, set()
        for request_id in news:
            tracked = self.requests.get(request_id)
            if tracked is None:
                continue
            request = tracked.request
            longest = max(len(s.token_ids) for s in request.seqs)
            if request.finished or (longest > tracked.delivered and (
                    tracked.delivered == 0 or longest - tracked.delivered >= self.stream_interval)):
                tracked.delivered = longest
                tracked.holder.put(0, True)
