"""`GET /images/{key}`: the local backend's signed, expiring image links.

No API key is needed: the link's HMAC signature is the credential (see
`ddserve.storage.signing`). A bad, expired or tampered link and a missing image all answer 404, so a
link reveals nothing about other keys.
"""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Query
from fastapi.responses import Response

from ddserve.storage import InvalidKeyError, ObjectNotFoundError, content_type_for, validate_key
from service.dependencies import State
from service.errors import ApiError, ErrorBody

router = APIRouter(tags=["images"])


def _not_found() -> ApiError:
    return ApiError(404, "image_not_found", "no such image, or the link is invalid or expired")


@router.get(
    "/images/{key:path}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/gif": {}}, "description": "the image"},
        404: {"model": ErrorBody, "description": "bad, expired or unknown link"},
    },
    summary="An output image (signed link from a job's output)",
)
async def get_image(
    key: str,
    state: State,
    expires: Annotated[str | None, Query(description="Unix time the link expires")] = None,
    sig: Annotated[str | None, Query(description="HMAC-SHA256 signature of key and expiry")] = None,
) -> Response:
    storage = state.storage
    if not storage.serves_links:
        raise _not_found()  # S3 links point at the bucket, never here
    try:
        validate_key(key)
    except InvalidKeyError:
        raise _not_found() from None
    if not storage.verify_link(key, expires, sig):
        raise _not_found()
    try:
        data = await to_thread.run_sync(storage.get, key)
    except ObjectNotFoundError:
        raise _not_found() from None
    return Response(
        data,
        media_type=content_type_for(key),
        headers={"Cache-Control": "private, max-age=3600, immutable"},
    )
