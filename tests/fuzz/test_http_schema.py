"""Fuzz the HTTP API from the OpenAPI schema it publishes (schemathesis, a bounded run).

Checks: no 5xx, every status and content type documented, every response body (and every SSE
event) valid against the schema, schema-violating bodies refused. One check is left out:
``positive_data_acceptance`` (a schema-valid body must be accepted) cannot hold for limits the
static schema does not carry: the box's ``max_tokens_limit``, the loaded model's vocabulary
for token-id prompts, its context for long prompts. Those are 400s with the numbers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.daemon import HttpDaemon
from tests.fixtures.paths import TEST_MODEL

pytestmark = [pytest.mark.slow]


def test_the_published_schema_holds_under_fuzzing(tmp_path):
    server = HttpDaemon(tmp_path, "--model", str(TEST_MODEL), "--max-tokens-limit", "4", "--ctx", "512").start()
    try:
        st = Path(sys.executable).with_name("st")
        run = subprocess.run(
            [str(st), "run", f"{server.url}/openapi.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
             "--max-examples", "40", "--max-time", "60", "--workers", "1", "--no-color"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        summary = run.stdout[run.stdout.rfind("Test cases:") :]
        assert " passed" in summary and "fail" not in summary, run.stdout[-3000:]
    finally:
        server.stop_ok()
