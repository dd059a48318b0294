"""Schema fuzzing of the gateway from its own OpenAPI document (schemathesis + Hypothesis).

Every operation of `/openapi.json` gets bounded, derandomized examples — inputs that fit the schema
(positive) and inputs that break it (negative) — sent in-process to a gateway on fakeredis. The
properties, whatever the input:

- no response is a 5xx, except readiness answering 503 (no worker is running here) and a 503 that
  says when to come back (Retry-After);
- every error (4xx, and 5xx other than readiness) has the contract's body
  `{"error": {"type", "code", "message", "param"}}` with a non-empty code and message, and every
  429 / 503 carries Retry-After.

To reach past "unknown model", the `model` field of a generated body is most of the time swapped
for a model the gateway serves, and job ids in paths are often those of jobs accepted earlier in the
run (so that status and cancel see real jobs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.gateway_support import make_app, write_config_zoo

MODELS = ["tiny-ddpm", "tiny-text", "tiny-ae", "tiny-vae", "tiny-vq"]
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 12}
ERROR_FIELDS = {"type", "code", "message", "param"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    root = tmp_path_factory.mktemp("fuzz")
    zoo = write_config_zoo(root / "zoo")
    # No worker runs here: the synchronous OpenAI Images routes answer their 503 (Retry-After)
    # after a short wait instead of holding each example for the default 120 s, and a job route's
    # `Prefer: wait=N` (its schema's example is wait=30) answers 202 at once instead of holding
    # an accepted example past the client's 10 s read timeout.
    gateway, _ = make_app(zoo, root, openai_wait_s=0.2, max_wait_s=0.2)
    return gateway


def problems_of(path: str, status: int, headers: Any, body: Any) -> list[str]:
    """What is wrong with one response, by the properties in the module docstring."""
    if path == "/readyz":
        if status == 503:
            return [] if isinstance(body, dict) and body.get("ready") is False else ["readyz body"]
        return [] if status == 200 else [f"readyz answered {status}"]
    found = []
    if status >= 500 and not (status == 503 and "retry-after" in headers):
        found.append(f"server error {status}")
    if status in (429, 503) and "retry-after" not in headers:
        found.append(f"{status} without Retry-After")
    if status >= 400:
        error = body.get("error") if isinstance(body, dict) and set(body) == {"error"} else None
        if not isinstance(error, dict) or set(error) != ERROR_FIELDS:
            found.append(f"{status} body not in the contract's error shape")
        elif not error["code"] or not error["message"]:
            found.append(f"{status} error without code or message")
    return found


def fuzz_operation(
    operation: Any, mode: GenerationMode, job_ids: list[str], report: Callable[[str], None]
) -> None:
    """Run the operation's bounded examples; report every broken property with its request."""

    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,  # the same examples on every run
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the report names the input
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = data.draw(
                st.sampled_from(MODELS) | st.just(case.body["model"]), label="model"
            )
        if "job_id" in (case.path_parameters or {}) and job_ids:
            case.path_parameters["job_id"] = data.draw(
                st.sampled_from(job_ids) | st.just(case.path_parameters["job_id"]), label="job"
            )
        try:
            response = case.call()
        except Exception as exc:  # an exception escaping the app is a 500
            report(f"{operation.label} raised {type(exc).__name__}: {exc} for {case.body!r}")
            return
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 202 and isinstance(body, dict) and "id" in body:
            job_ids.append(body["id"])
        for problem in problems_of(case.path, response.status_code, response.headers, body):
            report(
                f"{operation.label} ({mode.value}): {problem} for path {case.formatted_path} "
                f"query {case.query!r} body {str(case.body)[:300]!r}: {response.text[:300]}"
            )

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_500_and_every_error_has_the_contract_shape(
    app: FastAPI, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /generate", "GET /jobs/{job_id}", "GET /images/{key}"} <= labels
    failures: list[str] = []
    job_ids: list[str] = []
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not _has_inputs(operation):
            continue  # nothing to break: /healthz, /readyz take no input
        fuzz_operation(operation, mode, job_ids, failures.append)
    if mode == GenerationMode.POSITIVE:
        assert job_ids, "no generated request was accepted: the fuzzing never got past validation"
    assert not failures, "\n".join(failures[:20])


def _has_inputs(operation: Any) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))
