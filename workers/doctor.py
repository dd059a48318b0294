"""`ddserve doctor`: what this machine will run the models on, before a worker is started.

Prints the torch build and device (CUDA and cuDNN versions, GPU names and memory), ONNX Runtime's
version and providers, the thread counts a worker would use, and for every model of the zoo the
device and backend it would run on — and exits non-zero when the configuration asks for CUDA that
cannot load (the same checks a worker makes at start), so a deployment can run it as a pre-flight.
"""

from __future__ import annotations

import argparse
import platform

from ddserve.settings import Settings

TORCH_KINDS = {"diffusion", "latent-diffusion", "classifier", "noisy-classifier"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embedded", action="store_true", help="thread counts of the embedded `ddserve serve`"
    )


def report(settings: Settings, embedded: bool = False) -> tuple[list[str], list[str]]:
    """The lines to print, and the problems found (each a clear sentence)."""
    import onnxruntime as ort
    import torch

    from models.catalog import load_catalog
    from models.onnx.runtime import ProviderUnavailable, resolve_providers
    from workers.model_pool import resolve_device
    from workers.threads import plan_threads

    lines = [f"python {platform.python_version()} on {platform.machine()}"]
    problems: list[str] = []
    lines.append(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    if torch.cuda.is_available():
        cudnn = torch.backends.cudnn.version()
        lines.append(f"  CUDA devices: {torch.cuda.device_count()}, cuDNN {cudnn}")
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"  cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("  no CUDA device")
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        problems.append(str(exc))
        device = torch.device("cpu")
    lines.append(f"worker device: {device} (DDSERVE_DEVICE={settings.device})")
    lines.append(
        f"onnxruntime {ort.__version__}, providers: {', '.join(ort.get_available_providers())}"
    )
    named = [p.strip() for p in settings.onnx_providers.split(",") if p.strip()]
    try:
        providers = resolve_providers(named or None, require_cuda=device.type == "cuda")
    except ProviderUnavailable as exc:
        problems.append(str(exc))
        providers = ["CPUExecutionProvider"]
    plan = plan_threads(settings, embedded=embedded)
    lines.append(
        f"threads: torch {plan.torch}, ONNX Runtime {plan.onnxruntime} of {plan.cores} cores"
        + (" (embedded: one left to the gateway)" if embedded else "")
    )
    lines.append("models:")
    for name, entry in sorted(load_catalog(settings.model_repository()).items()):
        if entry.kind in TORCH_KINDS:
            runs = f"torch on {device}"
        elif entry.file("encoder_onnx") and entry.file("decoder_onnx"):
            runs = f"ONNX Runtime ({', '.join(providers)})"
        else:
            runs = f"torch on {device} (no ONNX files)"
        lines.append(f"  {name:<24} {entry.kind:<22} {runs}")
    return lines, problems


def run(args: argparse.Namespace) -> int:
    lines, problems = report(Settings(), embedded=args.embedded)
    print("\n".join(lines))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0
