"""Evaluation: Fréchet distance, precision/recall, accuracy, autoencoder and inpainting metrics, the
quality-target checks, and `ddserve eval` end to end on throwaway models in a temporary zoo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ddserve.cli import main
from models.evaluation.accuracy import accuracy, label_set_accuracy, per_class_accuracy
from models.evaluation.autoencoder import (
    denoising_metrics,
    elbo_metrics,
    psnr_db,
    reconstruction_metrics,
)
from models.evaluation.frechet import feature_frechet_distance, frechet_distance
from models.evaluation.generation import GenerationSetting
from models.evaluation.inpainting import fill_hole, half_masks, masked_mse
from models.evaluation.precision_recall import knn_radii, precision_recall
from models.evaluation.report import flatten, merge_metrics, read_metrics
from models.evaluation.table import zoo_table
from models.evaluation.targets import check_targets
from models.nets.classifier import (
    ClassifierConfig,
    ImageClassifier,
    NoisyClassifier,
    NoisyClassifierConfig,
)
from models.nets.unet import UNet, UNetConfig
from models.registry import WEIGHTS_FILE, save_weights, write_entry


def _random_covariance(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_of_identical_sets_is_zero() -> None:
    x = np.random.default_rng(0).normal(size=(300, 16))
    assert feature_frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_matches_closed_forms() -> None:
    rng = np.random.default_rng(1)
    # 1-D: (μ₁ − μ₂)² + (σ₁ − σ₂)².
    d = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx(9.0 + 1.0)
    # Commuting (diagonal) covariances: ‖μ₁ − μ₂‖² + Σ (σ₁ᵢ − σ₂ᵢ)².
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    got = frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-9)
    # General covariances: the textbook formula with scipy's matrix square root of Σ₁Σ₂.
    c1, c2 = _random_covariance(rng, 6), _random_covariance(rng, 6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    reference = (
        ((m1 - m2) ** 2).sum() + np.trace(c1 + c2) - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real)
    )
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(reference, rel=1e-7)


def test_frechet_from_samples_approaches_the_mean_shift() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) + np.array([1.0, 0.0, 0.0])
    assert feature_frechet_distance(a, b) == pytest.approx(1.0, abs=0.05)


def test_knn_radii_skip_the_point_itself() -> None:
    points = np.arange(6, dtype=np.float64)[:, None]  # 0, 1, …, 5 on a line
    assert knn_radii(points, k=1).tolist() == [1.0] * 6
    assert knn_radii(points, k=2).tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        knn_radii(points[:3], k=3)


def test_precision_recall_on_known_configurations() -> None:
    rng = np.random.default_rng(3)
    real = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 20.0])
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    far = rng.normal(size=(100, 2)) + 100.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # Fresh samples of one of the two modes only: most look real (the union of 3-NN balls has
    # small holes), and only that mode's half of the data is covered.
    one_mode = rng.normal(size=(200, 2))
    precision, recall = precision_recall(real, one_mode, k=3)
    assert precision > 0.8
    assert 0.35 < recall <= 0.5


def test_accuracy_per_class_and_joint() -> None:
    target = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0])
    assert accuracy(predicted, target) == pytest.approx(0.6)
    assert per_class_accuracy(predicted, target, ["a", "b", "c", "d"]) == {
        "a": 0.5,
        "b": 1.0,
        "c": 0.0,
    }
    result = label_set_accuracy(
        {"shape": predicted, "colour": torch.tensor([1, 1, 1, 0, 0])},
        {"shape": target, "colour": torch.tensor([1, 0, 1, 0, 0])},
        {"shape": ["a", "b", "c"], "colour": ["x", "y"]},
    )
    assert result["all"] == {"accuracy": pytest.approx(0.6)}  # rows 0, 2, 3 right in both
    with pytest.raises(ValueError):
        accuracy(torch.tensor([1]), torch.tensor([1, 2]))


def test_floor_images_match_the_sample_labels() -> None:
    from models.data.shapes import load_shapes
    from models.evaluation.evaluate import balanced_labels, matching_train_indices

    train = load_shapes("train", n=300, seed=5)
    targets = balanced_labels(train.label_names, 48)
    assert targets["shape"][:5].tolist() == [0, 1, 2, 3, 0]
    assert targets["colour"][:9].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    index = matching_train_indices(train, targets, seed=0)
    for name in ("shape", "colour"):
        assert torch.equal(train.labels[name][index], targets[name])
    assert len(set(index.tolist())) == 48  # enough of each pair here: no repeats
    # More rows than images of a label: reuse, still with the right labels.
    few = load_shapes("train", n=30, seed=5)
    many = {"shape": torch.zeros(40, dtype=torch.long)}
    reused = matching_train_indices(few, many, seed=0)
    assert (few.labels["shape"][reused] == 0).all()


def test_reconstruction_psnr_and_elbo_conversion() -> None:
    images = torch.rand(10, 1, 4, 4) * 1.6 - 0.8
    recon = images + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01, PSNR 20 dB
    metrics = reconstruction_metrics(images, recon)
    assert metrics["mse"] == pytest.approx(0.01)
    assert metrics["psnr_db"] == pytest.approx(20.0)
    assert metrics["psnr_db_mean_per_image"] == pytest.approx(20.0)
    assert psnr_db(0.0) == float("inf")

    class FixedElbo(nn.Module):
        def elbo_nats(self, x: torch.Tensor, generator: object, samples: int) -> torch.Tensor:
            return torch.full((x.shape[0],), -16.0 * 2)  # 2 nats per dim

    elbo = elbo_metrics(FixedElbo(), images)
    assert elbo["elbo_nats_per_dim"] == pytest.approx(-2.0)
    assert elbo["nll_bound_bits_per_dim"] == pytest.approx((2.0 + math.log(127.5)) / math.log(2))


def test_denoising_metrics_compare_input_and_output() -> None:
    class Identity(nn.Module):
        def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Oracle(nn.Module):  # "denoises" every image to a constant 0.5 off the clean one
        def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, -0.5)

    images = torch.full((4, 1, 8, 8), -0.5)
    same = denoising_metrics(Identity(), images, 0.3)
    assert set(same) == {"gaussian", "masking", "salt_pepper"}
    for scores in same.values():
        assert scores["psnr_db_output"] == pytest.approx(scores["psnr_db_input"])
    assert all(
        v["psnr_db_output"] == float("inf")
        for v in denoising_metrics(Oracle(), images, 0.3).values()
    )


def test_inpainting_masks_and_region_errors() -> None:
    masks = half_masks(4, 4, 6)
    assert masks[0, 0].tolist()[0] == [1, 1, 1, 0, 0, 0]  # left half kept
    assert masks[1, 0, :, 0].tolist() == [1, 1, 0, 0]  # top half kept
    a = torch.zeros(4, 3, 4, 6)
    b = a + (1 - masks) * 2.0  # differs only in the generated region
    assert masked_mse(a, b, masks) == 0.0
    assert masked_mse(a, b, 1 - masks) == pytest.approx(4.0)
    assert torch.equal(fill_hole(b, masks), -(1 - masks).expand_as(b))


def test_setting_keys_and_targets() -> None:
    assert GenerationSetting("ddim", 50, guidance=3).key == "ddim-50-w3"
    assert GenerationSetting("ddpm", 1000).key == "ddpm-1000-w0"
    assert GenerationSetting("ddim", 50, eta=1, classifier_scale=2.5).key == "ddim-50-eta1-w0-s2.5"
    metrics = {
        "ddpm-1000-w0": {"fid": 3.0, "data_floor": {"fid": 2.0}},
        "ddim-50-w0": {"fid": 3.6, "data_floor": {"fid": 2.0}},
        "ddim-50-w3": {"fid": 5.0, "accuracy": {"class": {"accuracy": 0.99}}},
    }
    answers = dict(check_targets("digits-ddpm", metrics))
    assert answers["DDPM with 1000 steps: FID ≤ 2 × the data floor"][1] is True
    assert answers["DDIM with 50 steps: FID ≤ 1.15 × that of DDPM-1000"][1] is False  # 1.2 ×
    assert answers["guidance scale 3: class accuracy ≥ 98 %"][1] is True
    assert dict(check_targets("digits-vae", {}))["test PSNR ≥ 20 dB"] is None


def test_merge_metrics_keeps_other_keys(tmp_path: Path) -> None:
    merge_metrics(tmp_path, "a", {"fid": 1.0}, "ddserve eval m --n 4")
    merge_metrics(tmp_path, "b", {"fid": float("nan"), "x": {"per_class": {"0": 1.0}}}, "cmd")
    metrics = read_metrics(tmp_path)
    assert metrics["a"] == {"fid": 1.0, "command": "ddserve eval m --n 4"}
    assert metrics["b"]["fid"] is None
    assert flatten(metrics["b"]) == {"fid": None}


# ----------------------------------------------------------------- end to end in a temporary zoo


def _tiny_zoo(root: Path) -> None:
    torch.manual_seed(0)
    image = {"channels": 1, "height": 16, "width": 16}
    classifier = ImageClassifier(
        ClassifierConfig(base_channels=4, channel_mults=(1, 2), feature_dim=8)
    )
    folder = root / "digits-eval-classifier"
    folder.mkdir(parents=True)
    save_weights(classifier, folder / WEIGHTS_FILE)
    write_entry(
        folder,
        {
            "name": "digits-eval-classifier",
            "kind": "classifier",
            "dataset": "digits",
            "image": image,
            "network": {
                "classifier": classifier.config.to_dict(),
                "label_names": {"class": [str(d) for d in range(10)]},
            },
            "files": {"weights": WEIGHTS_FILE},
        },
    )
    noisy = NoisyClassifier(NoisyClassifierConfig(base_channels=4, channel_mults=(1, 2)))
    folder = root / "tiny-classifier"
    folder.mkdir()
    save_weights(noisy, folder / WEIGHTS_FILE)
    write_entry(
        folder,
        {
            "name": "tiny-classifier",
            "kind": "noisy-classifier",
            "dataset": "digits",
            "image": image,
            "schedule": {"kind": "linear", "num_timesteps": 100},
            "network": {"noisy_classifier": noisy.config.to_dict()},
            "files": {"weights": WEIGHTS_FILE},
        },
    )
    unet_config = UNetConfig(
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        num_classes=10,
    )
    unet = UNet(unet_config)
    folder = root / "tiny-ddpm"
    folder.mkdir()
    save_weights(unet, folder / WEIGHTS_FILE)
    write_entry(
        folder,
        {
            "name": "tiny-ddpm",
            "kind": "diffusion",
            "tasks": ["generate", "inpaint"],
            "dataset": "digits",
            "image": image,
            "conditioning": {"type": "class", "classes": [str(d) for d in range(10)]},
            "schedule": {"kind": "linear", "num_timesteps": 100},
            # the card's s = 2 is the library's (and `ddserve eval --guidance`'s) w = 1
            "defaults": {"sampler": "ddim", "num_inference_steps": 4, "guidance_scale": 2.0},
            "classifier": "tiny-classifier",
            "network": {"unet": unet_config.to_dict()},
            "files": {"weights": WEIGHTS_FILE},
        },
    )


def test_eval_end_to_end_on_a_temporary_zoo(tmp_path: Path) -> None:
    _tiny_zoo(tmp_path)
    zoo = ["--zoo-dir", str(tmp_path)]
    assert main(["eval", "digits-eval-classifier", "--n", "40", *zoo]) == 0
    assert main(["eval", "tiny-classifier", "--n", "40", *zoo]) == 0
    assert main(["eval", "tiny-ddpm", "--n", "20", "--classifier-scale", "1", *zoo]) == 0
    assert main(["eval", "tiny-ddpm", "--n", "6", "--steps", "2", "--inpaint", *zoo]) == 0

    classifier = read_metrics(tmp_path / "digits-eval-classifier")["test"]
    assert classifier["n_test"] == 360
    assert 0.0 <= classifier["test_accuracy"]["class"]["accuracy"] <= 1.0
    assert classifier["data_floor"]["n"] == 40 and classifier["data_floor"]["fid"] >= 0.0

    noisy = read_metrics(tmp_path / "tiny-classifier")["test"]
    assert set(noisy["test_accuracy_by_t"]) == {"0-9", "10-24", "25-49", "50-74", "75-99"}

    metrics = read_metrics(tmp_path / "tiny-ddpm")
    assert set(metrics) == {"ddim-4-w1-s1", "inpaint-ddim-2-w0-j10r1"}
    generated = metrics["ddim-4-w1-s1"]
    assert generated["command"] == (
        "ddserve eval tiny-ddpm --sampler ddim --steps 4 --eta 0 --guidance 1 "
        f"--classifier-scale 1 --n 20 --seed 0 --zoo-dir {tmp_path}"
    )
    assert generated["fid"] > 0 and 0 <= generated["precision"] <= 1
    assert generated["data_floor"]["n"] == 20
    assert generated["data_floor"]["labels"] == "matched to the samples' labels"
    assert set(generated["accuracy"]["class"]["per_class"]) == {str(d) for d in range(10)}
    assert generated["default_setting"] is False
    inpaint = metrics["inpaint-ddim-2-w0-j10r1"]
    assert inpaint["kept_region_mse"] == pytest.approx(0.0, abs=1e-10)
    assert inpaint["generated_region_mse"] > 0

    card = (tmp_path / "tiny-ddpm" / "card.md").read_text()
    assert "ddim-4-w1-s1" in card and "data_floor.fid" in card
    assert (tmp_path / "tiny-ddpm" / "samples.png").stat().st_size > 0
    saved = json.loads((tmp_path / "tiny-ddpm" / "metrics.json").read_text())
    assert saved == metrics
    table = zoo_table(tmp_path)
    assert "| tiny-ddpm | `ddim-4-w1-s1` | FID " in table
    assert "| `ddserve eval tiny-ddpm --sampler ddim --steps 4 " in table
    assert "| tiny-classifier | `test` | test accuracy at t = 0 " in table


def test_eval_rejects_guided_inpainting(tmp_path: Path) -> None:
    _tiny_zoo(tmp_path)
    with pytest.raises(ValueError, match="unconditionally"):
        main(["eval", "tiny-ddpm", "--inpaint", "--guidance", "2", "--zoo-dir", str(tmp_path)])


def test_eval_latent_diffusion_with_prompts(tmp_path: Path) -> None:
    """A text-conditional latent model: prompts cycle through every (shape, colour), latents are
    decoded by the first stage, and accuracy is reported for shape, colour and both."""
    from models.autoencoders import build_autoencoder
    from models.data.text import CONTEXT_LEN, VOCABULARY

    torch.manual_seed(0)
    shapes_classifier = ImageClassifier(
        ClassifierConfig(
            in_channels=3,
            image_size=32,
            base_channels=4,
            channel_mults=(1, 2),
            feature_dim=8,
            heads={"shape": 4, "colour": 6},
        )
    )
    image = {"channels": 3, "height": 32, "width": 32}
    folder = tmp_path / "shapes-eval-classifier"
    folder.mkdir()
    save_weights(shapes_classifier, folder / WEIGHTS_FILE)
    write_entry(
        folder,
        {
            "name": "shapes-eval-classifier",
            "kind": "classifier",
            "dataset": "shapes",
            "image": image,
            "network": {
                "classifier": shapes_classifier.config.to_dict(),
                "label_names": {
                    "shape": ["circle", "square", "triangle", "cross"],
                    "colour": ["red", "green", "blue", "yellow", "magenta", "cyan"],
                },
            },
            "files": {"weights": WEIGHTS_FILE},
        },
    )
    network = {"channels": [8, 8, 8], "num_res_blocks": 0, "latent_channels": 2}
    first_stage = build_autoencoder("kl-autoencoder", network)
    folder = tmp_path / "tiny-first-stage"
    folder.mkdir()
    save_weights(first_stage, folder / WEIGHTS_FILE)
    write_entry(
        folder,
        {
            "name": "tiny-first-stage",
            "kind": "kl-autoencoder",
            "dataset": "shapes",
            "image": image,
            "latent_shape": [2, 8, 8],
            "network": network,
            "files": {"weights": WEIGHTS_FILE},
        },
    )
    unet_config = UNetConfig(
        in_channels=2,
        image_size=8,
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        attention_resolutions=(8,),
        vocab_size=len(VOCABULARY),
        context_len=CONTEXT_LEN,
        context_dim=8,
    )
    folder = tmp_path / "tiny-ldm"
    folder.mkdir()
    save_weights(UNet(unet_config), folder / WEIGHTS_FILE)
    write_entry(
        folder,
        {
            "name": "tiny-ldm",
            "kind": "latent-diffusion",
            "dataset": "shapes",
            "image": image,
            "latent_shape": [2, 8, 8],
            "first_stage": "tiny-first-stage",
            "conditioning": {"type": "text", "vocabulary": VOCABULARY, "context_len": CONTEXT_LEN},
            "schedule": {"kind": "linear", "num_timesteps": 100},
            "defaults": {
                "sampler": "ddim",
                "num_inference_steps": 2,
                "guidance_scale": 3.0,  # s = 3: w = 2 (the metrics key's w2)
                "clip_denoised": False,
            },
            "network": {"unet": unet_config.to_dict(), "latent_scale": 2.0},
            "files": {"weights": WEIGHTS_FILE},
        },
    )
    assert main(["eval", "tiny-ldm", "--n", "24", "--zoo-dir", str(tmp_path)]) == 0
    result = read_metrics(tmp_path / "tiny-ldm")["ddim-2-w2"]
    assert result["default_setting"] is True
    assert set(result["accuracy"]) == {"shape", "colour", "both"}
    assert set(result["accuracy"]["colour"]["per_class"]) == {
        "red",
        "green",
        "blue",
        "yellow",
        "magenta",
        "cyan",
    }
    assert result["accuracy"]["both"]["accuracy"] <= result["accuracy"]["shape"]["accuracy"]
    assert result["data_floor"]["n"] == 24
