"""The request bodies of the job routes, built from the parameters of `ddserve.params`.

The gateway validates every `POST` against these models (their JSON schema is the OpenAPI document's),
the Python client builds its bodies through them (so a bad argument fails before it is sent) and the
`ddserve generate` options are derived from `GenerateBody`'s fields. Optional sampling fields left out
(or `null`) mean "the model's default" (the model's `defaults` in `GET /models`); the gateway fills
them in and the job's `input` shows the values used.

Types are strict: `"n": "4"` or `"n": true` is a 422, not a coercion. Unknown fields are refused.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ddserve.params import (
    DEFAULT_STRENGTH,
    MAX_IMAGES,
    ClassifierScale,
    ClassLabel,
    Eta,
    GuidanceScale,
    ImageCount,
    ImageFormat,
    ImageHeight,
    ImageList,
    ImagePng,
    ImageQuality,
    ImageWidth,
    InferenceSteps,
    JumpLength,
    JumpNSample,
    MaskPng,
    ModelName,
    NegativePrompt,
    NoiseAmount,
    NoiseKind,
    PreviewEvery,
    Prompt,
    ReturnMode,
    SamplerName,
    Seed,
    SolverOrder,
    Strength,
    Trajectory,
    UseKarrasSigmas,
    WebhookEventsFilter,
    WebhookUrl,
    description_of,
)

REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class Body(BaseModel):
    """A request body: strict, closed, and each optional field described by its parameter's own
    description (`ddserve.params`), which pydantic leaves inside `X | None`."""

    model_config = REQUEST_CONFIG

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        lifted = False
        for field in cls.model_fields.values():
            if field.description is None and (text := description_of(field.annotation)):
                field.description = text
                lifted = True
        if lifted:
            cls.model_rebuild(force=True)


class OutputOptions(Body):
    format: ImageFormat = "png"
    quality: ImageQuality | None = None
    return_: ReturnMode = Field("url", alias="return")
    trajectory: Trajectory = False
    preview_every: PreviewEvery | None = None

    @model_validator(mode="after")
    def _quality_is_lossy_formats_only(self) -> OutputOptions:
        if self.quality is not None and self.format == "png":
            raise ValueError("quality applies to jpeg and webp; png is lossless (leave it out)")
        return self


class JobBody(Body):
    """What every job-creating body has: the model, how its outputs come back, and the webhook
    its events go to (none by default)."""

    model: ModelName
    output: OutputOptions = Field(
        default_factory=OutputOptions, description="how the outputs are returned"
    )
    webhook: WebhookUrl | None = None
    webhook_events_filter: WebhookEventsFilter | None = None


class SamplingBody(JobBody):
    """What every denoising route's body has (`/generate`, `/img2img`, `/inpaint`): how many
    images, the sampler and its options, the condition and its guidance, and the seed."""

    n: ImageCount = 1
    sampler: SamplerName | None = None
    num_inference_steps: InferenceSteps | None = None
    eta: Eta | None = None
    use_karras_sigmas: UseKarrasSigmas | None = None
    solver_order: SolverOrder | None = None
    class_label: ClassLabel | None = None
    prompt: Prompt | None = None
    negative_prompt: NegativePrompt | None = None
    guidance_scale: GuidanceScale | None = None
    seed: Seed | None = None


class GenerateBody(SamplingBody):
    """`POST /generate`: sample n images from a diffusion model (or a VAE/AAE's prior)."""

    model_config = ConfigDict(
        **REQUEST_CONFIG,
        json_schema_extra={
            "examples": [
                {
                    "model": "digits-ddpm",
                    "n": 4,
                    "sampler": "ddim",
                    "num_inference_steps": 50,
                    "eta": 0.0,
                    "class_label": 7,
                    "guidance_scale": 4.0,
                    "seed": 1234,
                }
            ]
        },
    )

    classifier_scale: ClassifierScale | None = None
    height: ImageHeight | None = None
    width: ImageWidth | None = None


class InpaintBody(SamplingBody):
    """`POST /inpaint`: RePaint — fill the black (0) region of `mask` in `image`, n variations."""

    image: ImagePng
    mask: MaskPng
    jump_length: JumpLength | None = None
    jump_n_sample: JumpNSample | None = None
    # Inpainting UNets only (RePaint models refuse it); None: the pipeline's default, 1.
    strength: Strength | None = None


class Img2ImgBody(SamplingBody):
    """`POST /img2img` (SDEdit): noise `image` part of the way and denoise it again, n variations,
    steered by the prompt or class like `/generate`."""

    image: ImagePng
    strength: Strength = DEFAULT_STRENGTH
    classifier_scale: ClassifierScale | None = None


class EncodeBody(JobBody):
    """`POST /encode`: images → latents (or VQ code indices)."""

    images: ImageList


class DecodeBody(JobBody):
    """`POST /decode`: latents [n, *latent_shape] (or VQ code indices [n, *code_shape]) → images."""

    latents: list[Any] | None = Field(
        None,
        min_length=1,
        max_length=MAX_IMAGES,
        description="nested lists of numbers, [n, *latent_shape] of the model (`GET /models`), "
        "e.g. the `latents` of an encode job; for a VQ-VAE also [n, *code_shape] code indices; a "
        "model with a `size_multiple` f (an imported first stage) takes [n, c, h, w] of any h × w "
        "and makes f·h × f·w images",
    )
    codes: list[Any] | None = Field(
        None,
        min_length=1,
        max_length=MAX_IMAGES,
        description="VQ-VAE: [n, *code_shape] code indices (integers < codebook_size); with a "
        "`size_multiple` f, [n, h, w] of any h × w",
    )


class NoiseOptions(Body):
    kind: NoiseKind
    amount: NoiseAmount


class ReconstructBody(JobBody):
    """`POST /reconstruct`: images (optionally corrupted first) → encoder → decoder → images."""

    images: ImageList
    noise: NoiseOptions | None = Field(None, description="corrupt the inputs first (denoising)")
    seed: Seed | None = None
