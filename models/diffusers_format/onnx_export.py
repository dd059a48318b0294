"""ONNX graphs of an imported pipeline's first stage (`AutoencoderKL`, `VQModel`), checked against
the diffusers module, so that `/encode`, `/decode`, `/reconstruct` and a latent model's decode run
in ONNX Runtime as the zoo's autoencoders do (`models.onnx.runtime.OnnxCodec`).

The graphs have the zoo's signatures (`models.onnx.export`), with `DiffusersCodec`'s meaning:
- KL: `images` [N, C, H, W] → `latents` = the posterior mean μ(x) [N, c, h, w]; decoder
  `latents` → `images` = D(z).
- VQ: `images` → `codes` [N, h, w] int64 (VQModel's own nearest-code search, argmin of the distance
  to the codebook) and `latents` = the pre-quantization h = quant_conv(E(x)) [N, D, h, w]; decoder
  `codes` → `images` = D(e_codes) (the code vectors, not quantized again). Decoding latents
  quantizes them first, on the host, against the codebook read from the component's weights
  (`ModelEntry.network["codebook_key"]`).

They are written into the pipeline's folder as `onnx/<component>_encoder.onnx` and
`onnx/<component>_decoder.onnx`, where the catalog finds them (`entries.py`, torch-free) and the
workers then load ONNX Runtime instead of diffusers. The check is the zoo's: max |ORT − torch| ≤ 1e-4
on random inputs and on the images' own latents, equal code indices, at a batch size other than the
export's and at image sizes other than the model's (the batch, height and width axes are dynamic:
one graph serves every size `size_multiple` allows). Graphs exported before the spatial axes were
dynamic have the model's own H × W; the workers keep running other sizes of those in PyTorch
(`loading.resizable_codec`) until `ddserve export NAME-vae` writes them again.
"""

from __future__ import annotations

import torch
from torch import nn

from models.catalog import ModelEntry
from models.diffusers_format.entries import onnx_files
from models.onnx.export import (
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    ParityCheck,
    ParityError,
    compare,
    export_graph,
)


class KLEncoder(nn.Module):
    """images → μ(x), the posterior mean of `AutoencoderKL`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images).latent_dist.mean


class KLDecoder(nn.Module):
    """latents → D(z)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents).sample


class VQEncoder(nn.Module):
    """images → (codes [N, h, w], h [N, D, h, w]) of `VQModel`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.encode(images).latents  # [N, D, h, w]
        _, _, (_, _, index) = self.model.quantize(h)
        return index.reshape(h.shape[0], *h.shape[2:]), h


class VQDecoder(nn.Module):
    """codes [N, h, w] → D(e_codes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        vectors = self.model.quantize.embedding(codes).permute(0, 3, 1, 2)  # [N, D, h, w]
        return self.model.decode(vectors, force_not_quantize=True).sample


def check_sizes(entry: ModelEntry) -> list[tuple[int, int]]:
    """(height, width) the graphs are checked at: the model's own, and two others of a different
    aspect (1.5·H × 0.75·W and 0.5·H × 1.5·W, rounded to multiples of the factor f) — at most
    about its own area, so that the check of a large first stage stays cheap."""
    spec, f = entry.image, entry.latent_factor

    def side(value: float) -> int:
        return max(f, round(value / f) * f)

    own = (spec.height, spec.width)
    others = [(side(1.5 * own[0]), side(0.75 * own[1])), (side(0.5 * own[0]), side(1.5 * own[1]))]
    return [own, *(size for size in others if size != own)]


def export_first_stage(
    entry: ModelEntry, seed: int = 0, sizes: list[tuple[int, int]] | None = None
) -> list[ParityCheck]:
    """Write and check the graphs of `entry` (an imported pipeline's first stage); raises
    `ParityError` (the files are removed) when ONNX Runtime disagrees with diffusers.

    The graphs have dynamic batch, height and width axes (images H × W = f·h × f·w ↔ latents or
    codes h × w), so ONNX Runtime serves every size the model takes; they are checked at each of
    `sizes` (default `check_sizes`: the model's own and two others)."""
    import onnxruntime as ort

    from models.diffusers_format.loading import DiffusersCodec

    if entry.format != "diffusers" or entry.kind not in ("kl-autoencoder", "vqvae"):
        raise ValueError(f"model {entry.name!r} is not the first stage of an imported pipeline")
    if entry.path is None or entry.component is None:
        raise ValueError(f"model {entry.name!r} has no folder")
    model = DiffusersCodec(entry, "cpu").model
    g = torch.Generator().manual_seed(seed)
    vq = entry.kind == "vqvae"
    encoder = VQEncoder(model) if vq else KLEncoder(model)
    decoder = VQDecoder(model) if vq else KLDecoder(model)
    decoder_input, encoder_outputs = (
        ("codes", ("codes", "latents")) if vq else ("latents", ("latents",))
    )
    size = int(entry.codebook_size or 1)
    channels, factor = entry.image.channels, entry.latent_factor
    # Per size: the encoder's inputs, and the decoder's (random, and the images' own encoding).
    encoder_inputs: list[tuple[str, torch.Tensor]] = []
    decoder_inputs: list[tuple[str, torch.Tensor]] = []
    for index, (height, width) in enumerate(sizes or check_sizes(entry)):
        at = f" at {width}×{height}"
        batch = 5 if index == 0 else 2  # the model's own size at a batch other than the export's
        images = torch.rand((batch, channels, height, width), generator=g) * 2 - 1
        with torch.no_grad():
            encoded = encoder(images)
        encoded = encoded[0] if vq else encoded  # the decoder's input: codes, or μ
        assert isinstance(encoded, torch.Tensor)
        if vq:
            random = torch.randint(0, size, tuple(encoded.shape), generator=g)
        else:
            random = torch.randn(encoded.shape, generator=g)
        encoder_inputs.append(("random" + at, images))
        decoder_inputs += [("random" + at, random), ("encoded" + at, encoded)]
    files = onnx_files(entry.component)
    paths = {role: entry.path / name for role, name in files.items()}
    paths["encoder_onnx"].parent.mkdir(parents=True, exist_ok=True)
    spatial = (1, 2) if vq else (2, 3)  # the decoder input's h, w axes: codes [N, h, w]
    graphs = [
        ("encoder", encoder, IMAGE_INPUT, encoder_outputs, encoder_inputs, (2, 3), factor),
        ("decoder", decoder, decoder_input, (IMAGE_OUTPUT,), decoder_inputs, spatial, 1),
    ]
    checks: list[ParityCheck] = []
    try:
        for graph, module, input_name, outputs, inputs, axes, multiple in graphs:
            path = paths[f"{graph}_onnx"]
            example = inputs[0][1][:2].contiguous()  # exported at batch 2, checked at 5
            export_graph(module, example, path, input_name, outputs, axes, multiple)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for kind, batch in inputs:
                checks.append(compare(session, module, batch.contiguous(), input_name, graph, kind))
        failed = [c for c in checks if not c.ok]
        if failed:
            raise ParityError("ONNX parity failed: " + "; ".join(str(c) for c in failed))
    except BaseException:
        for path in paths.values():
            path.unlink(missing_ok=True)
        raise
    return checks
