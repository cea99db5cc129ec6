"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response
from starlette.requests import Request

from ..engine.chat_template import RESERVED_VARIABLES, ChatTemplateError
from ..engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from .chat_sandbox import ChatTemplateSandbox
from .config import ServerConfig
from .errors import bad_request
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobEntry,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from .request_stream import EngineClient, RequestStream
from .serving import ChoiceProgress, Serving, sse, streamed_usage, usage_of
from .shutdown import Shutdown
from .structured import Constraints
from .tool_replies import ReplyStream, reply_message


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


def chat_turns(messages: list[ChatMessage]) -> list[dict[str, str]]:
    try:
        return [
            {
                "role": m.role,
                "content": m.text(),
                **({"name": m.name} if m.name else {}),
                **({"tool_calls": m.tool_calls} if m.tool_calls else {}),
                **({"tool_call_id": m.tool_call_id} if m.tool_call_id else {}),
            }
            for m in messages
        ]
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None


class ChatServing(Serving):
    """Chat requests. The model's template renders in a worker thread (its cost grows with the messages);
    a request's own template only when the operator allows it, in ChatTemplateSandbox's process."""

    def __init__(
        self, engine: EngineClient, model_name: str, config: ServerConfig, shutdown: Shutdown,
        constraints: Constraints | None = None,
    ) -> None:
        super().__init__(engine, model_name, config, shutdown, constraints)
        self.sandbox = ChatTemplateSandbox(config.chat_template_timeout, config.max_prompt_chars)

    async def render(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> str:
        """The prompt text; a 400 when the template rejects the messages or passes its budget."""
        kwargs = dict(template_kwargs or {})
        reserved = sorted(RESERVED_VARIABLES & set(kwargs))
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {reserved}", "chat_template_kwargs")
        if chat_template is not None and not self.config.trust_request_chat_template:
            raise bad_request(
                "this server does not take a request's chat_template (--trust-request-chat-template)",
                "chat_template",
            )
        turns = chat_turns(messages)
        tokenizer = self.engine.tokenizer
        try:
            if chat_template is not None:
                context = dict(kwargs, messages=turns, add_generation_prompt=add_generation_prompt,
                               bos_token=getattr(tokenizer, "bos_token", None) or "",
                               eos_token=getattr(tokenizer, "eos_token", None) or "")
                return await self.sandbox.render(chat_template, context)
            rendered = await asyncio.to_thread(
                tokenizer.apply_chat_template, turns, add_generation_prompt=add_generation_prompt,
                max_chars=self.config.max_prompt_chars, **kwargs,
            )
            return str(rendered)
        except ChatTemplateError as exc:  # a template's raise_exception(...) or a budget is the request's
            raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None
        except TypeError as exc:  # a kwarg the tokenizer's own apply_chat_template does not take
            raise bad_request(f"chat_template_kwargs: {exc}", "chat_template_kwargs") from None

    async def encode_chat(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> list[int]:
        text = await self.render(messages, add_generation_prompt, template_kwargs, chat_template)
        ids = await self.encode(text, add_special_tokens=False)  # the template holds BOS
        if not ids:
            raise bad_request("the messages render to an empty prompt", "messages")
        return ids

    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        constraint = self.constraints.for_chat(body)
        params = self.sampling_params(
            body,
            body.max_completion_tokens or body.max_tokens,
            (body.top_logprobs or 0) if body.logprobs else None,
            "top_logprobs",
        )
        template_kwargs = dict(body.chat_template_kwargs or {})
        if body.tools:  # the template tells the model about them (Hugging Face's `tools` variable)
            template_kwargs["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
        prompt_ids = await self.encode_chat(
            body.messages, body.add_generation_prompt, template_kwargs, body.chat_template
        )
        params = await self.constraints.apply(constraint, params)
        request_id = self.new_id("chatcmpl")
        created = ChatCompletionChunk(id=request_id, model=self.model_name, choices=[]).created

        def respond(outputs: list[RequestOutput]) -> ChatCompletionResponse:
            choices = []
            for c in outputs[0].outputs:
                message, finish_reason = reply_message(c, constraint)
                choices.append(
                    ChatChoice(
                        index=c.index,
                        message=message,
                        logprobs=chat_logprobs(c.logprobs or []) if body.logprobs else None,
                        finish_reason=finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
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
            replies = {i: ReplyStream(constraint) for i in progress}
            prompt_tokens, cached_tokens = len(prompt_ids), 0
            async for _, out in stream:
                prompt_tokens, cached_tokens = len(out.prompt_token_ids), out.num_cached_tokens
                for c in out.outputs:
                    delta = self._delta(c, progress[c.index], body.logprobs, replies[c.index])
                    if delta is not None:
                        yield chunk([delta])
            if body.include_usage:
                yield chunk([], streamed_usage(progress, prompt_tokens, cached_tokens))

        return await self.run(request, [prompt_ids], params, request_id, body.stream, events, respond)

    @staticmethod
    def _delta(
        c: CompletionOutput, p: ChoiceProgress, want_logprobs: bool, reply: ReplyStream
    ) -> ChatStreamChoice | None:
        new = p.advance(c, want_logprobs)
        if new is None:
            return None
        text, new_logprobs = new
        delta = DeltaMessage(content=text) if text or not c.finished else DeltaMessage()
        if reply.constraint.calls:  # the text may be tool calls: the reply stream decides what it says
            delta = reply.delta(c.text, c.finished)
            if delta is None and not new_logprobs and not c.finished:
                return None
        return ChatStreamChoice(
            index=c.index,
            delta=delta or DeltaMessage(),
            logprobs=chat_logprobs(new_logprobs) if want_logprobs else None,
            finish_reason=reply.finish_reason(c),
            stop_reason=c.stop_reason,
        )
