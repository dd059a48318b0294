"""Every request parameter, declared once: its type, limits and description.

The HTTP bodies (`ddserve.requests`), the job specs the workers run (`ddserve.spec`), the Python
client's keyword arguments (checked against the bodies by a test) and the `ddserve generate` options
(derived from the bodies) all take their fields from the `Annotated` types below, so a parameter's
limit or wording changes here and nowhere else. Model-dependent limits (steps ≤ T, class_label <
number of classes, prompt words, image size) are checked against the model's card by the gateway
(`service.normalize`); per-model defaults come from the card's `defaults`, applied in one function
(`service.normalize.RequestNormalizer`).

Classifier-free guidance follows diffusers (Ho & Salimans 2022, eq. 6 written as diffusers does):

    ε̃(x_t, y) = ε(x_t, ∅) + s · (ε(x_t, y) − ε(x_t, ∅))

so `guidance_scale` s = 1 is the plain conditional model (no unconditional rows are computed) and
s = 7.5 means what it means in diffusers, A1111 and ComfyUI. The sampling library writes the same
rule as ε̃ = (1 + w)·ε_c − w·ε_∅ with w = s − 1 (`models.diffusion.guidance.guidance_weight`).

This module is torch-free: the gateway and the client import it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field
from pydantic.fields import FieldInfo

MAX_IMAGES = 16  # images one job may ask for (n, or the images of an encode/reconstruct)
MAX_SEED = 2**63 - MAX_IMAGES  # image i of a job uses seed + i, itself a valid seed
MAX_STEPS = 10_000
NO_GUIDANCE = 1.0  # guidance_scale s = 1: the conditional prediction alone
MAX_GUIDANCE = 21.0  # the first version allowed w ≤ 20, i.e. s ≤ 21
DEFAULT_STRENGTH = (
    0.8  # image-to-image: diffusers' img2img default (StableDiffusionImg2ImgPipeline)
)

# Every sampler of the library (models.diffusion.steps.SAMPLER_NAMES, checked by a test): DDPM and
# DDIM; Euler and Euler ancestral (Karras et al. 2022); DPM-Solver++(2M) and its SDE variant (Lu et
# al. 2022); UniPC-bh2 (Zhao et al. 2023). The multistep ones keep a history per sample and cannot
# take RePaint's forward jumps.
SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
REPAINT_SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral")  # those that take jump_n_sample > 1
# The σ-space samplers take `use_karras_sigmas`; the multistep ones (a history per sample) also take
# `solver_order` (models.diffusion.steps.SIGMA_SAMPLERS / MULTISTEP_SAMPLERS, checked by a test).
KARRAS_SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
ORDER_SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")

ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
        description="a model of `GET /models`",
        examples=["digits-ddpm"],
    ),
]
ImageCount = Annotated[int, Field(ge=1, le=MAX_IMAGES, description="number of images")]
Seed = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_SEED,
        description="noise seed; image i uses seed + i (each output reports its own), so one image "
        "of a batch is regenerated alone with n = 1 and its seed. Omitted: a random seed, reported "
        "in the job's input",
    ),
]
SamplerName = Annotated[
    Literal["ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc"],
    Field(
        description="ddpm (ancestral), ddim (strided, with eta), euler, euler_ancestral, dpmpp_2m "
        "(DPM-Solver++ 2M), dpmpp_2m_sde, unipc (UniPC-bh2): the few-step solvers reach DDIM-50's "
        "images in far fewer steps; omitted: the model's default"
    ),
]
InferenceSteps = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_STEPS,
        description="denoising steps, ≤ the model's T; omitted: the model's default",
    ),
]
Eta = Annotated[
    float, Field(ge=0.0, le=1.0, description="DDIM's η (0 = deterministic); omitted: default")
]
UseKarrasSigmas = Annotated[
    bool,
    Field(
        description="euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, unipc only: step through "
        "Karras et al. (2022) noise levels σ_i = (σ_max^(1/7) + i/(S−1)·(σ_min^(1/7) − "
        "σ_max^(1/7)))^7 instead of the spaced timesteps; omitted: the model's default (false)"
    ),
]
SolverOrder = Annotated[
    int,
    Field(
        ge=1,
        le=2,
        description="dpmpp_2m, dpmpp_2m_sde, unipc only: the multistep solver's order, 1 (the "
        "first-order DPM-Solver / UniPC step) or 2; omitted: the model's default (2)",
    ),
]
ClassLabel = Annotated[
    int,
    Field(
        ge=0, description="class index (< the model's number of classes); omitted: unconditional"
    ),
]
Prompt = Annotated[
    str,
    Field(
        min_length=1,
        max_length=256,
        description="words from the model's vocabulary (text-conditioned models), or any text for "
        "an imported text pipeline (its own CLIP or BERT tokenizer: past its 77 tokens the prompt "
        "is cut, as diffusers does); omitted: unconditional",
    ),
]
NegativePrompt = Annotated[
    str,
    Field(
        max_length=256,
        description="what to steer away from (text-conditioned models, as diffusers' "
        "negative_prompt): a prompt, read as `prompt` is, that replaces the empty prompt ∅ in "
        "classifier-free guidance, ε̃ = ε(x, t, n) + s·(ε(x, t, y) − ε(x, t, n)); needs a prompt "
        'and guidance_scale > 1 (refused otherwise, never ignored); "" is the empty prompt ∅ '
        "itself; omitted: ∅",
    ),
]
PromptTokens = Annotated[
    list[Annotated[int, Field(ge=0)]],
    Field(max_length=256, description="the prompt's token ids, padded to the context length"),
]
GuidanceScale = Annotated[
    float,
    Field(
        ge=NO_GUIDANCE,
        le=MAX_GUIDANCE,
        description="classifier-free guidance s, as in diffusers: ε̃ = ε(x, t, ∅) + "
        "s·(ε(x, t, y) − ε(x, t, ∅)); 1 = none; omitted: the model's default when a condition is "
        "given, else 1",
    ),
]
ClassifierScale = Annotated[
    float,
    Field(
        ge=0.0,
        le=100.0,
        description="classifier guidance s with the model's noisy classifier (needs class_label); "
        "0 = none; omitted: the model's default",
    ),
]
Strength = Annotated[
    float,
    Field(
        gt=0.0,
        le=1.0,
        description="image-to-image (SDEdit): how much of the sampler's schedule to re-run; the "
        "image is noised to the step where the last ⌊num_inference_steps·strength⌋ steps begin "
        "(diffusers' img2img arithmetic) and denoised from there, so small values keep the image "
        "and 1 ignores it (= generate with the same seed); at least one step must remain. "
        "/inpaint takes it on inpainting UNets only (diffusers' StableDiffusionInpaintPipeline "
        "strength; omitted: 1)",
    ),
]
JumpLength = Annotated[
    int, Field(ge=1, le=1000, description="RePaint's jump length j; omitted: default")
]
JumpNSample = Annotated[
    int, Field(ge=1, le=20, description="RePaint's resampling count r (1 = none); omitted: default")
]
# Per-request image size (`/generate`, OpenAI `size`): a model whose network is convolutional at any
# size (an imported diffusers pipeline) takes height and width that are multiples of its size
# multiple, f · 2^(D − 1) for a first stage of factor f (1 for pixels) and a UNet of D down blocks,
# up to `Settings.max_image_side` (its own size is always allowed); a zoo model only its own size.
# The bound here is the parameter's own; the gateway checks the model's multiple and the setting.
MAX_IMAGE_SIDE = 4096
ImageHeight = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_IMAGE_SIDE,
        description="height of the images in pixels: a multiple of the model's `size_multiple` "
        "(`GET /models`; 64 for Stable Diffusion 1.x: its first stage's factor 8 × 2^(down "
        "blocks − 1)), at most DDSERVE_MAX_IMAGE_SIDE (512 by default; the model's own height is "
        "always allowed); models without a `size_multiple` make only their own size; omitted: the "
        "model's own height",
    ),
]
ImageWidth = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_IMAGE_SIDE,
        description="width of the images in pixels, as height: a multiple of the model's "
        "`size_multiple`, at most DDSERVE_MAX_IMAGE_SIDE (512 by default; the model's own width is "
        "always allowed); omitted: the model's own width",
    ),
]
ImagePng = Annotated[
    str,
    Field(
        min_length=1,
        description="base64 PNG of the model's size (grayscale or RGB; alpha is composited on "
        "white); /inpaint and /img2img on a model with a `size_multiple` also take the sizes "
        "/generate's height and width take, and run at the image's size",
    ),
]
MaskPng = Annotated[
    str,
    Field(
        min_length=1,
        description="base64 PNG of the image's size: white (255) = keep, black (0) = generate",
    ),
]
ImageList = Annotated[
    list[ImagePng], Field(min_length=1, max_length=MAX_IMAGES, description="base64 PNGs")
]
NoiseKind = Annotated[
    Literal["gaussian", "masking", "salt_pepper"],
    Field(
        description="gaussian: x + σ·ε; masking: a fraction of pixels set to 0; salt_pepper: a "
        "fraction set to min or max"
    ),
]
NoiseAmount = Annotated[
    float,
    Field(ge=0.0, le=2.0, description="σ for gaussian (≤ 2); the pixel fraction (≤ 1) otherwise"),
]
ImageFormat = Annotated[
    Literal["png", "jpeg", "webp"],
    Field(description="image format of the outputs: png (lossless), jpeg or webp (lossy)"),
]
DEFAULT_IMAGE_QUALITY = 90  # jpeg / webp, when a request gives none
ImageQuality = Annotated[
    int,
    Field(
        ge=1,
        le=100,
        description=f"jpeg / webp quality, 1–100 (default {DEFAULT_IMAGE_QUALITY}); png is "
        "lossless and takes none",
    ),
]
ReturnMode = Annotated[
    Literal["url", "b64"],
    Field(description="url: signed, expiring links; b64: inline base64 PNG"),
]
Trajectory = Annotated[bool, Field(description="also return an animated GIF of x_t")]
MIN_PREVIEW_EVERY = 2  # the floor of preview_every: a preview costs a PNG (and a decode) per image
PreviewEvery = Annotated[
    int,
    Field(
        ge=MIN_PREVIEW_EVERY,
        le=MAX_STEPS,
        description=f"every k denoising steps, a small preview of x̂_0 per image on the job's "
        f"event stream (GET /jobs/{{id}}/events?preview=1); k ≥ {MIN_PREVIEW_EVERY}; omitted: none",
    ),
]

# Webhooks (Replicate's names): where to POST the job's events, and which of them. Checked by the
# gateway at submit (https, or http to an allowlisted host; the host's addresses public or
# allowlisted: `service.webhooks.addresses`) and again by the delivery worker before each attempt.
WEBHOOK_EVENTS = ("start", "progress", "completed")
MAX_WEBHOOK_URL = 2048
WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_WEBHOOK_URL,
        description="an https URL to POST the job's events to (Standard Webhooks: signed "
        "`webhook-id`, `webhook-timestamp`, `webhook-signature` headers; the body is the job as "
        "`GET /jobs/{id}` shows it, under `data`); http only for allowlisted hosts; private, "
        "loopback, link-local and metadata addresses are refused",
        examples=["https://example.com/ddserve-hook"],
    ),
]
WebhookEvent = Literal["start", "progress", "completed"]
WebhookEventsFilter = Annotated[
    list[WebhookEvent],
    Field(
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        description="which events to send to `webhook`: start (a worker took the job), progress "
        "(throttled), completed (succeeded, failed or canceled); omitted: all three",
    ),
]


def guidance_weight(scale: float) -> float:
    """The sampling library's classifier-free guidance weight w for the public scale s: w = s − 1
    (ε̃ = (1 + w)·ε_c − w·ε_∅ = ε_∅ + s·(ε_c − ε_∅)). The one place the two meet."""
    return scale - NO_GUIDANCE


def description_of(annotation: Any) -> str | None:
    """The description declared above for a parameter type, also when it is wrapped in
    `X | None` (an optional body field), where pydantic does not lift it to the field."""
    candidates = [annotation, *get_args(annotation)]
    for candidate in candidates:
        if get_origin(candidate) is Annotated:
            for meta in get_args(candidate)[1:]:
                if isinstance(meta, FieldInfo) and meta.description:
                    return meta.description
    return None


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a job seeded with `seed`: seed + index. Image i draws all its
    noise from the stream of its own seed (`models.diffusion.noise.sample_generator(seed + i, 0)`),
    so the same image comes out of a job of n = 1 with that seed, in any batch."""
    return seed + index
