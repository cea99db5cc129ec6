"""What crosses between the API server processes and the engine-core process (msgspec structs, msgpack).

One socket: the core binds a ZMQ ROUTER; each API server, and the launcher, connects a DEALER under its
own identity, and the core answers each API server on its identity. msgspec encodes and decodes these
typed structs (and the engine's dataclasses inside them) in C, several times faster than pickle, and
checks their types on the way in. Messages are batched both ways:

- API server -> core: one ClientInputs per event-loop turn (new requests, aborts, stops), and Hello
  first. Launcher -> core: ClientGone when an API server died, Shutdown once all have drained.
- core -> API server: one StepOutputs per engine step that has anything for it: per request, the token
  ids sampled since the last message (and their logprobs, finish reasons), rejections; and the step's
  EngineStats for the first API server that said Hello (one writer per metric; see server/metrics.py).
"""

from __future__ import annotations

import msgspec

from .outputs import TokenLogprobs
from .sampling_params import SamplingParams
from .stats import EngineStats


class AddRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]  # validated by the API server (engine/input_processor.py)
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against max_model_len
    arrival_time: float  # time.monotonic() when the API server took it (one clock for all processes)


class ClientInputs(msgspec.Struct, tag="inputs", array_like=True):
    adds: list[AddRequest] = []
    aborts: list[str] = []  # request ids; each gets a finished RequestDelta back, known or not
    stops: list[tuple[str, int]] = []  # (request id, sample index) that hit a stop string in the text


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """An API server's first message: from now on the core may send to its identity."""


class ClientGone(msgspec.Struct, tag="gone", array_like=True):
    """From the launcher: the API server process with this pid died; abort its clients' requests."""

    pid: int


def client_identity(pid: int, n: int) -> bytes:
    """The socket identity of a process's n-th client: the launcher knows its API servers by pid."""
    return f"api-{pid}-{n}".encode()


def is_client_of(identity: bytes, pid: int) -> bool:
    return identity.startswith(f"api-{pid}-".encode())


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """From the launcher: every API server has drained; abort what is left and exit."""


CoreInput = ClientInputs | Hello | ClientGone | Shutdown


class SampleDelta(msgspec.Struct, array_like=True):
    index: int  # which of the request's n samples
    token_ids: list[int]  # sampled since the last message
    logprobs: list[TokenLogprobs] | None = None  # one per new token when asked for (token texts empty)
    # set once: "stop" (a stop token, or a grammar that is complete), "length", "abort", "error" or
    # "grammar_error"
    finish_reason: str | None = None
    # the stop token id that ended it (None for EOS); a grammar's dead end: the grammar engine's reason
    stop_reason: int | str | None = None


class RequestDelta(msgspec.Struct, array_like=True):
    request_id: str
    samples: list[SampleDelta]  # the samples with news
    finished: bool = False  # all samples are done: nothing more comes for this request
    error: str | None = None  # why the engine failed or refused the request
    rejected: str | None = None  # not added: "queue_full" or "invalid" (error says why)
    num_cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not prefilled


class StepOutputs(msgspec.Struct, array_like=True):
    requests: list[RequestDelta]
    stats: list[EngineStats] = []  # the steps' stats since the last message (to one API server only)
    dead: str | None = None  # the core's loop failed and the process exits: why


class EngineInfo(msgspec.Struct, frozen=True):
    """What an API server needs to know of the core, sent once it is ready (model loaded, pool allocated).
    The server reads it as its engine's `config` and `model_config`."""

    model: str  # the model directory (the API server loads the tokenizer from it)
    served_model_name: str
    max_model_len: int  # prompt + output limit
    vocab_size: int
    max_num_seqs: int  # samples running at once (slots); the most samples one request may ask for
    max_waiting: int  # waiting-queue bound beyond the free slots
    eos_token_ids: frozenset[int]  # end a sample unless ignore_eos
