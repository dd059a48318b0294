"""The OpenAI Images API's request fields, and how they become ddserve's own request bodies.

Clients written for OpenAI (the official `openai` SDK and everything built on it) call
`POST /v1/images/generations` and `POST /v1/images/edits`; these map onto ddserve's `/generate` and
`/inpaint` bodies (`ddserve.requests`), so the same checks, specs and batching apply. ddserve's own
parameters (seed, steps, guidance, sampler, class_label, eta, negative_prompt) come as extra fields, the way the SDK
sends `extra_body=`; their types are `ddserve.params`', declared once.

The prompt is read according to the model's conditioning: a text model takes it as its prompt; a
class-conditional model takes a class name or index ("7", "seven" …) or an explicit `class_label`;
an unconditional model takes the empty prompt only (anything else would be silently dropped).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ddserve.params import (
    ClassLabel,
    Eta,
    GuidanceScale,
    ImageCount,
    ImageFormat,
    InferenceSteps,
    ModelName,
    NegativePrompt,
    SamplerName,
    Seed,
)
from models.catalog import ModelEntry
from service.errors import ApiError

SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_PROMPT_CHARS = 32_000  # OpenAI's own limit; the model's vocabulary limits what is usable


def _bad(message: str, param: str, code: str) -> ApiError:
    return ApiError(400, code, message, param)


OutputCompression = Annotated[
    int,
    Field(
        ge=0,
        le=100,
        description="jpeg / webp compression level as OpenAI defines it: 0–100, 100 = the least "
        "compression (the default); ddserve's quality; png: not applied",
    ),
]


class DdserveExtras(BaseModel):
    """ddserve's sampling parameters, sent through the SDK's `extra_body`."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    seed: Seed | None = None
    num_inference_steps: InferenceSteps | None = None
    guidance_scale: GuidanceScale | None = None
    sampler: SamplerName | None = None
    eta: Eta | None = None
    class_label: ClassLabel | None = None
    negative_prompt: NegativePrompt | None = None


class ImageGenerationBody(DdserveExtras):
    """`POST /v1/images/generations`, as OpenAI documents it."""

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="the prompt (see module doc)")
    model: ModelName | None = Field(None, description="a model of `GET /v1/models`")
    n: ImageCount = 1
    size: str | None = Field(
        None,
        description='"auto" (the model\'s own size) or "WxH": the model\'s own, or for a model with '
        "a `size_multiple` any size `/generate`'s height and width take",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="url (signed, expiring link) or b64_json"
    )
    output_format: ImageFormat | None = None
    output_compression: OutputCompression | None = None
    quality: Literal["auto", "standard"] | None = Field(None, description="auto only")
    style: None = Field(None, description="not supported")
    background: Literal["auto", "opaque"] | None = Field(None, description="auto or opaque only")
    moderation: Literal["auto", "low"] | None = Field(None, description="accepted, not applied")
    user: str | None = Field(None, max_length=256, description="the end user, for the logs")


def parse_size(size: str | None, entry: ModelEntry) -> tuple[int, int] | None:
    """(height, width) of a "WxH" `size`; None for "auto" or none (the model's own size)."""
    if size is None or size == "auto":
        return None
    match = SIZE.match(size)
    if match is None:
        own = f"{entry.image.width}x{entry.image.height}"
        raise _bad(
            f'size must be "auto" or "WxH" (model {entry.name!r}: "{own}")', "size", "invalid_size"
        )
    return int(match.group(2)), int(match.group(1))


def check_size(size: str | None, entry: ModelEntry, image: tuple[int, int] | None = None) -> None:
    """`size` must be "auto" or the model's own "WxH" (a model without a `size_multiple` makes one
    size); an edit's must be its image's (width, height) `image` where the model takes other sizes
    (the edit then runs at that size)."""
    parsed = parse_size(size, entry)
    own = (entry.image.height, entry.image.width)
    if entry.size_multiple is not None and image is not None:
        own = (image[1], image[0])
    if parsed is not None and parsed != own:
        made = f"{own[1]}x{own[0]}"
        raise _bad(
            f"size {size} is not served by model {entry.name!r} here; it makes {made} images",
            "size",
            "unsupported_size",
        )


def generation_size(size: str | None, entry: ModelEntry) -> dict[str, int]:
    """The `height` and `width` of `/generate` for a generation's `size`: a model that makes other
    sizes (`size_multiple`) takes any "WxH" that `/generate` takes (checked there: a multiple, up to
    the side limit, else a 422); another model only its own size (400 `unsupported_size`)."""
    if entry.size_multiple is None:
        check_size(size, entry)
        return {}
    parsed = parse_size(size, entry)
    return {} if parsed is None else {"height": parsed[0], "width": parsed[1]}


def condition_of(
    prompt: str, class_label: int | None, entry: ModelEntry
) -> tuple[str | None, int | None]:
    """The (prompt, class_label) of ddserve's body for an OpenAI prompt on `entry`."""
    text = prompt.strip()
    cond = entry.conditioning
    if cond is not None and cond.type == "text":
        return (text or None), class_label
    if cond is not None and cond.type == "class" and cond.classes:
        if not text:
            return None, class_label
        names = {name.lower(): i for i, name in enumerate(cond.classes)}
        index = int(text) if text.isdigit() else names.get(text.lower())
        if index is None or index >= len(cond.classes):
            listed = ", ".join(f"{i}={c}" for i, c in enumerate(cond.classes))
            raise _bad(
                f"model {entry.name!r} is class-conditional: the prompt must be a class name or "
                f"index ({listed}), or empty with class_label",
                "prompt",
                "invalid_prompt",
            )
        if class_label is not None and class_label != index:
            raise _bad(
                "the prompt and class_label name different classes",
                "class_label",
                "conflicting_condition",
            )
        return None, index
    if text:
        raise _bad(
            f"model {entry.name!r} is unconditional: send an empty prompt",
            "prompt",
            "not_text_conditional",
        )
    return None, class_label


def output_options(
    output_format: str | None, output_compression: int | None, b64: bool
) -> dict[str, Any]:
    """ddserve's `output` for OpenAI's `output_format` / `output_compression` (its compression
    level is ddserve's jpeg / webp quality, 100 = the least compression, OpenAI's default; png is
    lossless and has no level, so one sent with png is not applied)."""
    image_format = output_format or "png"
    output: dict[str, Any] = {"format": image_format, "return": "b64" if b64 else "url"}
    if image_format != "png":
        output["quality"] = max(1, output_compression if output_compression is not None else 100)
    return output


def generate_body(body: ImageGenerationBody, entry: ModelEntry, b64: bool) -> dict[str, Any]:
    """ddserve's `/generate` body for an OpenAI generation request on `entry`."""
    size = generation_size(body.size, entry)
    prompt, class_label = condition_of(body.prompt, body.class_label, entry)
    extras = body.model_dump(include=set(DdserveExtras.model_fields), exclude_none=True)
    extras.update(prompt=prompt, class_label=class_label)
    return {
        "model": entry.name,
        "n": body.n,
        **size,
        **{k: v for k, v in extras.items() if v is not None},
        "output": output_options(body.output_format, body.output_compression, b64),
    }
