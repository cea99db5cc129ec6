"""fenwick_client's structured-output and tool arguments against the shared real server (tiny model)."""

from __future__ import annotations

import json

import pytest
from fenwick_client import AsyncClient, BadRequestError, Client, json_schema_format
from pydantic import BaseModel, Field
from server_utils import ServerProcess


class Reading(BaseModel):
    sensor: str = Field(max_length=8)
    value: float = Field(ge=-10, le=10)


TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"key": {"type": "string", "maxLength": 6}}, "required": ["key"]}}}


def test_response_format_model_structured_outputs_and_tools(server: ServerProcess) -> None:
    with Client(server.url) as client:
        out = client.chat.completions.create(messages=[{"role": "user", "content": "reading?"}],
                                             response_format=Reading, max_tokens=120, seed=4)
        Reading.model_validate_json(out.choices[0].message.content or "")
        out = client.completions.create(prompt="x", structured_outputs={"choice": ["on", "off"]},
                                        max_tokens=5)
        assert out.choices[0].text in ("on", "off")
        out = client.chat.completions.create(messages=[{"role": "user", "content": "look up"}],
                                             tools=[TOOL], tool_choice="required", parallel_tool_calls=False,
                                             max_tokens=120)
        calls = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and calls and calls[0].function.name == "lookup"
        assert set(calls[0].function.parsed_arguments()) == {"key"}
        chunks = list(client.chat.completions.create(
            messages=[{"role": "user", "content": "look up"}], tools=[TOOL], stream=True, max_tokens=120,
            tool_choice={"type": "function", "function": {"name": "lookup"}}, parallel_tool_calls=False))
        entries = [tc for ch in chunks for c in ch.choices for tc in c.delta.tool_calls or []]
        assert entries[0].id and entries[0].function and entries[0].function.name == "lookup"
        args = "".join(e.function.arguments or "" for e in entries if e.function)
        assert set(json.loads(args)) == {"key"} and chunks[-1].choices[0].finish_reason == "tool_calls"
        with pytest.raises(BadRequestError, match="regular expression"):
            client.completions.create(prompt="x", structured_outputs={"regex": "(unclosed"})


async def test_async_client_sends_response_format(server: ServerProcess) -> None:
    assert json_schema_format(Reading)["json_schema"]["name"] == "Reading"
    async with AsyncClient(server.url) as client:
        out = await client.completions.create(prompt="x", response_format=json_schema_format(Reading),
                                              max_tokens=120, seed=1)
        Reading.model_validate_json(out.choices[0].text)
