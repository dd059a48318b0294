"""The per-request diffusers server that `bench_diffusers.py` compares ddserve with.

The obvious server a user would write around a diffusers pipeline: one FastAPI process holding the
pipeline, `POST /generate` with ddserve's body fields (`n`, `num_inference_steps`, `eta`, `prompt`,
`negative_prompt`, `guidance_scale`, `seed`), one `pipeline(...)` call per request, one request at
a time (a lock: a pipeline is not safe to call from two threads, and two calls at once on the same
cores only share them), the first image returned as PNG bytes. A request waits for the lock in
FastAPI's thread pool, so requests queue in arrival order (nearly: the lock is not fair).

    python -m benchmarks.diffusers_baseline --pipeline DIR --port PORT [--threads 1]

Not part of the service: a benchmark's reference point only (it never imports `service/`).
"""

from __future__ import annotations

import argparse
import io
import threading
from pathlib import Path
from typing import Any

import torch
from fastapi import Body, FastAPI
from fastapi.responses import Response


def pipeline_call(pipe: Any, body: dict[str, Any]) -> Any:
    """The PIL image of one request: the pipeline called with the body's parameters, seeded by
    `seed` (a text pipeline: prompt, negative prompt and guidance scale s, diffusers' own)."""
    generator = torch.Generator().manual_seed(int(body.get("seed", 0)))
    common = {
        "num_inference_steps": int(body["num_inference_steps"]),
        "eta": float(body.get("eta", 0.0)),
        "generator": generator,
        "output_type": "pil",
    }
    if "prompt" in body:  # StableDiffusionPipeline
        result = pipe(
            prompt=body["prompt"],
            negative_prompt=body.get("negative_prompt"),
            guidance_scale=float(body.get("guidance_scale", 7.5)),
            num_images_per_prompt=int(body.get("n", 1)),
            **common,
        )
    else:  # DDIMPipeline
        result = pipe(batch_size=int(body.get("n", 1)), **common)
    return result.images[0]


def create_app(folder: Path) -> FastAPI:
    """The server of the pipeline saved in `folder` (loaded once, fp32 on the CPU)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()
    app = FastAPI(title="per-request diffusers server")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate")
    def generate(body: dict[str, Any] = Body(...)) -> Response:  # noqa: B008 (FastAPI's idiom)
        # A sync route runs in the thread pool; the lock makes it one pipeline call at a time.
        with lock, torch.inference_mode():
            image = pipeline_call(pipe, body)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", type=Path, required=True, help="a saved diffusers pipeline")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import uvicorn

    uvicorn.run(create_app(args.pipeline), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
