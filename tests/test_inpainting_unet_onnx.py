"""An inpainting UNet whose first stage runs in ONNX Runtime (`ddserve export NAME-vae`: graphs
with dynamic height and width). The masked image the UNet reads is a sample of the first stage's
posterior N(μ, σ²), which the graphs do not give (they output μ only): the worker samples it
through the diffusers module beside them — as it does for graphs of a fixed size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddserve.settings import Settings
from models.catalog import load_catalog
from models.diffusion.inpainting_unet import masked_pixels

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

NAME = "tiny-inpaint-onnx"


def test_masked_image_latents_with_a_resizable_onnx_first_stage(tmp_path: Path) -> None:
    """Regression: with graphs of dynamic size, `resizable_first_stage()` is the ONNX codec
    itself, which has no posterior, so every inpaint failed ("has no first stage to sample
    from")."""
    from models.diffusers_format.importer import import_pipeline
    from models.diffusers_format.onnx_export import export_first_stage
    from models.onnx.runtime import OnnxCodec
    from tests.tiny_sd import tiny_sd_pipeline
    from workers.model_pool import ModelPool

    torch.set_num_threads(1)
    pipe = tiny_sd_pipeline(
        tmp_path / "source", pipeline_class="StableDiffusionInpaintPipeline", unet_channels=9
    )
    settings = Settings(
        redis_url=None,
        zoo_dir=tmp_path / "no-zoo",
        model_dirs=str(tmp_path / "models"),
        storage_dir=tmp_path / "images",
        device="cpu",
        log_level="WARNING",
    )
    import_pipeline(str(tmp_path / "source" / "pipeline"), name=NAME, settings=settings)
    export_first_stage(load_catalog(settings.model_repository())[f"{NAME}-vae"], sizes=[(16, 16)])

    pool = ModelPool(settings)
    model = pool.get(NAME)
    assert isinstance(model.first_stage, OnnxCodec) and model.first_stage.resizable
    image = 2.0 * torch.rand((3, 16, 16), generator=torch.Generator().manual_seed(1)) - 1.0
    keep = torch.ones((1, 16, 16))
    keep[:, 4:12, 2:9] = 0
    got = model.masked_image_latents(image, keep)
    with torch.no_grad():
        posterior = pipe.vae.encode(masked_pixels(image, keep)[None]).latent_dist
    torch.testing.assert_close(got.mean, posterior.mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.std, posterior.std[0], atol=1e-5, rtol=1e-5)
    # strength < 1: x_0 drawn from the image's own posterior, through the same module
    whole = model.image_posterior(image)
    with torch.no_grad():
        torch.testing.assert_close(whole.mean, pipe.vae.encode(image[None]).latent_dist.mean[0])
    assert model.resizable_first_stage is not None and model.torch_first_stage is not None
    assert model.resizable_first_stage() is model.first_stage  # any size in ONNX Runtime

    # Graphs of a fixed size: one diffusers module serves the posterior and the other sizes.
    fixed = ModelPool(settings)
    model = fixed.get(NAME)
    model.first_stage.resizable = False  # as `spatial_axes_dynamic` says of older graphs
    assert model.masked_image_latents(image, keep).mean.shape == got.mean.shape
    assert model.resizable_first_stage() is model.torch_first_stage()
