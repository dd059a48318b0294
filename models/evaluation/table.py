"""The zoo's results as Markdown, from every model's metrics.json: `python -m models.evaluation.table`.

One row per measurement (model × setting key) with its headline figures, then the quality targets
with what was measured. The README's results section is this output.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from models.catalog import DEFAULT_ZOO, load_catalog
from models.evaluation.report import read_metrics
from models.evaluation.targets import TARGETS, check_targets, value_at


def _pct(value: Any) -> str:
    return "—" if value is None else f"{value:.1%}"


def _num(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def headline(kind: str, result: dict[str, Any]) -> str:
    """The few figures that matter for one measurement, as text."""
    if kind == "classifier":
        parts = [
            f"test accuracy {name} {_pct(value_at(result, 'test_accuracy', name, 'accuracy'))}"
            for name in result.get("test_accuracy", {})
        ]
        floor = result.get("data_floor", {})
        parts.append(f"data floor (n = {floor.get('n')}): FID {_num(floor.get('fid'))}")
        return "; ".join(parts)
    if kind == "noisy-classifier":
        by_t = result.get("test_accuracy_by_t", {})
        spread = ", ".join(f"t {k}: {_pct(v)}" for k, v in by_t.items())
        return f"test accuracy at t = 0 {_pct(result.get('test_accuracy_t0'))}; {spread}"
    if "kept_region_mse" in result:  # inpainting
        acc = result.get("accuracy", {})
        first = next(iter(acc), None)
        return (
            f"kept-region MSE {_num(result['kept_region_mse'])}; accuracy on completions "
            f"{_pct(value_at(acc, first, 'accuracy'))} (originals "
            f"{_pct(value_at(result, 'accuracy_originals', first, 'accuracy'))}, masked input "
            f"{_pct(value_at(result, 'accuracy_masked_input', first, 'accuracy'))})"
        )
    if "fid" in result:  # generation
        parts = [
            f"FID {_num(result['fid'])} (floor {_num(value_at(result, 'data_floor', 'fid'))})",
            f"P {_num(result.get('precision'), 2)} / R {_num(result.get('recall'), 2)}",
        ]
        for name, value in result.get("accuracy", {}).items():
            parts.append(f"accuracy {name} {_pct(value.get('accuracy'))}")
        return "; ".join(parts)
    parts = []  # autoencoders
    if "psnr_db" in result:
        parts.append(f"MSE {_num(result['mse'])}, PSNR {result['psnr_db']:.2f} dB")
    if "elbo" in result:
        elbo = result["elbo"]
        parts.append(
            f"ELBO {elbo['elbo_nats']:.1f} nats ({elbo['nll_bound_bits_per_dim']:.2f} bits/dim)"
        )
    if "codebook" in result:
        book = result["codebook"]
        parts.append(f"perplexity {book['perplexity']:.1f} / {book['codebook_size']}")
    for kind, scores in result.get("denoising", {}).items():
        parts.append(
            f"denoising {kind} {scores['amount']:g}: {scores['psnr_db_input']:.1f} → "
            f"{scores['psnr_db_output']:.1f} dB"
        )
    recon = result.get("reconstructions")
    if recon:
        accuracies = ", ".join(
            f"{name} {_pct(v.get('accuracy'))}" for name, v in recon.get("accuracy", {}).items()
        )
        parts.append(f"reconstructions: FID {_num(recon.get('fid'))}, accuracy {accuracies}")
    prior = result.get("prior_samples")
    if prior:
        floor = value_at(prior, "data_floor", "fid")
        parts.append(f"prior samples: FID {_num(prior.get('fid'))} (floor {_num(floor)})")
    return "; ".join(parts)


def zoo_table(zoo_dir: Path | str | None = None) -> str:
    catalog = load_catalog(zoo_dir)
    lines = ["| model | measurement | results | command |", "|---|---|---|---|"]
    for name, entry in catalog.items():
        assert entry.path is not None
        metrics = read_metrics(entry.path)
        if not metrics:
            lines.append(f"| {name} | — | not measured yet | |")
        for key, result in metrics.items():
            command = f"`{result['command']}`" if result.get("command") else ""
            lines.append(f"| {name} | `{key}` | {headline(entry.kind, result)} | {command} |")
    lines += ["", "| model | target | measured | met |", "|---|---|---|---|"]
    for model in dict.fromkeys(t.model for t in TARGETS):
        entry = catalog.get(model)
        metrics = read_metrics(entry.path) if entry is not None and entry.path else {}
        for text, answer in check_targets(model, metrics):
            measured, met = answer if answer is not None else ("not measured yet", None)
            mark = "—" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {model} | {text} | {measured} | {mark} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zoo-dir", type=Path, default=DEFAULT_ZOO)
    print(zoo_table(parser.parse_args().zoo_dir), end="")


if __name__ == "__main__":
    main()
