"""`POST /generate`, `POST /inpaint` and `POST /img2img`: diffusion sampling jobs."""

from __future__ import annotations

from fastapi import APIRouter

from ddserve.jobs import JobKind
from ddserve.requests import GenerateBody, Img2ImgBody, InpaintBody
from service.normalize import RequestNormalizer
from service.routers.job_route import add_job_route

router = APIRouter(tags=["diffusion"])

add_job_route(
    router,
    JobKind.GENERATE,
    GenerateBody,
    RequestNormalizer.generate,
    summary="Sample images (DDPM / DDIM, guidance)",
    description="Queues a generation job and answers 202 with it (`Location: /jobs/{id}`).",
)
add_job_route(
    router,
    JobKind.INPAINT,
    InpaintBody,
    RequestNormalizer.inpaint,
    summary="Inpaint the masked region (RePaint)",
    description="Mask: white (255) = keep, black (0) = generate.",
)
add_job_route(
    router,
    JobKind.IMG2IMG,
    Img2ImgBody,
    RequestNormalizer.img2img,
    summary="Image-to-image (SDEdit)",
    description="The image is noised to the step where the last ⌊num_inference_steps·strength⌋ "
    "steps of the sampler's plan begin, then denoised (prompt, class and guidance as in "
    "`/generate`); it runs in the same batches as the other jobs of the model.",
)
