"""The quality targets of the zoo (issue 4), checked against a model's metrics.json.

Each target reads the metrics `ddserve eval` wrote and answers (measured value, met?) — or nothing,
when the measurement it needs has not been made yet. Cards and the README show the answers; the
targets themselves are the specification, not results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Metrics = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Target:
    model: str
    text: str
    check: Callable[[Metrics], tuple[str, bool] | None]


def value_at(result: dict[str, Any], *path: str) -> Any:
    """`result[path[0]][path[1]]…`, or None where a key is missing (a metric not measured)."""
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def _results(metrics: Metrics, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    return sorted((k, v) for k, v in metrics.items() if k.startswith(prefix))


def _ddpm_fid(metrics: Metrics) -> tuple[str, bool] | None:
    for key, result in _results(metrics, "ddpm-1000-"):
        fid, floor = result.get("fid"), value_at(result, "data_floor", "fid")
        if fid is not None and floor:
            return f"{key}: FID {fid:.2f} = {fid / floor:.2f} × floor {floor:.2f}", fid <= 2 * floor
    return None


def _ddim_vs_ddpm(metrics: Metrics) -> tuple[str, bool] | None:
    for key, result in _results(metrics, "ddim-50-w"):
        reference = metrics.get(key.replace("ddim-50-", "ddpm-1000-", 1))
        if reference is None or "fid" not in result or "fid" not in reference:
            continue
        ratio = result["fid"] / reference["fid"]
        return f"{key}: FID {result['fid']:.2f} = {ratio:.2f} × DDPM-1000's", ratio <= 1.15
    return None


def _guided_accuracy(metrics: Metrics) -> tuple[str, bool] | None:
    for key, result in _results(metrics, ""):
        if not key.endswith("-w3") and "-w3-" not in key:
            continue
        value = value_at(result, "accuracy", "class", "accuracy")
        if value is not None and not key.startswith("inpaint"):
            return f"{key}: {value:.1%}", value >= 0.98
    return None


def _shapes_both(metrics: Metrics) -> tuple[str, bool] | None:
    for key, result in _results(metrics, ""):
        value = value_at(result, "accuracy", "both", "accuracy")
        if value is not None and result.get("default_setting"):
            return f"{key}: {value:.1%}", value >= 0.90
    return None


def _vae_psnr(metrics: Metrics) -> tuple[str, bool] | None:
    value = value_at(metrics, "test", "psnr_db")
    return None if value is None else (f"test PSNR {value:.2f} dB", value >= 20.0)


def _vq_perplexity(metrics: Metrics) -> tuple[str, bool] | None:
    codebook = value_at(metrics, "test", "codebook")
    if codebook is None:
        return None
    fraction = codebook["perplexity_fraction"]
    text = f"perplexity {codebook['perplexity']:.1f} / {codebook['codebook_size']} = {fraction:.1%}"
    return text, fraction >= 0.25


TARGETS: tuple[Target, ...] = (
    Target("digits-ddpm", "DDPM with 1000 steps: FID ≤ 2 × the data floor", _ddpm_fid),
    Target("digits-ddpm", "DDIM with 50 steps: FID ≤ 1.15 × that of DDPM-1000", _ddim_vs_ddpm),
    Target("digits-ddpm", "guidance scale 3: class accuracy ≥ 98 %", _guided_accuracy),
    Target("shapes-ldm", "default guidance: shape and colour both right ≥ 90 %", _shapes_both),
    Target("digits-vae", "test PSNR ≥ 20 dB", _vae_psnr),
    Target("digits-vqvae", "perplexity ≥ 25 % of the codebook size", _vq_perplexity),
)


def check_targets(model: str, metrics: Metrics) -> list[tuple[str, tuple[str, bool] | None]]:
    """(target text, (measured, met) or None if not measured) for each target of `model`."""
    return [(t.text, t.check(metrics)) for t in TARGETS if t.model == model]
