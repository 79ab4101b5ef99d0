"""Property-based fuzzing of the model server from its own OpenAPI schema: no input may cause a 5xx.

Left out: ``/readyz`` (503 is its documented answer while loading) and the admin calls that add, change or remove
variants (a fuzzed ``fault`` would make 500s on purpose, a fuzzed ``source`` would load arbitrary folders).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_module
from test_serving_models import Server, build_classifier, build_tiny_lm, start_server

pytestmark = pytest.mark.integration
schemathesis = require_module("schemathesis")  # a dev tool: skipped where absent, a failure under CI=true
ADMIN = "fuzz-admin"
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))  # FUZZ_EXAMPLES=200 for a longer hunt


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("serve-fuzz")
    server = start_server(
        work,
        "--model", f"clf={build_classifier()}:1",
        "--model", f"lm={build_tiny_lm()}:1",
        "--shadow", "mirror=echo://:50",
        "--admin-token", ADMIN,
        "--request-log", str(work / "requests"),
        "--max-tokens-limit", "64",
        timeout=180,
    )  # fmt: skip
    yield server
    server.process.stop()


def _operations(url: str) -> list[object]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    schema = schema.exclude(path="/readyz").exclude(path_regex="^/admin/variants", method=["POST", "PATCH", "DELETE"])
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_makes_the_server_fail(server: Server, mode: str, tmp_path: Path) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    operations = _operations(server.url)
    labels = {op.label for op in operations}  # type: ignore[attr-defined]
    assert {"POST /v1/classify", "POST /v1/completions", "POST /v1/chat/completions", "GET /admin/metrics"} <= labels
    failures: list[str] = []
    headers = {"Authorization": f"Bearer {ADMIN}"}
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))  # type: ignore[attr-defined]

        @given(case=strategy)
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: object) -> None:
            response = case.call(base_url=server.url, headers=headers, timeout=60)  # type: ignore[attr-defined]
            if response.status_code >= 500:
                failures.append(f"{case.operation.label} {response.status_code}: {case.body!r} {response.text[:300]}")  # type: ignore[attr-defined]

        try:
            run()
        except Unsatisfiable:  # negative mode: an operation without parameters has no invalid input
            assert mode == "negative", operation.label  # type: ignore[attr-defined]
    assert not failures, "\n".join(failures[:10])
    # Still serving after the fuzzing.
    import httpx

    assert httpx.post(f"{server.url}/v1/classify", json={"inputs": "hello"}, timeout=60).status_code == 200
