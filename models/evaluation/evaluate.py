"""`evaluate_model`: the measurements of one zoo model, chosen by its kind.

- `classifier` (evaluation classifier): test accuracy per label set, and the data floor of the
  feature metrics (train vs test split).
- `noisy-classifier`: test accuracy on x_t = q_sample(x_0, t) by ranges of t.
- `diffusion` / `latent-diffusion`: n samples with one `GenerationSetting`; Fréchet distance and
  precision/recall (k = 3) against the test split on the evaluation classifier's features, beside
  the data floor (n train images against the same test split); for conditional models the
  classifier's accuracy on the samples per label set. With `inpaint`: see `inpainting.py`.
- autoencoders: reconstruction MSE/PSNR, ELBO (VAE), perplexity (VQ-VAE), and — when the dataset
  has an evaluation classifier — the feature distance and accuracy of the reconstructions, and of
  prior samples for models that have a prior.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddserve.params import guidance_weight
from models.catalog import AUTOENCODER_KINDS, ModelEntry
from models.data import ImageDataset, load_dataset
from models.diffusion.forward import q_sample
from models.diffusion.schedule import NoiseSchedule
from models.evaluation.accuracy import accuracy, label_set_accuracy
from models.evaluation.autoencoder import (
    denoising_metrics,
    elbo_metrics,
    perplexity_metrics,
    reconstruction_metrics,
    reconstructions,
)
from models.evaluation.features import EvalClassifier, load_eval_classifier
from models.evaluation.frechet import feature_frechet_distance
from models.evaluation.generation import (
    DIFFUSION_KINDS,
    Conditions,
    GenerationSetting,
    balanced_conditions,
    generate,
    load_diffusion,
    sampler_settings,
)
from models.evaluation.inpainting import fill_hole, half_masks, masked_mse
from models.evaluation.precision_recall import precision_recall
from models.nets.classifier import ImageClassifier
from models.registry import load_network

PRIOR_KINDS = ("vae", "adversarial-autoencoder")  # p(z) = N(0, I) is part of their objective
NOISY_T_EDGES = (0, 100, 250, 500, 750, 1000)  # per 1000 steps; scaled to the schedule's T


@dataclass(frozen=True)
class EvalOptions:
    setting: GenerationSetting = field(default_factory=GenerationSetting)
    inpaint: bool = False
    jump_length: int = 10
    jump_n_sample: int = 1
    batch_size: int = 100


@dataclass
class Evaluation:
    key: str  # where the result goes in metrics.json
    result: dict[str, Any]
    grid: torch.Tensor  # [N, C, H, W] in [−1, 1], tiled into samples.png
    grid_columns: int


def _dataset(entry: ModelEntry, split: str) -> ImageDataset:
    options = getattr(entry, "dataset_options", None) or {}
    return load_dataset(entry.dataset, split, **options)


def feature_scores(real: np.ndarray, generated: np.ndarray) -> dict[str, float]:
    precision, recall = precision_recall(real, generated, k=3)
    return {
        "fid": feature_frechet_distance(generated, real),
        "precision": precision,
        "recall": recall,
    }


def balanced_labels(label_names: dict[str, list[str]], n: int) -> dict[str, torch.Tensor]:
    """Labels of n rows that cycle through every combination, the first label set fastest (digits:
    class i mod 10; shapes: shape i mod 4, colour ⌊i / 4⌋ mod 6 — as `balanced_conditions`)."""
    i = torch.arange(n)
    labels, stride = {}, 1
    for name, names in label_names.items():
        labels[name] = (i // stride) % len(names)
        stride *= len(names)
    return labels


def matching_train_indices(
    train: ImageDataset, targets: dict[str, torch.Tensor], seed: int
) -> torch.Tensor:
    """For each row of `targets`, a distinct random train image with those labels, [n].

    The conditional samples of an evaluation have a fixed label composition (every class equally
    often); a floor drawn at random would add the noise of a random composition, which the
    classifier's class-dominated features feel strongly, and make the floor look worse than the
    samples. Rows beyond a label's supply reuse its images (sampling with replacement)."""
    generator = torch.Generator().manual_seed(seed)
    names = list(targets)
    train_keys = torch.stack([train.labels[name] for name in names], dim=1)  # [N_train, L]
    wanted = torch.stack([targets[name] for name in names], dim=1)  # [n, L]
    chosen = torch.empty(len(wanted), dtype=torch.long)
    for key in torch.unique(wanted, dim=0):
        rows = (wanted == key).all(dim=1).nonzero()[:, 0]
        pool = (train_keys == key).all(dim=1).nonzero()[:, 0]
        if len(pool) == 0:
            raise ValueError(
                f"no train image has the labels {dict(zip(names, key.tolist(), strict=True))}"
            )
        order = pool[torch.randperm(len(pool), generator=generator)]
        chosen[rows] = order[torch.arange(len(rows)) % len(order)]
    return chosen


def data_floor(
    entry: ModelEntry,
    classifier: EvalClassifier,
    test_features: np.ndarray,
    n: int,
    seed: int,
    targets: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The feature scores of n real train images against the test split: what a perfect model of
    the data distribution would get at this sample count. With `targets` (the labels conditional
    samples were drawn with) the train images have exactly those labels; else they are a random
    subset."""
    train = _dataset(entry, "train")
    if targets:
        index = matching_train_indices(train, targets, seed)
        composition = "matched to the samples' labels"
    else:
        count = min(n, len(train))
        index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
        composition = "random"
    features = classifier.measure(train.images[index]).features
    return {"n": len(index), "labels": composition, **feature_scores(test_features, features)}


def _named_accuracy(result: dict[str, object]) -> dict[str, object]:
    """`all` reads `both` when there are exactly two label sets (shapes: shape and colour)."""
    if "all" in result and len(result) == 3:
        result["both"] = result.pop("all")
    return result


def evaluate_classifier(entry: ModelEntry, options: EvalOptions) -> Evaluation:
    network = load_network(entry)
    assert isinstance(network, ImageClassifier)
    classifier = EvalClassifier(network, dict(entry.network["label_names"]), entry.name)
    test = _dataset(entry, "test")
    measured = classifier.measure(test.images)
    n = options.setting.n
    balanced = balanced_labels(classifier.label_names, n)
    floor = data_floor(entry, classifier, measured.features, n, options.setting.seed, balanced)
    result = {
        "n_test": len(test),
        "feature_dim": int(measured.features.shape[1]),
        "test_accuracy": _named_accuracy(
            label_set_accuracy(measured.predicted, test.labels, classifier.label_names)
        ),
        "data_floor": floor,
    }
    return Evaluation("test", result, test.images[:64], 8)


@torch.no_grad()
def evaluate_noisy_classifier(entry: ModelEntry, options: EvalOptions) -> Evaluation:
    """Accuracy of f_φ(y | x_t, t) on noised test images, t uniform within each range of t."""
    network = load_network(entry)
    assert entry.schedule is not None
    schedule = NoiseSchedule.create(entry.schedule.kind, entry.schedule.num_timesteps)
    test = _dataset(entry, "test")
    labels = test.labels["class"]
    generator = torch.Generator().manual_seed(options.setting.seed)
    scale = schedule.num_timesteps / 1000

    def accuracy_on(low: int, high: int) -> float:
        t = torch.randint(low, high, (len(test),), generator=generator)
        noise = torch.randn(test.images.shape, generator=generator)
        logits = network(q_sample(schedule, test.images, t, noise), t)  # [N, K]
        return accuracy(logits.argmax(1), labels)

    edges = [round(e * scale) for e in NOISY_T_EDGES]
    by_t = {f"{lo}-{hi - 1}": accuracy_on(lo, hi) for lo, hi in itertools.pairwise(edges)}
    result = {
        "n_test": len(test),
        "test_accuracy_t0": accuracy_on(0, 1),
        "test_accuracy_uniform_t": accuracy_on(0, schedule.num_timesteps),
        "test_accuracy_by_t": by_t,
    }
    # The grid: 8 test images (rows) noised at t = 0, T/8, …, 7T/8 (columns).
    images = test.images[:8]  # [8, C, H, W]
    ts = torch.arange(8) * schedule.num_timesteps // 8
    noise = torch.randn((8, *images.shape[1:]), generator=torch.Generator().manual_seed(0))
    grid = torch.stack(
        [q_sample(schedule, images, torch.full((8,), int(t)), noise) for t in ts], dim=1
    ).reshape(64, *images.shape[1:])
    return Evaluation("test", result, grid.clamp(-1, 1), 8)


def is_default_setting(entry: ModelEntry, setting: GenerationSetting) -> bool:
    """Whether `setting` is how the model samples when a request says nothing."""
    d = entry.defaults
    return (
        d is not None
        and (d.sampler, d.num_inference_steps, d.eta, guidance_weight(d.guidance_scale))
        == (
            setting.sampler,
            setting.steps,
            setting.eta,
            setting.guidance,
        )
        and d.classifier_scale == setting.classifier_scale
    )


def evaluate_generation(
    entry: ModelEntry, options: EvalOptions, zoo_dir: Path | str | None
) -> Evaluation:
    setting = options.setting
    model = load_diffusion(entry, zoo_dir, need_classifier=setting.classifier_scale != 0.0)
    classifier = load_eval_classifier(entry.dataset, zoo_dir)
    test = _dataset(entry, "test")
    test_measured = classifier.measure(test.images)
    conditions = balanced_conditions(entry, setting.n)
    started = time.perf_counter()
    images = generate(model, setting, conditions, batch_size=options.batch_size)
    seconds = time.perf_counter() - started
    measured = classifier.measure(images)
    scores = feature_scores(test_measured.features, measured.features)
    floor = data_floor(
        entry, classifier, test_measured.features, setting.n, setting.seed, conditions.targets
    )
    result: dict[str, Any] = {
        "setting": asdict(setting),
        **scores,
        "fid_over_floor": scores["fid"] / floor["fid"] if floor["fid"] > 0 else None,
        "data_floor": floor,
        "n_test": len(test),
        "eval_classifier": classifier.name,
        "sampling_seconds": round(seconds, 1),
        "default_setting": is_default_setting(entry, setting),
    }
    if conditions.targets:
        result["accuracy"] = _named_accuracy(
            label_set_accuracy(measured.predicted, conditions.targets, classifier.label_names)
        )
        result["eval_classifier_test_accuracy"] = _named_accuracy(
            label_set_accuracy(test_measured.predicted, test.labels, classifier.label_names)
        )
    columns = 10 if entry.conditioning is None or entry.conditioning.type == "class" else 12
    return Evaluation(setting.key, result, images[: columns * 10], columns)


def evaluate_inpainting(
    entry: ModelEntry, options: EvalOptions, zoo_dir: Path | str | None
) -> Evaluation:
    if entry.kind != "diffusion":
        raise ValueError(
            f"inpainting evaluation needs a pixel-space diffusion model; {entry.name} is "
            f"{entry.kind!r}"
        )
    if options.setting.guidance != 0.0 or options.setting.classifier_scale != 0.0:
        raise ValueError(
            "inpainting is evaluated unconditionally (the kept half must carry the class); "
            "use --guidance 0 --classifier-scale 0"
        )
    classifier = load_eval_classifier(entry.dataset, zoo_dir)
    test = _dataset(entry, "test")
    n = min(options.setting.n, len(test))
    setting = replace(options.setting, n=n)
    images = test.images[:n]  # [n, C, H, W]
    _, height, width = test.image_shape
    masks = half_masks(n, height, width)  # [n, 1, H, W]
    model = load_diffusion(entry, zoo_dir, need_classifier=False)
    settings = sampler_settings(
        model, setting, jump_length=options.jump_length, jump_n_sample=options.jump_n_sample
    )
    started = time.perf_counter()
    completed = generate(
        model,
        setting,
        Conditions(None, {}),
        known=images,
        mask=masks,
        settings=settings,
        batch_size=options.batch_size,
    )
    seconds = time.perf_counter() - started
    targets = {name: test.labels[name][:n] for name in classifier.label_names}

    def accuracy_of(batch: torch.Tensor) -> dict[str, object]:
        predicted = classifier.measure(batch).predicted
        return _named_accuracy(label_set_accuracy(predicted, targets, classifier.label_names))

    result = {
        "setting": asdict(setting),
        "jump_length": options.jump_length,
        "jump_n_sample": options.jump_n_sample,
        "masks": "left half kept (even images), top half kept (odd images)",
        "kept_region_mse": masked_mse(completed, images, masks),
        "generated_region_mse": masked_mse(completed, images, 1.0 - masks),
        "accuracy": accuracy_of(completed),
        "accuracy_originals": accuracy_of(images),
        "accuracy_masked_input": accuracy_of(fill_hole(images, masks)),
        "eval_classifier": classifier.name,
        "sampling_seconds": round(seconds, 1),
    }
    key = f"inpaint-{setting.key}-j{options.jump_length}r{options.jump_n_sample}"
    shown = 10
    display_hole = fill_hole(images[:shown], masks[:shown], value=0.0)
    grid = torch.cat([images[:shown], display_hole, completed[:shown]])
    return Evaluation(key, result, grid, shown)


def evaluate_autoencoder(
    entry: ModelEntry, options: EvalOptions, zoo_dir: Path | str | None
) -> Evaluation:
    network = load_network(entry)
    test = _dataset(entry, "test")
    recon = reconstructions(network, test.images, options.batch_size)
    result: dict[str, Any] = {"n_test": len(test), **reconstruction_metrics(test.images, recon)}
    if hasattr(network, "elbo_nats"):
        result["elbo"] = elbo_metrics(network, test.images, seed=options.setting.seed)
    if entry.kind == "denoising-autoencoder":
        amount = float(network.config.noise_amount)
        result["denoising"] = denoising_metrics(
            network, test.images, amount, seed=options.setting.seed
        )
    if hasattr(network, "perplexity"):
        size = entry.codebook_size or int(network.config.codebook_size)
        result["codebook"] = perplexity_metrics(network, test.images, size)
    try:
        classifier = load_eval_classifier(entry.dataset, zoo_dir)
    except KeyError:
        classifier = None
    if classifier is not None:
        test_measured = classifier.measure(test.images)
        recon_measured = classifier.measure(recon)
        result["reconstructions"] = {
            **feature_scores(test_measured.features, recon_measured.features),
            "accuracy": _named_accuracy(
                label_set_accuracy(recon_measured.predicted, test.labels, classifier.label_names)
            ),
            "eval_classifier": classifier.name,
        }
        # Only models trained to match a prior: the KL first stage's weak KL term (≈1e-4) leaves
        # its latents far from N(0, I), so decoding prior draws measures nothing about it.
        if entry.kind in PRIOR_KINDS and hasattr(network, "sample_prior"):
            n = options.setting.n
            generator = torch.Generator().manual_seed(options.setting.seed)
            with torch.no_grad():
                prior = network.sample_prior(n, generator).clamp(-1, 1)
            floor = data_floor(entry, classifier, test_measured.features, n, options.setting.seed)
            scores = feature_scores(test_measured.features, classifier.measure(prior).features)
            result["prior_samples"] = {"n": n, **scores, "data_floor": floor}
    shown = 8
    grid = torch.cat(
        [
            torch.stack(
                [test.images[r * shown : (r + 1) * shown], recon[r * shown : (r + 1) * shown]]
            )
            for r in range(4)
        ]
    ).reshape(-1, *test.image_shape)
    return Evaluation("test", result, grid, shown)


def evaluate_model(
    entry: ModelEntry, options: EvalOptions, zoo_dir: Path | str | None = None
) -> Evaluation:
    """Dispatch on the model's kind (see the module docstring)."""
    if entry.kind == "classifier":
        return evaluate_classifier(entry, options)
    if entry.kind == "noisy-classifier":
        return evaluate_noisy_classifier(entry, options)
    if entry.kind in DIFFUSION_KINDS:
        if options.inpaint:
            return evaluate_inpainting(entry, options, zoo_dir)
        return evaluate_generation(entry, options, zoo_dir)
    if entry.kind in AUTOENCODER_KINDS:
        return evaluate_autoencoder(entry, options, zoo_dir)
    raise ValueError(f"no evaluation for model kind {entry.kind!r}")
