"""Fuzz job (issue 19): schemathesis draws requests from /openapi.json (valid and invalid ones) and sends
them to a real `fenwick serve` on the tiny model. No request may get a 5xx, an undocumented status or
content type, or stop the engine; /health answers within a second after each one. Bounded in time:
FUZZ_EXAMPLES valid and FUZZ_EXAMPLES invalid cases per operation (about a minute in all on a 2-core
machine)."""

from __future__ import annotations

import time

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import load_all_checks
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    status_code_conformance,
)
from server_utils import ServerProcess

FUZZ_EXAMPLES = 40


def check_case(case: schemathesis.Case, url: str, output: str) -> None:
    if isinstance(case.body, dict):
        case.body.setdefault("max_tokens", 4)  # keep generation short: the fuzz is about the edge
    response = case.call(base_url=url, timeout=60)
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
    case.validate_response(response, checks=(status_code_conformance, content_type_conformance))
    started = time.monotonic()
    health = httpx.get(f"{url}/health", timeout=5)
    assert health.status_code == 200 and time.monotonic() - started < 1.0, output


def test_no_request_breaks_the_server(server: ServerProcess) -> None:
    load_all_checks()
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # invalid bodies too (a GET without parameters has none)
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def fuzz(case: schemathesis.Case) -> None:
                check_case(case, server.url, server.output())

            fuzz()
