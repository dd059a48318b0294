"""`ddserve import`: a checked pipeline lands in the model repository with its card; every bad
source is one plain error line (exit status 2), never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ddserve.cli import main
from models.catalog import load_catalog

pytest.importorskip("diffusers")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model repository that `ddserve import` (its own Settings()) writes into."""
    target = tmp_path / "models"
    monkeypatch.setenv("DDSERVE_MODEL_DIRS", str(target))
    return target


def import_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["import", *argv]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.startswith("ddserve import: error: ")
    assert captured.err.count("\n") == 1  # one line
    return captured.err


def broken_copy(pipelines_dir: Path, tmp_path: Path, name: str = "ldm") -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(pipelines_dir / name, folder)
    return folder


def test_import_writes_the_pipeline_and_its_card(
    repo: Path, pipelines_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (pipelines_dir / "ldm" / "LICENSE").write_text("Apache License 2.0\n")
    try:
        assert main(["import", str(pipelines_dir / "ldm"), "--name", "my-ldm"]) == 0
    finally:
        (pipelines_dir / "ldm" / "LICENSE").unlink()
    out = capsys.readouterr().out
    assert "imported my-ldm (LDMPipeline, 3×16×16 images" in out and "my-ldm-vqvae" in out
    card = (repo / "my-ldm" / "card.md").read_text()
    for needed in (
        f"source: folder {(pipelines_dir / 'ldm').resolve()}",
        "pipeline class: `LDMPipeline`",
        '"_class_name": "DDIMScheduler"',
        "| `unet` |",
        "| `vqvae` |",
        "licence: Apache License 2.0",
    ):
        assert needed in card, needed
    catalog = load_catalog(repo)
    assert catalog.keys() == {"my-ldm", "my-ldm-vqvae"}
    assert catalog["my-ldm"].license == "Apache License 2.0"
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging left behind
    # the same name again is refused, naming the existing folder
    error = import_error(capsys, str(pipelines_dir / "ldm"), "--name", "my-ldm")
    assert "already exists" in error and str(repo / "my-ldm") in error


def test_not_a_folder(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "is not a folder" in import_error(capsys, str(tmp_path / "nowhere"))
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hi")
    assert "is a file, not a folder" in import_error(capsys, str(text_file))


def test_missing_model_index(
    repo: Path, pipelines_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = import_error(capsys, str(pipelines_dir / "ldm" / "unet"))
    assert "has no model_index.json: not a diffusers pipeline folder" in error


def test_unsupported_pipeline_class_names_the_supported_ones(
    repo: Path, pipelines_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = broken_copy(pipelines_dir, tmp_path, "ddpm")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    error = import_error(capsys, str(folder))
    assert "'FluxPipeline' is not supported; supported: DDPMPipeline, DDIMPipeline" in error


def test_missing_component(
    repo: Path, pipelines_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = broken_copy(pipelines_dir, tmp_path)
    shutil.rmtree(folder / "vqvae")
    assert "missing vqvae/config.json" in import_error(capsys, str(folder))
    (folder / "vqvae").mkdir()
    shutil.copy(pipelines_dir / "ldm" / "vqvae" / "config.json", folder / "vqvae")
    error = import_error(capsys, str(folder))
    assert "component 'vqvae' has no weights file" in error
    index = json.loads((folder / "model_index.json").read_text())
    del index["unet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert "has no 'unet' component" in import_error(capsys, str(folder))


def test_corrupt_weights(
    repo: Path, pipelines_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = broken_copy(pipelines_dir, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "the weights of 'unet' are corrupt or truncated" in import_error(capsys, str(folder))


def test_mismatched_shapes(
    repo: Path, pipelines_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = broken_copy(pipelines_dir, tmp_path)
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "block_out_channels": [32, 128]}))
    error = import_error(capsys, str(folder))
    assert "the weights of 'unet' do not fit its config.json (mismatched shapes)" in error
    # a UNet on other channels than its first stage's latents: a pipeline built that way
    from diffusers import DDIMScheduler, LDMPipeline

    from tests.diffusers_fixtures import LATENT, tiny_unet, tiny_vqvae

    odd = tmp_path / "odd"
    LDMPipeline(
        vqvae=tiny_vqvae(),
        unet=tiny_unet(in_channels=3, sample_size=LATENT),
        scheduler=DDIMScheduler(),
    ).save_pretrained(odd)
    error = import_error(capsys, str(odd))
    assert "the UNet works on 3 channels but the first stage 'vqvae' has 4" in error
    assert not repo.exists() or not list(repo.iterdir())  # nothing was written


def test_hub_id_without_network_says_so(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    error = import_error(capsys, "nobody-here/no-such-model")
    assert "could not reach the Hugging Face Hub for 'nobody-here/no-such-model'" in error


def test_single_safetensors_file(
    repo: Path, pipelines_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = pipelines_dir / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors"
    error = import_error(capsys, str(weights))
    assert "single .safetensors file" in error and "save_pretrained" in error


def test_hub_id_from_the_local_cache(
    repo: Path,
    pipelines_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Hub id already in the Hugging Face cache imports offline (the cache's layout:
    models--owner--name/refs/main naming a snapshot folder)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    storage = cache / "models--someone--tiny-ddpm"
    shutil.copytree(pipelines_dir / "ddpm", storage / "snapshots" / "0123abcd")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    assert main(["import", "someone/tiny-ddpm"]) == 0
    assert "imported tiny-ddpm (DDPMPipeline" in capsys.readouterr().out
    assert (
        "source: Hugging Face Hub someone/tiny-ddpm" in (repo / "tiny-ddpm" / "card.md").read_text()
    )


def test_import_with_a_dtype_serves_the_unet_in_it(
    repo: Path, pipelines_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--dtype` is the model's precision (its `ddserve.json`), which the worker loads the UNet in
    unless DDSERVE_DTYPE says otherwise."""
    import torch

    from ddserve.settings import Settings
    from workers.model_pool import ModelPool

    assert (
        main(["import", str(pipelines_dir / "ddpm"), "--name", "half", "--dtype", "bfloat16"]) == 0
    )
    assert json.loads((repo / "half" / "ddserve.json").read_text()) == {"dtype": "bfloat16"}
    assert "precision of the denoiser: bfloat16" in (repo / "half" / "card.md").read_text()
    assert load_catalog(repo)["half"].dtype == "bfloat16"
    loaded = ModelPool(Settings(model_dirs=str(repo), device="cpu")).get("half")
    assert {p.dtype for p in loaded.denoiser.network.unet.parameters()} == {torch.bfloat16}
    overridden = ModelPool(Settings(model_dirs=str(repo), device="cpu", dtype="float32"))
    assert {p.dtype for p in overridden.get("half").denoiser.network.unet.parameters()} == {
        torch.float32
    }


def test_an_inpainting_unet_is_imported_only_as_an_inpainting_pipeline(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 9-channel UNet (x_t, mask, masked-image latents) in a folder saved as
    `StableDiffusionPipeline` would be fed 4 channels by that pipeline: refused by the shape check;
    saved as `StableDiffusionInpaintPipeline` it imports, to serve inpaint only."""
    pytest.importorskip("transformers")
    from tests.tiny_sd import tiny_sd_pipeline

    tiny_sd_pipeline(tmp_path / "plain", unet_channels=9)
    tiny_sd_pipeline(
        tmp_path / "inpaint", pipeline_class="StableDiffusionInpaintPipeline", unet_channels=9
    )
    capsys.readouterr()  # transformers' warnings while building them
    error = import_error(capsys, str(tmp_path / "plain" / "pipeline"))
    assert "the UNet works on 9 channels but the first stage 'vae' has 4" in error
    assert main(["import", str(tmp_path / "inpaint" / "pipeline"), "--name", "inpainting"]) == 0
    assert load_catalog(repo)["inpainting"].tasks == ["inpaint"]
    assert (
        "`inpainting` (latent-diffusion): inpaint" in (repo / "inpainting" / "card.md").read_text()
    )
