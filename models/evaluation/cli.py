"""`ddserve eval MODEL`: measure a zoo model and record the result in its folder.

Sampling options default to the model's own defaults (config.json `defaults`); the exact command,
with every option spelled out, is stored beside the result in metrics.json.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ddserve.params import SAMPLERS, guidance_weight
from models.catalog import DEFAULT_ZOO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model of the zoo (models/zoo/NAME)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the model's")
    parser.add_argument("--steps", type=int, help="inference steps (default: the model's)")
    parser.add_argument("--eta", type=float, help="DDIM η (default: the model's)")
    parser.add_argument(
        "--guidance", type=float, help="classifier-free guidance w = guidance_scale − 1 (0 = none)"
    )
    parser.add_argument("--classifier-scale", type=float, help="classifier guidance s")
    parser.add_argument("--n", type=int, default=500, help="samples (or real images) to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inpaint", action="store_true", help="measure RePaint inpainting")
    parser.add_argument("--jump-length", type=int, default=10, help="RePaint jump length")
    parser.add_argument("--jump-n-sample", type=int, default=1, help="RePaint resamplings")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--zoo-dir", type=Path, default=DEFAULT_ZOO)


def _command(args: argparse.Namespace, setting: object, diffusion: bool) -> str:
    words = ["ddserve", "eval", args.model]
    if diffusion:
        s = setting
        words += ["--sampler", s.sampler, "--steps", str(s.steps), "--eta", f"{s.eta:g}"]  # type: ignore[attr-defined]
        words += ["--guidance", f"{s.guidance:g}", "--classifier-scale", f"{s.classifier_scale:g}"]  # type: ignore[attr-defined]
    words += ["--n", str(args.n), "--seed", str(args.seed)]
    if args.inpaint:
        words += ["--inpaint", "--jump-length", str(args.jump_length)]
        words += ["--jump-n-sample", str(args.jump_n_sample)]
    if Path(args.zoo_dir).resolve() != DEFAULT_ZOO.resolve():
        words += ["--zoo-dir", str(args.zoo_dir)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    import torch

    from models.evaluation.evaluate import EvalOptions, evaluate_model
    from models.evaluation.generation import DIFFUSION_KINDS, GenerationSetting
    from models.evaluation.report import merge_metrics, write_card, write_samples
    from models.registry import find_entry

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 4:
        raise SystemExit("--n must be at least 4 (precision/recall uses k = 3 neighbours)")
    entry = find_entry(args.model, args.zoo_dir)
    defaults = entry.defaults
    guidance_default = (
        0.0 if args.inpaint or defaults is None else guidance_weight(defaults.guidance_scale)
    )
    setting = GenerationSetting(
        sampler=args.sampler or (defaults.sampler if defaults else "ddim"),
        steps=args.steps or (defaults.num_inference_steps if defaults else 50),
        eta=args.eta if args.eta is not None else (defaults.eta if defaults else 0.0),
        guidance=args.guidance if args.guidance is not None else guidance_default,
        classifier_scale=args.classifier_scale if args.classifier_scale is not None else 0.0,
        n=args.n,
        seed=args.seed,
    )
    options = EvalOptions(
        setting=setting,
        inpaint=args.inpaint,
        jump_length=args.jump_length,
        jump_n_sample=args.jump_n_sample,
        batch_size=args.batch_size,
    )
    evaluation = evaluate_model(entry, options, args.zoo_dir)
    assert entry.path is not None
    command = _command(args, setting, entry.kind in DIFFUSION_KINDS)
    merge_metrics(entry.path, evaluation.key, evaluation.result, command)
    write_samples(entry.path, evaluation.grid, evaluation.grid_columns)
    write_card(entry.path)
    print(f"{entry.name} [{evaluation.key}]")
    from models.evaluation.report import flatten

    for name, value in flatten(evaluation.result).items():
        print(f"  {name}: {value}")
    print(f"wrote {entry.path / 'metrics.json'}, samples.png, card.md")
    return 0
