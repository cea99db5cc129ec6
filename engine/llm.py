"""Offline inference in vLLM's shape: ``LLM(model_dir, ...).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

from .config import EngineConfig
from .engine_core import EngineCore
from .outputs import RequestOutput
from .request import Request
from .sampling_params import SamplingParams
from .startup import freeze_heap

Prompt = str | list[int]


class LLM:
    """Loads the model once, then runs batches of prompts through the continuous-batching engine.

    Keyword arguments past ``max_model_len`` are EngineConfig fields (max_num_batched_tokens,
    long_prefill_chunk, state_dtype, enforce_eager, seed, ...).
    """

    def __init__(self, model: str, device: str = "auto", dtype: Any = "auto", max_num_seqs: int = 256,
                 max_model_len: int | None = None, **engine_args: Any) -> None:
        self.config = EngineConfig(model=model, device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                                   max_model_len=max_model_len, **engine_args)
        self.engine = EngineCore(self.config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        freeze_heap()  # the loaded model and engine out of the garbage collector's sight

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Every request is validated before any runs."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompt_list)
        else:
            params = list(sampling_params)
            if len(params) != len(prompt_list):
                raise ValueError(f"{len(params)} sampling params for {len(prompt_list)} prompts")
        requests = [self.engine.make_request(f"llm-{next(self._ids)}", p, sp)
                    for p, sp in zip(prompt_list, params, strict=True)]
        results: dict[str, RequestOutput] = {}
        pending: deque[Request] = deque(requests)
        bar = _progress(len(requests)) if use_tqdm else None
        try:
            while pending or self.engine.has_unfinished():
                while pending and self.engine.scheduler.num_waiting < self.config.max_waiting:
                    self.engine.add_request(pending.popleft())
                for out in self.engine.step(stream=False):
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            for r in requests:
                if r.request_id not in results:
                    self.engine.abort(r.request_id)
            if bar is not None:
                bar.close()
        return [results[r.request_id] for r in requests]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [items]  # one prompt given as token ids
    out: list[Prompt] = []
    for p in items:
        if not isinstance(p, (str, list, tuple)):
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
        out.append(p if isinstance(p, str) else list(p))
    return out


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
