"""The models' metadata, read from their folders' JSON files without torch.

A model folder holds either a ddserve card (`config.json`, the zoo's format, `models/zoo/<name>/`) or a
diffusers pipeline (`model_index.json` and its component folders, read by
`models.diffusers_format.entries`). The model repository is a list of folders of model folders
(`Settings.model_repository()`: the zoo, then `./var/models`, where `ddserve import` writes).

The gateway validates requests against these entries (tasks, shapes, classes, vocabulary, limits);
the workers read the same entries and then load weights through `models.registry` (zoo cards) or
`models.diffusers_format.loading` (diffusers pipelines). This module must stay importable without
torch: it is the gateway's only view of the models.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from ddserve.params import (
    NO_GUIDANCE,
    ClassifierScale,
    Eta,
    GuidanceScale,
    InferenceSteps,
    SamplerName,
    SolverOrder,
    UseKarrasSigmas,
)

log = logging.getLogger(__name__)

DEFAULT_ZOO = Path(__file__).resolve().parent / "zoo"
CARD_FILE = "config.json"  # a ddserve card
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline

AutoencoderKind = Literal[
    "autoencoder",
    "denoising-autoencoder",
    "sparse-autoencoder",
    "vae",
    "adversarial-autoencoder",
    "vqvae",
    "kl-autoencoder",  # the first stage of latent diffusion
]
AUTOENCODER_KINDS: tuple[str, ...] = get_args(AutoencoderKind)  # the one list of them
ModelKind = Literal[
    "diffusion",  # pixel-space DDPM/DDIM
    "latent-diffusion",  # diffusion on a first-stage autoencoder's latents
    AutoencoderKind,
    "noisy-classifier",  # f_φ(y | x_t, t), for classifier guidance
    "classifier",  # evaluation classifier (features for FID, accuracy)
]
Task = Literal["generate", "inpaint", "encode", "decode", "reconstruct"]
Precision = Literal["float32", "bfloat16", "float16"]


class ImageSpec(BaseModel):
    channels: int
    height: int
    width: int


class Conditioning(BaseModel):
    """`class`: a label index in `classes`; `text`: a prompt, tokenized by the gateway into words
    of `vocabulary` (the zoo's tokenizer, `tokenizer: "words"`), or by the worker with the model's
    own tokenizer and text encoder (diffusers pipelines, `OWN_TOKENIZERS`: `"clip"` for
    StableDiffusionPipeline, `"bert"` for LDMTextToImagePipeline's LDMBert; the gateway passes the
    prompt string)."""

    type: Literal["class", "text"]
    classes: list[str] | None = None
    vocabulary: list[str] | None = None  # index 0 is padding (∅), never a prompt word
    context_len: int | None = None
    tokenizer: Literal["words", "clip", "bert"] = "words"
    # Whether a text model takes a negative_prompt (a prompt in place of ∅ in guidance); a
    # pipeline whose own `__call__` has none (LDMTextToImagePipeline) refuses it.
    negative_prompt: bool = True
    # Whether the network has a ∅ condition (trained with condition dropout): it then samples
    # without a condition and takes classifier-free guidance. A diffusers class-conditional
    # UNet2DModel has none: every request names a class_label.
    has_null: bool = True


OWN_TOKENIZERS = ("clip", "bert")  # the worker tokenizes and encodes the prompt's text itself


def encodes_own_prompts(conditioning: Conditioning | None) -> bool:
    """A text model whose worker tokenizes and encodes prompts with its own tokenizer and text
    encoder (diffusers text pipelines): its specs carry the prompt's text, no tokens."""
    return (
        conditioning is not None
        and conditioning.type == "text"
        and conditioning.tokenizer in OWN_TOKENIZERS
    )


class ScheduleSpec(BaseModel):
    kind: Literal["linear", "scaled_linear", "cosine"] = "linear"
    num_timesteps: int = 1000


class SamplingDefaults(BaseModel):
    """A model's defaults for the parameters a request leaves out (`ddserve.params` declares them);
    `guidance_scale` is diffusers' s (1 = no guidance), applied only when a condition is given."""

    sampler: SamplerName = "ddim"
    num_inference_steps: InferenceSteps = 50
    eta: Eta = 0.0
    use_karras_sigmas: UseKarrasSigmas = False  # applied only to the samplers that take it
    solver_order: SolverOrder = 2  # likewise (diffusers' default)
    guidance_scale: GuidanceScale = NO_GUIDANCE
    classifier_scale: ClassifierScale = 0.0
    clip_denoised: bool = True
    jump_length: int = 10
    jump_n_sample: int = 1


class ModelEntry(BaseModel):
    """One model of the zoo: what the gateway may accept for it and what a worker must load."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    kind: ModelKind
    tasks: list[Task] = Field(default_factory=list)
    dataset: str
    description: str = ""
    image: ImageSpec
    latent_shape: list[int] | None = None  # [C, H, W] of encode's output (continuous latents)
    # Generates images of other sizes too: height and width multiples of this (pixels), the
    # first stage's factor × the UNet's total down-sampling (`diffusers_format.entries`); None:
    # only `image`'s size (the zoo's networks are built for one).
    size_multiple: int | None = None
    code_shape: list[int] | None = None  # [H, W] of a VQ-VAE's code indices
    codebook_size: int | None = None
    conditioning: Conditioning | None = None
    schedule: ScheduleSpec | None = None
    prediction_type: Literal["epsilon", "v", "sample"] = "epsilon"
    dtype: Precision | None = None  # the denoiser's weights and activations (None: float32)
    samplers: list[str] = Field(default_factory=list)
    defaults: SamplingDefaults | None = None
    classifier: str | None = None  # the noisy classifier used for classifier guidance
    first_stage: str | None = None  # latent diffusion: the autoencoder whose latents it models
    network: dict[str, Any] = Field(default_factory=dict)  # architecture, read by models.registry
    files: dict[str, str] = Field(default_factory=dict)  # role → file name in the model's folder
    # diffusers pipelines (`models.diffusers_format`): the format, the pipeline class, the component
    # sub-folder this entry loads (`unet`; `vqvae` / `vae` for a first stage), the scheduler config.
    format: Literal["ddserve", "diffusers"] = "ddserve"
    pipeline: str | None = None
    component: str | None = None
    scheduler: dict[str, Any] | None = None
    license: str | None = None
    path: Path | None = Field(default=None, exclude=True)

    @property
    def latent_factor(self) -> int:
        """f: the first stage's spatial down-sampling, image side / latent side, for latents
        [c, h, w] on a grid (1 for other latents, or none)."""
        latent = self.latent_shape or []
        return self.image.height // latent[1] if len(latent) == 3 and latent[1] else 1

    def file(self, role: str) -> Path | None:
        """Absolute path of a file of this model (weights, encoder_onnx, …) if it exists."""
        name = self.files.get(role)
        if name is None or self.path is None:
            return None
        candidate = self.path / name
        return candidate if candidate.exists() else None

    def public(self) -> dict[str, Any]:
        """What `GET /models` shows: everything but the architecture and file layout."""
        return self.model_dump(
            exclude={"network", "files", "path", "component", "scheduler"}, exclude_none=True
        )


def read_entry(folder: Path) -> ModelEntry:
    data = json.loads((folder / "config.json").read_text())
    entry = ModelEntry.model_validate(data)
    entry.path = folder
    return entry


def model_folders(root: Path) -> list[Path]:
    """The sub-folders of `root` that hold a model: a ddserve card or a diffusers pipeline."""
    if not root.is_dir():
        return []
    return [
        folder
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        if (folder / CARD_FILE).is_file() or (folder / PIPELINE_INDEX).is_file()
    ]


def read_folder(folder: Path) -> list[ModelEntry]:
    """The entries of one model folder: its card's, or a diffusers pipeline's (the denoiser and,
    for a latent pipeline, its first stage as a model of its own)."""
    if (folder / CARD_FILE).is_file():
        return [read_entry(folder)]
    from models.diffusers_format.entries import PipelineError, read_pipeline  # JSON only

    try:
        return read_pipeline(folder)
    except PipelineError as exc:  # one unservable folder must not take the others down
        log.warning("skipping model folder %s: %s", folder, exc)
        return []


def load_catalog(
    model_dirs: Path | str | Sequence[Path | str] | None = None,
) -> dict[str, ModelEntry]:
    """Every model in the model repository `model_dirs` (one folder, or a list searched in
    order; default: the zoo), by name. A name met twice keeps its first folder's model."""
    if model_dirs is None:
        roots = [DEFAULT_ZOO]
    elif isinstance(model_dirs, str | Path):
        roots = [Path(model_dirs)]
    else:
        roots = [Path(d) for d in model_dirs]
    entries: dict[str, ModelEntry] = {}
    for root in roots:
        for folder in model_folders(root):
            for entry in read_folder(folder):
                if entry.name in entries:
                    log.warning(
                        "model %r in %s is hidden by the one in %s",
                        entry.name,
                        folder,
                        entries[entry.name].path,
                    )
                    continue
                entries[entry.name] = entry
    return entries
