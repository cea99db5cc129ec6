"""The server's side of structured outputs: from response_format, structured_outputs, tools and tool_choice
to the engine's StructuredOutputsParams; compiled in a worker thread (off the event loop) before the
request reaches the engine, whose cache then has it; 400s that name the problem.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..engine.grammar import GrammarCompiler, GrammarError
from ..engine.sampling_params import SamplingParams
from ..engine.structured_params import StructuredOutputsParams
from . import tool_calls
from .errors import APIError, bad_request
from .metrics import Metrics
from .protocol import ChatCompletionRequest, SamplingRequest
from .protocol_structured import NamedToolChoice


@dataclass(frozen=True)
class Constraint:
    spec: StructuredOutputsParams | None  # what the engine enforces; None: free text
    kind: str | None  # metrics label: json_schema, json_object, regex, choice, grammar or tool_calls
    param: str | None  # the request field it came from (errors name it)
    calls: bool = False  # read tool calls out of the reply
    auto: bool = False  # the reply may be text instead of calls (tool_choice "auto")


FREE = Constraint(None, None, None)


class Constraints:
    def __init__(self, grammars: GrammarCompiler | None, chat_template: str | None,
                 metrics: Metrics | None = None) -> None:
        self.grammars = grammars
        self.template_calls = tool_calls.template_has_tool_calls(chat_template)  # "auto" is possible
        self.metrics = metrics

    def for_request(self, body: SamplingRequest) -> Constraint:
        """response_format or structured_outputs (completions, and chat without tools)."""
        rf, so = body.response_format, body.structured_outputs
        if rf is not None and rf.type != "text" and so is not None:
            raise bad_request("give response_format or structured_outputs, not both", "structured_outputs")
        if so is not None:
            fields = so.model_dump(by_alias=True, exclude_none=True)
            if isinstance(fields.get("json"), dict):
                fields["json"] = closed_objects(fields["json"])
            spec = _spec(fields, "structured_outputs")
            return Constraint(spec, "json_schema" if spec.kind == "json" else spec.kind, "structured_outputs")
        if rf is None or rf.type == "text":
            return FREE
        if rf.type == "json_object":
            return Constraint(StructuredOutputsParams(json_object=True), "json_object", "response_format")
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
        schema = closed_objects(rf.json_schema.schema_)
        return Constraint(_spec({"json": schema}, "response_format"), "json_schema", "response_format")

    def for_chat(self, body: ChatCompletionRequest) -> Constraint:
        text = self.for_request(body)
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
        if not body.tools:
            if choice != "none":
                raise bad_request("tool_choice needs tools", "tool_choice")
            return text
        functions = {t.function.name: closed_objects(t.function.parameters or tool_calls.EMPTY_PARAMETERS)
                     for t in body.tools}
        if len(functions) != len(body.tools):
            raise bad_request("tools must have distinct function names", "tools")
        if choice == "none":
            return text
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in functions:
                raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in tools",
                                  "tool_choice")
            functions = {choice.function.name: functions[choice.function.name]}
        auto = choice == "auto"
        if auto and not self.template_calls:
            raise bad_request('tool_choice "auto" needs a chat template with a tool-call format, and this '
                              'model\'s has none: use "required" or a named function', "tool_choice")
        if text.spec is not None and auto:
            if text.spec.kind != "json" and text.spec.kind != "json_object":
                raise bad_request("with tools, response_format may only be a JSON schema", "response_format")
            schema = json.loads(text.spec.json) if text.spec.json else {"type": "object"}
            reply = f"%json{json.dumps({**schema, 'x-guidance': tool_calls.COMPACT}, ensure_ascii=False)}"
        else:
            reply = tool_calls.ANY_TEXT
        grammar = tool_calls.calls_grammar(functions, body.parallel_tool_calls, reply if auto else None)
        spec = StructuredOutputsParams(grammar=grammar)
        return Constraint(spec, "tool_calls", "tools", calls=True, auto=auto)

    async def apply(self, constraint: Constraint, params: SamplingParams) -> SamplingParams:
        """``params`` with the constraint, compiled first in a worker thread (a 400 if it cannot be)."""
        if constraint.spec is None:
            return params
        if self.grammars is None:
            raise bad_request("structured outputs are not available on this server", constraint.param)
        try:
            grammar, compiled_now = await asyncio.to_thread(self.grammars.get, constraint.spec)
        except GrammarError as exc:
            raise bad_request(str(exc), constraint.param, code="invalid_schema") from None
        if self.metrics is not None:
            self.metrics.observe_structured(str(constraint.kind),
                                            grammar.compile_seconds if compiled_now else None)
        return dataclasses.replace(params, structured_outputs=constraint.spec)


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_COMPOSED = ("allOf", "anyOf", "oneOf", "$ref")


def closed_objects(schema: Any) -> Any:
    """Objects that list their properties take no others (additionalProperties false where it is not
    given; not beside allOf / anyOf / oneOf / $ref, whose properties it would exclude), as in OpenAI's
    strict mode and xgrammar's default. A restriction: what matches it matches the schema; and it keeps
    a model from inventing keys without end (docs/structured-outputs.md)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: closed_objects(v) for k, v in value.items()}
        elif key in _SUBSCHEMA_LISTS or key in ("items", "additionalProperties", "not"):
            out[key] = closed_objects(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out and not any(k in out for k in _COMPOSED):
        out["additionalProperties"] = False
    return out


def _spec(fields: dict[str, Any], param: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except (TypeError, ValueError) as exc:
        raise APIError(400, str(exc), param=param, code="invalid_value") from None
