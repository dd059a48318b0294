"""How the feature metrics respond to known degradations of real images — the calibration of the
instrument: `python -m models.evaluation.sensitivity [--dataset digits] [--n 500]`.

n train images with the label composition of an evaluation (class i mod K; shapes: every
(shape, colour) pair alike) are measured against the test split as they are (the data floor), with
Gaussian pixel noise, blurred by the 5×5 binomial kernel, averaged in pairs (x_i + x_{i−1}) / 2,
and collapsed to one image per label (the first K repeated: no diversity).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from models.data import load_dataset
from models.evaluation.evaluate import balanced_labels, feature_scores, matching_train_indices
from models.evaluation.features import load_eval_classifier


def degradations(x: torch.Tensor, labels: int, seed: int) -> dict[str, torch.Tensor]:
    """Named versions of images x [n, C, H, W]; `labels` = the number of label combinations."""
    generator = torch.Generator().manual_seed(seed)
    c = x.shape[1]
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 256.0).expand(c, 1, 5, 5)
    return {
        "real (the data floor)": x,
        "Gaussian noise σ = 0.1": (x + 0.1 * torch.randn(x.shape, generator=generator)).clamp(
            -1, 1
        ),
        "Gaussian noise σ = 0.3": (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(
            -1, 1
        ),
        "5×5 binomial blur": F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=c),
        "pairs averaged": (x + x.roll(1, dims=0)) / 2,
        "one image per label": x[torch.arange(len(x)) % labels],
    }


def sensitivity_table(dataset: str, n: int, seed: int = 0) -> str:
    classifier = load_eval_classifier(dataset)
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    test_features = classifier.measure(test.images).features
    targets = balanced_labels(train.label_names, n)
    combinations = math.prod(len(names) for names in train.label_names.values())
    images = train.images[matching_train_indices(train, targets, seed)]
    lines = [f"| {dataset}, n = {n} | FID | precision | recall |", "|---|---|---|---|"]
    for name, x in degradations(images, combinations, seed).items():
        s = feature_scores(test_features, classifier.measure(x).features)
        lines.append(f"| {name} | {s['fid']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(sensitivity_table(args.dataset, args.n, args.seed), end="")


if __name__ == "__main__":
    main()
