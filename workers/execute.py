"""From a job spec to images: the job function and the pieces the engine shares with it.

`run_job(request)` is `ddserve.jobs.JOB_FUNCTION`: a plain RQ worker can run it, and it runs a job
alone (the reference the batching engine must reproduce). Every piece takes the job's parsed spec
(`ddserve.spec`: typed, every default already applied by the gateway); the checks here are the
ones only the loaded model can make. The engine uses the same pieces:
- `prepare_denoise(spec, model, job_id)` turns a generate/inpaint/img2img spec into `Sample`s — image i
  draws all its noise from the stream of its own seed, `image_seed(seed, i)` = seed + i, so its
  pixels do not depend on its batch, and a job of n = 1 with that seed gives the same image; its
  slow parts, the text encoder's rows and the first stage's latents (`encode_inputs`), may be
  computed beforehand on another thread and handed to it (the engine's prepare thread);
- `DenoiseWork.store(...)` writes each image as soon as its sample finishes (latents are decoded
  first; `write_images` is the same write for another thread), and `DenoiseWork.complete(...)`
  builds the `JobOutput` (plus the trajectory GIF);
- `prepare_codec(...)` and `run_codec_calls(model, calls)` run the encode / decode / reconstruct
  jobs of a round in one ONNX Runtime call per kind of input; `run_codec(...)` runs one alone.
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddserve.job_events import PREVIEW_MAX_SIDE
from ddserve.jobs import ImageRecord, JobKind, JobOutput
from ddserve.params import DEFAULT_IMAGE_QUALITY, guidance_weight, image_seed
from ddserve.requests import NoiseOptions, OutputOptions
from ddserve.settings import Settings
from ddserve.spec import (
    DecodeSpec,
    DenoiseSpec,
    EncodeSpec,
    GenerateSpec,
    Img2ImgSpec,
    InpaintSpec,
    JobSpec,
    PriorSampleSpec,
    ReconstructSpec,
    parse_job_spec,
)
from ddserve.storage import Storage, content_type_for, image_key, trajectory_key
from models.diffusion.inpainting_unet import ImagePosterior, MaskedImageLatents
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import Sample, SamplerSettings
from models.imaging import from_uint8, make_grid, to_pil
from workers.errors import InvalidJobRequest
from workers.model_pool import CodecModel, DiffusionModel, ModelPool

DENOISE_KINDS = frozenset({JobKind.GENERATE, JobKind.INPAINT, JobKind.IMG2IMG})
MAX_TRAJECTORY_FRAMES = 32
MIN_GIF_WIDTH = 128  # small images are upscaled (nearest) so the animation is visible
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def image_generator(seed: int, index: int) -> torch.Generator:
    """The noise stream of image `index` of a job seeded with `seed` (`ddserve.params.image_seed`)."""
    return sample_generator(image_seed(seed, index), 0)


# --- images in and out ------------------------------------------------------------------------
def decode_image(data: str, channels: int, height: int, width: int, field_name: str) -> np.ndarray:
    """A base64 PNG → [H, W, C] uint8 with the model's channel count; InvalidJobRequest if not."""
    try:
        raw = base64.b64decode(data, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError, OSError) as exc:
        raise InvalidJobRequest(f"{field_name}: not a base64-encoded image ({exc})") from exc
    if image.size != (width, height):
        raise InvalidJobRequest(
            f"{field_name}: image is {image.size[0]}×{image.size[1]}, the model needs {width}×{height}"
        )
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def decode_images(
    items: list[str], channels: int, height: int, width: int, field_name: str
) -> torch.Tensor:
    """Base64 PNGs → [N, C, H, W] float32 in [−1, 1]."""
    if not items:
        raise InvalidJobRequest(f"{field_name}: at least one image is needed")
    pixels = np.stack(
        [
            decode_image(item, channels, height, width, f"{field_name}[{i}]")
            for i, item in enumerate(items)
        ]
    )
    return from_uint8(pixels)


def encode_image(
    image: torch.Tensor, image_format: str = "png", quality: int | None = None
) -> bytes:
    """[C, H, W] in [−1, 1] → PNG (lossless), JPEG or WebP bytes (lossy, at `quality`, 1–100,
    default `DEFAULT_IMAGE_QUALITY`)."""
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if image_format != "png":
        options["quality"] = quality if quality is not None else DEFAULT_IMAGE_QUALITY
    to_pil(image).save(buffer, format=IMAGE_FORMATS[image_format], **options)
    return buffer.getvalue()


def preview_png(image: torch.Tensor) -> str:
    """[C, H, W] in [−1, 1] → base64 PNG whose longest side is at most PREVIEW_MAX_SIDE (box-
    filtered down; a smaller image keeps its size): a live preview of x̂_0 for the SSE stream."""
    picture = to_pil(image.clamp(-1.0, 1.0))
    side = max(picture.width, picture.height)
    if side > PREVIEW_MAX_SIDE:
        scale = PREVIEW_MAX_SIDE / side
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.BOX)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def trajectory_gif(frames: list[torch.Tensor], duration_ms: int = 60) -> bytes:
    """Frames [n, C, H, W] in [−1, 1] (one per kept step) → an animated GIF of their grids."""
    pictures = []
    for frame in frames:
        picture = to_pil(make_grid(frame.clamp(-1.0, 1.0)))
        if picture.width < MIN_GIF_WIDTH:
            scale = -(-MIN_GIF_WIDTH // picture.width)
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
        pictures.append(picture)
    buffer = io.BytesIO()
    durations = [duration_ms] * (len(pictures) - 1) + [1000]
    pictures[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=pictures[1:],
        duration=durations,
        loop=0,
    )
    return buffer.getvalue()


def _frame_indices(count: int, limit: int) -> list[int]:
    """At most `limit` indices spread over range(count), always the first and the last."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


@dataclass(frozen=True)
class OutputSpec:
    image_format: str = "png"
    quality: int | None = None  # jpeg / webp only
    return_b64: bool = False
    trajectory: bool = False
    preview_every: int | None = None  # steps between x̂_0 previews on the job's event stream

    @classmethod
    def from_options(cls, output: OutputOptions) -> OutputSpec:
        return cls(
            output.format,
            output.quality,
            output.return_ == "b64",
            output.trajectory,
            output.preview_every,
        )


def store_image(
    storage: Storage,
    job_id: str,
    index: int,
    image: torch.Tensor,  # [C, H, W] in [−1, 1]
    spec: OutputSpec,
    seed: int | None,
) -> ImageRecord:
    """Write one output image and describe it for the job's output."""
    data = encode_image(image, spec.image_format, spec.quality)
    key = image_key(job_id, index, spec.image_format)
    storage.put(key, data, content_type_for(key))
    record: ImageRecord = {
        "key": key,
        "width": int(image.shape[-1]),
        "height": int(image.shape[-2]),
        "seed": seed,
    }
    if spec.return_b64:
        record["b64"] = base64.b64encode(data).decode("ascii")
    return record


# --- denoising jobs (generate, inpaint) -------------------------------------------------------
@dataclass
class DenoiseWork:
    """The samples of one generate/inpaint job and what has come out of them so far."""

    job_id: str
    kind: JobKind
    model: DiffusionModel
    samples: list[Sample]  # tag = image index
    seed: int
    spec: OutputSpec
    steps_per_image: int  # network calls one image needs (RePaint's resampling included)
    records: dict[int, ImageRecord] = field(default_factory=dict)
    sample_shape: tuple[int, int, int] | None = None  # x_t's (C, h, w); None: the model's own

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def done(self) -> bool:
        return len(self.records) == self.n

    def store(self, finished: list[Sample], pixels: torch.Tensor, storage: Storage) -> None:
        """Write the images of finished samples (pixels [k, C, H, W] in [−1, 1], same order)."""
        self.records.update(self.write_images(finished, pixels, storage))

    def write_images(
        self, finished: list[Sample], pixels: torch.Tensor, storage: Storage
    ) -> dict[int, ImageRecord]:
        """Encode and write the images of finished samples; return their records by image index
        without adding them to the work, so that it can run on another thread (the engine's
        store threads) while the samples' job goes on."""
        return {
            int(sample.tag): store_image(
                storage,
                self.job_id,
                int(sample.tag),
                image,
                self.spec,
                image_seed(self.seed, int(sample.tag)),
            )
            for sample, image in zip(finished, pixels, strict=True)
        }

    def complete(self, storage: Storage) -> JobOutput:
        """The job's output once every image is stored (and the trajectory GIF when asked for)."""
        if not self.done:
            raise RuntimeError(f"job {self.job_id}: {self.n - len(self.records)} images unfinished")
        output: JobOutput = {
            "images": [self.records[i] for i in range(self.n)],
            "latents": None,
            "trajectory_key": None,
        }
        if self.spec.trajectory:
            output["trajectory_key"] = self._store_trajectory(storage)
        return output

    def _store_trajectory(self, storage: Storage) -> str:
        steps = len(self.samples[0].trajectory)
        frames = []
        for step in _frame_indices(steps, MAX_TRAJECTORY_FRAMES):
            x_t = torch.stack(
                [s.trajectory[min(step, len(s.trajectory) - 1)] for s in self.samples]
            )
            frames.append(self.model.to_pixels(x_t) if self.model.is_latent else x_t)
        key = trajectory_key(self.job_id)
        storage.put(key, trajectory_gif(frames), content_type_for(key))
        return key


def text_prompts(spec: JobSpec, model: DiffusionModel) -> list[str] | None:
    """The texts the model's own text encoder (`DiffusionModel.prompt_encoder`) turns into this
    spec's rows: its prompt, then its negative prompt if any; None when the model has no text
    encoder or the spec gives no prompt (a class label, ∅, or a spec `prepare_denoise` refuses)."""
    encoder = model.prompt_encoder
    if encoder is None or not isinstance(spec, GenerateSpec | InpaintSpec | Img2ImgSpec):
        return None
    if spec.class_label is not None or spec.prompt is None:
        return None
    prompts = [spec.prompt]
    if spec.negative_prompt is not None:
        prompts.append(spec.negative_prompt)
    return prompts


@dataclass(frozen=True)
class ImageInputs:
    """An inpaint or img2img spec's image where the model samples (`image_inputs`); all None for
    a generate spec."""

    known: torch.Tensor | None = None  # inpaint: the known image x_0 [*sample_shape]
    mask: torch.Tensor | None = None  # inpaint: 1 = keep, [1, h, w] on the sample's grid
    init_x0: torch.Tensor | None = None  # img2img: the x_0 its samples start from
    # inpaint on an inpainting UNet with strength < 1: the whole image's posterior, each sample's
    # x_0 drawn from it (`models.diffusion.inpainting_unet`)
    init_posterior: ImagePosterior | None = None
    # inpaint on an inpainting UNet (`DiffusionModel.inpainting_unet`): what it reads beside x_t,
    # in place of RePaint's known image and mask
    masked_image: MaskedImageLatents | None = None


@dataclass(frozen=True)
class EncodedInputs:
    """What a model's encoders make of a spec's inputs (`encode_inputs`): the text encoder's rows
    and the first stage's latents, the slow parts of `prepare_denoise` (a CLIP forward, a VAE
    encode: hundreds of ms each on a CPU at SD's sizes), which the engine runs on its prepare
    thread while the running set steps."""

    prompt_rows: list[torch.Tensor] | None  # the rows [L, D] of `text_prompts(spec, model)`
    images: ImageInputs


# Where `prepare_denoise` reads a spec's encoded inputs: a call that returns them or raises the
# error their encoding raised (the engine's prepare thread: its future's result).
EncodedSource = Callable[[], EncodedInputs]


def encodes_image(spec: JobSpec, model: DiffusionModel) -> bool:
    """Whether preparing the spec runs the first stage's encoder: an inpaint or img2img spec on a
    latent model (a pixel-space model takes the decoded image as it is)."""
    return model.is_latent and isinstance(spec, InpaintSpec | Img2ImgSpec)


def encode_inputs(spec: JobSpec, model: DiffusionModel) -> EncodedInputs:
    """The spec's prompt rows (the model's prompt encoder and its cache), then its image inputs,
    computed as `prepare_denoise` computes them inline and in that order: the first error raised
    is the one the inline path would raise (it reads the prompt rows first, the images next)."""
    prompts = text_prompts(spec, model)
    encoder = model.prompt_encoder
    rows = encoder.rows(prompts) if prompts is not None and encoder is not None else None
    return EncodedInputs(rows, image_inputs(spec, model))


def _conditions(
    spec: DenoiseSpec, model: DiffusionModel, encoded: EncodedSource | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The sample's conditioning row and unconditional row (None: the model's ∅).

    A model with its own text encoder (`DiffusionModel.prompt_encoder`, diffusers text pipelines)
    encodes the prompt and the negative prompt (`text_prompts`) here — one text-encoder call for
    those its cache lacks — or takes their rows from `encoded` (the engine's prepare thread
    encoded them: it returns that call's rows, or raises its error); the rows are [L, D] hidden
    states. Otherwise the rows are the class id or the token ids the gateway wrote into the
    spec."""
    prompts = text_prompts(spec, model)
    if prompts is not None and model.prompt_encoder is not None:
        rows = encoded().prompt_rows if encoded is not None else model.prompt_encoder.rows(prompts)
        if rows is None or len(rows) != len(prompts):
            raise ValueError(f"{len(rows or [])} prompt rows for the spec's {len(prompts)} prompts")
        return rows[0], rows[1] if len(rows) > 1 else None  # [L, D] each
    return _condition(spec, model), _uncondition(spec, model)


def _condition(spec: DenoiseSpec, model: DiffusionModel) -> torch.Tensor | None:
    """The conditioning row of a spec: a class id, the prompt's token ids, or None (∅)."""
    conditioning = model.entry.conditioning
    if spec.class_label is None and spec.prompt is None:
        if conditioning is not None and not conditioning.has_null:
            raise InvalidJobRequest(f"model {model.name!r} needs a class_label (it has no ∅ class)")
        return None
    if conditioning is None:
        raise InvalidJobRequest(f"model {model.name!r} is unconditional")
    if conditioning.type == "class":
        if spec.prompt is not None:
            raise InvalidJobRequest(f"model {model.name!r} takes class_label, not prompt")
        classes = conditioning.classes or []
        if spec.class_label is None or not 0 <= spec.class_label < len(classes):
            raise InvalidJobRequest(
                f"class_label must be in [0, {len(classes) - 1}], got {spec.class_label}"
            )
        return torch.tensor(spec.class_label, dtype=torch.long)
    if spec.prompt is None:
        raise InvalidJobRequest(f"model {model.name!r} takes prompt, not class_label")
    if spec.prompt_tokens is None:
        raise InvalidJobRequest(
            f"model {model.name!r} reads the prompt's prompt_tokens (tokenized by the gateway)"
        )
    return _token_row(spec.prompt_tokens, model, "prompt_tokens")


def _token_row(tokens: list[int], model: DiffusionModel, name: str) -> torch.Tensor:
    """A prompt's token ids (tokenized by the gateway) as a conditioning row [L], checked against
    the model's vocabulary and ∅'s length."""
    conditioning = model.entry.conditioning
    vocabulary = len(conditioning.vocabulary or []) if conditioning is not None else 0
    if any(token >= vocabulary for token in tokens):
        raise InvalidJobRequest(f"{name} must be < {vocabulary} (the vocabulary's size)")
    null = model.null_condition
    if null is not None and len(tokens) != null.shape[0]:
        raise InvalidJobRequest(f"{name} must hold {null.shape[0]} tokens, got {len(tokens)}")
    return torch.tensor(tokens, dtype=torch.long)


def _uncondition(spec: DenoiseSpec, model: DiffusionModel) -> torch.Tensor | None:
    """The unconditional row of classifier-free guidance: the negative prompt's tokens, or None
    (the model's ∅). The spec already ties it to a prompt and guidance_scale > 1."""
    if spec.negative_prompt is None:
        return None
    if spec.negative_prompt_tokens is None:
        raise InvalidJobRequest(
            f"model {model.name!r} reads the negative prompt's negative_prompt_tokens"
        )
    conditioning = model.entry.conditioning
    if conditioning is None or conditioning.type != "text":
        raise InvalidJobRequest(f"model {model.name!r} takes no negative_prompt")
    return _token_row(spec.negative_prompt_tokens, model, "negative_prompt_tokens")


def _sampler_settings(spec: DenoiseSpec, model: DiffusionModel) -> SamplerSettings:
    T = model.schedule.num_timesteps
    if spec.num_inference_steps > T:
        raise InvalidJobRequest(
            f"num_inference_steps must be in [1, {T}], got {spec.num_inference_steps}"
        )
    if model.entry.samplers and spec.sampler not in model.entry.samplers:
        raise InvalidJobRequest(
            f"sampler {spec.sampler!r} not offered; use one of {model.entry.samplers}"
        )
    if spec.guided and model.null_condition is None:
        raise InvalidJobRequest(f"model {model.name!r} is unconditional: guidance_scale must be 1")
    guided_by_classifier = isinstance(spec, GenerateSpec | Img2ImgSpec)
    classifier_scale = spec.classifier_scale if guided_by_classifier else 0.0
    if classifier_scale != 0.0 and model.classifier is None:
        raise InvalidJobRequest(f"model {model.name!r} has no classifier for classifier_scale")
    inpaint = isinstance(spec, InpaintSpec)
    request: dict[str, Any] = dict(
        eta=spec.eta,
        guidance_scale=guidance_weight(spec.guidance_scale),
        classifier_scale=classifier_scale,
        jump_length=spec.jump_length if inpaint else 1,
        jump_n_sample=spec.jump_n_sample if inpaint else 1,
        strength=_strength(spec),
    )
    # The solver options are present exactly for the samplers that take them (the spec checks).
    for name, value in (
        ("use_karras_sigmas", spec.use_karras_sigmas),
        ("solver_order", spec.solver_order),
    ):
        if value is not None:
            request[name] = value
    if not model.scheduler.from_diffusers:
        # A zoo model's card decides clipping (resolved into the spec by the gateway); a diffusers
        # config decides it per sampler class (`SchedulerOptions.settings`).
        request["clip_denoised"] = spec.clip_denoised
    try:
        return model.scheduler.settings(spec.sampler, spec.num_inference_steps, **request)
    except ValueError as exc:
        raise InvalidJobRequest(str(exc)) from exc


def _strength(spec: DenoiseSpec) -> float:
    """The tail of the plan a spec's samples walk: img2img's strength, an inpaint spec's (an
    inpainting UNet's; None: the pipeline's default 1), else 1 (the whole plan)."""
    if isinstance(spec, Img2ImgSpec | InpaintSpec) and spec.strength is not None:
        return spec.strength
    return 1.0


def _inpaint_inputs(spec: InpaintSpec, model: DiffusionModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The known image and the mask (1 = keep, white in the PNG) where the model samples: pixels
    [C, H, W] in [−1, 1] and [1, H, W]; for a latent model the image's latents z_0 = s·(E(x) − b)
    [c, h, w] and the mask on the latent grid [1, h, w] (`latent_mask`)."""
    channels, (height, width) = model.entry.image.channels, image_size(spec, model)
    known = decode_images([spec.image], channels, height, width, "image")[0]
    mask_pixels = decode_image(spec.mask, 1, height, width, "mask")
    mask = torch.from_numpy((mask_pixels[..., 0] >= 128).astype(np.float32))[None]  # [1, H, W]
    if not model.is_latent:
        return known, mask
    latents = model.from_pixels(known[None])[0]  # [c, h, w]
    return latents, latent_mask(mask, tuple(latents.shape[-2:]))


def latent_mask(mask: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """A pixel mask [1, H, W] (1 = keep) on a latent grid [1, h, w]: a latent position is kept only
    if every pixel of its f×f patch is (f = H / h, a min-pool), so everything asked to be
    generated is, and the kept region shrinks to whole patches — a pixel edge within a patch is
    generated too, and RePaint's known-region replacement acts at patch resolution."""
    h, w = grid
    factor_h, factor_w = mask.shape[-2] // h, mask.shape[-1] // w
    pooled = -torch.nn.functional.max_pool2d(-mask[None], (factor_h, factor_w))  # [1, 1, h, w]
    return pooled[0]


def _img2img_input(spec: Img2ImgSpec, model: DiffusionModel) -> torch.Tensor:
    """The x_0 an image-to-image sample starts from, [*sample_shape]: the image in [−1, 1], or
    for latent diffusion its latents through the first stage (`DiffusionModel.from_pixels`)."""
    channels, (height, width) = model.entry.image.channels, image_size(spec, model)
    pixels = decode_images([spec.image], channels, height, width, "image")
    return model.from_pixels(pixels)[0]


def _inpainting_unet_inputs(spec: InpaintSpec, model: DiffusionModel) -> ImageInputs:
    """An inpainting UNet's mask and masked image (`models.diffusion.inpainting_unet`): the image
    [C, H, W] in [−1, 1] with the region to generate (black in ddserve's mask, 1 in the
    pipeline's) blanked, through the first stage's posterior; with strength < 1 also the whole
    image's posterior, where its samples start."""
    channels, (height, width) = model.entry.image.channels, image_size(spec, model)
    image = decode_images([spec.image], channels, height, width, "image")[0]
    mask_pixels = decode_image(spec.mask, 1, height, width, "mask")
    keep = torch.from_numpy((mask_pixels[..., 0] >= 128).astype(np.float32))[None]  # [1, H, W]
    start = model.image_posterior(image) if _strength(spec) != 1.0 else None
    return ImageInputs(masked_image=model.masked_image_latents(image, keep), init_posterior=start)


def image_inputs(spec: JobSpec, model: DiffusionModel) -> ImageInputs:
    """The spec's image where the model samples: inpaint's known image and mask (an inpainting
    UNet's masked image), img2img's x_0 (for a latent model through the first stage's encoder);
    none for a generate spec."""
    if isinstance(spec, InpaintSpec) and model.inpainting_unet:
        return _inpainting_unet_inputs(spec, model)
    if isinstance(spec, InpaintSpec):
        known, mask = _inpaint_inputs(spec, model)
        return ImageInputs(known=known, mask=mask)
    if isinstance(spec, Img2ImgSpec):
        return ImageInputs(init_x0=_img2img_input(spec, model))
    return ImageInputs()


def _png_size(data: str) -> tuple[int, int]:
    """(height, width) of a base64 image, from its header (nothing decoded but the base64)."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            return image.height, image.width
    except (binascii.Error, ValueError, OSError) as exc:
        raise InvalidJobRequest(f"image: not a base64-encoded image ({exc})") from exc


def image_size(spec: JobSpec, model: DiffusionModel) -> tuple[int, int]:
    """(height, width) of a denoising job's images: a generate spec's own, an inpaint or img2img
    spec's input image's, else the model's. The
    gateway checked it against the catalog; a worker whose model cannot make it (another card
    than the gateway's, a spec from elsewhere) fails the job, never the running set."""
    own = model.image_size
    if isinstance(spec, InpaintSpec | Img2ImgSpec):
        size = _png_size(spec.image)  # an input image sets the size (the gateway checked it)
    elif isinstance(spec, GenerateSpec) and spec.height is not None and spec.width is not None:
        size = (spec.height, spec.width)
    else:
        return own
    multiple = model.entry.size_multiple
    if size != own and (multiple is None or size[0] % multiple or size[1] % multiple):
        allowed = f"multiples of {multiple}" if multiple else f"{own[1]}×{own[0]} only"
        raise InvalidJobRequest(
            f"model {model.name!r} cannot make {size[1]}×{size[0]} images ({allowed})"
        )
    return size


def prepare_denoise(
    spec: JobSpec,
    model: DiffusionModel,
    job_id: str,
    encoded: EncodedSource | None = None,
) -> DenoiseWork:
    """The samples of a generate/inpaint/img2img spec; image i draws from the stream of seed + i.
    `encoded`: where the spec's prompt rows and image inputs come from (`encode_inputs`, run on
    the engine's prepare thread); None: encoded here (the prompt encoder's cache, the first stage).
    Either way the checks run in one order (the spec, then its prompts, then its image), so a
    spec fails with the same error."""
    if not isinstance(spec, GenerateSpec | InpaintSpec | Img2ImgSpec):
        raise InvalidJobRequest(
            f"model {model.name!r} serves generate/inpaint/img2img, not {spec.kind}"
        )
    if model.inpainting_unet:
        _check_inpainting_unet_spec(spec, model)
    elif isinstance(spec, InpaintSpec) and spec.strength is not None:
        raise InvalidJobRequest(
            f"model {model.name!r} inpaints with RePaint: strength applies to inpainting UNets only"
        )
    output = OutputSpec.from_options(spec.output)
    shape = model.sample_shape_at(*image_size(spec, model))  # before any text encoding
    settings = _sampler_settings(spec, model)
    # inpainting may be conditional (and guided) too
    cond, uncond = _conditions(spec, model, encoded)
    images = encoded().images if encoded is not None else image_inputs(spec, model)
    samples = [
        Sample(
            settings=settings,
            generator=image_generator(spec.seed, i),
            cond=cond,
            uncond=uncond,
            class_label=spec.class_label,
            known=images.known,
            mask=images.mask,
            init_x0=images.init_x0,
            init_posterior=images.init_posterior,
            masked_image=images.masked_image,
            keep_trajectory=output.trajectory,
            keep_x0=output.preview_every is not None,
            tag=i,
        )
        for i in range(spec.n)
    ]
    # Counted once per job, from the shared plan: progress reports it every few steps, and
    # counting a 1000-step plan each time cost about 1 % of a saturated worker's time.
    plan = model.plan_cache.transitions(settings)
    steps = sum(1 for transition in plan if transition.is_reverse)
    return DenoiseWork(
        job_id, JobKind(spec.kind), model, samples, spec.seed, output, steps, sample_shape=shape
    )


def _check_inpainting_unet_spec(spec: DenoiseSpec, model: DiffusionModel) -> None:
    """An inpainting UNet only inpaints, by itself (the gateway refuses the rest first)."""
    if not isinstance(spec, InpaintSpec):
        raise InvalidJobRequest(
            f"model {model.name!r} has an inpainting UNet: it serves inpaint, not {spec.kind}"
        )
    if spec.jump_n_sample > 1:
        raise InvalidJobRequest(
            f"model {model.name!r} inpaints with its own UNet, not RePaint: jump_n_sample must be 1"
        )


# --- autoencoder jobs (encode, decode, reconstruct) -------------------------------------------
def _corrupt(
    images: torch.Tensor,  # [N, C, H, W]
    noise: NoiseOptions,
    seed: int,
) -> torch.Tensor:
    """The denoising autoencoder's input corruption; image i draws from the stream of seed + i."""
    from models.autoencoders import corrupt

    try:
        return torch.cat(
            [
                corrupt(images[i : i + 1], noise.kind, noise.amount, image_generator(seed, i))
                for i in range(images.shape[0])
            ]
        )
    except ValueError as exc:
        raise InvalidJobRequest(f"noise: {exc}") from exc


def _prior_sample(
    spec: PriorSampleSpec, model: CodecModel, job_id: str, storage: Storage
) -> JobOutput:
    """`generate` on a VAE or AAE: image i decodes z_i ~ N(0, I) of the latent shape, drawn from
    the stream of seed + i (so the same seed gives the same images in any batch)."""
    shape = model.entry.latent_shape
    if not shape:
        raise InvalidJobRequest(f"model {model.name!r} has no latent prior to sample")
    if spec.class_label is not None:
        raise InvalidJobRequest(f"model {model.name!r} is not class-conditional")
    z = torch.stack(
        [torch.randn(tuple(shape), generator=image_generator(spec.seed, i)) for i in range(spec.n)]
    )  # [n, *latent_shape]
    decoded = model.codec.decode(latents=z.numpy())
    pixels = torch.from_numpy(np.asarray(decoded, dtype=np.float32))  # [n, C, H, W]
    output = OutputSpec.from_options(spec.output)
    records = [
        store_image(storage, job_id, i, img, output, image_seed(spec.seed, i))
        for i, img in enumerate(pixels)
    ]
    return {"images": records, "latents": None}


@dataclass
class CodecCall:
    """One job's share of a batched autoencoder call: the codec method and input it needs, its
    rows, and how its output is built from its rows of the result (`run_codec_calls`)."""

    method: str  # "encode" | "decode" | "reconstruct"
    argument: str  # "images" | "latents" | "codes"
    rows: np.ndarray  # [n, ...] this job's inputs
    finish: Callable[[Any], JobOutput]  # this job's slice of the result → its JobOutput

    @property
    def group(self) -> tuple[str, str, tuple[int, ...]]:
        """Calls that can share one network call: same method, same input, same row shape (an
        imported first stage takes images and latents of many sizes; rows of different sizes
        cannot share a tensor, so each size in a round gets a call of its own)."""
        return self.method, self.argument, tuple(self.rows.shape[1:])


def prepare_codec(spec: JobSpec, model: CodecModel, job_id: str, storage: Storage) -> CodecCall:
    """encode: images → latents (and VQ codes); decode: latents or codes → images; reconstruct:
    images (optionally corrupted first, for denoising autoencoders) → reconstructions. Input errors
    raise here, for this job alone."""
    image = model.entry.image
    output_spec = OutputSpec.from_options(spec.output)

    def input_images(items: list[str]) -> torch.Tensor:
        """[n, C, H, W] in [−1, 1]: the model's own H × W, or for a first stage that takes other
        sizes (`size_multiple` = its factor f) the images' own, one size per job."""
        height, width = codec_image_size(items, model)
        return decode_images(items, image.channels, height, width, "images")

    def store_all(pixels: np.ndarray, start: int = 0) -> list[ImageRecord]:
        tensor = torch.from_numpy(np.asarray(pixels, dtype=np.float32))
        return [
            store_image(storage, job_id, i, img, output_spec, None)
            for i, img in enumerate(tensor, start=start)
        ]

    if isinstance(spec, EncodeSpec):
        x = input_images(spec.images)

        def encoded_output(encoded: dict[str, np.ndarray | None]) -> JobOutput:
            latents, codes = encoded.get("latents"), encoded.get("codes")
            return {
                "images": [],
                "latents": None if latents is None else np.asarray(latents).tolist(),
                "codes": None if codes is None else np.asarray(codes).tolist(),
            }

        return CodecCall("encode", "images", x.numpy(), encoded_output)
    if isinstance(spec, DecodeSpec):
        if spec.latents is not None:
            rows = np.asarray(spec.latents, dtype=np.float32)
            return CodecCall(
                "decode", "latents", rows, lambda px: {"images": store_all(px), "latents": None}
            )
        rows = np.asarray(spec.codes, dtype=np.int64)
        return CodecCall(
            "decode", "codes", rows, lambda px: {"images": store_all(px), "latents": None}
        )
    if isinstance(spec, ReconstructSpec):
        x = input_images(spec.images)
        noise, seed = spec.noise, spec.seed
        if noise is not None:
            x = _corrupt(x, noise, seed)
        corrupted = x

        def reconstruction(pixels: np.ndarray) -> JobOutput:
            output: JobOutput = {"images": [], "latents": None, "corrupted": None}
            if noise is not None:
                output["corrupted"] = [
                    store_image(
                        storage, job_id, i, img, output_spec, image_seed(seed, i - len(corrupted))
                    )
                    for i, img in enumerate(corrupted, start=len(corrupted))
                ]
            output["images"] = store_all(pixels)
            return output

        return CodecCall("reconstruct", "images", x.numpy(), reconstruction)
    raise InvalidJobRequest(
        f"model {model.name!r} serves encode/decode/reconstruct, not {spec.kind}"
    )


def codec_image_size(items: list[str], model: CodecModel) -> tuple[int, int]:
    """(height, width) of an encode or reconstruct job's images: the model's own, or for a model
    with a `size_multiple` (an imported first stage) the first image's, when the factor divides
    it (the gateway checked it; a spec from elsewhere fails its job only). The job's other images
    must have the same size (`decode_images` says so)."""
    own = (model.entry.image.height, model.entry.image.width)
    multiple = model.entry.size_multiple
    if multiple is None or not items:
        return own
    size = _png_size(items[0])
    if size != own and (size[0] % multiple or size[1] % multiple):
        raise InvalidJobRequest(
            f"images[0] is {size[1]}×{size[0]}: model {model.name!r} takes sides that are "
            f"multiples of {multiple}"
        )
    return size


def _codec_call(model: CodecModel, method: str, argument: str, rows: np.ndarray) -> Any:
    codec = model.codec_for(argument, rows)  # another size than the model's own may need another
    if method == "decode":
        return codec.decode(**{argument: rows})
    return getattr(codec, method)(rows)


def _result_rows(result: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of a codec result (an array, or encode's dict of arrays)."""
    if isinstance(result, dict):
        return {k: None if v is None else np.asarray(v)[start:stop] for k, v in result.items()}
    return np.asarray(result)[start:stop]


def run_codec_calls(
    model: CodecModel, calls: list[CodecCall]
) -> list[tuple[JobOutput | Exception, int]]:
    """Run many jobs' calls with one ONNX Runtime call per (method, input) group; return each job's
    output (or the exception that failed it) and the rows of the call it ran in. A group call that
    fails is retried job by job, so one job's bad input (codes out of range, say) fails only it."""
    results: list[tuple[JobOutput | Exception, int] | None] = [None] * len(calls)
    groups: dict[tuple[str, str, tuple[int, ...]], list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(call.group, []).append(i)
    for (method, argument, _shape), members in groups.items():
        batch = [calls[i] for i in members]
        try:
            result = _codec_call(model, method, argument, np.concatenate([c.rows for c in batch]))
        except Exception as exc:
            if len(batch) == 1:
                results[members[0]] = (exc, len(batch[0].rows))
            else:  # isolate the job that failed the call: each alone
                for i in members:
                    results[i] = run_codec_calls(model, [calls[i]])[0]
            continue
        total, start = sum(len(c.rows) for c in batch), 0
        for i, call in zip(members, batch, strict=True):
            stop = start + len(call.rows)
            try:
                results[i] = (call.finish(_result_rows(result, start, stop)), total)
            except Exception as exc:
                results[i] = (exc, total)
            start = stop
    assert all(r is not None for r in results)  # every call belongs to a group
    return [r for r in results if r is not None]


def run_codec(spec: JobSpec, model: CodecModel, job_id: str, storage: Storage) -> JobOutput:
    """One autoencoder job by itself; generate on a VAE/AAE decodes samples of its latent prior."""
    if isinstance(spec, PriorSampleSpec):
        return _prior_sample(spec, model, job_id, storage)
    if isinstance(spec, GenerateSpec):
        raise InvalidJobRequest(f"model {model.name!r} has no diffusion schedule to sample")
    output, _ = run_codec_calls(model, [prepare_codec(spec, model, job_id, storage)])[0]
    if isinstance(output, Exception):
        raise output
    return output


# --- one job alone ----------------------------------------------------------------------------
def run_alone(spec: JobSpec, pool: ModelPool, storage: Storage, job_id: str) -> JobOutput:
    """Run one job by itself: all of its images in one running set, stepped to the end."""
    model = pool.get(spec.model)
    if isinstance(model, CodecModel):
        return run_codec(spec, model, job_id, storage)
    work = prepare_denoise(spec, model, job_id)
    batch = model.new_batch(work.sample_shape)
    batch.add(work.samples)
    while len(batch):
        finished = batch.step()
        if finished:
            pixels = model.to_pixels(torch.stack([s.x for s in finished]))
            work.store(finished, pixels, storage)
    return work.complete(storage)


def run_job(request: dict[str, Any]) -> JobOutput:
    """The RQ job function (`ddserve.jobs.JOB_FUNCTION`) for a worker without batching: parses the
    spec, loads the model, runs the job alone, stores the images, returns the `JobOutput`."""
    from rq import get_current_job

    from ddserve.storage import create_storage

    settings = Settings()
    job = get_current_job()
    job_id = job.id if job is not None else uuid.uuid4().hex
    spec = parse_job_spec(request)
    return run_alone(spec, ModelPool(settings), create_storage(settings), job_id)
