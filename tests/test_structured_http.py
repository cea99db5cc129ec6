"""Structured outputs and tool calls through the `openai` package against real `fenwick serve` processes:
the shared tiny random model (its template has no tool-call format) and the bundled demo model (it has).
The whole schema suite runs through the engine in test_structured_engine.py; a sample of it runs here,
streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import httpx
import openai
import pytest
from fenwick_llm.models import demo_model_dir
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field
from server_utils import ServerProcess, metric

SCHEMAS: dict[str, dict] = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
SAMPLE = ["nested_object", "array_of_objects", "anyof_objects", "ref_defs", "format_date_time",
          "pattern_code", "number_bounds", "person_record"]
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def valid(schema: dict, text: str | None) -> bool:
    try:
        value = json.loads(text or "")
    except ValueError:
        return False
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).is_valid(value)


@pytest.fixture(scope="module")
def demo_server() -> Iterator[ServerProcess]:
    args = ["--device", "cpu", "--max-num-seqs", "16", "--max-model-len", "2048"]
    with ServerProcess(["--model", str(demo_model_dir()), *args]) as proc:
        yield proc


@pytest.fixture(scope="module", params=["tiny", "demo"])
def api(request: pytest.FixtureRequest) -> tuple[openai.OpenAI, str]:
    srv = request.getfixturevalue("server" if request.param == "tiny" else "demo_server")
    model = "tiny-shakespeare" if request.param == "tiny" else "fenwick-shakespeare"
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0), model


def _schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_json_schemas_parse_and_validate(api: tuple[openai.OpenAI, str], stream: bool) -> None:
    client, model = api

    def one(i: int, name: str) -> tuple[str, str | None, str | None]:
        kw = dict(model=model, messages=MESSAGES, response_format=_schema_format(name), max_tokens=200,
                  seed=i)
        if stream:
            pieces, finish = [], None
            for chunk in client.chat.completions.create(stream=True, **kw):  # type: ignore[call-overload]
                for c in chunk.choices:
                    pieces.append(c.delta.content or "")
                    finish = c.finish_reason or finish
            return name, "".join(pieces), finish
        r = client.chat.completions.create(**kw)  # type: ignore[call-overload]
        return name, r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(len(SAMPLE)) as pool:  # together: one engine batch
        results = list(pool.map(one, range(len(SAMPLE)), SAMPLE))
    for name, text, finish in results:
        assert finish == "stop" and valid(SCHEMAS[name], text), (name, finish, text)


class Book(BaseModel):
    title: str = Field(max_length=16)
    year: int = Field(ge=1500, le=2030)
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=2)


def test_parse_with_a_pydantic_model(demo_server: ServerProcess) -> None:
    """client.beta.chat.completions.parse(response_format=Model), with bounded strings (an unbounded one
    lets the demo model's Shakespeare run on to max_tokens: finish_reason "length", which parse raises)."""
    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0)
    r = client.beta.chat.completions.parse(model="fenwick-shakespeare", messages=MESSAGES,
                                           response_format=Book, max_tokens=600, seed=2)
    assert isinstance(r.choices[0].message.parsed, Book)


def test_completions_json_schema_and_extras(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny-shakespeare", prompt="JSON:", max_tokens=150, n=2, seed=1,
                                  extra_body={"response_format": _schema_format("weather_report")})
    assert all(c.finish_reason == "stop" and valid(SCHEMAS["weather_report"], c.text) for c in r.choices)
    r = client.completions.create(model="tiny-shakespeare", prompt="Pick:", max_tokens=20,
                                  extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
    assert r.choices[0].text in ("alpha", "beta")
    r = client.completions.create(model="tiny-shakespeare", prompt="Code:", max_tokens=20,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert len(r.choices[0].text) == 6 and r.choices[0].text[2] == "-"


def test_n_seed_logprobs_and_stop_with_a_schema(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    kw = dict(model="tiny-shakespeare", messages=MESSAGES, response_format=_schema_format("classification"),
              max_tokens=100, n=3, seed=7, logprobs=True, top_logprobs=2)
    a, b = (client.chat.completions.create(**kw) for _ in range(2))  # type: ignore[call-overload]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    for c in a.choices:
        assert valid(SCHEMAS["classification"], c.message.content)
        assert c.logprobs is not None and all(len(e.top_logprobs) == 2 for e in c.logprobs.content or [])
    r = client.chat.completions.create(model="tiny-shakespeare", messages=MESSAGES, stop=['"confidence"'],
                                       response_format=_schema_format("classification"), max_tokens=100)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content.startswith('{"label": "')


@pytest.mark.parametrize("which,choice,stream", [
    ("tiny", "required", False), ("tiny", "required", True), ("tiny", "named", False),
    ("tiny", "named", True), ("demo", "required", True), ("demo", "named", False)], ids=lambda v: str(v))
def test_required_and_named_calls_validate(which: str, choice: str, stream: bool,
                                           request: pytest.FixtureRequest) -> None:
    srv = request.getfixturevalue("server" if which == "tiny" else "demo_server")
    model = "tiny-shakespeare" if which == "tiny" else "fenwick-shakespeare"
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    named = {"type": "function", "function": {"name": "get_time"}}
    demo = which == "demo"  # up to 8 parallel calls fit its context, not the tiny server's
    kw = dict(model=model, messages=[{"role": "user", "content": "What time is it?"}], tools=TOOLS, seed=3,
              tool_choice=choice if choice == "required" else named, max_tokens=700 if demo else 230,
              parallel_tool_calls=demo and choice == "required")
    if stream:
        with client.beta.chat.completions.stream(**kw) as s:  # type: ignore[arg-type]
            for _ in s:
                pass
            r = s.get_final_completion()
    else:
        r = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
    for call in c.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert choice == "required" or call.function.name == "get_time"
        assert valid(PARAMS[call.function.name], call.function.arguments), call


def test_auto_and_none(demo_server: ServerProcess, server: ServerProcess) -> None:
    demo = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0)
    kw = dict(model="fenwick-shakespeare", messages=[{"role": "user", "content": "Weather in Paris?"}],
              tools=TOOLS, max_tokens=300)
    for seed in range(3):  # auto: text that is not a call, or calls that validate
        c = demo.chat.completions.create(seed=seed, **kw).choices[0]  # type: ignore[call-overload]
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            assert all(valid(PARAMS[t.function.name], t.function.arguments) for t in c.message.tool_calls)
        else:
            assert not (c.message.content or "").startswith("<tool_call>")
    forced = demo.chat.completions.create(messages=[*kw["messages"], {"role": "assistant", "content": None,  # type: ignore[call-overload]
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                        "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], tool_choice="none",
        **{k: v for k, v in kw.items() if k != "messages"})
    assert forced.choices[0].message.tool_calls is None
    assert forced.choices[0].finish_reason in ("stop", "length")
    tiny = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="auto") as err:  # its template has no call format
        tiny.chat.completions.create(**{**kw, "model": "tiny-shakespeare"})  # type: ignore[call-overload]
    assert err.value.body["param"] == "tool_choice"  # type: ignore[index]


@pytest.mark.parametrize("body,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ({"structured_outputs": {"regex": "(open"}}, "structured_outputs", "regular expression"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs", "nothing_here"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "name"),
], ids=["unsupported-keyword", "bad-type", "bad-regex", "two-constraints", "bad-grammar", "unknown-function",
        "choice-without-tools", "bad-function-name"])
def test_bad_constraints_are_400s_naming_the_problem(server: ServerProcess, body: dict, param: str,
                                                     words: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_dead_end_finishes_with_grammar_error_and_metrics(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v1/completions", timeout=30, json={
        "prompt": "x", "max_tokens": 20, "structured_outputs": {"regex": "[^\\s\\S]"}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "grammar_error" and choice["text"] == "" and choice["stop_reason"]
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "fenwick_structured_requests_total", 'kind="regex"') >= 1
    assert metric(text, "fenwick_grammar_compile_seconds_count") >= 1
    assert httpx.get(f"{server.url}/health").status_code == 200
