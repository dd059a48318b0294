"""Request bodies of the contract's job routes, built from keyword arguments, and image uploads.

Optional fields left as `None` are left out of the body: the gateway then applies the model's
defaults (its `GET /models` entry) and the job's `input` shows the values used.

Images may be given as PNG (or any format Pillow reads) `bytes`, a file path, a `PIL.Image.Image`,
or a `numpy` uint8 array `[H, W]` / `[H, W, 3]`; they travel as base64 PNG. A mask for `/inpaint`
follows the contract: white (255) = keep, black (0) = generate; a boolean array means True = keep.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any, Literal

from ddserve.requests import GenerateBody, Img2ImgBody, InpaintBody, JobBody

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_FIELDS = ("image", "mask", "images")  # taken as any ImageInput, sent as base64 PNG

ImageInput = Any  # bytes | str | os.PathLike | PIL.Image.Image | numpy.ndarray
ReturnMode = Literal["url", "b64"]


def _png_bytes_of_array(array: Any) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(array)
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.dtype != np.uint8:
        raise TypeError(f"an image array must be uint8 (or bool for a mask), not {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3):
        raise ValueError(f"an image array must be [H, W] or [H, W, 3], not {list(pixels.shape)}")
    return _png_bytes_of_pil(Image.fromarray(pixels))


def _png_bytes_of_pil(picture: Any) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(image: ImageInput) -> bytes:
    """The PNG bytes of an image given in any of the accepted forms."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if data.startswith(PNG_SIGNATURE):
            return data
        from PIL import Image

        return _png_bytes_of_pil(Image.open(io.BytesIO(data)))
    if isinstance(image, str | os.PathLike):
        return png_bytes(Path(image).read_bytes())
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        return _png_bytes_of_pil(image)
    if hasattr(image, "__array__"):
        return _png_bytes_of_array(image)
    raise TypeError(
        f"cannot upload a {type(image).__name__} as an image: give PNG bytes, a path, a PIL "
        "image or a uint8 numpy array"
    )


def encode_image(image: ImageInput) -> str:
    """Base64 PNG of an image, as the job routes take it."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def _output(
    return_: ReturnMode, trajectory: bool = False, preview_every: int | None = None
) -> dict[str, Any]:
    output: dict[str, Any] = {"format": "png", "return": return_}
    if trajectory:
        output["trajectory"] = True
    if preview_every is not None:
        output["preview_every"] = preview_every
    return output


def _without_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _sampling_fields(body: type[JobBody], fields: dict[str, Any]) -> dict[str, Any]:
    """The request's own parameters (`ddserve.params`, as `body` declares them), passed through:
    a name the body does not have is a TypeError here, before anything is sent; values are checked
    by the gateway, whose errors name the field."""
    taken = set(body.model_fields) - {"model", "output", *IMAGE_FIELDS}
    unknown = sorted(set(fields) - taken)
    if unknown:
        raise TypeError(
            f"{body.__name__} has no field {', '.join(unknown)}; it takes {', '.join(sorted(taken))}"
        )
    return _without_none(fields)


def parameters_doc(body: type[JobBody]) -> str:
    """The body's parameters as a docstring section, from their declarations."""
    lines = ["", "Parameters (`ddserve.params`; omitted or None = the model's default):"]
    for name, field in body.model_fields.items():
        if name not in {"model", "output", *IMAGE_FIELDS}:
            lines.append(f"    {name}: {field.description}")
    return "\n".join(lines)


def generate_body(
    model: str,
    *,
    trajectory: bool = False,
    return_: ReturnMode = "url",
    preview_every: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """`POST /generate`; `fields` are `GenerateBody`'s parameters (n, sampler, guidance_scale, …);
    `preview_every` = k: x̂_0 previews every k steps on the job's event stream (`Client.stream`)."""
    return {
        "model": model,
        **_sampling_fields(GenerateBody, fields),
        "output": _output(return_, trajectory, preview_every),
    }


def inpaint_body(
    model: str,
    image: ImageInput,
    mask: ImageInput,
    *,
    return_: ReturnMode = "url",
    preview_every: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """`POST /inpaint` (RePaint): mask white (255) = keep, black (0) = generate; `fields` are
    `InpaintBody`'s parameters."""
    return {
        "model": model,
        "image": encode_image(image),
        "mask": encode_image(mask),
        **_sampling_fields(InpaintBody, fields),
        "output": _output(return_, preview_every=preview_every),
    }


def img2img_body(
    model: str,
    image: ImageInput,
    *,
    trajectory: bool = False,
    return_: ReturnMode = "url",
    **fields: Any,
) -> dict[str, Any]:
    """`POST /img2img` (SDEdit): `fields` are `Img2ImgBody`'s parameters (strength, prompt, …)."""
    return {
        "model": model,
        "image": encode_image(image),
        **_sampling_fields(Img2ImgBody, fields),
        "output": _output(return_, trajectory),
    }


def webhook_fields(webhook: str | None, events: list[str] | None) -> dict[str, Any]:
    """The job's webhook (`JobBody.webhook`, `webhook_events_filter`), when given."""
    return _without_none({"webhook": webhook, "webhook_events_filter": events})


def encode_body(
    model: str,
    images: list[ImageInput],
    *,
    return_: ReturnMode = "url",
    webhook: str | None = None,
    webhook_events_filter: list[str] | None = None,
) -> dict[str, Any]:
    """`POST /encode`: images → latents (or VQ code indices)."""
    return {
        "model": model,
        "images": [encode_image(i) for i in images],
        "output": _output(return_),
        **webhook_fields(webhook, webhook_events_filter),
    }


def decode_body(
    model: str,
    *,
    latents: list[Any] | None = None,
    codes: list[Any] | None = None,
    return_: ReturnMode = "url",
    webhook: str | None = None,
    webhook_events_filter: list[str] | None = None,
) -> dict[str, Any]:
    """`POST /decode`: latents [n, C, H, W] or VQ code indices [n, H, W] → images. Numpy arrays
    are accepted and sent as nested lists."""
    if (latents is None) == (codes is None):
        raise ValueError("give latents or codes (one of them)")

    def listed(value: Any) -> Any:
        return value.tolist() if hasattr(value, "tolist") else value

    return _without_none(
        {
            "model": model,
            "latents": None if latents is None else listed(latents),
            "codes": None if codes is None else listed(codes),
            "output": _output(return_),
            **webhook_fields(webhook, webhook_events_filter),
        }
    )


def reconstruct_body(
    model: str,
    images: list[ImageInput],
    *,
    noise: str | None = None,
    amount: float | None = None,
    seed: int | None = None,
    return_: ReturnMode = "url",
    webhook: str | None = None,
    webhook_events_filter: list[str] | None = None,
) -> dict[str, Any]:
    """`POST /reconstruct`: images (corrupted first when `noise` is gaussian, masking or
    salt_pepper, by `amount`) → encoder → decoder → images."""
    if noise is not None and amount is None:
        raise ValueError("noise needs an amount (σ for gaussian, a pixel fraction otherwise)")
    return _without_none(
        {
            "model": model,
            "images": [encode_image(i) for i in images],
            "noise": None if noise is None else {"kind": noise, "amount": amount},
            "seed": seed,
            "output": _output(return_),
            **webhook_fields(webhook, webhook_events_filter),
        }
    )
