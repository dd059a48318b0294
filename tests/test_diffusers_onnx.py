"""ONNX for imported first stages (#19 item 6): `ddserve import --onnx` / `ddserve export NAME-vae`
write the graphs of an `AutoencoderKL` or `VQModel` into the pipeline's `onnx/` folder, checked
against diffusers (≤ 1e-4, equal codes); the catalog then lists them and the workers' codec is ONNX
Runtime, giving what diffusers' module gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ddserve.cli import main
from models.catalog import load_catalog
from models.diffusers_format.entries import onnx_files, read_pipeline
from models.onnx.export import TOLERANCE
from models.onnx.runtime import OnnxCodec, load_codec

pytest.importorskip("diffusers")


def first_stage(folder: Path, name: str):
    (entry,) = [e for e in read_pipeline(folder, name) if "encode" in e.tasks]
    return entry


def assert_codecs_agree(entry, seed: int = 0) -> None:
    from models.diffusers_format.loading import DiffusersCodec

    onnx, torch_codec = load_codec(entry, ["CPUExecutionProvider"]), DiffusersCodec(entry)
    assert isinstance(onnx, OnnxCodec)
    spec = entry.image
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (3, spec.channels, spec.height, spec.width)).astype(np.float32)
    got, want = onnx.encode(images), torch_codec.encode(images)
    np.testing.assert_allclose(got["latents"], want["latents"], atol=TOLERANCE)
    if entry.kind == "vqvae":
        np.testing.assert_array_equal(got["codes"], want["codes"])
        np.testing.assert_allclose(
            onnx.decode(codes=got["codes"]), torch_codec.decode(codes=want["codes"]), atol=TOLERANCE
        )
    latents = want["latents"]
    np.testing.assert_allclose(
        onnx.decode(latents=latents), torch_codec.decode(latents=latents), atol=TOLERANCE
    )
    np.testing.assert_allclose(onnx.reconstruct(images), torch_codec.reconstruct(images), atol=1e-3)


def test_import_onnx_exports_a_kl_first_stage(
    pipelines_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = tmp_path / "models"
    monkeypatch.setenv("DDSERVE_MODEL_DIRS", str(repo))
    assert main(["import", str(pipelines_dir / "ldm-kl"), "--name", "kl", "--onnx"]) == 0
    out = capsys.readouterr().out
    assert out.count("— ok") == 3 and "FAILED" not in out  # encoder once, decoder twice
    entry = load_catalog(repo)["kl-vae"]
    assert entry.files == onnx_files("vqvae")  # LDMPipeline's slot is named vqvae
    assert all((repo / "kl" / name).is_file() for name in entry.files.values())
    assert_codecs_agree(entry)
    assert_other_sizes_decode_in_pytorch(repo, "kl")


def assert_other_sizes_decode_in_pytorch(repo: Path, name: str) -> None:
    """The graphs have the model's own H and W (a dynamic batch axis only): a latent model's own
    size decodes in ONNX Runtime, another size (`height`/`width` of /generate) in diffusers'
    module, both as diffusers decodes."""
    import diffusers
    import torch

    from ddserve.settings import Settings
    from models.diffusers_format.loading import DiffusersCodec
    from workers.model_pool import DiffusionModel, ModelPool

    settings = Settings(model_dirs=str(repo), device="cpu", onnx_providers="CPUExecutionProvider")
    model = ModelPool(settings).get(name)
    assert isinstance(model, DiffusionModel) and isinstance(model.first_stage, OnnxCodec)
    assert model.resizable_first_stage is not None
    vae = diffusers.AutoencoderKL.from_pretrained(repo / name, subfolder="vqvae")
    g = torch.Generator().manual_seed(1)
    for size in ((16, 16), (24, 8)):
        z = torch.randn((2, *model.sample_shape_at(*size)), generator=g)  # scaled latents
        with torch.no_grad():
            expected = vae.decode(z / model.latent_scale).sample.clamp(-1, 1)  # [2, 3, H, W]
        got = model.to_pixels(z)
        assert got.shape == (2, 3, *size)
        assert (got - expected).abs().max().item() <= TOLERANCE
    assert isinstance(model.resizable_first_stage(), DiffusersCodec)


def test_export_cli_writes_a_vq_first_stage_and_the_catalog_finds_it(
    pipelines_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "repo" / "vq"
    shutil.copytree(pipelines_dir / "ldm", folder)
    before = first_stage(folder, "vq")
    assert before.files == {"weights": "vqvae/diffusion_pytorch_model.safetensors"}
    assert not isinstance(load_codec(before), OnnxCodec)  # diffusers until exported
    assert main(["export", "vq-vqvae", "--zoo-dir", str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    assert "codes equal: True" in out and "FAILED" not in out
    after = first_stage(folder, "vq")
    assert set(after.files) == {"encoder_onnx", "decoder_onnx", "weights"}
    assert_codecs_agree(after)


def test_export_refuses_what_is_not_an_imported_first_stage(
    pipelines_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(pipelines_dir / "ddpm", tmp_path / "repo" / "px")
    assert main(["export", "px", "--zoo-dir", str(tmp_path / "repo")]) == 2
    assert main(["export", "nope", "--zoo-dir", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().out
    assert "not the first stage of an imported pipeline" in err and "unknown model 'nope'" in err
