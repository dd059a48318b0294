"""`GET /`: the playground page, and `GET /playground/{file}`: its script, style and test images.

Plain files from `service/static/` (no build step): `index.html`, `playground.js`,
`playground.css` and `samples/` (small test PNGs made by `scripts/make_playground_samples.py`,
since the gateway has no datasets). The page calls the contract's routes from the browser with the
API key the user types (kept in localStorage). These routes need no key — they serve the same
static files to everyone — and are left out of the OpenAPI document.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
}
# Revalidate every time (FileResponse sends ETag and Last-Modified): an upgraded gateway's page
# never runs with a stale script.
CACHE_CONTROL = "no-cache"

router = APIRouter(include_in_schema=False)


def static_file(relative: str) -> Path:
    """The file under STATIC_DIR named by `relative`, or a 404: no escape from the folder, only the
    known file types."""
    root = STATIC_DIR.resolve()
    candidate = (root / relative).resolve()
    if (
        not candidate.is_relative_to(root)
        or candidate.suffix not in MEDIA_TYPES
        or not candidate.is_file()
    ):
        raise ApiError(404, "not_found", f"no playground file {relative!r}")
    return candidate


def _file_response(path: Path) -> FileResponse:
    return FileResponse(
        path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": CACHE_CONTROL}
    )


@router.get("/")
async def playground_page() -> FileResponse:
    """The playground: generate, inpaint and autoencoder panels."""
    return _file_response(static_file("index.html"))


@router.get("/playground/{relative:path}")
async def playground_asset(relative: str) -> FileResponse:
    return _file_response(static_file(relative))
