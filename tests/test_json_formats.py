"""Strict date/time formats (engine/json_formats.py): the patterns against Python's own date and time
parsers, the schema rewrite, and the compiled grammar refusing what llguidance's loose formats allow."""

from __future__ import annotations

import datetime
import json
import random
import re

import llguidance
import pytest
from fenwick_llm.engine.grammar import COMPACT_JSON
from fenwick_llm.engine.json_formats import PATTERNS, strict_formats
from fenwick_llm.models import demo_model_dir
from jsonschema import Draft202012Validator


def python_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return len(text) == 10


def test_date_pattern_is_pythons_calendar() -> None:
    """Every YYYY-MM-DD string with month 00-13 and day 00-32, over centuries and leap-year edges: the
    pattern accepts exactly what datetime.date accepts."""
    rx = re.compile(PATTERNS["date"].strip("^$"))
    years = [0, 1, 4, 99, 100, 400, 1600, 1700, 1900, 2000, 2023, 2024, 2100, 2400, 9996, 9999]
    years += random.Random(0).sample(range(1, 10000), 60)
    for year in years:
        for month in range(14):
            for day in range(33):
                text = f"{year:04d}-{month:02d}-{day:02d}"
                assert bool(rx.fullmatch(text)) == python_date(text), text


@pytest.mark.parametrize(("text", "ok"), [
    ("23:59:59Z", True), ("00:00:00.123456789+05:30", True), ("12:30:00-08:00", True),
    ("23:59:60Z", False), ("24:00:00Z", False), ("12:60:00Z", False), ("12:00:00z", False),
    ("12:00:00", False), ("12:00:00+24:00", False), ("12:00:00.Z", False)])
def test_time_pattern(text: str, ok: bool) -> None:
    assert bool(re.fullmatch(PATTERNS["time"].strip("^$"), text)) == ok
    if ok:  # what the pattern accepts, the jsonschema checker (rfc3339-validator) and Python accept too
        assert Draft202012Validator.FORMAT_CHECKER.conforms(text, "time")
        datetime.time.fromisoformat(text.replace("Z", "+00:00"))


def test_rewrite_leaves_data_and_explicit_patterns_alone() -> None:
    schema = {"type": "object", "properties": {
        "when": {"type": "string", "format": "date-time"},
        "format": {"type": "string", "format": "date"},  # a property named "format"
        "mine": {"type": "string", "format": "date", "pattern": "^2024-"},
        "email": {"type": "string", "format": "email"},
        "fixed": {"const": {"format": "date-time"}, "default": {"format": "time"}},
        "list": {"type": "array", "items": [{"type": "string", "format": "time"}]}}}
    before = json.dumps(schema)
    out = strict_formats(schema)
    assert json.dumps(schema) == before  # the input is not modified
    props = out["properties"]
    assert props["when"] == {"type": "string", "pattern": PATTERNS["date-time"]}
    assert props["format"] == {"type": "string", "pattern": PATTERNS["date"]}
    assert props["mine"] == schema["properties"]["mine"]
    assert props["email"] == schema["properties"]["email"]
    assert props["fixed"] == schema["properties"]["fixed"]
    assert props["list"]["items"][0] == {"type": "string", "pattern": PATTERNS["time"]}


@pytest.fixture(scope="module")
def tokenizer() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer((demo_model_dir() / "tokenizer.json").read_text())


def accepts(tokenizer: llguidance.LLTokenizer, schema: dict, value: str) -> bool:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)  # type: ignore[arg-type]
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ok = matcher.consume_tokens(tokenizer.tokenize_str(json.dumps(value)))
    return bool(ok) and matcher.is_accepting() and not matcher.is_error()


@pytest.mark.parametrize("value", ["2016-12-30T22:48:60Z", "2021-02-29T10:00:00Z", "0000-01-01T00:00:00Z",
                                   "2021-01-01t00:00:00z"])
def test_compiled_grammar_refuses_what_parsers_reject(tokenizer: llguidance.LLTokenizer, value: str) -> None:
    """llguidance's own format takes each of these (the test fails if it ever stops doing so, and the
    rewrite can go); after the rewrite the grammar refuses them, and still takes a plain value."""
    schema = {"type": "string", "format": "date-time"}
    assert accepts(tokenizer, schema, value)
    assert not accepts(tokenizer, strict_formats(schema), value)
    assert accepts(tokenizer, strict_formats(schema), "2024-02-29T23:59:59.5+01:00")
