"""The OpenAI Images API under `/v1`: `POST /v1/images/generations`, `POST /v1/images/edits`,
`GET /v1/models`, `GET /v1/models/{id}`.

Clients of OpenAI's API (the official `openai` SDK: `OpenAI(base_url=".../v1", api_key=KEY)`) use
ddserve unchanged. Each call becomes an ordinary ddserve job — the same checks, spec, queue and
continuous batching as `/generate` and `/inpaint` — and, since the SDK does not poll, the call waits
for it (`DDSERVE_OPENAI_WAIT_S`); a job not done by then is answered 503 with `Retry-After` and the
job's id, and goes on. Errors have OpenAI's shape (`{"error": {"message", "type", "param",
"code"}}`, which is ddserve's own) and statuses the SDK maps to its exception classes.

Edits: with a `mask`, its fully transparent pixels (alpha = 0) mark the area to generate (OpenAI's
convention), run as RePaint inpainting; without a mask, an image with transparent pixels is
inpainted there (OpenAI's convention again), and any other edit without a mask — a fully opaque
image, or any image sent with ddserve's `strength` (`extra_body`) — is image-to-image (SDEdit, the
`/img2img` job; strength defaults to `ddserve.params.DEFAULT_STRENGTH`).
"""

# No `from __future__ import annotations`: FastAPI reads the body annotation at run time.

import base64
import io
import time
from typing import Annotated, Any

from fastapi import APIRouter, Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import FormData, UploadFile

from ddserve.jobs import JobKind, JobStatus
from ddserve.params import ImageFormat, Strength
from ddserve.requests import GenerateBody, Img2ImgBody, InpaintBody
from models.catalog import ModelEntry
from service.dependencies import AppState, CallerDep, State, base_url
from service.errors import ERROR_RESPONSES, ApiError
from service.openai_schemas import (
    DdserveExtras,
    ImageGenerationBody,
    OutputCompression,
    check_size,
    condition_of,
    generate_body,
    output_options,
)
from service.presenter import output_view
from service.submission import submit_and_wait

router = APIRouter(prefix="/v1", tags=["openai"])

MAX_FORM_FILES = 4
MAX_FORM_FIELDS = 32


def _model(state: AppState, name: str | None, task: str) -> ModelEntry:
    """The named model (404 if not served), or the default one for `task`."""
    if name is None:
        name = state.settings.openai_default_model or next(
            (
                m
                for m in state.served
                if task in state.catalog[m].tasks and state.catalog[m].schedule is not None
            ),
            None,
        )
        if name is None:
            raise ApiError(404, "model_not_found", f"no served model can {task}", "model")
    return state.normalizer.entry(name, task)


def _body(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    """ddserve's own body from the mapped fields; its limits answer 400 naming the field."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        raise ApiError(400, "invalid_value", f"{param}: {error['msg']}", param) from None


def _images_answer(snap: Any, state: AppState, request: Request, b64: bool) -> dict[str, Any]:
    """OpenAI's answer for a finished job: `{"created", "data": [{"url"} | {"b64_json"}]}`."""
    if snap.status == JobStatus.CANCELED:
        raise ApiError(409, "job_canceled", f"job {snap.id} was canceled")
    if snap.status != JobStatus.SUCCEEDED:
        error = snap.error or {}
        reason = f"{error.get('code') or 'failed'}: {error.get('message') or 'no reason recorded'}"
        if error.get("type") == "invalid_request_error":  # the request could not run as given
            raise ApiError(400, "job_invalid", f"job {snap.id} failed: {reason}")
        raise ApiError(500, "job_failed", f"job {snap.id} failed: {reason}")
    output = output_view(snap.output or {}, state.storage, base_url(request, state.settings))
    data = [
        {"b64_json": image["b64"]} if b64 else {"url": image["url"]} for image in output["images"]
    ]
    prompt = snap.input.get("prompt")
    if prompt is not None:
        for item in data:
            item["revised_prompt"] = prompt
    return {"created": int(time.time()), "data": data}


@router.post(
    "/images/generations",
    responses=ERROR_RESPONSES,
    summary="OpenAI Images API: create images",
)
async def create_images(
    request: Request, state: State, caller: CallerDep, body: ImageGenerationBody
) -> dict[str, Any]:
    entry = _model(state, body.model, "generate")
    b64 = body.response_format == "b64_json"
    generate = _body(GenerateBody, generate_body(body, entry, b64))
    snap = await submit_and_wait(
        request,
        state,
        caller,
        JobKind.GENERATE,
        generate,
        state.normalizer.generate,
        state.settings.openai_wait_s,
    )
    return _images_answer(snap, state, request, b64)


# --- edits (multipart) -------------------------------------------------------------------------


async def _form(request: Request) -> FormData:
    try:
        return await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except Exception as exc:  # malformed multipart, too many parts: the client's fault
        raise ApiError(
            400, "invalid_multipart", f"the body is not a valid multipart form: {exc}"
        ) from None


async def _picture(upload: Any, param: str, limit: int) -> Image.Image:
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "invalid_value", f"{param} must be a file (an image)", param)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "image_too_large", f"{param} is over the {limit}-byte limit", param)
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ApiError(
            400, "invalid_image", f"{param} is not a readable image ({exc})", param
        ) from None
    return picture


def _alpha(picture: Image.Image) -> Image.Image | None:
    """The picture's alpha channel (L), or None if it has no transparency at all."""
    if picture.mode in ("RGBA", "LA") or (picture.mode == "P" and "transparency" in picture.info):
        return picture.convert("RGBA").getchannel("A")
    if "transparency" in picture.info:
        return picture.convert("RGBA").getchannel("A")
    return None


def _png_b64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _ddserve_mask(alpha: Image.Image) -> Image.Image:
    """OpenAI's mask (alpha 0 = generate) → ddserve's (255 = keep, 0 = generate)."""
    return alpha.point(lambda a: 0 if a == 0 else 255)


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_value", f"{name} must be a text field", name)
    return value


def _adapter(field: Any) -> TypeAdapter[Any]:
    return TypeAdapter(
        Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    )


# Form fields are text: each is read with its declared type (`ddserve.params`), leniently.
# `strength` is an edit's alone (image-to-image), so not one of the generations' extras.
_FORM_FIELDS = {
    **{
        name: _adapter(field)
        for name, field in {**ImageGenerationBody.model_fields}.items()
        if name == "n" or name in DdserveExtras.model_fields
    },
    "strength": TypeAdapter(Strength),
}


_OUTPUT_FORMAT = TypeAdapter(ImageFormat)
_OUTPUT_COMPRESSION = TypeAdapter(OutputCompression)


def _output_fields(form: FormData) -> tuple[str | None, int | None]:
    """`output_format` and `output_compression` of an edit's form, checked (400 if not valid)."""
    checked: list[Any] = []
    for param, adapter in (
        ("output_format", _OUTPUT_FORMAT),
        ("output_compression", _OUTPUT_COMPRESSION),
    ):
        text = _text(form, param)
        try:
            checked.append(None if text is None else adapter.validate_strings(text))
        except ValidationError as exc:
            message = f"{param}: {exc.errors()[0]['msg']}"
            raise ApiError(400, "invalid_value", message, param) from None
    return checked[0], checked[1]


def _typed_fields(form: FormData) -> dict[str, Any]:
    """n and ddserve's extras from the form's text fields."""
    fields: dict[str, Any] = {}
    for name, adapter in _FORM_FIELDS.items():
        text = _text(form, name)
        if text is None:
            continue
        try:
            fields[name] = adapter.validate_python(text, strict=False)
        except ValidationError as exc:
            message = exc.errors(include_url=False)[0]["msg"]
            raise ApiError(400, "invalid_value", f"{name}: {message}", name) from None
    return fields


@router.post(
    "/images/edits",
    responses=ERROR_RESPONSES,
    summary="OpenAI Images API: edit an image (inpainting with a mask, else image-to-image)",
    openapi_extra={
        "requestBody": {
            "content": {"multipart/form-data": {"schema": {"type": "object"}}},
            "required": True,
        }
    },
)
async def edit_images(request: Request, state: State, caller: CallerDep) -> dict[str, Any]:
    form = await _form(request)
    known = {"image", "image[]", "mask", "prompt", "model", "n", "size", "response_format"}
    known |= {"user", "output_format", "output_compression", "quality", "background"}
    known |= {"input_fidelity"}
    known |= set(_FORM_FIELDS)
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown fields: {', '.join(unknown)}", unknown[0])
    extras = _typed_fields(form)
    uploads = form.getlist("image") + form.getlist("image[]")
    if len(uploads) != 1:
        raise ApiError(
            400, "invalid_value", f"send exactly one image (got {len(uploads)})", "image"
        )
    limit = state.settings.max_image_bytes
    picture = await _picture(uploads[0], "image", limit)
    mask_upload = form.get("mask")
    if mask_upload is not None and "strength" in extras:
        raise ApiError(
            400,
            "invalid_value",
            "strength is image-to-image's (an edit without a mask); with a mask the edit is "
            "inpainting",
            "strength",
        )
    alpha = None
    if mask_upload is not None:
        mask_picture = await _picture(mask_upload, "mask", limit)
        if mask_picture.size != picture.size:
            raise ApiError(
                400,
                "mask_size_mismatch",
                f"the mask is {mask_picture.size[0]}x{mask_picture.size[1]}, the image "
                f"{picture.size[0]}x{picture.size[1]}: they must match",
                "mask",
            )
        alpha = _alpha(mask_picture)
        if alpha is None:
            raise ApiError(
                400,
                "mask_without_alpha",
                "the mask has no alpha channel: its fully transparent pixels mark the area to "
                "generate",
                "mask",
            )
    elif "strength" not in extras:
        alpha = _alpha(picture)
        if alpha is not None and alpha.getextrema()[0] > 0:
            alpha = None  # fully opaque: nothing marked to generate, so image-to-image
    # With a mask (given, or the image's transparency): inpainting; else image-to-image.
    entry = _model(state, _text(form, "model"), "inpaint" if alpha is not None else "generate")
    check_size(_text(form, "size"), entry, picture.size)
    response_format = _text(form, "response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise ApiError(
            400, "invalid_value", "response_format is url or b64_json", "response_format"
        )
    prompt, class_label = condition_of(
        _text(form, "prompt") or "", extras.pop("class_label", None), entry
    )
    b64 = response_format == "b64_json"
    fields = {
        **extras,
        "model": entry.name,
        "image": _png_b64(picture.convert("RGBA") if picture.mode == "P" else picture),
        "mask": None if alpha is None else _png_b64(_ddserve_mask(alpha)),
        "prompt": prompt,
        "class_label": class_label,
        "output": output_options(*_output_fields(form), b64),
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    if alpha is None:  # image-to-image
        kind, body, normalize = (
            JobKind.IMG2IMG,
            _body(Img2ImgBody, fields),
            state.normalizer.img2img,
        )
    else:
        kind, body, normalize = (
            JobKind.INPAINT,
            _body(InpaintBody, fields),
            state.normalizer.inpaint,
        )
    snap = await submit_and_wait(
        request, state, caller, kind, body, normalize, state.settings.openai_wait_s
    )
    return _images_answer(snap, state, request, b64)


# --- models ------------------------------------------------------------------------------------


def _model_object(entry: ModelEntry) -> dict[str, Any]:
    created = 0
    if entry.path is not None and (entry.path / "config.json").exists():
        created = int((entry.path / "config.json").stat().st_mtime)
    return {"id": entry.name, "object": "model", "created": created, "owned_by": "ddserve"}


@router.get("/models", responses={401: ERROR_RESPONSES[401]}, summary="OpenAI: list models")
async def list_models(state: State, caller: CallerDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model_object(state.catalog[m]) for m in state.served]}


@router.get(
    "/models/{model_id}",
    responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]},
    summary="OpenAI: one model",
)
async def get_model(model_id: str, state: State, caller: CallerDep) -> dict[str, Any]:
    if model_id not in state.served:
        raise ApiError(404, "model_not_found", f"unknown model {model_id!r}", "model")
    return _model_object(state.catalog[model_id])
