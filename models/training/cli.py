"""`ddserve train`: train a zoo model from its recipe (or a JSON file), resuming from its checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.catalog import DEFAULT_ZOO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a zoo model name (models/recipes/NAME.json) or a JSON file")
    parser.add_argument("--steps", type=int, help="override the recipe's number of steps")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--run-dir", type=Path, help="checkpoints and grids (default runs/NAME)")
    parser.add_argument("--zoo-dir", type=Path, default=DEFAULT_ZOO, help="where to write NAME/")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from models.training.recipes import build_task, load_recipe
    from models.training.trainer import TrainConfig, Trainer

    recipe = load_recipe(args.recipe)
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
    }
    recipe["train"].update({k: v for k, v in overrides.items() if v is not None})
    recipe["zoo_dir"] = str(args.zoo_dir)  # where the models it builds on (first stages) live
    task = build_task(recipe)
    run_dir = args.run_dir or Path("runs") / recipe["name"]
    trainer = Trainer(task, TrainConfig.from_dict(recipe["train"]), run_dir)
    trainer.run(args.zoo_dir / recipe["name"], progress=not args.no_progress)
    print(f"wrote {args.zoo_dir / recipe['name']}")
    return 0
