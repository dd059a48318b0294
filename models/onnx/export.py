"""Export an autoencoder's encoder and decoder to ONNX (torch.export-based exporter, dynamic batch
axis) and check the graphs against PyTorch: ONNX Runtime's outputs must match within 1e-4 (max abs
difference) on random inputs and on real images, and a VQ-VAE's code indices must be equal.

Graph signatures (what `models.onnx.runtime` relies on):
- encoder.onnx: `images` float32 [N, C, H, W] → `latents` float32 [N, *latent_shape]; the VQ-VAE's
  → `codes` int64 [N, h, w] and `latents` (the quantized vectors) [N, D, h, w].
- decoder.onnx: `latents` float32 → `images` float32 [N, C, H, W] in [−1, 1]; the VQ-VAE's reads
  `codes` int64 [N, h, w]."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.autoencoders.base import AutoencoderBase
from models.catalog import ModelEntry

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
TOLERANCE = 1e-4
IMAGE_INPUT = "images"
IMAGE_OUTPUT = "images"


class ParityError(RuntimeError):
    """An exported graph disagrees with PyTorch beyond the tolerance."""


@dataclass
class ParityCheck:
    graph: str  # "encoder" | "decoder"
    inputs: str  # "random" | "real"
    batch: int
    max_abs_diff: float
    codes_equal: bool | None = None  # VQ-VAE encoder only

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE and self.codes_equal is not False

    def __str__(self) -> str:
        codes = "" if self.codes_equal is None else f", codes equal: {self.codes_equal}"
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"{self.graph} on {self.inputs} inputs (batch {self.batch}): "
            f"max |ORT − torch| = {self.max_abs_diff:.2e}{codes} — {verdict}"
        )


def export_graph(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: tuple[str, ...],
    spatial_axes: tuple[int, int] | None = None,
    spatial_factor: int = 1,
) -> Path:
    """One graph with a dynamic batch axis, weights inside the file.

    spatial_axes: the input's (height, width) axes, made dynamic too, each a multiple of
    `spatial_factor` (an encoder's images: the first stage's factor f, so that the graph knows
    H = f·h; a decoder's latents or codes: 1). None: fixed at the example's size (the zoo's
    autoencoders, built for one size)."""
    axes: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if spatial_axes is not None:
        for axis, name in zip(spatial_axes, ("h", "w"), strict=True):
            dim = torch.export.Dim(name, min=1, max=4096)
            axes[axis] = dim * spatial_factor if spatial_factor > 1 else dim
    torch.onnx.export(
        module.eval(),
        (example,),
        str(path),
        input_names=[input_name],
        output_names=list(output_names),
        dynamic_shapes=(axes,),
        dynamo=True,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    return path


def _as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def compare(
    session: object,
    module: torch.nn.Module,
    inputs: torch.Tensor,
    input_name: str,
    graph: str,
    kind: str,
) -> ParityCheck:
    """Run both on the same inputs; integer outputs (code indices) must be equal, floats close."""
    with torch.no_grad():
        expected = [t.numpy() for t in _as_tuple(module(inputs))]
    actual = session.run(None, {input_name: inputs.numpy()})  # type: ignore[attr-defined]
    diff, codes_equal = 0.0, None
    for want, got in zip(expected, actual, strict=True):
        if np.issubdtype(want.dtype, np.integer):
            codes_equal = bool(np.array_equal(want, got))
        else:
            diff = max(diff, float(np.abs(want - got).max()))
    return ParityCheck(graph, kind, int(inputs.shape[0]), diff, codes_equal)


def export_autoencoder(
    model: AutoencoderBase, folder: Path, real_images: torch.Tensor, seed: int = 0
) -> tuple[dict[str, str], list[ParityCheck]]:
    """Write encoder.onnx and decoder.onnx into folder and check them (raises ParityError).

    real_images [N, C, H, W] in [−1, 1]: the data the graphs are checked on (a few dozen suffice).
    Returns the `files` entries for config.json and the checks."""
    import onnxruntime as ort

    model = model.eval().cpu()
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    encoder, decoder = model.onnx_encoder(), model.onnx_decoder()
    c, h, w = real_images.shape[1:]
    random_images = torch.rand((5, c, h, w), generator=generator) * 2 - 1
    real = real_images[:64].float().contiguous()
    with torch.no_grad():
        encoded = model.encode(real)
    if isinstance(encoded, tuple):  # several outputs (VQ-VAE): the one the decoder reads
        encoded = dict(zip(model.encoder_outputs, encoded, strict=True))[model.decoder_input]

    graphs = [
        ("encoder", encoder, real[:2], IMAGE_INPUT, model.encoder_outputs, random_images, real),
        (
            "decoder",
            decoder,
            model.example_decoder_input(2, generator),
            model.decoder_input,
            (IMAGE_OUTPUT,),
            model.example_decoder_input(5, generator),
            encoded,
        ),
    ]
    checks: list[ParityCheck] = []
    for graph, module, example, input_name, outputs, random_inputs, real_inputs in graphs:
        path = folder / (ENCODER_FILE if graph == "encoder" else DECODER_FILE)
        export_graph(module, example, path, input_name, outputs)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for kind, inputs in (("random", random_inputs), ("real", real_inputs)):
            check = compare(session, module, inputs.contiguous(), input_name, graph, kind)
            log.info("%s", check)
            checks.append(check)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ParityError("ONNX parity failed: " + "; ".join(str(c) for c in failed))
    return {"encoder_onnx": ENCODER_FILE, "decoder_onnx": DECODER_FILE}, checks


def export_entry(entry: ModelEntry) -> list[ParityCheck]:
    """`ddserve export`: the zoo model's ONNX graphs into its folder, recorded in config.json."""
    from models.data import load_dataset
    from models.registry import load_network, write_entry

    if entry.path is None:
        raise ValueError(f"model {entry.name!r} has no folder")
    model = load_network(entry)
    if not isinstance(model, AutoencoderBase):
        raise ValueError(f"model {entry.name!r} ({entry.kind}) is not an autoencoder")
    real = load_dataset(entry.dataset, "test").images
    files, checks = export_autoencoder(model, entry.path, real)
    data = entry.model_dump(mode="json", exclude={"path"}, exclude_none=True)
    data["files"] = {**entry.files, **files}
    write_entry(entry.path, data)
    return checks
