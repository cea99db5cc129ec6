"""What completions and chat share: model checks, sampling parameters, running requests, SSE framing."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import Request

from ..engine.errors import EngineError
from ..engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from ..engine.sampling_params import SamplingParams
from .config import ServerConfig
from .errors import APIError, bad_request, error_body, from_engine_error, from_value_error
from .protocol import PromptTokensDetails, SamplingRequest, UsageInfo
from .request_stream import EngineClient, RequestStream, unless_disconnected
from .shutdown import Shutdown
from .structured import Constraints

logger = logging.getLogger("fenwick.server")

CLIENT_GONE_STATUS = 499  # nginx's "client closed request"; nobody reads it


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Serving:
    def __init__(
        self, engine: EngineClient, model_name: str, config: ServerConfig, shutdown: Shutdown,
        constraints: Constraints | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.config = config
        self.sampling_defaults: Mapping[str, Any] = config.sampling_defaults
        self.shutdown = shutdown
        self.constraints = constraints or Constraints(None, None)
        self.vocab_size = int(engine.model_config.vocab_size)
        # engine requests that can be queued at once: more prompts in one request would never all fit
        engine_config = engine.config
        room = getattr(engine_config, "max_waiting", None)
        room = None if room is None else int(room) + int(getattr(engine_config, "max_num_seqs", 0) or 0)
        self.max_prompts = config.max_prompts if room is None else min(config.max_prompts, room)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def check_token_ids(self, prompts: list[str | list[int]]) -> None:
        for prompt in prompts:
            if isinstance(prompt, list) and any(t >= self.vocab_size for t in prompt):
                raise bad_request(
                    f"prompt token ids must be below the vocabulary size {self.vocab_size}", "prompt"
                )

    def check_prompt_count(self, count: int) -> None:
        if count > self.max_prompts:
            raise bad_request(f"at most {self.max_prompts} prompts per request on this server", "prompt")

    def sampling_params(
        self, body: SamplingRequest, max_tokens: int | None, logprobs: int | None, logprobs_param: str
    ) -> SamplingParams:
        """The request's SamplingParams within this server's bounds (ServerConfig), or a 400."""
        c = self.config
        if body.n > c.max_n:
            raise bad_request(f"n must be at most {c.max_n} on this server", "n")
        if logprobs is not None and logprobs > c.max_logprobs:
            message = f"{logprobs_param} must be at most {c.max_logprobs} on this server"
            raise bad_request(message, logprobs_param)
        stops = body.stop or []
        if len(stops) > c.max_stop or any(len(x) > c.max_stop_chars for x in stops):
            raise bad_request(
                f"at most {c.max_stop} stop strings of at most {c.max_stop_chars} characters each", "stop"
            )
        if len(body.stop_token_ids or []) > c.max_stop:
            raise bad_request(f"at most {c.max_stop} stop_token_ids", "stop_token_ids")
        if max_tokens is None:
            max_tokens = c.default_max_tokens
        try:
            params = body.sampling_params(max_tokens, logprobs, self.sampling_defaults)
        except ValueError as exc:
            raise from_value_error(exc) from None
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise bad_request(
                f"stop_token_ids must be below the vocabulary size {self.vocab_size}", "stop_token_ids"
            )
        return params

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text, in a worker thread (time grows with the text); a 400 for text too long to
        fit the context (checked before tokenizing) or that the tokenizer cannot take."""
        engine = self.engine
        limit = int(getattr(engine.config, "max_model_len", None) or engine.model_config.max_model_len)
        chars = getattr(engine.tokenizer, "max_token_chars", None)
        if chars is not None and len(text) > limit * int(chars):
            raise APIError(400, f"the text has {len(text)} characters, more than the {limit}-token context "
                           f"can hold", param="prompt", code="context_length_exceeded")
        try:
            text.encode("utf-8")
            return list(await asyncio.to_thread(engine.tokenizer.encode, text,
                                                add_special_tokens=add_special_tokens))
        except (UnicodeError, TypeError, ValueError) as exc:  # lone surrogates and the like: the text's fault
            raise bad_request(f"the text cannot be tokenized: {exc}", "prompt") from None

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    async def run(
        self,
        request: Request,
        prompts: list[str | list[int]],
        params: SamplingParams,
        request_id: str,
        stream: bool,
        events: Callable[[RequestStream], AsyncIterator[str]],
        respond: Callable[[list[RequestOutput]], BaseModel],
    ) -> Response:
        """Start the engine requests, then stream `events` as SSE or answer `respond(final outputs)`."""
        try:
            self.shutdown.check()
        except EngineError as exc:
            raise from_engine_error(exc) from None
        engine_stream = RequestStream(self.engine, prompts, params, request_id)
        self.shutdown.streams.add(engine_stream)
        try:
            connected, _ = await unless_disconnected(request, engine_stream.prefetch())
            if not connected:
                await self._close(engine_stream)
                return Response(status_code=CLIENT_GONE_STATUS)
            if stream:
                return StreamingResponse(
                    self._sse(engine_stream, events),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            connected, outputs = await unless_disconnected(request, engine_stream.final_outputs())
            await self._close(engine_stream)
            if not connected or outputs is None:
                return Response(status_code=CLIENT_GONE_STATUS)
            return JSONResponse(respond(outputs).model_dump())
        except EngineError as exc:
            await self._close(engine_stream)
            raise from_engine_error(exc) from None
        except BaseException:
            await self._close(engine_stream)
            raise

    async def _close(self, engine_stream: RequestStream) -> None:
        self.shutdown.streams.discard(engine_stream)
        await engine_stream.aclose()

    async def _sse(
        self, engine_stream: RequestStream, events: Callable[[RequestStream], AsyncIterator[str]]
    ) -> AsyncIterator[str]:
        try:
            async for event in events(engine_stream):
                yield event
        except EngineError as exc:  # after the headers went out: report in-band, then end the stream
            err = from_engine_error(exc)
            yield sse(error_body(err.status, err.message, err.param, err.code))
        except Exception:
            logger.exception("streaming failed")
            yield sse(error_body(500, "internal server error", code="internal_error"))
        finally:
            await self._close(engine_stream)
        yield SSE_DONE


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


@dataclass
class ChoiceProgress:
    """How much of one choice's cumulative output has been streamed so far."""

    text_len: int = 0  # characters of text sent
    num_tokens: int = 0  # generated tokens seen
    num_logprobs: int = 0  # logprob entries sent
    token_chars: int = 0  # characters of the sent logprob tokens (completions' text_offset)
    finished: bool = False  # the chunk with finish_reason went out

    def advance(self, c: CompletionOutput, want_logprobs: bool) -> tuple[str, list[TokenLogprobs]] | None:
        """The text and logprob entries of `c` not streamed yet, now counted as sent; None when nothing new
        is to be said (and after the finishing chunk)."""
        if self.finished:
            return None
        text = c.text[self.text_len :]
        new_logprobs = (c.logprobs or [])[self.num_logprobs :] if want_logprobs else []
        if not text and not new_logprobs and not c.finished:
            return None
        self.text_len = len(c.text)
        self.num_tokens = len(c.token_ids)
        self.num_logprobs += len(new_logprobs)
        self.finished = c.finished
        return text, new_logprobs


def streamed_usage(
    progress: Mapping[int, ChoiceProgress], prompt_tokens: int, cached_tokens: int
) -> UsageInfo:
    completion = sum(p.num_tokens for p in progress.values())
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )
