"""Tool calls in Fenwick's chat format: the grammar a tool_choice asks for, and reading calls back out of
the generated text, whole or while it streams.

The format (the bundled template's and tools/train.py's; docs/structured-outputs.md): an assistant turn
that calls tools is one or more blocks, separated by a newline,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The JSON is compact (", " and ": ", no newlines), so "}\\n</tool_call>" can only end a call. With
tool_choice "required" or a named function the reply is constrained to such blocks (the arguments to
the function's parameters schema); with "auto" it is either such blocks or text that does not start
with "<tool_call>", decided by its first bytes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

BEGIN = "<tool_call>\n"
END = "\n</tool_call>"
SEPARATOR = "\n"
MAX_CALLS = 8  # most calls in one reply when parallel_tool_calls (one otherwise)
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
_HEADER = re.compile(r'\{"name": "([^"\\]*)", "arguments": ')


def template_has_tool_calls(chat_template: str | None) -> bool:
    """Whether a chat template writes this format (and so a model trained on it can choose: "auto")."""
    return bool(chat_template) and BEGIN.strip() in str(chat_template) and "tools" in str(chat_template)


def _call_rule(name: str, parameters: dict[str, Any]) -> str:
    schema = {**parameters, "x-guidance": COMPACT}
    header = json.dumps('{"name": ' + json.dumps(name) + ', "arguments": ')
    return f"{header} %json{json.dumps(schema, ensure_ascii=False)} \"}}\""


def calls_grammar(functions: dict[str, dict[str, Any]], parallel: bool, text: str | None) -> str:
    """A Lark grammar (llguidance's dialect) for one or more calls of ``functions`` (name -> parameters
    schema); with ``text`` (the Lark of the text branch, "auto"), a reply may be that instead."""
    bodies = [f"body_{i}: {_call_rule(name, params)}" for i, (name, params) in enumerate(functions.items())]
    more = f'({json.dumps(SEPARATOR)} call){{0,{MAX_CALLS - 1}}}' if parallel else ""
    lines = [
        "start: calls" + (" | reply" if text is not None else ""),
        f"calls: call {more}",
        f"call: {json.dumps(BEGIN)} body {json.dumps(END)}",
        "body: " + " | ".join(f"body_{i}" for i in range(len(bodies))),
        *bodies,
    ]
    if text is not None:
        lines.append(f"reply: {text}")
    return "\n".join(lines) + "\n"


ANY_TEXT = "TEXT\nTEXT: /(?s:.*)/ & ~/<tool_call>(?s:.*)/"  # free text that does not start a call


@dataclass
class ParsedCall:
    name: str | None  # None until the header is complete
    arguments: str  # the arguments' JSON text so far (without a tail that may close the call)
    complete: bool  # the closing tag has been generated


def parse(text: str) -> list[ParsedCall] | None:
    """The calls in a reply so far; None when the reply is not (or not yet known to be) calls."""
    if not text.startswith(BEGIN):
        return None
    calls: list[ParsedCall] = []
    for i, block in enumerate(text.split(SEPARATOR + BEGIN)):
        body = block[len(BEGIN):] if i == 0 else block
        match = _HEADER.match(body)
        if match is None:
            calls.append(ParsedCall(None, "", False))
            continue
        rest = body[match.end():]
        end = rest.find("}" + END)
        if end >= 0:
            calls.append(ParsedCall(match.group(1), rest[:end], True))
        else:
            calls.append(ParsedCall(match.group(1), rest[:len(rest) - _held(rest)], False))
    return calls


def _held(rest: str) -> int:
    """Characters at the end that could be the start of the call's closing '}' + END."""
    closing = "}" + END
    for k in range(min(len(closing), len(rest)), 0, -1):
        if rest.endswith(closing[:k]):
            return k
    return 0


def maybe_calls(text: str) -> bool:
    """Whether the reply could still turn out to be calls (it is a prefix of BEGIN, or starts with it)."""
    return text.startswith(BEGIN) or BEGIN.startswith(text)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def complete_calls(text: str) -> list[tuple[str, str]]:
    """(name, arguments JSON text) of every finished call whose arguments parse."""
    out = []
    for c in parse(text) or []:
        if c.complete and c.name is not None:
            try:
                json.loads(c.arguments)
            except ValueError:
                continue
            out.append((c.name, c.arguments))
    return out


@dataclass
class CallStream:
    """What of one choice's calls has been streamed: per call, its id and the argument characters sent."""

    ids: list[str] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)

    def advance(self, text: str) -> list[dict[str, Any]]:
        """OpenAI's delta.tool_calls entries for what ``text`` (the cumulative reply) adds: a call's first
        entry has its index, id, type and name, the later ones argument pieces."""
        out: list[dict[str, Any]] = []
        for i, c in enumerate(parse(text) or []):
            if c.name is None:
                break
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.sent.append(0)
                out.append({"index": i, "id": self.ids[i], "type": "function",
                            "function": {"name": c.name, "arguments": ""}})
            piece = c.arguments[self.sent[i]:]
            if piece:
                self.sent[i] = len(c.arguments)
                out.append({"index": i, "function": {"arguments": piece}})
        return out
