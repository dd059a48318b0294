"""Quality vs steps of every sampler (issue #22): classifier-FID and guidance accuracy per step count.

For each zoo model (`digits-ddpm`, `shapes-ldm`) the same n samples (same conditions, same x_T and
noise streams: image i draws from `sample_generator(seed, i)` in every setting, so differences
between settings are not blurred by different noise) are drawn with each sampler at 3, 4, 5, 6, 8,
10, 15, 20 steps (DDIM beside the few-step solvers), then DDIM-50 with two seeds (the FID's own
noise at this n) and DDPM-1000. Every setting is what a request gets: the model's default guidance
(w = guidance_scale − 1), the model's `clip_denoised`, `leading` spacing, and the solver defaults
of `SamplerSettings` (`use_karras_sigmas` off, `solver_order` 2); `dpmpp_2m+karras` adds
DPM-Solver++(2M) with Karras et al. (2022) sigmas.

The measures are those of `ddserve eval` (`models.evaluation.evaluate.evaluate_generation`): the
Fréchet distance on the dataset's evaluation classifier's features against the test split
(`feature_frechet_distance`, "classifier-FID") and the classifier's accuracy on the intended labels
(digits: the class; shapes: shape and colour both right). Results go to a JSON written after every
setting (a run stopped early keeps what it measured), then a plot and a Markdown table:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.solvers_quality --n 100
    .venv/bin/python -m benchmarks.solvers_quality --report   # plot + table from the JSON

Not a timed test. The few-step rows cost ~500 steps per sample and model, DDIM-50 twice and
DDPM-1000 another 1100: at ~5 ms per guided sample-step on one free core, n = 100 takes ~25 min
for both models; on 2 cores shared with other work, expect twice that (run one process per model,
`--models`, each with its own `--out`, and `--report --merge` them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("digits-ddpm", "shapes-ldm")
STEP_COUNTS = (3, 4, 5, 6, 8, 10, 15, 20)
FEW_STEP = (
    "ddim",
    "euler",
    "euler_ancestral",
    "dpmpp_2m",
    "dpmpp_2m+karras",
    "dpmpp_2m_sde",
    "unipc",
)
TARGET_RATIO = 1.1  # within 1.1× DDIM-50's FID …
TARGET_STEPS = {"digits-ddpm": 5, "shapes-ldm": 8}  # … in at most this many steps


@dataclass(frozen=True)
class Setting:
    """One row of the table: a sampler variant (`name`), a step count and the noise seed."""

    name: str
    steps: int
    seed: int = 0

    @property
    def sampler(self) -> str:
        return self.name.split("+")[0]

    @property
    def karras(self) -> bool:
        return self.name.endswith("+karras")

    @property
    def key(self) -> str:
        return f"{self.name}-{self.steps}" + (f"-seed{self.seed}" if self.seed else "")


def settings_in_order() -> list[Setting]:
    """Cheap settings first, DDPM-1000 last: a run cut short still has the few-step table."""
    few = [Setting(name, steps) for steps in STEP_COUNTS for name in FEW_STEP]
    return [*few, Setting("ddim", 50), Setting("ddim", 50, seed=1), Setting("ddpm", 1000)]


def measure_model(name: str, n: int, batch_size: int, out: dict[str, Any], path: Path) -> None:
    import torch

    from ddserve.params import guidance_weight
    from models.diffusion.sampler import SamplerSettings
    from models.evaluation.accuracy import label_set_accuracy
    from models.evaluation.evaluate import _dataset, feature_scores
    from models.evaluation.features import load_eval_classifier
    from models.evaluation.generation import (
        GenerationSetting,
        balanced_conditions,
        generate,
        load_diffusion,
    )
    from models.registry import find_entry

    entry = find_entry(name)
    assert entry.defaults is not None
    model = load_diffusion(entry, None, need_classifier=False)
    classifier = load_eval_classifier(entry.dataset)
    test_features = classifier.measure(_dataset(entry, "test").images).features
    conditions = balanced_conditions(entry, n)
    w = guidance_weight(entry.defaults.guidance_scale)
    rows = out.setdefault(name, {"guidance_scale": entry.defaults.guidance_scale, "rows": {}})
    for setting in settings_in_order():
        if setting.key in rows["rows"]:
            continue  # measured by an earlier run (resumable)
        generation = GenerationSetting(
            sampler=setting.sampler, steps=setting.steps, guidance=w, n=n, seed=setting.seed
        )
        settings = SamplerSettings(
            sampler=setting.sampler,  # type: ignore[arg-type]
            num_inference_steps=setting.steps,
            guidance_scale=w,
            clip_denoised=model.clip_denoised,
            use_karras_sigmas=setting.karras,
        )
        started = time.perf_counter()
        with torch.no_grad():
            images = generate(
                model, generation, conditions, settings=settings, batch_size=batch_size, log=False
            )
        seconds = time.perf_counter() - started
        measured = classifier.measure(images)
        scores = feature_scores(test_features, measured.features)
        accuracy = label_set_accuracy(
            measured.predicted, conditions.targets, classifier.label_names
        )
        overall = accuracy.get("all", accuracy.get(next(iter(accuracy))))
        rows["rows"][setting.key] = {
            "sampler": setting.name,
            "steps": setting.steps,
            "seed": setting.seed,
            "fid": round(scores["fid"], 6),
            "precision": round(scores["precision"], 4),
            "recall": round(scores["recall"], 4),
            "accuracy": round(overall["accuracy"], 4),  # type: ignore[index]
            "seconds": round(seconds, 1),
        }
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"{name} {setting.key}: {rows['rows'][setting.key]}", file=sys.stderr, flush=True)


def steps_to_stay_within(model: dict[str, Any], sampler: str) -> int | None:
    """The fewest steps from which `sampler`'s FID stays within TARGET_RATIO × DDIM-50's (seed 0)
    at every larger step count of the table: a single lucky count (at n = 100 the FID moves by
    ~10-20 % from seed to seed) does not count."""
    rows = model["rows"]
    limit = TARGET_RATIO * rows["ddim-50"]["fid"]
    found = None
    for steps in reversed(STEP_COUNTS):
        row = rows.get(f"{sampler}-{steps}")
        if row is None or row["fid"] > limit:
            break
        found = steps
    return found


def best_within_target(model: dict[str, Any]) -> dict[str, Any]:
    """Per sampler `steps_to_stay_within`, and the sampler that needs the fewest steps."""
    rows = model["rows"]
    reference = rows["ddim-50"]["fid"]
    per_sampler = {name: steps_to_stay_within(model, name) for name in FEW_STEP}
    reached = sorted((steps, name) for name, steps in per_sampler.items() if steps is not None)
    if not reached:
        return {"steps": None, "sampler": None, "fid_ratio": None, "per_sampler": per_sampler}
    steps, sampler = reached[0]
    ratio = rows[f"{sampler}-{steps}"]["fid"] / reference
    return {
        "steps": steps,
        "sampler": sampler,
        "fid_ratio": round(ratio, 3),
        "per_sampler": per_sampler,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for name in MODELS:
        if name not in results:
            continue
        model = results[name]
        rows = model["rows"]
        reference = rows.get("ddim-50", {}).get("fid")
        lines.append(
            f"**{name}** (n = {results['n']}, guidance_scale {model['guidance_scale']:g}): "
            "classifier-FID (accuracy)"
        )
        lines.append("")
        lines.append("| sampler | " + " | ".join(str(s) for s in STEP_COUNTS) + " |")
        lines.append("|---|" + "---|" * len(STEP_COUNTS))
        for sampler in FEW_STEP:
            cells = []
            for steps in STEP_COUNTS:
                row = rows.get(f"{sampler}-{steps}")
                cells.append("—" if row is None else f"{row['fid']:.3g} ({row['accuracy']:.0%})")
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
        refs = []
        for key, label in (
            ("ddim-50", "DDIM-50"),
            ("ddim-50-seed1", "DDIM-50, seed 1"),
            ("ddpm-1000", "DDPM-1000"),
        ):
            row = rows.get(key)
            if row is not None:
                refs.append(f"{label} {row['fid']:.3g} ({row['accuracy']:.0%})")
        lines.append("")
        lines.append("References: " + "; ".join(refs) + ".")
        if reference is not None:
            best = best_within_target(model)
            budget = TARGET_STEPS[name]
            if best["steps"] is None:
                verdict = "no sampler stays within it from ≤ 20 steps on"
            else:
                met = "met" if best["steps"] <= budget else "not met"
                verdict = (
                    f"{best['sampler']} from {best['steps']} steps on ({best['fid_ratio']:g}× at "
                    f"{best['steps']}): target ≤ {budget} steps {met}"
                )
            each = ", ".join(
                f"{name} {steps if steps is not None else '—'}"
                for name, steps in best["per_sampler"].items()
            )
            lines.append(
                f"Stays within {TARGET_RATIO:g}× DDIM-50's FID (seed 0) at every larger step "
                f"count: {verdict}. Steps needed per sampler: {each}."
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in MODELS if name in results]
    figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        rows = results[name]["rows"]
        for sampler in FEW_STEP:
            points = [
                (s, rows[f"{sampler}-{s}"]["fid"]) for s in STEP_COUNTS if f"{sampler}-{s}" in rows
            ]
            if points:
                style = "k--" if sampler == "ddim" else "-"
                axis.plot(*zip(*points, strict=True), style, marker="o", ms=3, label=sampler)
        for key, label, colour in (
            ("ddim-50", "DDIM-50", "grey"),
            ("ddpm-1000", "DDPM-1000", "tab:brown"),
        ):
            if key in rows:
                axis.axhline(rows[key]["fid"], color=colour, lw=0.8, ls=":", label=label)
        if "ddim-50" in rows:
            axis.axhline(
                TARGET_RATIO * rows["ddim-50"]["fid"], color="red", lw=0.8, label="1.1× DDIM-50"
            )
        axis.set_yscale("log")
        axis.set_xscale("log")
        axis.set_xticks(list(STEP_COUNTS), [str(s) for s in STEP_COUNTS])
        axis.set_xlabel("steps (network calls per image)")
        axis.set_ylabel("classifier-FID (lower is better)")
        axis.set_title(f"{name}, n = {results['n']}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=120, help="samples per setting")
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", type=Path, default=RESULTS / "solvers_quality.json")
    parser.add_argument("--report", action="store_true", help="only plot and print the table")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="with --report: first add the models of these results (runs of one model each, "
        "e.g. two processes side by side) to --out",
    )
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    for other in args.merge:
        extra = json.loads(other.read_text())
        if extra["n"] != results.get("n", extra["n"]):
            raise SystemExit(f"{other} holds n = {extra['n']}, {args.out} n = {results['n']}")
        results |= {name: extra[name] for name in MODELS if name in extra}
        results.setdefault("n", extra["n"])
        results.setdefault("command", extra["command"])
    if not args.report:
        if results.get("n", args.n) != args.n:
            raise SystemExit(f"{args.out} holds n = {results['n']}; use another --out")
        results["n"] = args.n
        results["command"] = f"python -m benchmarks.solvers_quality --n {args.n}"
        for name in args.models:
            measure_model(name, args.n, args.batch_size, results, args.out)
    for name in MODELS:
        if name in results and "ddim-50" in results[name]["rows"]:
            results[name]["target"] = best_within_target(results[name])
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
