"""A chat reply under tools, as OpenAI shapes it: message.tool_calls and finish_reason "tool_calls", or
delta.tool_calls chunks while it streams (server/tool_calls.py reads the calls out of the text)."""

from __future__ import annotations

from ..engine.outputs import CompletionOutput
from . import tool_calls
from .protocol import ChatResponseMessage, DeltaMessage
from .protocol_structured import FunctionCall, ToolCall
from .structured import Constraint


def reply_message(c: CompletionOutput, constraint: Constraint) -> tuple[ChatResponseMessage, str | None]:
    """(message, finish_reason) of a finished choice."""
    if not constraint.calls or tool_calls.parse(c.text) is None:
        return ChatResponseMessage(content=c.text), c.finish_reason
    calls = tool_calls.complete_calls(c.text)
    if not calls:  # cut off before a call was complete: the text is all there is to show
        return ChatResponseMessage(content=c.text), c.finish_reason
    message = ChatResponseMessage(
        content=None,
        tool_calls=[ToolCall(id=tool_calls.new_call_id(), function=FunctionCall(name=n, arguments=a))
                    for n, a in calls],
    )
    return message, "tool_calls" if c.finish_reason == "stop" else c.finish_reason


class ReplyStream:
    """One streamed choice of a request with tools: text goes out as content, calls as tool_calls entries.
    Under "auto" the reply is held back while it could still become a call (a prefix of "<tool_call>")."""

    def __init__(self, constraint: Constraint) -> None:
        self.constraint = constraint
        self.mode = "text" if not constraint.calls else ("undecided" if constraint.auto else "calls")
        self.text_sent = 0  # characters of content streamed
        self.calls = tool_calls.CallStream()

    def delta(self, text: str, finished: bool) -> DeltaMessage | None:
        """What the cumulative reply ``text`` adds to the stream; None when nothing yet."""
        if self.mode == "undecided":
            if text.startswith(tool_calls.BEGIN):
                self.mode = "calls"
            elif tool_calls.maybe_calls(text) and not finished:
                return None
            else:
                self.mode = "text"
        if self.mode == "text":
            piece, self.text_sent = text[self.text_sent:], len(text)
            return DeltaMessage(content=piece) if piece else None
        entries = self.calls.advance(text)
        return DeltaMessage(tool_calls=entries) if entries else None

    def finish_reason(self, c: CompletionOutput) -> str | None:
        if c.finish_reason == "stop" and self.mode == "calls" and tool_calls.complete_calls(c.text):
            return "tool_calls"
        return c.finish_reason
