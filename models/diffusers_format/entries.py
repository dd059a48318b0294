"""Catalog entries of diffusers pipelines, read from their JSON files only (no torch, no diffusers).

A diffusers pipeline folder (what `save_pretrained` writes, or a Hub snapshot) is
`model_index.json` — `{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
"scheduler": ["diffusers", "DDPMScheduler"], …}` — plus one sub-folder per component with its
`config.json` (`scheduler/scheduler_config.json` for the scheduler). The gateway learns from these
alone what a model accepts:

- image size: the UNet's `sample_size`, times the first stage's down-sampling factor
  f = 2^(len(block_out_channels) − 1) for a latent pipeline (Rombach et al. 2022, §3: z = E(x) has
  H/f × W/f positions); the denoiser also makes other sizes (`size_multiple`): sides that are
  multiples of f · 2^(D − 1) for a UNet of D down blocks (SD 1.x: 8 · 8 = 64);
- channels: the UNet's `in_channels` (pixel), the first stage's `in_channels` (latent);
- conditioning: `num_class_embeds` → class labels 0 … n − 1 (no ∅ class: always required);
  a text encoder + tokenizer → a prompt, tokenized and encoded by the worker with the pipeline's
  own tokenizer and text encoder (`TextLayout`: SD's CLIP, LDMTextToImagePipeline's LDMBert);
- schedule and defaults: the scheduler config (`num_train_timesteps`, `beta_schedule`,
  `prediction_type`, `clip_sample`) and the scheduler class (DDPM → ddpm, DDIM → ddim);
- licence: the `license:` of the folder's README.md front matter (the Hub's model card), else the
  first line of a LICENSE file;
- ddserve's own choices for the model, not part of the diffusers format, from an optional
  `ddserve.json` beside `model_index.json` (`ddserve import --dtype` writes it): `dtype`, the
  denoiser's precision (`float32`, `bfloat16`, `float16`), overridden by `DDSERVE_DTYPE`.

A latent pipeline gives two entries: the denoiser `<name>` (kind `latent-diffusion`, whose
`first_stage` is the second) and its first stage `<name>-vqvae` / `<name>-vae` (kind `vqvae` /
`kl-autoencoder`), which serves `/encode`, `/decode` and `/reconstruct` — at any size its factor
divides: its `size_multiple` is f alone (the first stage is convolutional, and no UNet constrains
it), so `/encode` takes an f·h × f·w image and `/decode` an h × w latent grid.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from ddserve.params import SAMPLERS
from models.catalog import (
    PIPELINE_INDEX,
    Conditioning,
    ImageSpec,
    ModelEntry,
    Precision,
    SamplingDefaults,
    ScheduleSpec,
)
from models.scheduler_config_fields import read_fields


class PipelineError(ValueError):
    """A pipeline folder that ddserve cannot serve; the message says why, for a person."""


OPTIONS_FILE = "ddserve.json"  # ddserve's options for a diffusers folder (see the docstring)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


# Pipeline class → the sampler its scheduler stands for and the pipeline's default step count
# (its `__call__` default). Pixel-space UNet2DModel pipelines and LDMPipeline (VQ or KL first stage).
PIXEL_PIPELINES = {"DDPMPipeline": 1000, "DDIMPipeline": 50, "RePaintPipeline": 250}
LATENT_PIPELINES = {"LDMPipeline": 50}
# Text-conditioned pipelines: the workers encode prompts with the pipeline's own tokenizer and text
# encoder (`models.diffusers_format.text`). Each names its components and defaults its own way
# (`TextLayout`); the catalog entry says which (`Conditioning.tokenizer`), and nothing else needs to.
# `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` folders hold the same
# components as `StableDiffusionPipeline` (what their `save_pretrained` writes differs only in
# `_class_name`); ddserve serves every task from the components, not from the class. An inpainting
# pipeline whose UNet also takes the mask and the masked image's latents (in_channels = 2c + 1:
# runwayml/stable-diffusion-inpainting's 9) is served on /inpaint alone (`INPAINTING_UNET`).
TEXT_PIPELINES = {
    "StableDiffusionPipeline": 50,
    "StableDiffusionImg2ImgPipeline": 50,
    "StableDiffusionInpaintPipeline": 50,
    "LDMTextToImagePipeline": 50,
}
SUPPORTED_PIPELINES = (*PIXEL_PIPELINES, *LATENT_PIPELINES, *TEXT_PIPELINES)


@dataclass(frozen=True)
class TextLayout:
    """How a text pipeline names its text components and conditions on a prompt, as its own
    `__call__` does: c = encoder(tokenize(y, padded and cut to L))[0] [L, D], ∅ = the same of "".

    - `tokenizer`: `Conditioning.tokenizer`, the prompt encoder the workers build
      (`models.diffusers_format.text.PROMPT_ENCODERS`);
    - `encoder`: the text encoder's component folder; `*_classes`: the classes accepted for it and
      for `tokenizer/`;
    - `context_len`: L when the pipeline fixes it, None: the tokenizer's `model_max_length`;
    - `guidance_scale`: the `__call__` default s; `negative_prompt`: whether `__call__` takes one.
    """

    tokenizer: Literal["clip", "bert"]
    encoder: str
    encoder_classes: tuple[str, ...]
    tokenizer_classes: tuple[str, ...]
    context_len: int | None
    guidance_scale: float
    negative_prompt: bool


# CLIP ViT-L/14's text tower (Radford et al. 2021), `last_hidden_state`; default s = 7.5.
SD_LAYOUT = TextLayout(
    tokenizer="clip",
    encoder="text_encoder",
    encoder_classes=("CLIPTextModel",),
    tokenizer_classes=("CLIPTokenizer", "CLIPTokenizerFast"),
    context_len=None,
    guidance_scale=7.5,
    negative_prompt=True,
)
TEXT_LAYOUTS = {
    "StableDiffusionPipeline": SD_LAYOUT,
    "StableDiffusionImg2ImgPipeline": SD_LAYOUT,
    "StableDiffusionInpaintPipeline": SD_LAYOUT,
    # LDMBert (Rombach et al. 2022, §4.3.1: a transformer τ_θ trained with the LDM on LAION) under
    # a BERT tokenizer; the pipeline pads and cuts to 77 tokens whatever the tokenizer's own
    # limit, encodes "" for ∅, has no negative prompt and defaults to s = 1 (no guidance).
    "LDMTextToImagePipeline": TextLayout(
        tokenizer="bert",
        encoder="bert",
        encoder_classes=("LDMBertModel",),
        tokenizer_classes=("BertTokenizer", "BertTokenizerFast"),
        context_len=77,
        guidance_scale=1.0,
        negative_prompt=False,
    ),
}
TEXT_UNET = "UNet2DConditionModel"  # a text pipeline's UNet attends to c by cross-attention


# `ModelEntry.network` flag of a latent model whose UNet reads x_t [c, h, w] with the inpainting
# mask [1, h, w] and the masked image's latents [c, h, w] concatenated over channels.
INPAINTING_UNET = "inpainting_unet"
INPAINTING_PIPELINES = ("StableDiffusionInpaintPipeline",)


def inpainting_unet(pipeline: str, unet_channels: int, latent_channels: int) -> bool:
    """Whether the pipeline's UNet is an inpainting UNet (`StableDiffusionInpaintPipeline`'s
    9-channel layout: in_channels = c latents + 1 mask + c masked-image latents). Such a folder
    saved as another class is not one (its own pipeline would not feed those channels)."""
    return pipeline in INPAINTING_PIPELINES and unet_channels == 2 * latent_channels + 1


def text_layout(pipeline: str | None) -> TextLayout:
    """The text layout of a text pipeline class (a `KeyError` naming it for any other)."""
    if pipeline not in TEXT_LAYOUTS:
        raise KeyError(f"{pipeline!r} is not a text pipeline; text pipelines: {list(TEXT_LAYOUTS)}")
    return TEXT_LAYOUTS[pipeline]


# Inpainting defaults of the pipelines that have their own (RePaintPipeline.__call__'s).
RESAMPLING = {"RePaintPipeline": {"jump_length": 10, "jump_n_sample": 10}}
# The pipelines that decode z / scaling_factor + shift_factor. diffusers' UNet pipelines
# (LDMPipeline, StableDiffusionPipeline) decode z / scaling_factor and ignore a first stage's
# shift_factor (which the transformer pipelines SD3 and Flux use); ddserve does as the pipeline does.
SHIFTING_PIPELINES: frozenset[str] = frozenset()
CLIPPING = ("DDPMScheduler", "DDIMScheduler")  # classes whose clip_sample defaults to True
FIRST_STAGES = {"VQModel": ("vqvae", "vqvae"), "AutoencoderKL": ("kl-autoencoder", "vae")}
BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "squaredcos_cap_v2": "cosine",
}


def read_json(path: Path) -> dict[str, Any]:
    """A component's JSON file; a missing or unreadable one is a `PipelineError` naming it."""
    if not path.is_file():
        raise PipelineError(f"missing {path.parent.name}/{path.name} in {path.parent.parent}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} is not a JSON object")
    return data


def pipeline_index(folder: Path) -> dict[str, Any]:
    """`model_index.json`: the pipeline class and its components (name → [library, class])."""
    index_file = folder / PIPELINE_INDEX
    if not index_file.is_file():
        raise PipelineError(
            f"{folder} has no {PIPELINE_INDEX}: not a diffusers pipeline folder "
            "(save one with `pipeline.save_pretrained(folder)`)"
        )
    return read_json(index_file)


def components(index: dict[str, Any]) -> dict[str, str]:
    """Component name → class name, for the components the pipeline has (null entries skipped)."""
    found = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        if value[1] is not None:
            found[name] = str(value[1])
    return found


ONNX_DIR = "onnx"  # the first stage's graphs in the pipeline folder (`onnx_export.py`)
VQ_CODEBOOK_KEY = "quantize.embedding.weight"  # VQModel's codebook [K, D] in its weights
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def onnx_files(component: str) -> dict[str, str]:
    """The `files` roles of a first stage's ONNX graphs, relative to the pipeline folder."""
    return {
        "encoder_onnx": f"{ONNX_DIR}/{component}_encoder.onnx",
        "decoder_onnx": f"{ONNX_DIR}/{component}_decoder.onnx",
    }


def first_stage_files(folder: Path, component: str, vq: bool) -> dict[str, str]:
    """A first stage's `files`: its two ONNX graphs when both exist (the workers then run it in
    ONNX Runtime), and for a VQModel its weights (ONNX Runtime's codec reads the codebook there)."""
    files = onnx_files(component)
    found = files if all((folder / name).is_file() for name in files.values()) else {}
    if vq and (folder / component / WEIGHTS_FILE).is_file():
        found = {**found, "weights": f"{component}/{WEIGHTS_FILE}"}
    return found


def first_stage_of(parts: dict[str, str]) -> tuple[str, str] | None:
    """(component folder, class) of the pipeline's autoencoder, if it has one."""
    for name in ("vqvae", "vae"):
        if name in parts:
            return name, parts[name]
    return None


def sample_size(config: dict[str, Any], component: str) -> tuple[int, int]:
    """(height, width) from a `sample_size` that is an int or a [height, width] pair."""
    size = config.get("sample_size")
    if isinstance(size, int):
        return size, size
    if isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise PipelineError(f"{component}/config.json has no usable sample_size (got {size!r})")


def down_factor(config: dict[str, Any]) -> int:
    """An autoencoder's spatial down-sampling factor: every encoder block but the last halves."""
    return 2 ** (len(config.get("block_out_channels", [64])) - 1)


def unet_down_factor(config: dict[str, Any]) -> int:
    """A UNet's total spatial down-sampling: each down block but the last halves H and W, so its
    input's sides must be multiples of 2^(D − 1) for D down blocks (the skip connections of the up
    path must meet feature maps of the same size)."""
    blocks = config.get("down_block_types") or config.get("block_out_channels") or [None]
    return 2 ** (len(blocks) - 1)


def read_license(folder: Path) -> str | None:
    """The `license:` of README.md's YAML front matter (Hub model cards), else LICENSE's first
    non-empty line."""
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        front = re.match(r"^---\s*\n(.*?)\n---", text, re.DOTALL)
        if front:
            found = re.search(r"^licen[sc]e:\s*(.+)$", front.group(1), re.MULTILINE)
            if found:
                return found.group(1).strip().strip("\"'")
    for name in ("LICENSE", "LICENSE.md", "LICENSE.txt"):
        path = folder / name
        if path.is_file():
            lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
            first = next((line for line in lines if line), None)
            if first:
                return first
    return None


def read_options(folder: Path) -> dict[str, Any]:
    """The folder's `ddserve.json` options, checked ({} without one)."""
    path = folder / OPTIONS_FILE
    if not path.is_file():
        return {}
    options = read_json(path)
    unknown = sorted(set(options) - {"dtype"})
    if unknown:
        raise PipelineError(f"{OPTIONS_FILE}: unknown option {unknown[0]!r} (known: dtype)")
    dtype = options.get("dtype")
    if dtype is not None and dtype not in PRECISIONS:
        raise PipelineError(
            f"{OPTIONS_FILE}: dtype {dtype!r} is not one of {', '.join(PRECISIONS)}"
        )
    return options


def scheduler_config(config: dict[str, Any]) -> dict[str, Any]:
    """The scheduler config ddserve reproduces (`scheduler_config_fields`, `from_diffusers`).

    RePaintPipeline's `RePaintScheduler` is DDIM's update (Lugmayr et al. 2022 build on it) with
    its η (0: deterministic DDIM, RePaintPipeline's default, … 1: DDPM-like noise) on ``leading``
    timesteps from T/S · (S − 1) down to 0 and a last step to ᾱ = 1, plus the resampling jumps that
    ddserve's RePaint does per request: its config reads as a `DDIMScheduler` one."""
    if config.get("_class_name") == "RePaintScheduler":
        kept = {k: v for k, v in config.items() if k not in ("eta", "_class_name")}
        return {**kept, "_class_name": "DDIMScheduler", "set_alpha_to_one": True}
    return config


def schedule_fields(
    scheduler: dict[str, Any], steps: int, resampling: dict[str, int] | None = None
) -> dict[str, Any]:
    """The entry's schedule, prediction type, samplers and defaults from the scheduler config
    (`models.scheduler_config_fields`: the fields the gateway needs, torch-free)."""
    try:
        fields = read_fields(scheduler_config(scheduler))
    except ValueError as exc:
        raise PipelineError(f"scheduler/scheduler_config.json: {exc}") from None
    beta = str(scheduler.get("beta_schedule", "linear"))
    total = fields.num_train_timesteps
    # The solver options of the config are the model's defaults: the gateway puts them into each
    # spec (for the samplers that take them), where they win over the worker's model options.
    order = scheduler.get("solver_order", 2)
    if order not in (1, 2):
        raise PipelineError(
            f"scheduler/scheduler_config.json: solver_order {order!r} is not supported (1 or 2)"
        )
    return {
        "schedule": ScheduleSpec(kind=BETA_SCHEDULES.get(beta, "linear"), num_timesteps=total),
        "prediction_type": fields.prediction_type,
        "samplers": list(SAMPLERS),
        "defaults": SamplingDefaults(
            sampler=fields.sampler,
            num_inference_steps=min(steps, total),
            clip_denoised=bool(scheduler.get("clip_sample", fields.class_name in CLIPPING)),
            use_karras_sigmas=bool(scheduler.get("use_karras_sigmas", False)),
            solver_order=int(order),
            **(resampling or {}),
        ),
        "scheduler": scheduler,
    }


def text_conditioning(folder: Path, pipeline: str, parts: dict[str, str]) -> Conditioning:
    """A text pipeline's conditioning, after checking it has the components its layout names,
    of classes the workers load (a `PipelineError` naming the first that is not)."""
    layout = TEXT_LAYOUTS[pipeline]
    wanted = {
        "unet": (TEXT_UNET,),
        layout.encoder: layout.encoder_classes,
        "tokenizer": layout.tokenizer_classes,
    }
    for component, classes in wanted.items():
        if component not in parts:
            raise PipelineError(f"{pipeline} in {folder} has no {component!r} component")
        if parts[component] not in classes:
            raise PipelineError(
                f"{component} is a {parts[component]}; supported: {', '.join(classes)}"
            )
    length = layout.context_len
    if length is None:
        tokenizer = folder / "tokenizer" / "tokenizer_config.json"
        length = read_json(tokenizer).get("model_max_length", 77) if tokenizer.is_file() else 77
    return Conditioning(
        type="text",
        tokenizer=layout.tokenizer,
        context_len=int(length),
        negative_prompt=layout.negative_prompt,
    )


def read_pipeline(folder: Path, name: str | None = None) -> list[ModelEntry]:
    """The catalog entries of the pipeline in `folder` (see the module docstring), named `name`
    (default: the folder's name). Raises `PipelineError` for a folder ddserve cannot serve."""
    name = name or folder.name
    index = pipeline_index(folder)
    pipeline = str(index.get("_class_name", ""))
    parts = components(index)
    steps = {**PIXEL_PIPELINES, **LATENT_PIPELINES, **TEXT_PIPELINES}.get(pipeline)
    if steps is None:
        raise PipelineError(
            f"pipeline class {pipeline or '(none)'!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_PIPELINES)}"
        )
    for needed in ("unet", "scheduler"):
        if needed not in parts:
            raise PipelineError(f"{pipeline} in {folder} has no {needed!r} component")
    unet = read_json(folder / "unet" / "config.json")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    common: dict[str, Any] = {
        "dataset": "",
        "format": "diffusers",
        "pipeline": pipeline,
        "license": read_license(folder),
    }
    stage = first_stage_of(parts)
    conditioning = None
    if unet.get("num_class_embeds"):
        count = int(unet["num_class_embeds"])
        conditioning = Conditioning(
            type="class", classes=[str(i) for i in range(count)], has_null=False
        )
    if pipeline in TEXT_PIPELINES:
        conditioning = text_conditioning(folder, pipeline, parts)
    height, width = sample_size(unet, "unet")
    channels = int(unet.get("in_channels", 3))
    denoiser = {
        **common,
        "name": name,
        "component": "unet",
        "conditioning": conditioning,
        "dtype": read_options(folder).get("dtype"),
        **schedule_fields(scheduler, steps, RESAMPLING.get(pipeline)),
    }
    if pipeline in TEXT_PIPELINES:  # the pipeline's own default s with a prompt
        denoiser["defaults"] = denoiser["defaults"].model_copy(
            update={"guidance_scale": TEXT_LAYOUTS[pipeline].guidance_scale}
        )
    if stage is None:
        return [
            ModelEntry(
                **denoiser,
                size_multiple=unet_down_factor(unet),
                kind="diffusion",
                tasks=["generate", "inpaint"],
                description=f"{pipeline} (diffusers), {channels}×{height}×{width} pixels",
                image=ImageSpec(channels=channels, height=height, width=width),
                path=folder,
            )
        ]
    component, stage_class = stage
    if stage_class not in FIRST_STAGES:
        raise PipelineError(
            f"first stage {component!r} is a {stage_class}; supported: {', '.join(FIRST_STAGES)}"
        )
    stage_kind, suffix = FIRST_STAGES[stage_class]
    vae = read_json(folder / component / "config.json")
    factor = down_factor(vae)
    image = ImageSpec(
        channels=int(vae.get("in_channels", 3)), height=height * factor, width=width * factor
    )
    latent_channels = int(vae.get("latent_channels", 4))
    if stage_kind == "vqvae":
        latent_channels = int(vae.get("vq_embed_dim") or latent_channels)
    latent_shape = [latent_channels, height, width]
    stage_name = f"{name}-{suffix}"
    scaling = {
        "scaling_factor": float(vae.get("scaling_factor", 0.18215)),
        "shift_factor": float(vae.get("shift_factor") or 0.0),
    }
    first = ModelEntry(
        **common,
        name=stage_name,
        kind=stage_kind,
        tasks=["encode", "decode", "reconstruct"],
        description=f"the {stage_class} first stage of {name} ({pipeline}, diffusers)",
        image=image,
        latent_shape=latent_shape,
        code_shape=[height, width] if stage_kind == "vqvae" else None,
        size_multiple=factor,  # the first stage alone divides the sides by f only
        codebook_size=int(vae.get("num_vq_embeddings", 256)) if stage_kind == "vqvae" else None,
        component=component,
        network={**scaling, "codebook_key": VQ_CODEBOOK_KEY} if stage_kind == "vqvae" else scaling,
        files=first_stage_files(folder, component, stage_kind == "vqvae"),
        path=folder,
    )
    inpainting = inpainting_unet(pipeline, channels, latent_channels)
    network: dict[str, Any] = {}
    if inpainting:
        network[INPAINTING_UNET] = True
        channels = latent_channels
    main = ModelEntry(
        **denoiser,
        kind="latent-diffusion",
        # An inpainting UNet only inpaints: it always reads a mask and a masked image.
        tasks=["inpaint"] if inpainting else ["generate", "inpaint"],
        description=f"{pipeline} (diffusers): {channels}×{height}×{width} latents of {stage_name}, "
        f"{image.channels}×{image.height}×{image.width} images"
        + ("; its UNet also reads the mask and the masked image's latents" if inpainting else ""),
        image=image,
        latent_shape=latent_shape,
        size_multiple=factor * unet_down_factor(unet),
        first_stage=stage_name,
        network={
            **network,
            "latent_scale": scaling["scaling_factor"],
            "latent_shift": scaling["shift_factor"] if pipeline in SHIFTING_PIPELINES else 0.0,
        },
        path=folder,
    )
    return [main, first]
