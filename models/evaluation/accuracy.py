"""Accuracy of an evaluation classifier's predictions against intended labels.

For conditional samples the intended labels are the conditions they were drawn with (the
"classification accuracy score" direction of Ravuri & Vinyals 2019 is the converse: train on
samples, test on real). For several label sets (shapes: shape and colour) an image counts as right
for `all` only when every label set is right.
"""

from __future__ import annotations

import torch


def accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of rows with predicted == target, for [N] long tensors."""
    if predicted.shape != target.shape or predicted.numel() == 0:
        raise ValueError(f"need equal non-empty shapes, got {predicted.shape} and {target.shape}")
    return float((predicted == target).float().mean())


def per_class_accuracy(
    predicted: torch.Tensor, target: torch.Tensor, class_names: list[str]
) -> dict[str, float]:
    """Accuracy among the rows of each target class (classes absent from target are left out)."""
    return {
        name: accuracy(predicted[target == k], target[target == k])
        for k, name in enumerate(class_names)
        if bool((target == k).any())
    }


def label_set_accuracy(
    predicted: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    label_names: dict[str, list[str]],
) -> dict[str, object]:
    """Per label set: overall and per-class accuracy; with several sets also `all` (every set right).

    Label sets missing from `target` are skipped (e.g. an unconditional model has none).
    """
    names = [name for name in label_names if name in target]
    result: dict[str, object] = {}
    for name in names:
        result[name] = {
            "accuracy": accuracy(predicted[name], target[name]),
            "per_class": per_class_accuracy(predicted[name], target[name], label_names[name]),
        }
    if len(names) > 1:
        every = torch.stack([predicted[n] == target[n] for n in names]).all(dim=0)
        result["all"] = {"accuracy": float(every.float().mean())}
    return result
