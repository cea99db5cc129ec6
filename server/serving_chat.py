"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response
from starlette.requests import Request

from ..engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from .errors import bad_request
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobEntry,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from .request_stream import RequestStream
from .serving import ChoiceProgress, Serving, sse, streamed_usage, usage_of


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))


def chat_logprobs(entries: list[TokenLogprobs]) -> ChatLogprobs:
    """OpenAI's chat format: one entry per generated token with its top alternatives."""
    content = [
        ChatLogprobEntry(
            token=e.sampled.token,
            logprob=e.sampled.logprob,
            bytes=list(e.sampled.token.encode("utf-8")),
            top_logprobs=[_top(lp.token, lp.logprob) for lp in e.top],
        )
        for e in entries
    ]
    return ChatLogprobs(content=content)


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text from the model's chat template (the tokenizer falls back to a plain one)."""
    try:
        turns = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages
        ]
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    try:
        rendered = tokenizer.apply_chat_template(
            turns, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
        )
        return str(rendered)
    except Exception as exc:  # a template's raise_exception(...) or a rendering error is the request's fault
        raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None


class ChatServing(Serving):
    def encode_chat(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        text = render_chat(self.engine.tokenizer, messages, add_generation_prompt, template_kwargs)
        ids = list(self.engine.tokenizer.encode(text, add_special_tokens=False))  # the template holds BOS
        if not ids:
            raise bad_request("the messages render to an empty prompt", "messages")
        return ids

    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.tools:
            raise bad_request("tools are not supported", "tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        prompt_ids = self.encode_chat(body.messages, body.add_generation_prompt, body.chat_template_kwargs)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self.sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        request_id = self.new_id("chatcmpl")
        created = ChatCompletionChunk(id=request_id, model=self.model_name, choices=[]).created

        def respond(outputs: list[RequestOutput]) -> ChatCompletionResponse:
            choices = [
                ChatChoice(
                    index=c.index,
                    message=ChatResponseMessage(content=c.text),
                    logprobs=chat_logprobs(c.logprobs or []) if body.logprobs else None,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for c in outputs[0].outputs
            ]
            return ChatCompletionResponse(
                id=request_id,
                created=created,
                model=self.model_name,
                choices=choices,
                usage=usage_of(outputs),
            )

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=request_id, created=created, model=self.model_name, choices=choices, usage=usage
                )
            )

        async def events(stream: RequestStream) -> AsyncIterator[str]:
            progress = {i: ChoiceProgress() for i in range(body.n)}
            yield chunk(
                [
                    ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                    for i in progress
                ]
            )
            prompt_tokens, cached_tokens = len(prompt_ids), 0
            async for _, out in stream:
                prompt_tokens, cached_tokens = len(out.prompt_token_ids), out.num_cached_tokens
                for c in out.outputs:
                    delta = self._delta(c, progress[c.index], body.logprobs)
                    if delta is not None:
                        yield chunk([delta])
            if body.include_usage:
                yield chunk([], streamed_usage(progress, prompt_tokens, cached_tokens))

        return await self.run(request, [prompt_ids], params, request_id, body.stream, events, respond)

    @staticmethod
    def _delta(c: CompletionOutput, p: ChoiceProgress, want_logprobs: bool) -> ChatStreamChoice | None:
        new = p.advance(c, want_logprobs)
        if new is None:
            return None
        text, new_logprobs = new
        return ChatStreamChoice(
            index=c.index,
            delta=DeltaMessage(content=text) if text or not c.finished else DeltaMessage(),
            logprobs=chat_logprobs(new_logprobs) if want_logprobs else None,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
