"""The worker's models, loaded once and kept warm.

A diffusion model (pixel or latent) becomes a `DiffusionModel`: the denoising network on the chosen
device (eval, channels_last), its noise schedule, the ∅ condition for classifier-free guidance, the
noisy classifier for classifier guidance and — for latent diffusion — the first-stage decoder. An
autoencoder becomes a `CodecModel` around its ONNX Runtime session. Sampling runs in PyTorch;
encoding and decoding run in ONNX Runtime.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from ddserve.settings import Settings
from models.catalog import ModelEntry, encodes_own_prompts, load_catalog
from models.diffusers_format.entries import INPAINTING_UNET
from models.diffusion.inpainting_unet import (
    ImagePosterior,
    MaskedImageLatents,
    latent_repaint_mask,
    masked_pixels,
)
from models.diffusion.sampler import DenoisingBatch, PlanCache
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.scheduler_config import SchedulerOptions
from workers.memory_budget import gauge_for, measure_row_limit

if TYPE_CHECKING:
    from models.diffusers_format.text import PromptEncoder

log = logging.getLogger(__name__)

DIFFUSION_KINDS = frozenset({"diffusion", "latent-diffusion"})


class Codec(Protocol):
    """An autoencoder in ONNX Runtime (`models.onnx.runtime.Codec`)."""

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray | None]: ...

    def decode(
        self, latents: np.ndarray | None = None, codes: np.ndarray | None = None
    ) -> np.ndarray: ...

    def reconstruct(self, images: np.ndarray) -> np.ndarray: ...

    def decode_tensor(self, latents: torch.Tensor, out: torch.Tensor | None = None) -> Any: ...


CodecLoader = Callable[[ModelEntry, list[str] | None, torch.device], Codec]


def resolve_device(setting: str) -> torch.device:
    """`auto` → CUDA when present, else CPU; `cuda` / `cuda:N` must exist (a clear error, never a
    silent fall back to the CPU)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"DDSERVE_DEVICE={setting} but no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(
                f"DDSERVE_DEVICE={setting} but this machine has {count} CUDA device(s): "
                f"cuda:0 … cuda:{count - 1}"
            )
    return device


def _default_codec_loader(
    entry: ModelEntry, providers: list[str] | None, device: torch.device, threads: int | None = None
) -> Codec:
    """ONNX Runtime on the model's exported graphs (PyTorch only if it has none, with a warning),
    with `threads` intra-op threads (None: ONNX Runtime's default)."""
    from models.onnx.runtime import load_codec

    return load_codec(entry, providers, device=str(device), threads=threads)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compile_mode(settings: Settings, device: torch.device) -> str:
    """inductor's mode for the diffusion networks: `reduce-overhead` (CUDA graphs, captured per
    bucket: the padded calls have a few fixed shapes, which is what graph capture needs) when
    `cuda_graphs` is set, else the default. CUDA graphs without a CUDA device are refused, not
    silently dropped."""
    if not settings.cuda_graphs:
        return "default"
    if device.type != "cuda":
        raise ValueError(
            f"DDSERVE_CUDA_GRAPHS=true needs a CUDA device; this worker runs on {device}"
        )
    if not settings.compile:
        raise ValueError("DDSERVE_CUDA_GRAPHS=true needs DDSERVE_COMPILE=true (graphs per bucket)")
    return "reduce-overhead"


def batch_buckets(setting: str, max_batch: int) -> tuple[int, ...]:
    """The batch sizes network calls are padded up to: the setting's, or powers of two up to
    `max_batch` (and `max_batch` itself)."""
    if setting.strip():
        sizes = {int(part) for part in setting.split(",") if part.strip()}
        if not sizes or min(sizes) < 1:
            raise ValueError(f"DDSERVE_COMPILE_BUCKETS must list sizes ≥ 1, got {setting!r}")
        return tuple(sorted(sizes))
    sizes = {1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch}
    return tuple(sorted(sizes | {max_batch}))


def _pad_rows(value: torch.Tensor, rows: int) -> torch.Tensor:
    """`value` [n, ...] grown to [rows, ...] by repeating its last row."""
    extra = rows - value.shape[0]
    return torch.cat([value, value[-1:].expand(extra, *value.shape[1:])]) if extra > 0 else value


class Denoiser:
    """ε_θ(x [N, C, H, W], t [N], cond [N, ...] | None) → [N, C, H, W] float32 on the model's device.

    - Inputs go channels_last to match the weights' memory format (faster convolutions on CUDA).
    - `dtype`: the network's precision (bfloat16 / float16 weights and activations); x is cast to it
      on the way in and the output back to float32, so the sampler's arithmetic is unchanged.
    - `buckets`: a call of N rows is padded to the smallest bucket ≥ N (its last row repeated) and
      cut back after, so a compiled network sees a few fixed shapes instead of one per batch size.
      Rows are independent in the U-Net (group norm and attention act within a sample), so the
      padding never changes the real rows' results.
    """

    def __init__(
        self,
        network: nn.Module,
        channels_last: bool,
        *,
        dtype: torch.dtype = torch.float32,
        buckets: tuple[int, ...] = (),
    ) -> None:
        self.network = network
        self.channels_last = channels_last
        self.dtype = dtype
        self.buckets = tuple(sorted(buckets))

    def bucket(self, rows: int) -> int:
        """The padded size of a call of `rows` rows (itself beyond the largest bucket)."""
        return next((size for size in self.buckets if size >= rows), rows)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        padded = self.bucket(rows)
        if padded != rows:
            x, t = _pad_rows(x, padded), _pad_rows(t, padded)
            cond = None if cond is None else _pad_rows(cond, padded)
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = self.network(x, t, cond)
        return out[:rows].float().contiguous()


@dataclass
class DiffusionModel:
    """A warm diffusion model and everything a `DenoisingBatch` of it needs."""

    entry: ModelEntry
    denoiser: Denoiser
    schedule: NoiseSchedule
    sample_shape: tuple[int, int, int]  # (C, H, W) of x_t: pixels, or latents for latent diffusion
    device: torch.device
    null_condition: torch.Tensor | None
    classifier: nn.Module | None = None
    first_stage: Codec | None = None  # latent diffusion: decodes x_0 latents to pixels
    latent_scale: float = 1.0
    # A text pipeline's tokenizer + text encoder (`models.diffusers_format.text`): conditioning
    # rows are its hidden states, encoded by the worker; None where the gateway tokenizes.
    prompt_encoder: PromptEncoder | None = None
    latent_shift: float = 0.0  # diffusers' shift_factor: z = s·(E(x) − shift)
    row_limit: int | None = None  # rows per call the device holds (`workers.memory_budget`)
    # Latent models that make other sizes (`ModelEntry.size_multiple`): a first-stage codec that
    # encodes and decodes any H × W, made on first need (`first_stage` itself when its ONNX graphs
    # have dynamic H and W; `models.diffusers_format.loading.resizable_codec`).
    resizable_first_stage: Callable[[], Codec] | None = None
    # An inpainting UNet's first stage in PyTorch (`posterior`, which ONNX graphs lack: they give
    # μ only), made on first need (`ModelPool._torch_codec`).
    torch_first_stage: Callable[[], Codec] | None = None
    # The sampling options of its diffusers scheduler config (`from_diffusers`); zoo models have
    # none and keep ddserve's defaults.
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    plan_cache: PlanCache = field(init=False)

    def __post_init__(self) -> None:
        self.plan_cache = PlanCache(self.schedule)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def is_latent(self) -> bool:
        return self.entry.kind == "latent-diffusion"

    @property
    def inpainting_unet(self) -> bool:
        """Whether its UNet also reads a mask and a masked image (`models.diffusion.inpainting_unet`)."""
        return bool(self.entry.network.get(INPAINTING_UNET))

    @property
    def input_channels(self) -> int:
        """Channels of the network's input: x_t's, plus an inpainting UNet's 1 + c."""
        channels = self.sample_shape[0]
        return 2 * channels + 1 if self.inpainting_unet else channels

    @property
    def clip_denoised(self) -> bool:
        defaults = self.entry.defaults
        return bool(defaults.clip_denoised) if defaults is not None else not self.is_latent

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the model's own images."""
        return self.entry.image.height, self.entry.image.width

    def sample_shape_at(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of x_t for images of height × width: the pixels, or for latent diffusion the
        first stage's grid h = H / f, w = W / f (f: the model's own image over its latent size)."""
        channels, own_h, own_w = self.sample_shape
        factor_h, factor_w = self.entry.image.height // own_h, self.entry.image.width // own_w
        return channels, height // factor_h, width // factor_w

    def new_batch(self, sample_shape: tuple[int, int, int] | None = None) -> DenoisingBatch:
        """An empty running set of this model, of samples of `sample_shape` (default: the model's
        own; a worker keeps one per model and size in flight)."""
        return DenoisingBatch(
            self.denoiser,
            self.schedule,
            sample_shape or self.sample_shape,
            prediction_type=self.entry.prediction_type,
            null_condition=self.null_condition,
            classifier=self.classifier,
            device=self.device,
            plan_cache=self.plan_cache,
        )

    def to_pixels(self, x0: torch.Tensor) -> torch.Tensor:
        """Finished samples [N, C, h, w] → images [N, C, H, W] in [−1, 1] on the CPU.

        Latent diffusion models z = s·(E(x) − b) (s = `latent_scale`, Rombach et al. 2022 §4.3.2;
        b = `latent_shift`, diffusers' `shift_factor`, 0 for most models), so the image is
        D(z / s + b); the decoder runs in ONNX Runtime (zoo) or PyTorch (diffusers pipelines),
        reading the latents on the model's device (ONNX Runtime's IO binding: no host round trip
        on a GPU) — only the images come to the host."""
        if not self.is_latent:
            return x0.detach().float().cpu().clamp(-1.0, 1.0)
        if self.first_stage is None:
            raise RuntimeError(f"latent model {self.name!r} has no first-stage decoder loaded")
        # [N, *latent_shape] on the device
        latents = x0.detach().float() / self.latent_scale + self.latent_shift
        codec = self.first_stage
        if tuple(x0.shape[1:]) != self.sample_shape:  # another size than the model's own
            if self.resizable_first_stage is None:
                raise RuntimeError(
                    f"latent model {self.name!r} decodes latents of {list(self.sample_shape)} "
                    f"only, not {list(x0.shape[1:])}"
                )
            codec = self.resizable_first_stage()
        return codec.decode_tensor(latents).cpu().clamp(-1.0, 1.0)

    def from_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [−1, 1] → the model's x_0 [N, *sample_shape]: the images
        themselves, or for latent diffusion z = s·(E(x) − b) (the inverse of `to_pixels` up to the
        autoencoder's reconstruction; the encoder's mean, through ONNX Runtime or PyTorch)."""
        images = images.detach().float().cpu()
        if not self.is_latent:
            return images
        if self.first_stage is None:
            raise RuntimeError(f"latent model {self.name!r} has no first-stage encoder loaded")
        codec = self.first_stage
        if tuple(images.shape[-2:]) != self.image_size:  # another size than the model's own
            if self.resizable_first_stage is None:
                raise RuntimeError(
                    f"latent model {self.name!r} encodes {self.image_size} images only, not "
                    f"{tuple(images.shape[-2:])}"
                )
            codec = self.resizable_first_stage()
        latents = codec.encode(images.numpy().astype(np.float32))["latents"]
        if latents is None:
            raise RuntimeError(f"the first stage of latent model {self.name!r} gave no latents")
        z = torch.from_numpy(np.asarray(latents, dtype=np.float32))  # [N, c, h, w]
        return (z - self.latent_shift) * self.latent_scale

    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) [1, c, h, w] of images [1, C, H, W] in [−1, 1] through the first stage's
        PyTorch module (ONNX graphs give the mean only), on the CPU."""
        codec: Any = self.first_stage
        if not hasattr(codec, "posterior") and self.torch_first_stage is not None:
            codec = self.torch_first_stage()  # the diffusers module beside the ONNX graphs
        if not hasattr(codec, "posterior"):
            raise RuntimeError(f"latent model {self.name!r} has no first stage to sample from")
        return codec.posterior(pixels.detach().float().cpu().numpy())

    def image_posterior(self, image: torch.Tensor) -> ImagePosterior:
        """The first stage's posterior of `image` [C, H, W] in [−1, 1], where an inpainting
        UNet's sample of strength < 1 draws its x_0 (`models.diffusion.inpainting_unet`)."""
        mean, std = self._posterior(image[None])  # [1, c, h, w] each
        return ImagePosterior(mean[0], std[0], self.latent_scale)

    def masked_image_latents(self, image: torch.Tensor, keep: torch.Tensor) -> MaskedImageLatents:
        """An inpainting UNet's inputs for `image` [C, H, W] in [−1, 1] and the mask `keep`
        [1, H, W] (1 = keep): the masked image's posterior through the first stage, and the
        repaint mask on its latent grid."""
        pixels = masked_pixels(image.detach().float().cpu(), keep)[None]  # [1, C, H, W]
        mean, std = self._posterior(pixels)  # [1, c, h, w] each, on the CPU
        return MaskedImageLatents(
            mask=latent_repaint_mask(keep, (mean.shape[-2], mean.shape[-1])),
            mean=mean[0],
            std=std[0],
            scaling_factor=self.latent_scale,
        )


@dataclass
class CodecModel:
    """A warm autoencoder (encode, decode, reconstruct through ONNX Runtime)."""

    entry: ModelEntry
    codec: Codec
    # The first stage of an imported pipeline (`ModelEntry.size_multiple`: its factor f) takes
    # images and latents of other sizes: a codec that does, made on first need (`codec` itself
    # when its ONNX graphs have dynamic H and W; `models.diffusers_format.loading.resizable_codec`).
    resizable_codec: Callable[[], Codec] | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    def codec_for(self, argument: str, rows: np.ndarray) -> Codec:
        """The codec for a call on `rows` ("images" [N, C, H, W], "latents" [N, c, h, w] or
        "codes" [N, h, w]): the model's own, unless the rows have another size and it does not
        take any (then the resizable one; without one, the own codec refuses them clearly)."""
        entry = self.entry
        own = {
            "images": [entry.image.channels, entry.image.height, entry.image.width],
            "latents": entry.latent_shape,
            "codes": entry.code_shape,
        }[argument]
        if self.resizable_codec is None or list(rows.shape[1:]) == own or self.codec.resizable:
            return self.codec
        return self.resizable_codec()


LoadedModel = DiffusionModel | CodecModel


class ModelPool:
    """Loads each model at most once per worker and keeps it.

    `codec_loader` defaults to `models.onnx.runtime.load_codec`; `catalog` to the zoo of
    `settings.model_repository()` (both injectable so that tests can build a zoo of tiny models)."""

    def __init__(
        self,
        settings: Settings,
        *,
        codec_loader: CodecLoader | None = None,
        catalog: dict[str, ModelEntry] | None = None,
    ) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self._codec_loader = codec_loader or functools.partial(
            _default_codec_loader, threads=settings.ort_threads
        )
        self._catalog = (
            catalog if catalog is not None else load_catalog(settings.model_repository())
        )
        self._models: dict[str, LoadedModel] = {}
        self._codecs: dict[str, Codec] = {}
        self._resizable_codecs: dict[str, Codec] = {}
        self._torch_codecs: dict[str, Codec] = {}
        self._resizable_lock = threading.Lock()

    @property
    def catalog(self) -> dict[str, ModelEntry]:
        return self._catalog

    def entry(self, name: str) -> ModelEntry:
        if name not in self._catalog:
            known = ", ".join(sorted(self._catalog)) or "none"
            raise KeyError(f"unknown model {name!r}; this worker's zoo has: {known}")
        return self._catalog[name]

    def get(self, name: str) -> LoadedModel:
        """The warm model `name`, loading it on first use."""
        model = self._models.get(name)
        if model is None:
            model = self._load(self.entry(name))
            self._models[name] = model
        return model

    def warm(self, names: list[str]) -> None:
        for name in names:
            self.get(name)
            log.info("model %s loaded on %s", name, self.device)

    def codec(self, name: str) -> Codec:
        codec = self._codecs.get(name)
        if codec is None:
            providers = [p.strip() for p in self.settings.onnx_providers.split(",") if p.strip()]
            codec = self._codec_loader(self.entry(name), providers or None, self.device)
            self._codecs[name] = codec
        return codec

    def _load(self, entry: ModelEntry) -> LoadedModel:
        if entry.kind in DIFFUSION_KINDS:
            return self._load_diffusion(entry)
        model = CodecModel(entry=entry, codec=self.codec(entry.name))
        if entry.size_multiple is not None:
            model.resizable_codec = self._resizable_codec(entry.name)
        return model

    def _load_diffusion(self, entry: ModelEntry) -> DiffusionModel:
        text = self._text_pipeline(entry) if is_text_pipeline(entry) else None
        if text is not None:
            network, schedule, shape, null = text.network, text.schedule, text.shape, text.null
            options = text.options
        else:
            network, schedule, options, shape, null = self._denoiser_parts(entry)
        dtype = self._precision(entry)
        network = network.to(dtype)
        channels_last = self.device.type == "cuda"
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        buckets: tuple[int, ...] = ()
        mode = compile_mode(self.settings, self.device)  # refuses CUDA graphs it cannot give
        if self.settings.compile:
            buckets = batch_buckets(self.settings.compile_buckets, self.settings.max_batch)
            network = torch.compile(network, dynamic=False, backend="inductor", mode=mode)
        model = DiffusionModel(
            entry=entry,
            denoiser=Denoiser(network, channels_last, dtype=dtype, buckets=buckets),
            schedule=schedule,
            sample_shape=shape,
            device=self.device,
            null_condition=null,
            scheduler=options,
        )
        if text is not None:
            model.prompt_encoder = text.encoder
        if self.settings.compile:
            warm_up(model)
        model.row_limit = measure_row_limit(
            entry.name,
            functools.partial(call_rows, model),
            gauge_for(self.device),
            self.settings.memory_fraction,
            self.settings.max_batch,
        )
        if entry.classifier and entry.classifier in self._catalog:
            model.classifier = self._load_classifier(self._catalog[entry.classifier])
        if entry.kind == "latent-diffusion":
            if not entry.first_stage:
                raise ValueError(f"latent model {entry.name!r} names no first_stage autoencoder")
            model.first_stage = self.codec(entry.first_stage)
            model.latent_scale = latent_scale(entry, self.entry(entry.first_stage))
            if entry.size_multiple is not None:
                model.resizable_first_stage = self._resizable_codec(entry.first_stage)
            if model.inpainting_unet:
                model.torch_first_stage = self._torch_codec(entry.first_stage)
            model.latent_shift = float(entry.network.get("latent_shift", 0.0))
        return model

    def _resizable_codec(self, name: str) -> Callable[[], Codec]:
        """The loader of a codec of the first stage `name` that takes any image size, run on the
        first rows of another size and kept (one per first stage: the latent model and its first
        stage's own routes share it; `models.diffusers_format.loading.resizable_codec`). Locked:
        the engine's prepare thread (an inpaint/img2img image's encoding) and its stepping thread
        (a decoding) may both be the first to need it."""

        def load() -> Codec:
            with self._resizable_lock:
                codec = self._resizable_codecs.get(name)
                if codec is None:
                    from models.diffusers_format.loading import resizable_codec

                    own = self.codec(name)
                    # the diffusers module `_torch_codec` made already (fixed-size graphs), else
                    # `own` (any size) or a new diffusers module
                    made = None if own.resizable else self._torch_codecs.get(name)
                    codec = made or resizable_codec(own, self.entry(name), self.device)
                    self._resizable_codecs[name] = codec
                    log.info("model %s: %s for other image sizes", name, codec.backend)
                return codec

        return load

    def _torch_codec(self, name: str) -> Callable[[], Codec]:
        """The loader of the first stage `name` in PyTorch (the diffusers module: its posterior,
        an inpainting UNet's masked image): the loaded codec or the resizable one when either is
        it, else made once and kept. Not `_resizable_codec`: ONNX graphs of dynamic size are
        resizable themselves, and still give the posterior's mean only. Locked as it is (the
        prepare thread calls it)."""

        def load() -> Codec:
            with self._resizable_lock:
                made = [self._codecs.get(name), self._resizable_codecs.get(name)]
                for codec in (*made, self._torch_codecs.get(name)):
                    if codec is not None and hasattr(codec, "posterior"):
                        return codec
                from models.diffusers_format.loading import DiffusersCodec

                codec = DiffusersCodec(self.entry(name), self.device)
                self._torch_codecs[name] = codec
                log.info("model %s: torch for the posterior of its first stage", name)
                return codec

        return load

    def _text_pipeline(self, entry: ModelEntry) -> TextPipelineParts:
        """A text pipeline's cross-attention UNet, prompt encoder (its own tokenizer and text
        encoder — SD's CLIP, LDMTextToImagePipeline's LDMBert, as `Conditioning.tokenizer` says —
        with an LRU of `text_cache_size` prompts), ∅ = the encoding of "", and the schedule and
        sampling options of its scheduler config."""
        from models.diffusers_format.entries import scheduler_config
        from models.diffusers_format.text import PROMPT_ENCODERS, load_cross_attention_unet
        from models.diffusion.scheduler_config import from_diffusers

        if entry.path is None or entry.conditioning is None:
            raise ValueError(f"model {entry.name!r} has no folder or no text conditioning")
        encoder_class = PROMPT_ENCODERS[entry.conditioning.tokenizer]
        encoder = encoder_class.from_folder(entry.path, self.device, self.settings.text_cache_size)
        network = load_cross_attention_unet(entry.path, self.device, entry.component or "unet")
        schedule, options = from_diffusers(scheduler_config(entry.scheduler or {}))
        c, h, w = entry.latent_shape or (
            entry.image.channels,
            entry.image.height,
            entry.image.width,
        )
        null = encoder.null_condition()  # [L, D]
        return TextPipelineParts(
            network, schedule, options, (int(c), int(h), int(w)), null, encoder
        )

    def _denoiser_parts(
        self, entry: ModelEntry
    ) -> tuple[
        nn.Module, NoiseSchedule, SchedulerOptions, tuple[int, int, int], torch.Tensor | None
    ]:
        """The network (ddserve's signature, eval, on the device), its noise schedule and sampling
        options, the shape of x_t and the ∅ condition (None: unconditional, or no ∅) of a zoo card
        or a diffusers pipeline (`models.diffusers_format.loading`; the schedule and options from
        its scheduler config, `scheduler_config.from_diffusers`)."""
        if entry.format == "diffusers":
            from models.diffusers_format.entries import scheduler_config
            from models.diffusers_format.loading import load_unet
            from models.diffusion.scheduler_config import from_diffusers

            network = load_unet(entry, self.device)
            schedule, options = from_diffusers(scheduler_config(entry.scheduler or {}))
            c, h, w = entry.latent_shape or (
                entry.image.channels,
                entry.image.height,
                entry.image.width,
            )
            return network, schedule, options, (int(c), int(h), int(w)), None
        from models.registry import load_network

        network = load_network(entry, self.device).eval().requires_grad_(False)
        unet = entry.network.get("unet", {})
        size = int(unet.get("image_size", entry.image.height))
        shape = (int(unet.get("in_channels", entry.image.channels)), size, size)
        null = network.null_condition() if hasattr(network, "null_condition") else None
        schedule_spec = entry.schedule
        schedule = NoiseSchedule.create(
            schedule_spec.kind if schedule_spec else "linear",
            schedule_spec.num_timesteps if schedule_spec else 1000,
        )
        return network, schedule, SchedulerOptions(), shape, null

    def _precision(self, entry: ModelEntry) -> torch.dtype:
        """The denoiser's dtype: the setting, else the card's, else float32."""
        name = self.settings.dtype or entry.dtype or "float32"
        if name == "float16" and self.device.type != "cuda":
            raise ValueError(
                f"model {entry.name!r}: float16 needs a CUDA device; use bfloat16 on the CPU"
            )
        return DTYPES[name]

    def _load_classifier(self, entry: ModelEntry) -> nn.Module | None:
        """The noisy classifier f_φ(y | x_t, t) for classifier guidance, or None if it cannot load
        (the diffusion model still serves; requests with classifier_scale > 0 then fail clearly)."""
        from models.registry import load_network

        try:
            return load_network(entry, self.device).eval().requires_grad_(False)
        except (KeyError, FileNotFoundError) as exc:
            log.warning("classifier %s not loaded: %s", entry.name, exc)
            return None


def call_rows(model: DiffusionModel, rows: int) -> torch.Tensor:
    """One network call of the model over `rows` rows of zeros (∅-conditioned): the warm-up's and
    the memory probe's call."""
    _, height, width = model.sample_shape
    x = torch.zeros((rows, model.input_channels, height, width), device=model.device)
    # The timesteps' dtype of the model's real calls: float32 for a diffusers model (its rows follow
    # diffusers' timesteps, `StepConvention` 5), so that a compiled denoiser warms up on that graph.
    dtype = torch.float32 if model.scheduler.from_diffusers else torch.long
    t = torch.zeros(rows, dtype=dtype, device=model.device)
    cond = None
    if model.null_condition is not None:
        cond = model.null_condition.to(model.device).expand(rows, *model.null_condition.shape)
    return model.denoiser(x, t, cond)


def is_text_pipeline(entry: ModelEntry) -> bool:
    """A diffusers pipeline conditioned on text through its own tokenizer and text encoder."""
    return entry.format == "diffusers" and encodes_own_prompts(entry.conditioning)


@dataclass
class TextPipelineParts:
    """What `ModelPool._text_pipeline` loads for a text pipeline."""

    network: nn.Module  # CrossAttentionUNet: (z, t, hidden states [N, L, D]) → prediction
    schedule: NoiseSchedule
    options: SchedulerOptions
    shape: tuple[int, int, int]  # (C, h, w) of the latents
    null: torch.Tensor  # [L, D] ∅ = τ("")
    encoder: PromptEncoder


def warm_up(model: DiffusionModel) -> None:
    """Compile the denoiser for each of its buckets before the worker takes jobs (a first call
    would otherwise stall a running batch for the compile), one log line per bucket."""
    for rows in model.denoiser.buckets:
        started = time.perf_counter()
        call_rows(model, rows)
        log.info(
            "model %s: compiled for batch %d in %.1f s",
            model.name,
            rows,
            time.perf_counter() - started,
        )


def latent_scale(entry: ModelEntry, first_stage: ModelEntry) -> float:
    """s in z = s·μ(x): the diffusion model's `network.latent_scale`, else 1 / the first stage's
    `network.latent_std` (the std of μ over the training set), else 1."""
    if "latent_scale" in entry.network:
        return float(entry.network["latent_scale"])
    std = first_stage.network.get("latent_std")
    return 1.0 / float(std) if std else 1.0


def describe(model: LoadedModel) -> dict[str, Any]:
    """A short summary for logs."""
    if isinstance(model, DiffusionModel):
        return {
            "model": model.name,
            "kind": model.entry.kind,
            "shape": model.sample_shape,
            "device": str(model.device),
            "classifier": model.classifier is not None,
        }
    return {"model": model.name, "kind": model.entry.kind}
