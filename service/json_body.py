"""JSON request bodies at a bounded cost, before FastAPI and pydantic see them.

Three hostile bodies cost far more than their size in FastAPI's own handling:
- many small values (a 3.8 MB body of 280,000 keys takes 0.6 s to parse here): their number,
  counted as commas before the parse, is capped by `max_body_values` (422 `too_many_values`);
- nesting deeper than the JSON parser's recursion limit raises RecursionError inside FastAPI's body
  parsing, which it answers with a bare 400 "There was an error parsing the body";
- an object with hundreds of thousands of unknown keys makes pydantic build one error per key and
  FastAPI copy each of them (3.8 MB of keys held the event loop for 3-10 s), although the answer
  names only a few.

`BoundedJsonRoute` counts, then parses the body once (FastAPI then reuses Starlette's cached
parse), and answers deep nesting with a 422 `nesting_too_deep`; `known_fields_only` is a route dependency (it runs after
the API-key check, before the body's validation) that answers unknown keys in one 422
`unknown_field` naming a few of them, in time linear in the body's keys and without pydantic.
"""

from __future__ import annotations

import email.message
import json
import types
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Union, get_args, get_origin

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from service.errors import ApiError

MAX_NAMED = 5  # unknown keys named in the error message


def is_json(request: Request) -> bool:
    """Whether FastAPI parses this request's body as JSON: its rule for a body route with a strict
    content type (application/json or application/*+json)."""
    value = request.headers.get("content-type")
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def parse_json_body(request: Request) -> None:
    """Parse the body as FastAPI would, answering what its parser cannot as the contract's errors
    (a syntax error is left to FastAPI's own 400 `invalid_json`)."""
    body = await request.body()
    if not is_json(request) or not body:
        return
    limit = request.app.state.ddserve.settings.max_body_values
    if body.count(b",") >= limit:  # C speed, before the parse; commas in strings count too
        raise ApiError(
            422,
            "too_many_values",
            f"the request body holds over {limit} JSON values; no request needs that many",
        )
    try:
        await request.json()  # Starlette keeps the result: FastAPI's own call reuses it
    except RecursionError:
        raise ApiError(
            422,
            "nesting_too_deep",
            "the request body nests arrays or objects too deeply for the JSON parser",
        ) from None
    except UnicodeDecodeError:
        raise ApiError(
            400, "invalid_json", "the request body is not valid JSON (it is not UTF-8)"
        ) from None
    except json.JSONDecodeError:
        return  # FastAPI parses again and answers its json_invalid (400 invalid_json)


class BoundedJsonRoute(APIRoute):
    """An APIRoute whose JSON body is parsed by `parse_json_body` first."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            await parse_json_body(request)
            return await handler(request)

        return bounded


def _models_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds, directly, in an Optional/Union, or as list items (then True)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        for arg in args:
            model, many = _models_in(arg)
            if model is not None:
                return model, many
    if origin in (list, tuple) and args:
        model, _ = _models_in(args[0])
        return model, model is not None
    return None, False


def _names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
        if isinstance(field.validation_alias, str):
            names.add(field.validation_alias)
    return names


def unknown_fields(model: type[BaseModel], body: Any) -> ApiError | None:
    """A 422 `unknown_field` for the first object of `body` (walked iteratively, in the nesting of
    `model`'s fields) that has keys its model forbids, naming a few of them; None if there are none.
    Values that are not objects are left to pydantic."""
    stack: list[tuple[type[BaseModel], Any, str]] = [(model, body, "")]
    while stack:
        current, value, path = stack.pop()
        if not isinstance(value, dict):
            continue
        names = _names(current)
        if current.model_config.get("extra") == "forbid":
            unknown = [key for key in value if key not in names]
            if unknown:
                return _unknown_error(current, unknown, path)
        for name, field in current.model_fields.items():
            key = next((k for k in (field.alias, name) if k and k in value), None)
            if key is None:
                continue
            inner, many = _models_in(field.annotation)
            if inner is None:
                continue
            where = f"{path}.{key}" if path else key
            items = value[key] if many and isinstance(value[key], list) else None
            if items is None:
                stack.append((inner, value[key], where))
            else:
                stack.extend((inner, item, f"{where}[{i}]") for i, item in enumerate(items))
    return None


def _unknown_error(model: type[BaseModel], unknown: list[str], path: str) -> ApiError:
    named = ", ".join(repr(key[:64]) for key in unknown[:MAX_NAMED])
    more = f" (and {len(unknown) - MAX_NAMED} more)" if len(unknown) > MAX_NAMED else ""
    fields = ", ".join(
        field.alias or name for name, field in model.model_fields.items() if not field.exclude
    )
    where = f" in {path}" if path else ""
    first = unknown[0][:64]
    return ApiError(
        422,
        "unknown_field",
        f"unknown field{'s' if len(unknown) > 1 else ''}{where}: {named}{more}; "
        f"the fields are: {fields}",
        f"{path}.{first}" if path else first,
    )


def known_fields_only(model: type[BaseModel]) -> Callable[[Request], Awaitable[None]]:
    """A route dependency: a 422 for a JSON body with keys `model` forbids (see `unknown_fields`)."""

    async def check(request: Request) -> None:
        if not is_json(request) or not await request.body():
            return
        try:
            body = await request.json()  # parsed already (cached): no second parse
        except ValueError:
            return  # not JSON: FastAPI answers it
        error = unknown_fields(model, body)
        if error is not None:
            raise error

    return check
