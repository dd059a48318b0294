"""ONNX for imported first stages (#19 item 6): `ddserve import --onnx` / `ddserve export NAME-vae`
write the graphs of an `AutoencoderKL` or `VQModel` into the pipeline's `onnx/` folder, checked
against diffusers (≤ 1e-4, equal codes); the catalog then lists them and the workers' codec is ONNX
Runtime, giving what diffusers' module gives — at the model's own size and at others (the graphs'
height and width axes are dynamic), so a latent model's lane of another size decodes in ONNX
Runtime too. Graphs of the model's own size only (exported before) keep working: other sizes then
run in diffusers' module."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddserve.cli import main
from models.catalog import load_catalog
from models.diffusers_format.entries import onnx_files, read_pipeline
from models.onnx.export import TOLERANCE
from models.onnx.runtime import OnnxCodec, load_codec

pytest.importorskip("diffusers")


def first_stage(folder: Path, name: str):
    (entry,) = [e for e in read_pipeline(folder, name) if "encode" in e.tasks]
    return entry


OTHER_SIZES = ((24, 12), (32, 24))  # (height, width) besides the tiny first stages' own 16×16


def assert_codecs_agree(entry, seed: int = 0, sizes=((16, 16), *OTHER_SIZES)) -> None:
    """ONNX Runtime's codec gives what diffusers' module gives (≤ 1e-4, equal codes) at each
    (height, width) of `sizes`: encode, decode of latents (and of codes), reconstruct."""
    from models.diffusers_format.loading import DiffusersCodec

    onnx, torch_codec = load_codec(entry, ["CPUExecutionProvider"]), DiffusersCodec(entry)
    assert isinstance(onnx, OnnxCodec) and onnx.resizable
    rng = np.random.default_rng(seed)
    for height, width in sizes:
        images = rng.uniform(-1, 1, (3, entry.image.channels, height, width)).astype(np.float32)
        got, want = onnx.encode(images), torch_codec.encode(images)
        assert got["latents"].shape[-2:] == (height // 2, width // 2)  # f = 2
        assert np.abs(got["latents"] - want["latents"]).max() <= TOLERANCE
        if entry.kind == "vqvae":
            np.testing.assert_array_equal(got["codes"], want["codes"])
            pixels = onnx.decode(codes=got["codes"])
            assert pixels.shape == images.shape
            assert np.abs(pixels - torch_codec.decode(codes=want["codes"])).max() <= TOLERANCE
        latents = want["latents"]
        decoded = onnx.decode(latents=latents)
        assert decoded.shape == images.shape
        assert np.abs(decoded - torch_codec.decode(latents=latents)).max() <= TOLERANCE
        np.testing.assert_allclose(
            onnx.reconstruct(images), torch_codec.reconstruct(images), atol=1e-3
        )


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
    # Encoder at 3 sizes (the own and two others), decoder twice (random, encoded) at each.
    assert out.count("— ok") == 9 and "FAILED" not in out and "at 24×8" in out
    entry = load_catalog(repo)["kl-vae"]
    assert entry.files == onnx_files("vqvae")  # LDMPipeline's slot is named vqvae
    assert all((repo / "kl" / name).is_file() for name in entry.files.values())
    assert_codecs_agree(entry)
    assert_other_sizes_decode_in_onnx_runtime(repo, "kl", monkeypatch)


def assert_other_sizes_decode_in_onnx_runtime(
    repo: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graphs take any size: a latent model's lane of another size (`height`/`width` of
    /generate) decodes in the same ONNX Runtime session as its own size, as diffusers decodes,
    and no PyTorch copy of the first stage is ever loaded."""
    import diffusers
    import torch

    from ddserve.settings import Settings
    from models.diffusers_format import loading
    from tests import specs
    from tests.worker_doubles import MemoryStorage, MemoryTicket
    from workers.execute import run_alone, run_codec
    from workers.model_pool import CodecModel, DiffusionModel, ModelPool

    def no_torch_copy(*_args: object, **_kw: object) -> None:
        raise AssertionError("a PyTorch copy of the first stage was loaded")

    vae = diffusers.AutoencoderKL.from_pretrained(repo / name, subfolder="vqvae")
    monkeypatch.setattr(loading.DiffusersCodec, "__init__", no_torch_copy)
    settings = Settings(model_dirs=str(repo), device="cpu", onnx_providers="CPUExecutionProvider")
    pool = ModelPool(settings)
    model = pool.get(name)
    assert isinstance(model, DiffusionModel) and isinstance(model.first_stage, OnnxCodec)
    assert model.resizable_first_stage is not None
    assert model.resizable_first_stage() is model.first_stage  # the same session, any size
    g = torch.Generator().manual_seed(1)
    for size in ((16, 16), (24, 8), (12, 32)):
        z = torch.randn((2, *model.sample_shape_at(*size)), generator=g)  # scaled latents
        with torch.no_grad():
            expected = vae.decode(z / model.latent_scale).sample.clamp(-1, 1)  # [2, 3, H, W]
        got = model.to_pixels(z)
        assert got.shape == (2, 3, *size)
        assert (got - expected).abs().max().item() <= TOLERANCE
    # A whole job at another size: its lane decodes through ONNX Runtime.
    spec = MemoryTicket(
        "sized", specs.generate(name, num_inference_steps=2, height=24, width=12)
    ).spec
    output = run_alone(spec, pool, MemoryStorage(), "sized")
    assert len(output["images"]) == 1
    # The first stage's own routes at another size: the same session too.
    stage = pool.get(f"{name}-vae")
    assert isinstance(stage, CodecModel) and stage.codec is model.first_stage
    picture = np.random.default_rng(2).integers(0, 256, (24, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    request = specs.codec(
        "encode", f"{name}-vae", images=[base64.b64encode(buffer.getvalue()).decode()]
    )
    encoded = run_codec(MemoryTicket("enc", request).spec, stage, "enc", MemoryStorage())
    x = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 127.5 - 1  # [1, 3, 24, 12]
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean  # [1, 4, 12, 6]
    assert np.abs(np.asarray(encoded["latents"]) - mean.numpy()).max() <= TOLERANCE


def test_graphs_of_the_model_s_own_size_keep_working(
    pipelines_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graphs exported before the spatial axes were dynamic (fixed H × W) still load: the own size
    runs in ONNX Runtime, other sizes in diffusers' module beside it (today's fallback, until
    `ddserve export` writes them again)."""
    import torch

    from ddserve.settings import Settings
    from models.diffusers_format import onnx_export
    from models.diffusers_format.loading import DiffusersCodec
    from workers.model_pool import CodecModel, DiffusionModel, ModelPool

    folder = tmp_path / "repo" / "old"
    shutil.copytree(pipelines_dir / "ldm-kl", folder)
    fixed = onnx_export.export_graph

    def export_fixed(module, example, path, input_name, outputs, *_spatial):  # type: ignore[no-untyped-def]
        return fixed(module, example, path, input_name, outputs)  # batch axis only, as before

    monkeypatch.setattr(onnx_export, "export_graph", export_fixed)
    onnx_export.export_first_stage(first_stage(folder, "old"), sizes=[(16, 16)])
    entry = first_stage(folder, "old")
    old = load_codec(entry, ["CPUExecutionProvider"])
    assert isinstance(old, OnnxCodec) and not old.resizable
    with pytest.raises(ValueError, match="expects images"):
        old.encode(np.zeros((1, 3, 24, 12), np.float32))
    settings = Settings(
        model_dirs=str(tmp_path / "repo"), device="cpu", onnx_providers="CPUExecutionProvider"
    )
    pool = ModelPool(settings)
    model = pool.get("old")
    assert isinstance(model, DiffusionModel) and isinstance(model.first_stage, OnnxCodec)
    assert model.resizable_first_stage is not None
    z = torch.randn((1, *model.sample_shape_at(24, 12)), generator=torch.Generator().manual_seed(0))
    assert model.to_pixels(z).shape == (1, 3, 24, 12)
    fallback = model.resizable_first_stage()
    assert isinstance(fallback, DiffusersCodec)
    stage = pool.get("old-vae")  # the first stage's own routes share that fallback
    assert isinstance(stage, CodecModel)
    rows = np.zeros((1, 3, 24, 12), np.float32)
    assert stage.codec_for("images", rows) is fallback
    assert stage.codec_for("images", np.zeros((1, 3, 16, 16), np.float32)) is stage.codec


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
