"""The model zoo's metadata, read from `models/zoo/<name>/config.json` without torch.

The gateway validates requests against these entries (tasks, shapes, classes, vocabulary, limits);
the workers read the same entries and then load weights through `models.registry`. This module must
stay importable without torch: it is the gateway's only view of the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

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

DEFAULT_ZOO = Path(__file__).resolve().parent / "zoo"

ModelKind = Literal[
    "diffusion",  # pixel-space DDPM/DDIM
    "latent-diffusion",  # diffusion on a first-stage autoencoder's latents
    "autoencoder",
    "denoising-autoencoder",
    "sparse-autoencoder",
    "vae",
    "adversarial-autoencoder",
    "vqvae",
    "kl-autoencoder",  # the first stage of latent diffusion
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
    """`class`: a label index in `classes`; `text`: a prompt of words from `vocabulary`."""

    type: Literal["class", "text"]
    classes: list[str] | None = None
    vocabulary: list[str] | None = None  # index 0 is padding (∅), never a prompt word
    context_len: int | None = None


class ScheduleSpec(BaseModel):
    kind: Literal["linear", "cosine"] = "linear"
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
    code_shape: list[int] | None = None  # [H, W] of a VQ-VAE's code indices
    codebook_size: int | None = None
    conditioning: Conditioning | None = None
    schedule: ScheduleSpec | None = None
    prediction_type: Literal["epsilon", "v"] = "epsilon"
    dtype: Precision | None = None  # the denoiser's weights and activations (None: float32)
    samplers: list[str] = Field(default_factory=list)
    defaults: SamplingDefaults | None = None
    classifier: str | None = None  # the noisy classifier used for classifier guidance
    first_stage: str | None = None  # latent diffusion: the autoencoder whose latents it models
    network: dict[str, Any] = Field(default_factory=dict)  # architecture, read by models.registry
    files: dict[str, str] = Field(default_factory=dict)  # role → file name in the model's folder
    path: Path | None = Field(default=None, exclude=True)

    def file(self, role: str) -> Path | None:
        """Absolute path of a file of this model (weights, encoder_onnx, …) if it exists."""
        name = self.files.get(role)
        if name is None or self.path is None:
            return None
        candidate = self.path / name
        return candidate if candidate.exists() else None

    def public(self) -> dict[str, Any]:
        """What `GET /models` shows: everything but the architecture and file layout."""
        return self.model_dump(exclude={"network", "files", "path"}, exclude_none=True)


def read_entry(folder: Path) -> ModelEntry:
    data = json.loads((folder / "config.json").read_text())
    entry = ModelEntry.model_validate(data)
    entry.path = folder
    return entry


def load_catalog(zoo_dir: Path | str | None = None) -> dict[str, ModelEntry]:
    """Every model folder with a config.json under zoo_dir, by name."""
    root = Path(zoo_dir) if zoo_dir is not None else DEFAULT_ZOO
    entries: dict[str, ModelEntry] = {}
    if not root.is_dir():
        return entries
    for config in sorted(root.glob("*/config.json")):
        entry = read_entry(config.parent)
        entries[entry.name] = entry
    return entries
