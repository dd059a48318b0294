"""The model repository: zoo cards and diffusers pipelines read from their JSON files, no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ddserve.settings import DEFAULT_IMPORT_DIR, Settings
from models.catalog import DEFAULT_ZOO, load_catalog
from models.diffusers_format.entries import PipelineError, read_pipeline


def test_pixel_pipelines(pipelines_dir: Path) -> None:
    (ddpm,) = read_pipeline(pipelines_dir / "ddpm")
    assert (ddpm.name, ddpm.kind, ddpm.format, ddpm.pipeline) == (
        "ddpm",
        "diffusion",
        "diffusers",
        "DDPMPipeline",
    )
    assert (ddpm.image.channels, ddpm.image.height, ddpm.image.width) == (3, 16, 16)
    assert ddpm.tasks == ["generate", "inpaint"] and ddpm.conditioning is None
    assert ddpm.schedule is not None and ddpm.schedule.num_timesteps == 1000
    assert ddpm.defaults is not None
    assert (ddpm.defaults.sampler, ddpm.defaults.num_inference_steps) == ("ddpm", 1000)
    assert ddpm.defaults.clip_denoised  # DDPMScheduler's clip_sample default
    (ddim,) = read_pipeline(pipelines_dir / "ddim", name="renamed")
    assert ddim.name == "renamed" and ddim.defaults is not None
    assert (ddim.defaults.sampler, ddim.defaults.num_inference_steps) == ("ddim", 50)
    assert not ddim.defaults.clip_denoised


def test_repaint_pipeline_defaults_to_its_resampling(pipelines_dir: Path) -> None:
    """RePaintPipeline's own defaults: 250 steps, η = 0 (DDIM-like), jumps of 10, 10 resamplings."""
    (entry,) = read_pipeline(pipelines_dir / "repaint")
    assert entry.pipeline == "RePaintPipeline" and entry.defaults is not None
    d = entry.defaults
    assert (d.sampler, d.num_inference_steps, d.eta) == ("ddim", 250, 0.0)
    assert (d.jump_length, d.jump_n_sample) == (10, 10)


def test_class_conditional_unet_has_labels_and_no_null(pipelines_dir: Path) -> None:
    (entry,) = read_pipeline(pipelines_dir / "ddpm-class")
    assert entry.conditioning is not None
    assert entry.conditioning.type == "class"
    assert entry.conditioning.classes == ["0", "1", "2", "3"]
    assert not entry.conditioning.has_null


@pytest.mark.parametrize(
    ("folder", "stage", "kind"),
    [("ldm", "ldm-vqvae", "vqvae"), ("ldm-kl", "ldm-kl-vae", "kl-autoencoder")],
)
def test_latent_pipeline_gives_a_denoiser_and_its_first_stage(
    pipelines_dir: Path, folder: str, stage: str, kind: str
) -> None:
    main, first = read_pipeline(pipelines_dir / folder)
    assert (main.kind, main.first_stage, main.latent_shape) == (
        "latent-diffusion",
        stage,
        [4, 8, 8],
    )
    assert (main.image.height, main.image.width) == (16, 16)  # 8×8 latents, f = 2
    assert main.network["latent_scale"] == (0.5 if kind == "vqvae" else 0.7)
    assert (first.name, first.kind, first.component) == (stage, kind, "vqvae")
    assert first.tasks == ["encode", "decode", "reconstruct"]
    assert first.latent_shape == [4, 8, 8]
    if kind == "vqvae":
        assert (first.code_shape, first.codebook_size) == ([8, 8], 64)


def test_licence_from_the_model_card(tmp_path: Path, pipelines_dir: Path) -> None:
    folder = tmp_path / "card"
    shutil.copytree(pipelines_dir / "ddpm", folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# a model\n")
    assert read_pipeline(folder)[0].license == "apache-2.0"
    (folder / "README.md").unlink()
    (folder / "LICENSE").write_text("\nMIT License\n\nCopyright …\n")
    assert read_pipeline(folder)[0].license == "MIT License"
    public = read_pipeline(folder)[0].public()
    assert public["license"] == "MIT License" and "scheduler" not in public


def test_repository_holds_zoo_cards_and_pipelines(tmp_path: Path, pipelines_dir: Path) -> None:
    extra = tmp_path / "mine"
    (extra / "not-a-model").mkdir(parents=True)
    shutil.copytree(pipelines_dir / "ddim", extra / "digits-ddpm")  # hidden by the zoo's
    shutil.copytree(pipelines_dir / "ldm", extra / "ldm")
    catalog = load_catalog([DEFAULT_ZOO, extra])
    assert catalog["digits-ddpm"].format == "ddserve"  # the first folder wins
    assert catalog["ldm"].format == "diffusers" and "ldm-vqvae" in catalog
    assert "not-a-model" not in catalog
    assert "shapes-ldm" in catalog  # the zoo is still read
    assert load_catalog(extra).keys() == {"digits-ddpm", "ldm", "ldm-vqvae"}


def test_an_unservable_folder_is_skipped_not_fatal(tmp_path: Path, pipelines_dir: Path) -> None:
    shutil.copytree(pipelines_dir / "ddpm", tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert list(load_catalog(tmp_path)) == ["good"]
    with pytest.raises(PipelineError, match=r"FluxPipeline.*supported: DDPMPipeline"):
        read_pipeline(tmp_path / "bad")


def test_model_dirs_setting_derives_from_the_zoo_setting(tmp_path: Path) -> None:
    assert Settings().model_repository() == [DEFAULT_ZOO, DEFAULT_IMPORT_DIR]
    assert Settings().import_dir() == DEFAULT_IMPORT_DIR  # never into the shipped zoo
    own = Settings(zoo_dir=tmp_path)  # a zoo of one's own is the repository, as it always was
    assert own.model_repository() == [tmp_path] and own.import_dir() == tmp_path
    named = Settings(model_dirs=f"{tmp_path}/a, {tmp_path}/b")
    assert named.model_repository() == [tmp_path / "a", tmp_path / "b"]
    assert named.import_dir() == tmp_path / "a"


def test_the_gateway_reads_pipelines_without_torch(pipelines_dir: Path) -> None:
    code = (
        "import sys; from models.catalog import load_catalog; "
        f"c = load_catalog({str(pipelines_dir)!r}); "
        "assert c['ldm'].first_stage == 'ldm-vqvae', c; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def write_sd_folder(
    folder: Path, pipeline_class: str = "StableDiffusionPipeline", unet_channels: int = 4
) -> None:
    """The JSON files of a Stable Diffusion 1.x folder saved as `pipeline_class` (no weights)."""
    files = {
        "model_index.json": {
            "_class_name": pipeline_class,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "safety_checker": [None, None],
        },
        "unet/config.json": {
            "sample_size": 64,
            "in_channels": unet_channels,
            "cross_attention_dim": 768,
        },
        "vae/config.json": {
            "in_channels": 3,
            "latent_channels": 4,
            "block_out_channels": [128, 256, 512, 512],
            "scaling_factor": 0.18215,
            "shift_factor": 0.1,  # SD decodes z / scaling_factor: no shift
        },
        "tokenizer/tokenizer_config.json": {"model_max_length": 77},
        "scheduler/scheduler_config.json": {
            "_class_name": "PNDMScheduler",
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "steps_offset": 1,
        },
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content))


def test_a_text_pipeline_is_read_from_its_json_files(tmp_path: Path) -> None:
    """A Stable-Diffusion-layout folder (JSON files only: the catalog reads no weights): a text
    conditioning whose prompt the worker tokenizes with the model's CLIP tokenizer, served with
    the pipeline's default guidance; its KL first stage is served too."""
    folder = tmp_path / "sd"
    write_sd_folder(folder)
    main, vae = read_pipeline(folder)
    assert main.conditioning is not None
    assert (main.conditioning.type, main.conditioning.tokenizer) == ("text", "clip")
    assert main.conditioning.context_len == 77 and main.conditioning.vocabulary is None
    assert main.tasks == ["generate", "inpaint"] and main.kind == "latent-diffusion"
    assert main.defaults is not None and main.defaults.guidance_scale == 7.5
    assert main.network["latent_shift"] == 0.0
    assert (main.image.height, main.latent_shape) == (512, [4, 64, 64])
    assert main.schedule is not None and main.schedule.kind == "scaled_linear"
    assert (vae.name, vae.kind, vae.tasks) == (
        "sd-vae",
        "kl-autoencoder",
        ["encode", "decode", "reconstruct"],
    )


def test_the_config_s_solver_options_are_the_model_s_defaults() -> None:
    """Regression: a DPM-Solver config with Karras sigmas and order 1 read as the defaults
    (False, 2), and the gateway's spec — whose solver options win over the worker's model
    options — then ran every request without them."""
    import pytest

    from models.diffusers_format.entries import PipelineError, schedule_fields

    config = {
        "_class_name": "DPMSolverMultistepScheduler",
        "num_train_timesteps": 1000,
        "use_karras_sigmas": True,
        "solver_order": 1,
    }
    defaults = schedule_fields(config, 25)["defaults"]
    assert defaults.sampler == "dpmpp_2m" and defaults.num_inference_steps == 25
    assert defaults.use_karras_sigmas is True and defaults.solver_order == 1
    plain = schedule_fields({"_class_name": "DDIMScheduler"}, 50)["defaults"]
    assert plain.use_karras_sigmas is False and plain.solver_order == 2
    with pytest.raises(PipelineError, match="solver_order 3"):
        schedule_fields({**config, "solver_order": 3}, 25)


def test_ddserve_json_sets_the_denoiser_precision(tmp_path: Path, pipelines_dir: Path) -> None:
    folder = tmp_path / "ldm"
    shutil.copytree(pipelines_dir / "ldm", folder)
    assert read_pipeline(folder)[0].dtype is None  # no ddserve.json: float32
    (folder / "ddserve.json").write_text(json.dumps({"dtype": "bfloat16"}))
    denoiser, first_stage = read_pipeline(folder)
    assert denoiser.dtype == "bfloat16" and first_stage.dtype is None  # the UNet's only
    (folder / "ddserve.json").write_text(json.dumps({"dtype": "float8"}))
    with pytest.raises(PipelineError, match="dtype 'float8' is not one of float32, bfloat16"):
        read_pipeline(folder)
    (folder / "ddserve.json").write_text(json.dumps({"precision": "bfloat16"}))
    with pytest.raises(PipelineError, match="unknown option 'precision'"):
        read_pipeline(folder)


@pytest.mark.parametrize(
    ("pipeline_class", "unet_channels", "tasks"),
    [
        ("StableDiffusionImg2ImgPipeline", 4, ["generate", "inpaint"]),
        ("StableDiffusionInpaintPipeline", 4, ["generate", "inpaint"]),  # an SD UNet saved so
        ("StableDiffusionInpaintPipeline", 9, ["inpaint"]),  # runwayml/stable-diffusion-inpainting
        ("StableDiffusionPipeline", 9, ["generate", "inpaint"]),  # import's shape check refuses it
    ],
)
def test_sd_pipeline_classes_and_inpainting_unets(
    tmp_path: Path, pipeline_class: str, unet_channels: int, tasks: list[str]
) -> None:
    """Folders saved from the img2img and inpaint pipelines serve as Stable Diffusion; only an
    inpainting pipeline's 2c + 1-channel UNet is an inpainting UNet (x_t, mask, masked latents)."""
    from models.diffusers_format.entries import INPAINTING_UNET

    folder = tmp_path / "sd"
    write_sd_folder(folder, pipeline_class, unet_channels)
    main, _ = read_pipeline(folder)
    assert main.pipeline == pipeline_class and main.tasks == tasks
    inpainting = tasks == ["inpaint"]
    assert bool(main.network.get(INPAINTING_UNET)) is inpainting
    assert main.latent_shape == [4, 64, 64] and main.defaults is not None
    assert main.defaults.guidance_scale == 7.5 and main.conditioning is not None
