"""`ddserve export MODEL`: write an autoencoder's encoder and decoder graphs to ONNX and check them
against PyTorch (max abs difference ≤ 1e-4 on random and real inputs): a zoo autoencoder's into its
folder (`encoder.onnx`, `decoder.onnx`, recorded in its config.json), an imported pipeline's first
stage into the pipeline's `onnx/` folder (`models.diffusers_format.onnx_export`), where the catalog
finds them. Workers started afterwards run the model in ONNX Runtime."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="a zoo autoencoder, or the first stage of an imported pipeline (NAME-vae)"
    )
    parser.add_argument(
        "--zoo-dir",
        type=Path,
        default=None,
        help="the model repository to look in (default: DDSERVE_MODEL_DIRS, else the zoo)",
    )


def run(args: argparse.Namespace) -> int:
    from ddserve.settings import Settings
    from models.catalog import load_catalog
    from models.onnx.export import ParityError

    roots = [args.zoo_dir] if args.zoo_dir is not None else Settings().model_repository()
    catalog = load_catalog(roots)
    entry = catalog.get(args.model)
    if entry is None:
        known = [n for n, e in sorted(catalog.items()) if "encode" in e.tasks]
        print(
            f"ddserve export: unknown model {args.model!r}; autoencoders here: {', '.join(known)}"
        )
        return 2
    try:
        if entry.format == "diffusers":
            from models.diffusers_format.onnx_export import export_first_stage

            checks = export_first_stage(entry)
        else:
            from models.onnx.export import export_entry

            checks = export_entry(entry)
    except ParityError as error:
        print(error)
        return 1
    except ValueError as error:
        print(f"ddserve export: {error}")
        return 2
    for check in checks:
        print(check)
    print(f"wrote the ONNX graphs of {entry.name} under {entry.path}")
    return 0
