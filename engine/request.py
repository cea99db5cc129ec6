"""An engine request: a prompt, its sampling parameters and its n output sequences. No tensors here."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from .detokenizer import StopStrings
from .outputs import TokenLogprobs
from .sampling_params import SamplingParams

_seq_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for state slots
    PREFILL = "prefill"  # holds slots, prompt partly absorbed
    DECODE = "decode"  # prompt absorbed, sequences generating
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One of a request's n samples. It owns one state slot from admission to finish."""

    request: Request  # the request this sample belongs to
    index: int  # which of the n samples (CompletionOutput.index)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))  # engine-unique id (sampler generator key)
    slot: int = -1  # state pool slot; -1 when none is held
    token_ids: list[int] = field(default_factory=list)  # generated tokens
    logprobs: list[TokenLogprobs] | None = None  # one per generated token, when asked for
    text: str = ""  # detokenized output (may be cut at a stop string when finished)
    emitted_len: int = 0  # how much of `text` may be shown (stop-string prefixes held back)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    first_token_time: float | None = None  # wall clock of the first sampled token
    last_token_time: float | None = None  # wall clock of the latest sampled token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.request.prompt_token_ids) + len(self.token_ids)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None  # the prompt text (None when given as token ids)
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against max_model_len
    eos_token_ids: frozenset[int] = frozenset()  # ends a sample unless params.ignore_eos
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # prompt tokens absorbed into the state so far
    num_cached_tokens: int = 0  # of them, restored from the prefix cache at admission
    scheduled_time: float | None = None  # wall clock of the first scheduled step (queue time ends)
    seqs: list[Sequence] = field(default_factory=list)  # the n samples; seqs[0] runs the prefill
    # the stop strings' automaton, built where the request is made (not in the engine's step)
    stop_strings: StopStrings | None = None
    stop_ids: frozenset[int] = field(init=False)  # token ids that end a sample (once min_tokens are out)

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [Sequence(self, i) for i in range(self.params.n)]
        ids = frozenset(self.params.stop_token_ids)
        self.stop_ids = ids if self.params.ignore_eos else ids | self.eos_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.finished]

    @property
    def slots(self) -> list[int]:
        return [s.slot for s in self.seqs if s.slot >= 0]
