"""What `ddserve eval` leaves in a model's folder: metrics.json, samples.png and card.md.

metrics.json maps a setting key ("ddim-50-w3", "test", "inpaint-…") to that measurement, with the
exact command that produced it stored beside it; a new measurement replaces only its own key. The
card is rewritten from config.json and metrics.json every time, so it never drifts from them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from models.catalog import ModelEntry, read_entry
from models.evaluation.targets import check_targets
from models.imaging import save_grid

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.png"
CARD_FILE = "card.md"


def read_metrics(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / METRICS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _clean(value: Any) -> Any:
    """JSON-safe: floats rounded to 6 significant digits, NaN/inf as null."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def merge_metrics(folder: Path, key: str, result: dict[str, Any], command: str) -> dict[str, Any]:
    """Write `result` (with `command`) under `key` in the folder's metrics.json; return it all."""
    metrics = read_metrics(folder)
    metrics[key] = _clean({**result, "command": command})
    ordered = dict(sorted(metrics.items()))
    (folder / METRICS_FILE).write_text(json.dumps(ordered, indent=2, ensure_ascii=False) + "\n")
    return ordered


def write_samples(folder: Path, images: torch.Tensor, columns: int) -> Path:
    """The grid PNG (images [N, C, H, W] in [−1, 1], `columns` per row, upscaled for viewing)."""
    path = folder / SAMPLES_FILE
    scale = 4 if images.shape[-1] <= 16 else 2
    save_grid(images, str(path), nrow=columns, scale=scale)
    return path


def flatten(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of a result with dotted keys; per-class tables, settings and commands left out."""
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if key in ("per_class", "command", "setting"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, int | float | str | bool) or value is None:
            flat[name] = value
    return flat


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def card_text(entry: ModelEntry, metrics: dict[str, dict[str, Any]]) -> str:
    lines = [f"# {entry.name}", "", entry.description or "", ""]
    image = entry.image
    lines += [
        f"- kind: `{entry.kind}`; dataset: `{entry.dataset}`; images: "
        f"{image.channels}×{image.height}×{image.width}",
    ]
    if entry.conditioning is not None:
        spec = entry.conditioning
        detail = spec.classes if spec.type == "class" else (spec.vocabulary or [])[1:]
        lines.append(f"- conditioning: {spec.type} ({', '.join(detail or [])})")
    if entry.schedule is not None:
        lines.append(f"- noise schedule: {entry.schedule.kind}, T = {entry.schedule.num_timesteps}")
    for role in ("classifier", "first_stage"):
        if getattr(entry, role):
            lines.append(f"- {role.replace('_', ' ')}: `{getattr(entry, role)}`")
    if entry.files:
        lines.append("- files: " + ", ".join(f"`{name}`" for name in sorted(entry.files.values())))
    lines += [
        "",
        f"Trained by `ddserve train {entry.name}` (recipe `models/recipes/{entry.name}.json`).",
        "",
    ]
    targets = check_targets(entry.name, metrics)
    if targets:
        lines += ["## Quality targets", "", "| target | measured | met |", "|---|---|---|"]
        for text, answer in targets:
            measured, met = answer if answer is not None else ("not measured yet", None)
            lines.append(
                f"| {text} | {measured} | {'—' if met is None else ('yes' if met else 'no')} |"
            )
        lines.append("")
    if metrics:
        lines += ["## Metrics (`ddserve eval`)", ""]
        for key, result in metrics.items():
            lines += [f"### {key}", "", f"`{result.get('command', '')}`", ""]
            lines += [f"- {name}: {_format(value)}" for name, value in flatten(result).items()]
            lines.append("")
        lines.append(
            "FID and precision/recall use the evaluation classifier's features, not Inception's: "
            "compare them with the data floor beside them, not with published numbers."
        )
    else:
        lines.append("No metrics yet: run `ddserve eval " + entry.name + "`.")
    return "\n".join(lines).rstrip() + "\n"


def write_card(folder: Path) -> Path:
    """(Re)write card.md from config.json and metrics.json."""
    path = folder / CARD_FILE
    path.write_text(card_text(read_entry(folder), read_metrics(folder)))
    return path
