"""Every error code the gateway can answer is in docs/errors.md, and every documented code can be
answered (issue #18: `http_400` and `conflicting_input` were answered but documented nowhere).

The codes are collected from the source with `ast`: every `ApiError(status, code, ...)` and
`error_response(status, code, ...)` call in `service/`, calls of helpers that pass their own
`code` parameter on (e.g. `normalize._invalid`), and the code tables of the exception handlers in
`service/errors.py` (FastAPI's own HTTP and validation errors). A code computed anywhere else fails
the test until it is added here and to the table.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from pathlib import Path

from starlette.exceptions import HTTPException

from service import errors

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
DOC = ROOT / "docs" / "errors.md"
MAKERS = {"ApiError", "error_response"}  # (status, code, ...) positionally or by keyword
# Calls whose code is not a literal and is not a helper's parameter: each is accounted for below.
DYNAMIC_SITES = {
    ("service/errors.py", "_api_error"),  # an ApiError's own code, collected at its raise
    ("service/errors.py", "_validation_error"),  # VALIDATION_CODES, VALIDATION_DEFAULT_CODE
    ("service/errors.py", "_http_error"),  # FRAMEWORK_CODES, FRAMEWORK_DEFAULT_CODE
}
ANY_4XX = 0  # the status of FRAMEWORK_DEFAULT_CODE: whatever 4xx the framework raised


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _argument(call: ast.Call, index: int, name: str) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return call.args[index] if len(call.args) > index else None


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def collect_codes() -> tuple[set[tuple[str, int]], set[tuple[str, str]]]:
    """(code, status) pairs raised with literal codes, and the (file, function) of every call whose
    code is computed."""
    trees = {
        path.relative_to(ROOT).as_posix(): ast.parse(path.read_text())
        for path in sorted(SERVICE.rglob("*.py"))
    }
    # helpers that build an error from their own `code` parameter: name → (code index, status)
    helpers: dict[str, tuple[int, int]] = {}
    for tree in trees.values():
        for function in _functions(tree):
            params = [a.arg for a in function.args.args]
            for call in ast.walk(function):
                if not (isinstance(call, ast.Call) and _callee(call) in MAKERS):
                    continue
                code, status = _argument(call, 1, "code"), _argument(call, 0, "status")
                if (
                    isinstance(code, ast.Name)
                    and code.id in params
                    and isinstance(status, ast.Constant)
                ):
                    helpers[function.name] = (params.index(code.id), status.value)
    pairs: set[tuple[str, int]] = set()
    dynamic: set[tuple[str, str]] = set()
    for path, tree in trees.items():
        for function in _functions(tree):
            for call in ast.walk(function):
                if not isinstance(call, ast.Call):
                    continue
                name = _callee(call)
                if name in MAKERS:
                    code, status = _argument(call, 1, "code"), _argument(call, 0, "status")
                    if function.name in helpers and isinstance(code, ast.Name):
                        continue  # the helper itself: its callers are collected
                    if isinstance(code, ast.Constant) and isinstance(status, ast.Constant):
                        pairs.add((code.value, status.value))
                    else:
                        dynamic.add((path, function.name))
                elif name in helpers:
                    index, status_value = helpers[name]
                    code = _argument(call, index, "code")
                    if isinstance(code, ast.Constant):
                        pairs.add((code.value, status_value))
                    else:
                        dynamic.add((path, function.name))
    return pairs, dynamic


def handler_codes() -> set[tuple[str, int]]:
    """The codes the exception handlers compute for FastAPI's and Starlette's own errors."""
    pairs = {(code, status) for status, code in errors.FRAMEWORK_CODES.items()}
    pairs.add((errors.FRAMEWORK_DEFAULT_CODE, ANY_4XX))
    pairs |= {(code, 422) for code in errors.VALIDATION_CODES.values()}
    pairs.add((errors.VALIDATION_DEFAULT_CODE, 422))
    return pairs


def documented_codes() -> set[tuple[str, int]]:
    """(code, status) of every row of docs/errors.md's table."""
    pairs = set()
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `([a-z0-9_]+)` \| (\d{3}|4xx) \|", line)
        if match:
            status = ANY_4XX if match[2] == "4xx" else int(match[2])
            pairs.add((match[1], status))
    return pairs


def test_every_code_the_gateway_answers_is_documented_and_every_documented_one_answered() -> None:
    raised, dynamic = collect_codes()
    assert dynamic == DYNAMIC_SITES, (
        "an error code is computed somewhere new: collect it in this test and document it"
    )
    answered = raised | handler_codes()
    documented = documented_codes()
    assert len(raised) > 30  # the scan found the gateway's calls (a broken scan finds none)
    assert answered - documented == set(), "answered, but not in docs/errors.md"
    assert documented - answered == set(), "in docs/errors.md, but never answered"
    assert ("conflicting_input", 422) in documented
    assert not any(code.startswith("http_4") for code, _ in answered)


def test_framework_http_errors_answer_documented_codes() -> None:
    """FastAPI's 400 "There was an error parsing the body" answered `http_400`, a code of no table."""

    def answer(status: int) -> dict:
        exc = HTTPException(status_code=status, detail="There was an error parsing the body")
        response = asyncio.run(errors._http_error(None, exc))  # type: ignore[arg-type]
        assert response.status_code == status
        return json.loads(response.body)["error"]

    assert answer(400)["code"] == "invalid_body"
    assert answer(413)["code"] == "body_too_large"
    assert answer(418)["code"] == "http_error"
