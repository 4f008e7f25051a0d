"""Fuzz the OFREP routes against the API's OpenAPI document (schemathesis), with real flags.

tests/test_openapi_fuzz.py fuzzes every route with a store that has no flag service;
here the store holds static flags and flagd definitions (tests/test_ofrep.py), so
generated contexts reach the evaluator: no 5xx, every answer as documented, invalid
requests refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.agent_harness import api_in_thread
from tests.test_ofrep import flag_store


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    with api_in_thread(flag_store()) as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_ofrep_routes_conform_to_the_document(api_url: str, mode: str) -> None:
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json").include(path_regex="^/ofrep/")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 3
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call_and_validate(timeout=10)
            assert response.status_code < 500

        if mode == "negative" and operation.path == "/ofrep/v1/configuration":
            continue  # only an optional header: nothing to make invalid
        check()
