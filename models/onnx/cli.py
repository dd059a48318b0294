"""`ddserve export MODEL`: write an autoencoder's encoder.onnx and decoder.onnx into its zoo folder
and check them against PyTorch (max abs difference ≤ 1e-4 on random and real inputs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.catalog import DEFAULT_ZOO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a zoo autoencoder (models/zoo/MODEL)")
    parser.add_argument("--zoo-dir", type=Path, default=DEFAULT_ZOO, help="the model repository")


def run(args: argparse.Namespace) -> int:
    from models.onnx.export import ParityError, export_entry
    from models.registry import find_entry

    entry = find_entry(args.model, args.zoo_dir)
    try:
        checks = export_entry(entry)
    except ParityError as error:
        print(error)
        return 1
    for check in checks:
        print(check)
    print(f"wrote {entry.path}/encoder.onnx and decoder.onnx")
    return 0
