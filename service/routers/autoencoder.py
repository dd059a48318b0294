"""`POST /encode`, `POST /decode`, `POST /reconstruct`: autoencoder jobs."""

from __future__ import annotations

from fastapi import APIRouter

from ddserve.jobs import JobKind
from ddserve.requests import DecodeBody, EncodeBody, ReconstructBody
from service.normalize import RequestNormalizer
from service.routers.job_route import add_job_route

router = APIRouter(tags=["autoencoders"])

add_job_route(
    router,
    JobKind.ENCODE,
    EncodeBody,
    RequestNormalizer.encode,
    summary="Images → latents (or VQ code indices)",
)
add_job_route(
    router,
    JobKind.DECODE,
    DecodeBody,
    RequestNormalizer.decode,
    summary="Latents (or VQ code indices) → images",
)
add_job_route(
    router,
    JobKind.RECONSTRUCT,
    ReconstructBody,
    RequestNormalizer.reconstruct,
    summary="Images (optionally corrupted first) → reconstructions",
)
