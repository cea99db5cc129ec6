"""POST /v1/completions: OpenAI's legacy completions, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import Response
from starlette.requests import Request

from ..engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from .errors import bad_request, from_value_error
from .protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Prompt,
    UsageInfo,
)
from .request_stream import RequestStream
from .serving import ChoiceProgress, Serving, sse, streamed_usage, usage_of


def completion_logprobs(entries: list[TokenLogprobs], start_offset: int) -> CompletionLogprobs:
    """OpenAI's completions format; text offsets count characters of the generated text."""
    out = CompletionLogprobs()
    offset = start_offset
    for entry in entries:
        out.tokens.append(entry.sampled.token)
        out.token_logprobs.append(entry.sampled.logprob)
        out.top_logprobs.append({lp.token: lp.logprob for lp in entry.top})
        out.text_offset.append(offset)
        offset += len(entry.sampled.token)
    return out


class CompletionServing(Serving):
    async def create(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.echo:
            raise bad_request("echo is not supported (the engine returns no prompt logprobs)", "echo")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        try:
            prompts: list[Prompt] = body.prompts()
        except ValueError as exc:
            raise from_value_error(exc) from None
        self.check_prompt_count(len(prompts))
        self.check_token_ids(prompts)
        constraint = self.constraints.for_request(body)
        params = self.sampling_params(body, body.max_tokens, body.logprobs, "logprobs")
        params = await self.constraints.apply(constraint, params)
        request_id = self.new_id("cmpl")
        created = CompletionResponse(id=request_id, model=self.model_name, choices=[]).created

        def response(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
            return CompletionResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage
            )

        def respond(outputs: list[RequestOutput]) -> CompletionResponse:
            choices = [
                self._choice(i * body.n + c.index, c, c.text, c.logprobs or [], 0, body.logprobs is not None)
                for i, out in enumerate(outputs)
                for c in out.outputs
            ]
            return response(choices, usage_of(outputs))

        async def events(stream: RequestStream) -> AsyncIterator[str]:
            progress: dict[int, ChoiceProgress] = {}
            prompt_tokens: dict[int, int] = {}
            cached_tokens: dict[int, int] = {}
            async for i, out in stream:
                prompt_tokens[i] = len(out.prompt_token_ids)
                cached_tokens[i] = out.num_cached_tokens
                for c in out.outputs:
                    index = i * body.n + c.index
                    p = progress.setdefault(index, ChoiceProgress())
                    chunk = self._delta(index, c, p, body.logprobs is not None)
                    if chunk is not None:
                        yield sse(response([chunk]))
            if body.include_usage:
                usage = streamed_usage(progress, sum(prompt_tokens.values()), sum(cached_tokens.values()))
                yield sse(response([], usage))

        return await self.run(request, prompts, params, request_id, body.stream, events, respond)

    @staticmethod
    def _choice(
        index: int, c: CompletionOutput, text: str, logprobs: list[TokenLogprobs], offset: int, want: bool
    ) -> CompletionChoice:
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=completion_logprobs(logprobs, offset) if want else None,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )

    def _delta(
        self, index: int, c: CompletionOutput, p: ChoiceProgress, want_logprobs: bool
    ) -> CompletionChoice | None:
        """The next streamed piece of one choice, or None when nothing new is to be said."""
        offset = p.token_chars
        new = p.advance(c, want_logprobs)
        if new is None:
            return None
        text, new_logprobs = new
        p.token_chars += sum(len(e.sampled.token) for e in new_logprobs)
        return self._choice(index, c, text, new_logprobs, offset, want_logprobs)
