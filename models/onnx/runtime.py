"""The autoencoders' inference API for the workers: encode, decode and reconstruct through ONNX
Runtime sessions on the model's `encoder.onnx` / `decoder.onnx`, or through PyTorch when the model
has no ONNX files (said in the log).

    codec = load_codec(entry)                       # models.catalog.ModelEntry
    out = codec.encode(images)                      # images: float32 [N, C, H, W] in [−1, 1]
    out["latents"]                                  # float32 [N, *latent_shape] (the VAE's: μ)
    out["codes"]                                    # int64 [N, h, w] for a VQ-VAE, else None
    codec.decode(latents=...) or codec.decode(codes=...)   # float32 [N, C, H, W] in [−1, 1]
    codec.reconstruct(images)
    codec.decode_tensor(latents)                    # torch [N, *latent_shape] → torch [N, C, H, W]
                                                    # on the latents' device (IO binding)
    codec.resizable                                 # True: images f·h × f·w ↔ latents h × w of any
                                                    # size (an imported first stage's graphs with
                                                    # dynamic height and width axes); False: the
                                                    # model's own size only (the zoo's graphs)

Providers: `CUDAExecutionProvider` first when onnxruntime-gpu provides it, then
`CPUExecutionProvider`; a list (settings `onnx_providers`, comma-separated) overrides the order.
This module imports neither torch nor onnxruntime until a codec needs them."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from models.catalog import ModelEntry

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
CODEBOOK_KEY = "quantizer.codebook"  # the VQ-VAE's codebook [K, D] in weights.safetensors


def parse_providers(setting: str | None) -> list[str] | None:
    """`Settings.onnx_providers` ("CUDAExecutionProvider,CPUExecutionProvider") → a list; "" → None."""
    names = [p.strip() for p in (setting or "").split(",") if p.strip()]
    return names or None


class ProviderUnavailable(RuntimeError):
    """A CUDA execution provider was asked for (by name, or by a CUDA device) and cannot run: the
    worker must not fall back to the CPU in silence."""


def resolve_providers(
    providers: list[str] | None = None, *, require_cuda: bool = False
) -> list[str]:
    """The providers to ask for, in order.

    - named (`DDSERVE_ONNX_PROVIDERS`): those this onnxruntime has; a named CUDA provider it lacks
      is an error (`ProviderUnavailable`), any other missing one is dropped with a warning;
    - none named: CUDA first when available, then CPU; with `require_cuda` (the worker runs on a
      CUDA device) CUDA must be available.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not providers:
        if require_cuda and CUDA not in available:
            raise ProviderUnavailable(_no_cuda_message(available, "the worker's device is CUDA"))
        return [p for p in (CUDA, CPU) if p in available]
    missing = [p for p in providers if p not in available]
    if CUDA in missing:
        raise ProviderUnavailable(_no_cuda_message(available, "DDSERVE_ONNX_PROVIDERS names it"))
    if missing:
        log.warning(
            "ONNX Runtime providers %s are not available here (available: %s); skipping them",
            ", ".join(missing),
            ", ".join(available),
        )
    chosen = [p for p in providers if p in available]
    return chosen or [CPU]


def _no_cuda_message(available: list[str], why: str) -> str:
    return (
        f"ONNX Runtime's {CUDA} is needed ({why}) but this onnxruntime offers only "
        f"{', '.join(available)}: install the `gpu` extra (onnxruntime-gpu built for this CUDA "
        "major, see docs/gpu.md), or run the autoencoders on the CPU with "
        f"DDSERVE_ONNX_PROVIDERS={CPU}"
    )


def check_session_providers(session: Any, chosen: list[str], name: str) -> None:
    """ONNX Runtime falls back to the CPU in silence when the CUDA provider fails to load (a
    missing libcudnn / libcublas of the wrong CUDA major): make that an error."""
    if CUDA in chosen and CUDA not in session.get_providers():
        raise ProviderUnavailable(
            f"{name}: ONNX Runtime's {CUDA} failed to load (ONNX Runtime's log above names the "
            "missing library, e.g. libcudnn.so.9 or libcublasLt.so.12): onnxruntime-gpu and the "
            "CUDA libraries must share one CUDA major; or set "
            f"DDSERVE_ONNX_PROVIDERS={CPU}"
        )


class Codec(ABC):
    """encode / decode / reconstruct of one autoencoder on numpy arrays."""

    backend: str
    # Takes images and latents of any size the first stage's factor divides (the diffusers
    # module; ONNX graphs with dynamic spatial axes), not only the model's own.
    resizable: bool = False

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.is_vq = entry.kind == "vqvae"

    @property
    def name(self) -> str:
        return self.entry.name

    def image_shape(self, grid: tuple[int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the images a latent grid (h, w) decodes to: f·h × f·w for a codec that
        takes any size, else the model's own."""
        spec = self.entry.image
        if not self.resizable:
            return spec.channels, spec.height, spec.width
        f = self.entry.latent_factor
        return spec.channels, grid[0] * f, grid[1] * f

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        """Images [N, C, H, W]: the model's own H × W, or for a codec that takes any size
        (`resizable`) any H × W the first stage's factor f divides."""
        spec = self.entry.image
        images = np.asarray(images, dtype=np.float32)
        if self.resizable:
            f = self.entry.latent_factor
            if (
                images.ndim != 4
                or images.shape[1] != spec.channels
                or images.shape[2] % f
                or images.shape[3] % f
            ):
                raise ValueError(
                    f"{self.name} expects images [N, {spec.channels}, H, W] with H and W "
                    f"multiples of {f}, got {list(images.shape)}"
                )
            return np.ascontiguousarray(images)
        expected = (spec.channels, spec.height, spec.width)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{self.name} expects images [N, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {list(images.shape)}"
            )
        return np.ascontiguousarray(images)

    def _latent_shape_error(self, shape: list[int]) -> str | None:
        """Why latents of `shape` [N, ...] do not fit (None: they do): [N, *latent_shape], or for
        a resizable codec [N, c, h, w] of any h × w with c the first stage's channels."""
        expected = list(self.entry.latent_shape or [])
        if self.resizable:
            if len(shape) != 4 or shape[1] != expected[0]:
                return f"{self.name} expects latents [N, {expected[0]}, h, w], got {shape}"
            return None
        if len(shape) != len(expected) + 1 or shape[1:] != expected:
            return f"{self.name} expects latents [N, {expected}], got {shape}"
        return None

    def _check_latents(self, latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float32)
        error = self._latent_shape_error(list(latents.shape))
        if error:
            raise ValueError(error)
        return np.ascontiguousarray(latents)

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        shape, size = list(self.entry.code_shape or []), int(self.entry.codebook_size or 0)
        fits = codes.ndim == 3 if self.resizable else list(codes.shape[1:]) == shape
        if not np.issubdtype(codes.dtype, np.integer) or not fits:
            wanted = "h, w" if self.resizable else str(shape)
            raise ValueError(
                f"{self.name} expects integer codes [N, {wanted}], got {codes.dtype} {list(codes.shape)}"
            )
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise ValueError(f"{self.name} codes must lie in [0, {size})")
        return np.ascontiguousarray(codes, dtype=np.int64)

    def decode(
        self, latents: np.ndarray | None = None, codes: np.ndarray | None = None
    ) -> np.ndarray:
        """latents [N, *latent_shape] or (VQ-VAE) codes [N, h, w] → images [N, C, H, W] in [−1, 1].

        A VQ-VAE given latents decodes their nearest codes (its decoder only sees code vectors)."""
        if (latents is None) == (codes is None):
            raise ValueError("pass exactly one of latents or codes")
        if codes is not None:
            if not self.is_vq:
                raise ValueError(f"{self.name} ({self.entry.kind}) has no codes; pass latents")
            return self._decode_codes(self._check_codes(codes))
        assert latents is not None
        checked = self._check_latents(latents)
        if self.is_vq:
            return self._decode_codes(self._nearest_codes(checked))
        return self._decode_latents(checked)

    def decode_tensor(self, latents: Any, out: Any = None) -> Any:
        """latents: a float32 torch tensor [N, *latent_shape] → images [N, C, H, W] in [−1, 1], a
        torch tensor on the latents' device (into `out` when given). This default goes through
        the host (`decode`); ONNX Runtime binds the tensors where they are (`OnnxCodec`)."""
        import torch

        images = torch.from_numpy(self.decode(latents=latents.detach().float().cpu().numpy()))
        if out is None:
            return images.to(latents.device)
        return out.copy_(images)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        encoded = self.encode(images)
        if encoded["codes"] is not None:
            return self.decode(codes=encoded["codes"])
        return self.decode(latents=encoded["latents"])

    @abstractmethod
    def encode(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        """images [N, C, H, W] in [−1, 1] → {"latents": float32, "codes": int64 [N, h, w] or None}."""

    @abstractmethod
    def _decode_latents(self, latents: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _decode_codes(self, codes: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _nearest_codes(self, latents: np.ndarray) -> np.ndarray: ...


def spatial_axes_dynamic(encoder: Any, decoder: Any) -> bool:
    """Whether both sessions' inputs have symbolic (named, not numeric) height and width axes:
    graphs exported with dynamic spatial axes (`models.diffusers_format.onnx_export`) take every
    size; older ones, and the zoo's, are fixed at the model's own."""
    images = encoder.get_inputs()[0].shape  # [N, C, H, W]
    latents = decoder.get_inputs()[0].shape  # [N, c, h, w], or a VQ-VAE's codes [N, h, w]
    return all(not isinstance(dim, int) for dim in (*images[-2:], *latents[-2:]))


def nearest_codes(latents: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """latents [N, D, h, w], codebook [K, D] → argmin_k ‖z − e_k‖² per position, int64 [N, h, w]."""
    z = latents.transpose(0, 2, 3, 1)  # [N, h, w, D]
    distances = (codebook**2).sum(1) - 2.0 * z @ codebook.T  # [N, h, w, K]
    return distances.argmin(-1).astype(np.int64)


class OnnxCodec(Codec):
    backend = "onnxruntime"

    def __init__(
        self,
        entry: ModelEntry,
        providers: list[str] | None = None,
        threads: int | None = None,
        *,
        require_cuda: bool = False,
    ) -> None:
        import onnxruntime as ort

        super().__init__(entry)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        chosen = resolve_providers(providers, require_cuda=require_cuda)
        self.encoder = ort.InferenceSession(
            str(entry.file("encoder_onnx")), options, providers=chosen
        )
        self.decoder = ort.InferenceSession(
            str(entry.file("decoder_onnx")), options, providers=chosen
        )
        for session in (self.encoder, self.decoder):
            check_session_providers(session, chosen, entry.name)
        self.providers = self.encoder.get_providers()
        self._output_names = [o.name for o in self.encoder.get_outputs()]
        self._decoder_input = self.decoder.get_inputs()[0].name
        self._decoder_output = self.decoder.get_outputs()[0].name
        self._codebook: np.ndarray | None = None
        self.resizable = spatial_axes_dynamic(self.encoder, self.decoder)
        log.info(
            "%s: ONNX Runtime with %s (%s)",
            entry.name,
            ", ".join(self.providers),
            "any image size" if self.resizable else "its own image size",
        )

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        outputs = self.encoder.run(None, {"images": self._check_images(images)})
        named = dict(zip(self._output_names, outputs, strict=True))
        return {"latents": named["latents"], "codes": named.get("codes")}

    def _decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self.decoder.run(None, {self._decoder_input: latents})[0]

    def decode_tensor(self, latents: Any, out: Any = None) -> Any:
        """The decoder on torch tensors through ONNX Runtime's IO binding: the session reads the
        latents where they are and writes the images into a tensor allocated on the same device,
        so latents already on the GPU (the sampler's x_0) never make a host round trip on the
        way to the decoder. A VQ-VAE (nearest codes first) and a tensor on a device this session
        does not run on take the host path."""
        import torch

        on_cuda = latents.is_cuda
        if self.is_vq or (on_cuda and CUDA not in self.providers):
            return super().decode_tensor(latents, out)
        error = self._latent_shape_error(list(latents.shape))
        if error:
            raise ValueError(error)
        x = latents.detach().to(torch.float32).contiguous()  # [N, c, h, w]
        images_shape = (x.shape[0], *self.image_shape(tuple(x.shape[-2:])))  # [N, C, f·h, f·w]
        if out is None:
            out = torch.empty(images_shape, dtype=torch.float32, device=x.device)
        if tuple(out.shape) != images_shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor {list(images_shape)}")
        device_type, device_id = ("cuda", x.device.index or 0) if on_cuda else ("cpu", 0)
        if on_cuda:  # the sampler's kernels that produced x must be done before ORT reads it
            torch.cuda.synchronize(x.device)
        binding = self.decoder.io_binding()
        binding.bind_input(
            self._decoder_input, device_type, device_id, np.float32, list(x.shape), x.data_ptr()
        )
        binding.bind_output(
            self._decoder_output,
            device_type,
            device_id,
            np.float32,
            list(images_shape),
            out.data_ptr(),
        )
        self.decoder.run_with_iobinding(binding)
        return out

    def _decode_codes(self, codes: np.ndarray) -> np.ndarray:
        return self.decoder.run(None, {self._decoder_input: codes})[0]

    def _nearest_codes(self, latents: np.ndarray) -> np.ndarray:
        if self._codebook is None:
            from safetensors.numpy import load_file

            weights = self.entry.file("weights")
            if weights is None:
                raise FileNotFoundError(
                    f"{self.name} has no weights file to read its codebook from"
                )
            key = str(self.entry.network.get("codebook_key", CODEBOOK_KEY))
            self._codebook = load_file(str(weights))[key].astype(np.float32)
        return nearest_codes(latents, self._codebook)


class TorchCodec(Codec):
    """The same API on the PyTorch module (a model without ONNX files)."""

    backend = "torch"

    def __init__(self, entry: ModelEntry, device: str = "cpu") -> None:
        from models.registry import load_network

        super().__init__(entry)
        self.device = device
        self.model: Any = load_network(entry, device)

    def _run(self, fn: Any, array: np.ndarray) -> Any:
        import torch

        with torch.no_grad():
            return fn(torch.from_numpy(array).to(self.device))

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        out = self._run(self.model.encode, self._check_images(images))
        if self.is_vq:
            return {"latents": out.latents.cpu().numpy(), "codes": out.codes.cpu().numpy()}
        return {"latents": out.cpu().numpy(), "codes": None}

    def _decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._run(self.model.decode, latents).cpu().numpy()

    def _decode_codes(self, codes: np.ndarray) -> np.ndarray:
        return self._run(self.model.decode_codes, codes).cpu().numpy()

    def _nearest_codes(self, latents: np.ndarray) -> np.ndarray:
        return self._run(self.model.quantizer.nearest, latents).cpu().numpy()


def load_codec(
    entry: ModelEntry,
    providers: list[str] | None = None,
    threads: int | None = None,
    device: str = "cpu",
) -> Codec:
    """An ONNX Runtime codec when the model has both ONNX files, else PyTorch (with a warning).

    providers: ONNX Runtime execution providers in order of preference (None: CUDA first when
    available, then CPU); threads: ONNX Runtime intra-op threads (None: its default);
    device: the worker's torch device (a CUDA device requires ONNX Runtime's CUDA provider) and the
    device of the fallback."""
    missing = [role for role in ("encoder_onnx", "decoder_onnx") if entry.file(role) is None]
    if entry.format == "diffusers" and missing:  # an imported first stage not exported (yet)
        from models.diffusers_format.loading import DiffusersCodec

        return DiffusersCodec(entry, device)
    if not missing:
        return OnnxCodec(entry, providers, threads, require_cuda=device.startswith("cuda"))
    log.warning(
        "model %s has no ONNX file (%s missing in %s): using PyTorch instead of ONNX Runtime "
        "(run `ddserve export %s` to create them)",
        entry.name,
        " and ".join(missing),
        entry.path,
        entry.name,
    )
    return TorchCodec(entry, device)
