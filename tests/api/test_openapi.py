"""The OpenAPI description tells the truth: schemathesis, with its default checks, against a live stack.

A real sender, consumer and simulator on the test broker and database; the
schemathesis command line (``st run``), as a user would run it, with a bound
number of examples per operation so that it takes well under a minute. Its
default checks: no 5xx, every status and content type documented, every
response matching its schema (OpenAI's error object for every error),
documented headers, schema-valid data accepted and invalid data refused, a
missing token refused, ``405`` with ``Allow`` for undocumented methods.

What the run is told, and why:

- the live model's name, for most generated bodies and model paths, so that
  the fuzz reaches the relay and the backend's answers (JSON and server-sent
  events) are checked too, not only ``404 model_not_found``;
- ``X-Request-Timeout`` from a few sane values: a client that asks for a
  deadline of 1e-38 s does get the documented ``504 deadline_exceeded``,
  which the ``not_a_server_error`` check counts as a failure of the server;
- on forwarded calls, a 400 for schema-valid data is allowed: the body beyond
  ``model`` is the model's server's to check (required fields per route,
  context length, vocabulary), and its refusal is relayed. The extra check of
  ``schemathesis_checks.py`` makes sure such a 400 never comes from the
  dispatcher itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import schemathesis
from sqlalchemy.ext.asyncio import AsyncEngine

from harness.stack import ROOT, Service
from harness.testrun import unique
from harness.tokens import create_token

EXAMPLES = 5
"""Examples per operation and phase (its coverage phase adds its own): enough to find what the earlier
descriptions got wrong; 20-45 s in all on a busy 2-core machine."""
TIMEOUT = 240
FORWARDED_POSITIVE = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""schemathesis' default for positive data, plus 400: the backend's refusal of a body, relayed."""


def config(model: str) -> str:
    statuses = ", ".join(f'"{status}"' for status in FORWARDED_POSITIVE)
    return f"""
[dictionaries.models]
values = ["{model}"]

[dictionaries.timeouts]
values = [30, 60.5, 1e3]

[parameters]
"body.model" = {{ dictionary = "models", probability = 0.7 }}
"path.model" = {{ dictionary = "models", probability = 0.5 }}
"header.X-Request-Timeout" = {{ dictionary = "timeouts", probability = 1.0 }}

[[operations]]
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = [{statuses}]
"""


@pytest_asyncio.fixture(scope="module")
async def model_token(engines: dict[str, AsyncEngine], ready_model: str) -> str:
    """A token for this run's model only: the broker is shared, and other runs' models, which come and go,
    would change the model list (and what the stateful checks follow from it) under the run."""
    return await create_token(engines["postgres"], unique("openapi"), models=[ready_model])


@pytest.mark.timeout(TIMEOUT + 60)
def test_schemathesis_default_checks_pass(
    sender: Service, model_token: str, ready_model: str, tmp_path: Path
) -> None:
    token = model_token
    settings = tmp_path / "schemathesis.toml"
    settings.write_text(config(ready_model))
    argv = [str(Path(sys.executable).with_name("st")), "--config-file", str(settings), "run"]
    argv += [f"{sender.url}/openapi.json", "-H", f"Authorization: Bearer {token}"]
    argv += ["--max-examples", str(EXAMPLES), "--generation-database", "none", "--no-color"]
    argv += ["--report", "ndjson", "--report-dir", str(tmp_path)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_checks", "PYTHONPATH": str(ROOT)}
    try:
        run = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        raise AssertionError(f"schemathesis ran for more than {TIMEOUT} s:\n{output}") from None
    report = run.stdout[run.stdout.find("=== FAILURES") :] if "=== FAILURES" in run.stdout else run.stdout
    assert run.returncode == 0, f"{report[-12000:]}\n{run.stderr[-2000:]}"
    assert "dispatcher_accepts_what_it_describes" in " ".join(_checks_run(tmp_path)), run.stdout[-3000:]


def test_real_answers_match_the_description(sender: Service, token: str, ready_model: str) -> None:
    """The fuzz seldom writes a body the backend serves: real answers, whole and streamed as server-sent
    events, are checked against the description with the same default checks."""
    api = schemathesis.openapi.from_url(f"{sender.url}/openapi.json")
    bodies: dict[str, dict[str, Any]] = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello"}]},
        "/v1/completions": {"prompt": "Hello"},
    }
    for path, body in bodies.items():
        for stream in (False, True):
            case = api[path]["POST"].Case(
                body={"model": ready_model, "max_tokens": 4, "stream": stream, **body},
                headers={"Authorization": f"Bearer {token}"},
                media_type="application/json",
            )
            response = case.call_and_validate(timeout=30)
            assert response.status_code == 200, response.text
            expected = "text/event-stream" if stream else "application/json"
            assert response.headers["content-type"][0].startswith(expected)


def _checks_run(report_dir: Path) -> list[str]:
    """The names of the checks schemathesis ran, from its ndjson report."""
    names: set[str] = set()
    for path in report_dir.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            for part in line.split('"name": "')[1:] + line.split('"name":"')[1:]:
                names.add(part.split('"', 1)[0])
    return sorted(names)


def test_a_route_the_backend_does_not_serve_gets_an_openai_error(
    sender: Service, token: str, ready_model: str
) -> None:
    """The simulator, like vLLM for a chat model, has no ``/v1/rerank``: FastAPI's bare ``{"detail"}`` 404
    becomes our ``unknown_url``, as the description says."""
    response = httpx.post(
        f"{sender.url}/v1/rerank",
        json={"model": ready_model, "query": "q", "documents": ["d"]},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "unknown_url" and "/v1/rerank" in error["message"], error
