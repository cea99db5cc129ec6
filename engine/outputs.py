"""What the engine hands back: one RequestOutput per request, with one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float
    token: str  # the decoded token text


@dataclass
class TokenLogprobs:
    sampled: Logprob  # the chosen token
    top: list[Logprob]  # the top-k alternatives, most likely first


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str  # generated text so far (cumulative; stop strings held back, never retracted)
    token_ids: list[int]  # generated token ids so far (cumulative)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" once finished
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprobs] | None = None  # one per generated token, when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the prompt text (None when given as token ids)
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False  # all n samples finished
    num_cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not prefilled
    error: str | None = None  # why the engine failed this request (its samples end with "error")
