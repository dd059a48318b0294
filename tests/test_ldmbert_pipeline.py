"""LDMTextToImagePipeline (LDMBert text encoder) in ddserve: its catalog entry from the JSON files,
`ddserve import`, the LDMBert prompt encoder, and parity of ddserve's batched sampler with the
pipeline's own `__call__` (tiny random components, `tests/tiny_ldm_text.py`).

Same noise: both sides start from the same x_T (the pipeline's `latents=`, ddserve's `Sample.x`).
The pipeline passes no generator to its scheduler's step, so at η > 0 its per-step noise comes from
torch's global generator: seeded with the seed of the ddserve sample's own stream, it draws the
same z (one [1, 4, 8, 8] draw per step on both sides)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from ddserve.params import guidance_weight
from ddserve.settings import Settings
from models.diffusers_format.entries import PipelineError, read_pipeline
from models.diffusers_format.importer import ImportFailed, import_pipeline
from models.diffusers_format.text import CrossAttentionUNet, LDMBertPromptEncoder, decode_latents
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, Sample, SamplerSettings
from models.diffusion.scheduler_config import from_diffusers
from tests.tiny_ldm_text import IMAGE, LATENT, SCALING_FACTOR, tiny_ldm_text_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOLERANCE = 1e-4
PROMPTS = ["a red circle", "a blue dog", "yellow square"]
LATENT_SHAPE = (4, LATENT, LATENT)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The pipeline and its saved folder."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ldm-text")
    return tiny_ldm_text_pipeline(root), root / "pipeline"


@pytest.fixture
def pipe(built: tuple[Any, Path]) -> Any:
    return built[0]


def x_T(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *LATENT_SHAPE), generator=torch.Generator().manual_seed(seed))


def settings_of(pipe: Any, steps: int, guidance: float, eta: float = 0.0) -> SamplerSettings:
    """A request's settings on this model: its scheduler config's sampler and options."""
    _, options = from_diffusers(dict(pipe.scheduler.config))
    return options.settings(None, steps, eta=eta, guidance_scale=guidance_weight(guidance))


def ddserve_images(
    pipe: Any,
    settings: SamplerSettings,
    prompts: Sequence[str],
    latents: torch.Tensor,  # [n, 4, 8, 8] x_T
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """The images [n, 3, 64, 64] in [0, 1] of `prompts`, sampled together in one running set of
    ddserve's sampler on the pipeline's UNet and LDMBert, decoded as the worker decodes."""
    schedule, options = from_diffusers(dict(pipe.scheduler.config))
    encoder = LDMBertPromptEncoder(pipe.tokenizer, pipe.bert)
    batch = DenoisingBatch(
        CrossAttentionUNet(pipe.unet),
        schedule,
        LATENT_SHAPE,
        prediction_type=options.prediction_type,
        null_condition=encoder.null_condition(),
    )
    conds = encoder.rows(list(prompts))
    samples = [
        Sample(settings, generators[i], cond=conds[i], x=latents[i]) for i in range(len(prompts))
    ]
    batch.add(samples)
    with torch.no_grad():
        while len(batch):
            batch.step()
    z = torch.stack([s.x for s in samples])  # [n, 4, 8, 8]
    decoded = decode_latents(pipe.vqvae, z, pipe.vqvae.config.scaling_factor)
    return (decoded / 2 + 0.5).clamp(0, 1)  # the pipeline's postprocessing


@pytest.mark.parametrize(("guidance", "steps"), [(1.0, 10), (6.0, 12)])
def test_ddim_with_prompts_matches_the_pipeline(pipe: Any, guidance: float, steps: int) -> None:
    start = x_T(len(PROMPTS))
    settings = settings_of(pipe, steps, guidance)
    assert settings.sampler == "ddim"  # the model's own scheduler class
    gens = [sample_generator(0, i) for i in range(len(PROMPTS))]  # unused at η = 0
    ours = ddserve_images(pipe, settings, PROMPTS, start, gens)
    theirs = pipe(
        PROMPTS,
        guidance_scale=guidance,
        num_inference_steps=steps,
        eta=0.0,
        latents=start.clone(),
        output_type="pt",
    ).images  # [3, 3, 64, 64] in [0, 1]
    assert ours.shape == theirs.shape == (3, 3, IMAGE, IMAGE)
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the prompts matter


def test_ddim_eta_one_with_the_same_per_step_noise_matches_the_pipeline(pipe: Any) -> None:
    start = x_T(1, seed=3)
    stream = sample_generator(7, 0)
    ours = ddserve_images(pipe, settings_of(pipe, 8, 6.0, eta=1.0), PROMPTS[:1], start, [stream])
    torch.manual_seed(sample_generator(7, 0).initial_seed())  # the pipeline's step noise
    theirs = pipe(
        PROMPTS[:1],
        guidance_scale=6.0,
        num_inference_steps=8,
        eta=1.0,
        latents=start.clone(),
        output_type="pt",
    ).images
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    plain = ddserve_images(
        pipe, settings_of(pipe, 8, 6.0), PROMPTS[:1], start, [sample_generator(7, 0)]
    )
    assert (ours - plain).abs().max() > 1e-3  # the noise was drawn and used


def test_the_ldmbert_encoder_is_the_pipelines_conditioning_and_caches(pipe: Any) -> None:
    encoder = LDMBertPromptEncoder(pipe.tokenizer, pipe.bert, cache_size=2)
    tokens = pipe.tokenizer(
        PROMPTS[:2], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        want = pipe.bert(tokens.input_ids)[0]  # [2, 77, 32], as the pipeline's __call__
        empty = pipe.bert(
            pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        )[0]
    rows = encoder.rows(PROMPTS[:2])
    assert encoder.encoder_calls == 1 and rows[0].shape == (77, 32)
    assert torch.allclose(torch.stack(rows), want, atol=1e-6)
    assert torch.allclose(encoder.null_condition(), empty[0], atol=1e-6)
    assert encoder.context_len == 77  # the pipeline's, not the saved tokenizer's unbounded limit
    calls = encoder.encoder_calls
    assert encoder.rows([PROMPTS[1], ""])[1] is encoder.null_condition()
    assert encoder.encoder_calls == calls  # cached


def test_the_encoder_loads_from_the_saved_folder(built: tuple[Any, Path]) -> None:
    pipe, folder = built
    loaded = LDMBertPromptEncoder.from_folder(folder)
    fresh = LDMBertPromptEncoder(pipe.tokenizer, pipe.bert)
    assert torch.allclose(loaded.rows(PROMPTS)[2], fresh.rows(PROMPTS)[2], atol=1e-6)
    assert torch.allclose(loaded.null_condition(), fresh.null_condition(), atol=1e-6)


# --- catalog and import -------------------------------------------------------------------------


def test_the_saved_pipeline_is_a_text_to_image_model(built: tuple[Any, Path]) -> None:
    main, stage = read_pipeline(built[1], "ldm-text")
    cond = main.conditioning
    assert cond is not None and (cond.type, cond.tokenizer, cond.context_len) == (
        "text",
        "bert",
        77,
    )
    assert cond.negative_prompt is False and cond.vocabulary is None
    assert main.tasks == ["generate", "inpaint"] and main.kind == "latent-diffusion"
    assert main.defaults is not None and main.defaults.guidance_scale == 1.0  # the pipeline's
    assert (main.image.height, main.image.width, main.latent_shape) == (IMAGE, IMAGE, [4, 8, 8])
    assert main.network == {"latent_scale": SCALING_FACTOR, "latent_shift": 0.0}
    assert main.first_stage == stage.name == "ldm-text-vae"
    assert (stage.kind, stage.component) == ("kl-autoencoder", "vqvae")  # a KL in the vqvae slot


def write_files(folder: Path, files: dict[str, Any]) -> None:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content))


def ldm_text2im_large_files() -> dict[str, Any]:
    """The JSON files of CompVis/ldm-text2im-large-256's layout (no weights)."""
    return {
        "model_index.json": {
            "_class_name": "LDMTextToImagePipeline",
            "bert": ["latent_diffusion", "LDMBertModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "tokenizer": ["transformers", "BertTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vqvae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": {"sample_size": 32, "in_channels": 4, "cross_attention_dim": 1280},
        "vqvae/config.json": {
            "in_channels": 3,
            "latent_channels": 4,
            "block_out_channels": [128, 256, 512, 512],
        },
        "tokenizer/tokenizer_config.json": {"model_max_length": 512},
        "scheduler/scheduler_config.json": {
            "_class_name": "DDIMScheduler",
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": False,
            "set_alpha_to_one": False,
        },
    }


def test_the_hub_layout_reads_without_torch_weights(tmp_path: Path) -> None:
    write_files(tmp_path / "ldm", ldm_text2im_large_files())
    main, stage = read_pipeline(tmp_path / "ldm")
    assert main.conditioning is not None and main.conditioning.context_len == 77  # not 512
    assert (main.image.height, main.latent_shape) == (256, [4, 32, 32])  # 32 × f = 8
    assert main.network["latent_scale"] == 0.18215  # AutoencoderKL's default scaling_factor
    assert main.defaults is not None and main.defaults.sampler == "ddim"
    assert (stage.name, stage.component) == ("ldm-vae", "vqvae")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bert": None}, "has no 'bert' component"),
        ({"bert": ["transformers", "BertModel"]}, "bert is a BertModel; supported: LDMBertModel"),
        ({"tokenizer": ["transformers", "CLIPTokenizer"]}, "supported: BertTokenizer"),
        ({"unet": ["diffusers", "UNet2DModel"]}, "supported: UNet2DConditionModel"),
    ],
    ids=["no-bert", "plain-bert", "clip-tokenizer", "no-cross-attention"],
)
def test_a_layout_ddserve_cannot_encode_for_is_refused_by_name(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    files = ldm_text2im_large_files()
    files["model_index.json"].update(change)
    write_files(tmp_path / "ldm", files)
    with pytest.raises(PipelineError, match=message):
        read_pipeline(tmp_path / "ldm")


def import_settings(root: Path) -> Settings:
    return Settings(zoo_dir=root / "no-zoo", model_dirs=str(root / "models"))


def test_import_checks_and_copies_the_pipeline(built: tuple[Any, Path], tmp_path: Path) -> None:
    target, checked = import_pipeline(
        str(built[1]), name="ldm-text", settings=import_settings(tmp_path)
    )
    assert target == tmp_path / "models" / "ldm-text"
    assert [e.name for e in checked.entries] == ["ldm-text", "ldm-text-vae"]
    assert set(checked.parameters) == {"bert", "unet", "vqvae"}
    card = (target / "card.md").read_text()
    assert "`LDMTextToImagePipeline`" in card
    assert "text prompt (bert tokenizer, 77 tokens; no negative prompt, as its pipeline)" in card


def test_import_names_a_missing_bert_folder(built: tuple[Any, Path], tmp_path: Path) -> None:
    folder = tmp_path / "source"
    shutil.copytree(built[1], folder)
    shutil.rmtree(folder / "bert")
    with pytest.raises(ImportFailed, match=r"lists the component 'bert' but .* is missing"):
        import_pipeline(str(folder), name="no-bert", settings=import_settings(tmp_path))
    assert not (tmp_path / "models" / "no-bert").exists()


def test_import_refuses_an_encoder_of_the_wrong_width(
    built: tuple[Any, Path], tmp_path: Path
) -> None:
    """LDMBert's d_model must be the UNet's cross-attention width: the check encodes ""."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
        LDMBertConfig,
        LDMBertModel,
    )

    folder = tmp_path / "source"
    shutil.copytree(built[1], folder)
    shutil.rmtree(folder / "bert")
    config = LDMBertConfig(vocab_size=16, d_model=16, encoder_layers=1, head_dim=8)
    LDMBertModel(config).save_pretrained(folder / "bert")
    with pytest.raises(
        ImportFailed, match="16-wide hidden states but the UNet's cross-attention takes 32"
    ):
        import_pipeline(str(folder), name="narrow", settings=import_settings(tmp_path))


def test_a_prompt_past_77_tokens_is_cut_as_the_pipeline_cuts_it(
    pipe: Any, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = LDMBertPromptEncoder(pipe.tokenizer, pipe.bert)
    long_prompt = " ".join(["red"] * 100)  # 100 words, 102 tokens with [CLS] and [SEP]
    with caplog.at_level("WARNING", logger="models.diffusers_format.text"):
        (row,) = encoder.rows([long_prompt])
    assert "prompt of 102 tokens cut to the text encoder's 77" in caplog.text
    ids = pipe.tokenizer(
        [long_prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert torch.allclose(row, pipe.bert(ids)[0][0], atol=1e-6)
