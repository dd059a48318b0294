"""The `ddserve` command. Each sub-command lives with its package and is imported only when used,
so `ddserve serve` with a remote Redis never loads torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command → module with add_arguments(parser) and run(args) -> int
COMMANDS = {
    "train": ("models.training.cli", "train a zoo model from its recipe"),
    "eval": ("models.evaluation.cli", "measure a zoo model: FID, precision/recall, accuracy"),
    "export": ("models.onnx.cli", "export an autoencoder's encoder and decoder to ONNX"),
    "import": (
        "models.diffusers_format.importer",
        "check a diffusers pipeline (folder, Hub id) and add it to the model repository",
    ),
    "worker": ("workers.cli", "run the batching worker for some models (needs Redis)"),
    "webhook-worker": (
        "service.webhooks.cli",
        "deliver the jobs' webhooks (Standard Webhooks, retried; needs Redis)",
    ),
    "doctor": ("workers.doctor", "what the models will run on here (device, CUDA, providers)"),
    "serve": ("ddserve.serve", "run the gateway (embedded with a worker thread when no Redis URL)"),
    "generate": (
        "ddserve.generate",
        "sample images into a PNG grid (a server URL or in-process)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddserve", description="Generative image model serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen command's module (`ddserve serve` must not load torch); all for --help.
    chosen = {argv[0]: COMMANDS[argv[0]]} if argv and argv[0] in COMMANDS else COMMANDS
    modules = {}
    for name, (module_name, help_text) in chosen.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
