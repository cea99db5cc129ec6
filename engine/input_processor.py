"""From a prompt and SamplingParams to a validated engine Request: tokenizing, the checks that depend on
the model (vocabulary, context, slots) and compiling a structured-output grammar (engine/grammar.py; the
compile is cached, so the engine core finds it there). No torch, so the API server processes run it too.

Tokenizing costs time in the prompt's length: the online engines run make_request off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .detokenizer import StopStrings
from .errors import InvalidRequestError, PromptTooLongError
from .grammar import GrammarCompiler
from .request import Request
from .sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, tokenizer: Any, *, max_model_len: int, vocab_size: int, max_num_seqs: int,
                 eos_token_ids: frozenset[int], grammars: GrammarCompiler | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs  # samples one request may ask for (n)
        self.eos_token_ids = eos_token_ids
        self.grammars = grammars  # None: no grammar engine for this tokenizer, constrained requests refused
        # a longer text cannot fit max_model_len: no token decodes to more characters than its vocabulary
        # entry has, so the check needs no tokenization (tokenizing megabytes takes seconds)
        self.max_prompt_chars = max_model_len * int(getattr(tokenizer, "max_token_chars", 64))

    def make_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams) -> Request:
        """Validate and tokenize; raises InvalidRequestError / PromptTooLongError. Thread-safe (no state)."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        limit, vocab = self.max_model_len, self.vocab_size
        if isinstance(prompt, str):
            text: str | None = prompt
            if len(prompt) > self.max_prompt_chars:
                raise PromptTooLongError(
                    f"this model's maximum context length is {limit} tokens; a prompt of {len(prompt)} "
                    f"characters is longer than that ({self.max_prompt_chars} characters at most)")
            try:
                prompt.encode("utf-8")
                ids = list(self.tokenizer.encode(prompt)) if prompt else []
            except (UnicodeError, TypeError, ValueError) as e:  # lone surrogates: the request's fault
                raise InvalidRequestError(f"the prompt cannot be tokenized: {e}") from None
        else:
            text, ids = None, list(prompt)
            if len(ids) > limit:
                raise PromptTooLongError(f"this model's maximum context length is {limit} tokens; the prompt "
                                         f"has {len(ids)}")
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(ids)
        if len(ids) + max(max_tokens, 1) > limit:
            raise PromptTooLongError(
                f"this model's maximum context length is {limit} tokens; the request needs "
                f"{len(ids) + max_tokens} "
                f"({len(ids)} in the prompt, {max_tokens} for the completion)")
        if params.n > self.max_num_seqs:
            raise InvalidRequestError(
                f"n={params.n} exceeds the {self.max_num_seqs} sequences the engine runs at once")
        if params.logprobs is not None and params.logprobs > vocab:
            raise InvalidRequestError(f"logprobs must be at most the vocabulary size {vocab}")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size {vocab}")
        self.compile(params)
        stops = StopStrings(params.stop) if params.stop else None
        return Request(request_id, text, ids, params, max_tokens=max_tokens, eos_token_ids=self.eos_token_ids,
                       stop_strings=stops)

    def compile(self, params: SamplingParams) -> None:
        """Compile (or find in the cache) a request's grammar; GrammarError names what is wrong."""
        if params.structured_outputs is None:
            return
        if self.grammars is None:
            raise InvalidRequestError("structured outputs are not available: no grammar engine")
        self.grammars.get(params.structured_outputs)
