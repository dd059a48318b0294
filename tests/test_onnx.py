"""ONNX export and ONNX Runtime inference of the autoencoders: graphs written by training's export
and by `ddserve export`, parity with PyTorch (≤ 1e-4 on random and real inputs, equal VQ codes) for
every exported graph — including the shipped zoo's — and the workers' `load_codec` API."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ddserve.cli import main as ddserve_main
from models.autoencoders import AUTOENCODERS
from models.catalog import load_catalog, read_entry
from models.data import load_dataset
from models.onnx.export import TOLERANCE, ParityCheck
from models.onnx.runtime import (
    CPU,
    CUDA,
    OnnxCodec,
    TorchCodec,
    load_codec,
    parse_providers,
    resolve_providers,
)
from models.registry import load_network
from models.training.recipes import build_task
from models.training.trainer import TrainConfig, Trainer

TINY_NETWORK = {"in_channels": 1, "image_size": 16, "channels": [8, 16, 16], "num_res_blocks": 0}


def tiny_recipe(name: str, kind: str, **network: object) -> dict:
    tasks = ["encode", "decode", "reconstruct"] + (["generate"] if kind == "vae" else [])
    return {
        "name": name,
        "kind": kind,
        "dataset": "digits",
        "network": {**TINY_NETWORK, **network},
        "train": {
            "steps": 20,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 1,
            "ema_decay": 0.9,
            "threads": 1,
        },
        "entry": {"kind": kind, "tasks": tasks, "description": f"tiny {kind} for tests"},
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zoo of two models trained for 20 steps by `Trainer`, exported with their ONNX graphs."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("zoo")
    recipes = [
        tiny_recipe("tiny-vae", "vae", latent_dim=8),
        tiny_recipe("tiny-vqvae", "vqvae", latent_dim=None, latent_channels=8, codebook_size=16),
    ]
    for recipe in recipes:
        task = build_task(recipe)
        run_dir = tmp_path_factory.mktemp(recipe["name"])
        config = TrainConfig.from_dict({**recipe["train"], "sample_every": 0})
        Trainer(task, config, run_dir).run(root / recipe["name"], progress=False)
    torch.set_num_threads(threads)  # the trainer set one thread (config.threads)
    return root


@pytest.fixture(scope="module")
def real_images() -> np.ndarray:
    return load_dataset("digits", "test").images[:64].numpy()


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=[CPU])


# --- the exported graphs -------------------------------------------------------------------------
def test_export_records_graphs_with_a_dynamic_batch_axis(zoo: Path) -> None:
    for name in ("tiny-vae", "tiny-vqvae"):
        entry = read_entry(zoo / name)
        assert entry.files == {
            "weights": "weights.safetensors",
            "encoder_onnx": "encoder.onnx",
            "decoder_onnx": "decoder.onnx",
        }
        for role in ("encoder_onnx", "decoder_onnx"):
            graph = session(entry.file(role))
            batch_dims = [i.shape[0] for i in graph.get_inputs() + graph.get_outputs()]
            assert all(isinstance(d, str) for d in batch_dims), batch_dims  # symbolic: dynamic


def test_vq_encoder_graph_includes_the_nearest_code_search(zoo: Path) -> None:
    entry = read_entry(zoo / "tiny-vqvae")
    model = onnx.load(str(entry.file("encoder_onnx")))
    assert "ArgMin" in {node.op_type for node in model.graph.node}
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs == {"codes": onnx.TensorProto.INT64, "latents": onnx.TensorProto.FLOAT}
    decoder = onnx.load(str(entry.file("decoder_onnx")))
    assert [i.name for i in decoder.graph.input] == ["codes"]
    assert entry.code_shape == [4, 4] and entry.codebook_size == 16


def check_parity(entry_folder: Path, real_images: np.ndarray) -> None:
    """ORT against PyTorch on the same random and real inputs, batch 1 and more, both graphs."""
    entry = read_entry(entry_folder)
    model = load_network(entry)
    encoder, decoder = session(entry.file("encoder_onnx")), session(entry.file("decoder_onnx"))
    rng = np.random.default_rng(0)
    c, h, w = entry.image.channels, entry.image.height, entry.image.width
    random_images = rng.uniform(-1, 1, (5, c, h, w)).astype(np.float32)
    for images in (random_images, random_images[:1], real_images):
        with torch.no_grad():
            expected = model.encode(torch.from_numpy(images))
        names = [o.name for o in encoder.get_outputs()]
        outputs = dict(zip(names, encoder.run(None, {"images": images}), strict=True))
        if entry.kind == "vqvae":
            np.testing.assert_array_equal(outputs["codes"], expected.codes.numpy())
            expected = expected.latents
        assert np.abs(outputs["latents"] - expected.numpy()).max() <= TOLERANCE
        # the decoder on these images' codes or latents, and on random ones
        if entry.kind == "vqvae":
            inputs = [
                outputs["codes"],
                rng.integers(0, entry.codebook_size, (5, *entry.code_shape)),
            ]
            decode = model.decode_codes
        else:
            latents = outputs["latents"]
            inputs = [latents, rng.standard_normal((5, *entry.latent_shape)).astype(np.float32)]
            decode = model.decode
        for z in inputs:
            with torch.no_grad():
                want = decode(torch.from_numpy(z)).numpy()
            got = decoder.run(None, {decoder.get_inputs()[0].name: z})[0]
            assert got.shape == (z.shape[0], c, h, w)
            assert np.abs(got - want).max() <= TOLERANCE


@pytest.mark.parametrize("name", ["tiny-vae", "tiny-vqvae"])
def test_exported_graphs_match_pytorch(zoo: Path, real_images: np.ndarray, name: str) -> None:
    check_parity(zoo / name, real_images)


SHIPPED = [
    e.name for e in load_catalog().values() if e.kind in AUTOENCODERS and e.file("encoder_onnx")
]


@pytest.mark.parametrize("name", SHIPPED or [pytest.param("none", marks=pytest.mark.skip)])
def test_shipped_zoo_graphs_match_pytorch(name: str) -> None:
    entry = load_catalog()[name]
    real = load_dataset(entry.dataset, "test").images[:32].numpy()
    check_parity(entry.path, real)


def test_parity_check_verdicts() -> None:
    assert ParityCheck("encoder", "real", 4, 5e-5).ok
    assert not ParityCheck("encoder", "real", 4, 2e-4).ok
    assert not ParityCheck("encoder", "real", 4, 0.0, codes_equal=False).ok


def test_export_cli_rewrites_the_graphs(zoo: Path, tmp_path: Path, real_images: np.ndarray) -> None:
    """`ddserve export` on a model without ONNX files writes them and records them in config.json."""
    folder = tmp_path / "tiny-vae"
    shutil.copytree(zoo / "tiny-vae", folder)
    for name in ("encoder.onnx", "decoder.onnx"):
        (folder / name).unlink()
    config = json.loads((folder / "config.json").read_text())
    config["files"] = {"weights": "weights.safetensors"}
    (folder / "config.json").write_text(json.dumps(config))
    assert ddserve_main(["export", "tiny-vae", "--zoo-dir", str(tmp_path)]) == 0
    entry = read_entry(folder)
    assert entry.file("encoder_onnx") and entry.file("decoder_onnx")
    check_parity(folder, real_images)


# --- the runtime API ----------------------------------------------------------------------------
def test_onnx_codec_matches_the_torch_codec(zoo: Path, real_images: np.ndarray) -> None:
    for name in ("tiny-vae", "tiny-vqvae"):
        entry = read_entry(zoo / name)
        codec, reference = load_codec(entry, [CPU]), TorchCodec(entry)
        assert codec.backend == "onnxruntime" and reference.backend == "torch"
        encoded, expected = codec.encode(real_images), reference.encode(real_images)
        assert encoded["latents"].dtype == np.float32
        assert np.abs(encoded["latents"] - expected["latents"]).max() <= TOLERANCE
        if entry.kind == "vqvae":
            assert encoded["codes"].dtype == np.int64
            assert encoded["codes"].shape == (64, 4, 4)
            np.testing.assert_array_equal(encoded["codes"], expected["codes"])
            decoded = codec.decode(codes=encoded["codes"])
            # latents decode through their nearest codes: the quantized vectors give the same codes
            np.testing.assert_allclose(codec.decode(latents=encoded["latents"]), decoded, atol=1e-6)
            np.testing.assert_allclose(
                reference.decode(latents=encoded["latents"]), decoded, atol=TOLERANCE
            )
        else:
            assert encoded["codes"] is None
            decoded = codec.decode(latents=encoded["latents"])
        assert decoded.shape == real_images.shape and np.abs(decoded).max() <= 1.0
        recon = codec.reconstruct(real_images)
        np.testing.assert_allclose(recon, decoded, atol=1e-6)
        np.testing.assert_allclose(recon, reference.reconstruct(real_images), atol=TOLERANCE)


def test_codec_rejects_bad_inputs(zoo: Path) -> None:
    vae = load_codec(read_entry(zoo / "tiny-vae"), [CPU])
    vq = load_codec(read_entry(zoo / "tiny-vqvae"), [CPU])
    with pytest.raises(ValueError, match="expects images"):
        vae.encode(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="expects latents"):
        vae.decode(latents=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="exactly one"):
        vae.decode()
    with pytest.raises(ValueError, match="has no codes"):
        vae.decode(codes=np.zeros((1, 4, 4), np.int64))
    with pytest.raises(ValueError, match=r"lie in \[0, 16\)"):
        vq.decode(codes=np.full((1, 4, 4), 16))
    with pytest.raises(ValueError, match="integer codes"):
        vq.decode(codes=np.zeros((1, 4, 4), np.float32))


def test_missing_onnx_falls_back_to_pytorch_with_a_warning(
    zoo: Path, tmp_path: Path, real_images: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "tiny-vae"
    shutil.copytree(zoo / "tiny-vae", folder)
    (folder / "decoder.onnx").unlink()
    with caplog.at_level(logging.WARNING, logger="models.onnx.runtime"):
        codec = load_codec(read_entry(folder))
    assert codec.backend == "torch"
    assert "no ONNX file" in caplog.text and "decoder_onnx" in caplog.text
    assert "PyTorch" in caplog.text
    onnx_codec = load_codec(read_entry(zoo / "tiny-vae"), [CPU])
    np.testing.assert_allclose(
        codec.reconstruct(real_images), onnx_codec.reconstruct(real_images), atol=TOLERANCE
    )


def test_providers_default_to_cuda_first_and_are_configurable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    available = ort.get_available_providers()
    default = resolve_providers(None)
    assert default[-1] == CPU
    assert (default[0] == CUDA) == (CUDA in available)
    assert parse_providers("") is None
    assert parse_providers(f" {CUDA}, {CPU} ") == [CUDA, CPU]
    with caplog.at_level(logging.WARNING, logger="models.onnx.runtime"):
        chosen = resolve_providers(["NoSuchExecutionProvider", CPU])
    assert chosen == [CPU]
    assert "NoSuchExecutionProvider" in caplog.text


@pytest.mark.parametrize("name", ["shapes-autoencoder", "digits-vae", "digits-vqvae"])
def test_decode_tensor_binds_the_latents_where_they_are(name: str) -> None:
    """Issue #21 item 7: `decode_tensor` runs the decoder through IO binding on torch tensors —
    the images are written into the tensor it was given (no copy on the way out), equal to the
    numpy path's; the torch codec and the VQ-VAE (nearest codes first) give the same through
    the host path."""
    entry = load_catalog()[name]
    onnx_codec = OnnxCodec(entry, [CPU])
    torch_codec = TorchCodec(entry)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((3, *(entry.latent_shape or [])), generator=g)  # [3, *latent_shape]
    expected = onnx_codec.decode(latents=latents.numpy())
    spec = entry.image
    out = torch.full((3, spec.channels, spec.height, spec.width), float("nan"))
    got = onnx_codec.decode_tensor(latents, out=out)
    assert got.data_ptr() == out.data_ptr()
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(onnx_codec.decode_tensor(latents).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(
        torch_codec.decode_tensor(latents).numpy(), torch_codec.decode(latents=latents.numpy())
    )
    with pytest.raises(ValueError, match="expects latents"):
        onnx_codec.decode_tensor(latents[:, :1])
