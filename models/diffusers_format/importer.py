"""`ddserve import SOURCE [--name NAME]`: check a diffusers pipeline and add it to the model repository.

SOURCE is a local pipeline folder (what `pipeline.save_pretrained(folder)` writes), a Hugging Face
Hub id (`owner/name`: the local Hub cache first, then a download where the network allows), or a
single `.safetensors` file where diffusers can load the pipeline from one. The pipeline is checked
the way a worker will load it, component by component with diffusers — its class is one ddserve
serves, every component is there, the weights load into the configured architecture, and one
forward pass of the UNet (and of the first stage's decoder) on zeros has the shapes the catalog
entry promises — then copied into `Settings.import_dir()` (the first of `DDSERVE_MODEL_DIRS`, by
default `./var/models`) with a `card.md`: source, pipeline class, scheduler config, parameter
counts, licence. Every failure is one plain sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ddserve.settings import Settings
from models.catalog import PIPELINE_INDEX, ModelEntry, Precision, load_catalog
from models.diffusers_format.entries import (
    INPAINTING_UNET,
    OPTIONS_FILE,
    PRECISIONS,
    SUPPORTED_PIPELINES,
    PipelineError,
    components,
    pipeline_index,
    read_options,
    read_pipeline,
)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CARD = "card.md"


class ImportFailed(Exception):
    """A source that cannot be imported; the message is the whole answer to the user."""


@dataclass
class Checked:
    """What the check found: the catalog entries and each component's parameter count."""

    entries: list[ModelEntry]
    parameters: dict[str, int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="a diffusers pipeline folder, a Hugging Face Hub id (owner/name) or a .safetensors file",
    )
    parser.add_argument(
        "--name", help="the model's name in ddserve (default: the folder's or the Hub id's name)"
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export the first stage (VAE / VQ-VAE) to ONNX, checked against diffusers",
    )
    parser.add_argument(
        "--dtype",
        choices=PRECISIONS,
        help="the denoiser's precision on the workers (written to the model's ddserve.json; "
        "DDSERVE_DTYPE overrides it; float16 needs a CUDA device)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        target, checked = import_pipeline(
            args.source, name=args.name, settings=Settings(), dtype=args.dtype
        )
    except ImportFailed as exc:
        print(f"ddserve import: error: {exc}", file=sys.stderr)
        return 2
    main = checked.entries[0]
    if args.onnx:
        failed = export_onnx(target, checked)
        if failed:
            print(f"ddserve import: error: {failed}", file=sys.stderr)
            return 2
    size = f"{main.image.channels}×{main.image.height}×{main.image.width}"
    total = sum(checked.parameters.values())
    print(f"imported {main.name} ({main.pipeline}, {size} images, {total:,} parameters) → {target}")
    for entry in checked.entries[1:]:
        print(f"  with its first stage {entry.name} ({', '.join(entry.tasks)})")
    print("serve it: ddserve serve   (a running gateway and its workers read models at start)")
    return 0


def export_onnx(target: Path, checked: Checked) -> str | None:
    """`--onnx`: the imported first stage's graphs (`onnx_export`), printed check by check; the
    error message when the pipeline has no first stage or ONNX Runtime disagrees (None: done)."""
    from models.diffusers_format.entries import read_pipeline
    from models.diffusers_format.onnx_export import export_first_stage
    from models.onnx.export import ParityError

    stages = [e for e in read_pipeline(target, checked.entries[0].name) if "encode" in e.tasks]
    if not stages:
        return "--onnx: this pipeline has no first stage (VAE / VQ-VAE) to export"
    try:
        for check in export_first_stage(stages[0]):
            print(check)
    except ParityError as exc:
        return f"--onnx: {exc} (the model is imported; it runs its first stage in PyTorch)"
    return None


def import_pipeline(
    source: str, *, name: str | None = None, settings: Settings, dtype: Precision | None = None
) -> tuple[Path, Checked]:
    """Check `source` and copy it into the model repository; return the new folder and what the
    check found. `dtype`: the denoiser's precision, kept in the copy's `ddserve.json` (None: the
    source's, if it has one). Raises `ImportFailed` with a message for a person."""
    folder, origin, cleanup = resolve_source(source)
    try:
        name = name or default_name(source, folder)
        if not NAME_PATTERN.match(name):
            raise ImportFailed(
                f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (give --name)"
            )
        checked = check_pipeline(folder, name)
        target_root = settings.import_dir()
        taken = load_catalog(settings.model_repository())
        clashes = [entry.name for entry in checked.entries if entry.name in taken]
        if clashes or (target_root / name).exists():
            where = taken[clashes[0]].path if clashes else target_root / name
            raise ImportFailed(
                f"a model named {(clashes or [name])[0]!r} already exists ({where}): choose "
                "another --name, or remove that folder first"
            )
        target = target_root / name
        target_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target_root))
        try:  # copied beside the target, then renamed: a half-copied model is never listed
            shutil.copytree(folder, staging / name, ignore=shutil.ignore_patterns(".git*"))
            if dtype is not None:
                options = {**read_options(staging / name), "dtype": dtype}
                (staging / name / OPTIONS_FILE).write_text(json.dumps(options, indent=2) + "\n")
                checked = dataclasses.replace(
                    checked,
                    entries=[
                        e.model_copy(update={"dtype": dtype}) if e.component == "unet" else e
                        for e in checked.entries
                    ],
                )
            write_card(staging / name, origin, checked)
            (staging / name).rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target, checked
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


def default_name(source: str, folder: Path) -> str:
    if HUB_ID.match(source) and not Path(source).exists():
        return source.split("/")[-1]
    path = Path(source)
    return path.stem if path.is_file() else folder.name


def resolve_source(source: str) -> tuple[Path, str, Path | None]:
    """(the pipeline folder, a description of where it came from, a temporary folder to delete)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / PIPELINE_INDEX).is_file():
            raise ImportFailed(
                f"{path} has no {PIPELINE_INDEX}: not a diffusers pipeline folder (save one with "
                "`pipeline.save_pretrained(folder)`; a ddserve zoo model needs no import)"
            )
        return path, f"folder {path.resolve()}", None
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ImportFailed(
                f"{path} is a file, not a folder: give a diffusers pipeline folder, a Hub id or a "
                ".safetensors file"
            )
        return single_file(path)
    if HUB_ID.match(source):
        return hub_snapshot(source), f"Hugging Face Hub {source}", None
    raise ImportFailed(f"{source} is not a folder (nor a .safetensors file or a Hub id owner/name)")


def single_file(path: Path) -> tuple[Path, str, Path | None]:
    """A one-file checkpoint: diffusers loads these only through a pipeline class's
    `from_single_file` (its `FromSingleFileMixin`); none of the classes ddserve serves has one."""
    from models.diffusers_format.loading import require_diffusers

    diffusers = require_diffusers()
    loadable = [
        name
        for name in SUPPORTED_PIPELINES
        if hasattr(getattr(diffusers, name, None), "from_single_file")
    ]
    if not loadable:
        raise ImportFailed(
            f"{path} is a single .safetensors file: diffusers loads single files only for "
            "pipelines with from_single_file, and none of those ddserve serves "
            f"({', '.join(SUPPORTED_PIPELINES)}) has it. Load it where it was trained and save "
            "the pipeline as a folder: pipeline.save_pretrained('my-pipeline')"
        )
    raise ImportFailed(
        f"{path} is a single .safetensors file, which ddserve does not import yet: load it with "
        f"diffusers where it can ({loadable[0]}.from_single_file(path)) and save the pipeline as a "
        "folder, pipeline.save_pretrained('my-pipeline'), then import the folder"
    )


def hub_snapshot(repo_id: str) -> Path:
    """The pipeline's files from the local Hub cache, else downloaded (where the network allows)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # comes with diffusers
        raise ImportFailed(
            "importing from the Hub needs huggingface_hub (the `diffusers` extra)"
        ) from exc
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached: ask the Hub
        pass
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:
        reason = first_line(str(exc)).rstrip(".") if str(exc).strip() else type(exc).__name__
        raise ImportFailed(
            f"could not reach the Hugging Face Hub for {repo_id!r} (it is not in the local cache "
            f"either, and there is no folder {repo_id} here): {reason}. Download it where the network allows "
            "(`huggingface-cli download` or pipeline.save_pretrained) and import the folder"
        ) from None


def check_pipeline(folder: Path, name: str) -> Checked:
    """Load every component with diffusers as a worker will and run the shape checks."""
    try:
        entries = read_pipeline(folder, name)
    except PipelineError as exc:
        raise ImportFailed(str(exc)) from None
    main = entries[0]
    if not main.tasks:
        raise ImportFailed(
            f"pipeline class {main.pipeline!r} is not served yet; supported: "
            f"{', '.join(SUPPORTED_PIPELINES)}"
        )
    index = pipeline_index(folder)
    parts = components(index)
    for component in parts:
        if not (folder / component).is_dir():
            raise ImportFailed(
                f"model_index.json lists the component {component!r} but {folder / component} "
                "is missing"
            )
    from models.diffusers_format.loading import require_diffusers

    diffusers = require_diffusers()
    parameters: dict[str, int] = {}
    modules: dict[str, Any] = {}
    for component, class_name in parts.items():
        cls = (
            getattr(diffusers, class_name, None)
            or transformers_class(class_name)
            or pipeline_module_class(diffusers, str(index[component][0]), class_name)
        )
        if cls is None:
            raise ImportFailed(
                f"component {component!r} is a {class_name}, unknown to diffusers and transformers"
            )
        with quiet_progress_bars():
            modules[component] = load_component(cls, folder, component)
        if hasattr(modules[component], "parameters"):
            parameters[component] = sum(p.numel() for p in modules[component].parameters())
    check_shapes(main, entries[1:], modules)
    from models.diffusers_format.entries import scheduler_config
    from models.diffusion.scheduler_config import from_diffusers

    try:  # the worker reproduces the scheduler config with ddserve's sampler: it must be able to
        from_diffusers(scheduler_config(main.scheduler or {}))
    except ValueError as exc:
        raise ImportFailed(f"scheduler/scheduler_config.json: {exc}") from None
    return Checked(entries=entries, parameters=parameters)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No progress bars from diffusers or transformers while loading (transformers 5 draws one
    per text encoder on stderr, where the import's answer is one plain line)."""
    import diffusers.utils.logging as diffusers_logging

    try:
        import transformers.utils.logging as transformers_logging
    except ImportError:
        transformers_logging = None
    loggers = [m for m in (diffusers_logging, transformers_logging) if m is not None]
    enabled = [m.is_progress_bar_enabled() for m in loggers]
    for module in loggers:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was in zip(loggers, enabled, strict=True):
            if was:
                module.enable_progress_bar()


def transformers_class(class_name: str) -> Any:
    """A text pipeline's tokenizer or text encoder class (`CLIPTokenizer`, `CLIPTextModel`), from
    transformers; None if it has no such class or is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    return getattr(transformers, class_name, None)


def pipeline_module_class(diffusers: Any, library: str, class_name: str) -> Any:
    """A class defined in a diffusers pipeline's own module, as `model_index.json` names it
    (`"bert": ["latent_diffusion", "LDMBertModel"]`: `diffusers.pipelines.latent_diffusion`);
    None if there is no such pipeline module or class."""
    if not library.isidentifier():
        return None
    try:
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    except ImportError:
        return None
    return getattr(module, class_name, None)


def load_component(cls: Any, folder: Path, component: str) -> Any:
    """One component through its class's `from_pretrained`, diffusers' errors made plain."""
    kwargs: dict[str, Any] = {"subfolder": component, "local_files_only": True}
    if hasattr(cls, "_keep_in_fp32_modules"):  # a model (not a scheduler)
        kwargs["low_cpu_mem_usage"] = False
    try:
        return cls.from_pretrained(folder, **kwargs)
    except OSError as exc:
        text = str(exc)
        files = sorted(p.name for p in (folder / component).iterdir())
        if "Unable to load weights" in text or "Error while deserializing" in text:
            raise ImportFailed(
                f"the weights of {component!r} are corrupt or truncated ({', '.join(files)}): "
                "they cannot be read"
            ) from None
        if "no file named" in text or "does not appear to have a file" in text:
            raise ImportFailed(
                f"component {component!r} has no weights file in {folder / component} (found: "
                f"{', '.join(files) or 'nothing'})"
            ) from None
        raise ImportFailed(
            f"component {component!r} cannot be loaded: {first_line(text)}"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if "size mismatch" in text:
            mismatch = next(
                (line.strip() for line in text.splitlines() if "size mismatch" in line), ""
            )
            raise ImportFailed(
                f"the weights of {component!r} do not fit its config.json (mismatched shapes): "
                f"{mismatch[:300]}"
            ) from None
        raise ImportFailed(
            f"component {component!r} cannot be loaded: {first_line(text)}"
        ) from None
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ImportFailed(
            f"component {component!r} has a config diffusers rejects: {first_line(str(exc))}"
        ) from None


def first_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no message)"])[0][:300]


def check_shapes(main: ModelEntry, stages: list[ModelEntry], modules: dict[str, Any]) -> None:
    """One forward pass on zeros: the UNet maps x_t [1, C, h, w] (with a class label if it takes
    one) to the same shape; a latent pipeline's first stage decodes [1, c, h, w] latents with
    c = the UNet's channels to the promised image size."""
    import torch

    unet = modules["unet"]
    unet_channels = int(unet.config.in_channels)
    # An inpainting UNet reads x_t, the mask and the masked image's latents: c + 1 + c channels.
    extra = (
        main.latent_shape[0] + 1 if main.network.get(INPAINTING_UNET) and main.latent_shape else 0
    )
    for stage in stages:
        stage_channels = (stage.latent_shape or [0])[0]
        if stage_channels + extra != unet_channels:
            raise ImportFailed(
                f"the UNet works on {unet_channels} channels but the first stage "
                f"{stage.component!r} has {stage_channels} latent channels (mismatched shapes)"
            )
    c, h, w = main.latent_shape or (main.image.channels, main.image.height, main.image.width)
    x = torch.zeros((1, int(c), int(h), int(w)))
    x_in = torch.zeros((1, int(c) + extra, int(h), int(w)))
    text = main.conditioning is not None and main.conditioning.type == "text"
    labels = torch.zeros(1, dtype=torch.long) if main.conditioning and not text else None
    kwargs: dict[str, Any] = {"class_labels": labels}
    if text:
        kwargs = {"encoder_hidden_states": empty_prompt_states(main, modules, unet)}
    try:
        with torch.no_grad():
            out = unet(x_in, torch.tensor([0]), **kwargs).sample
    except Exception as exc:
        raise ImportFailed(
            f"the UNet fails on x of shape {list(x_in.shape)} (mismatched shapes): "
            f"{first_line(str(exc))}"
        ) from None
    if tuple(out.shape) != tuple(x.shape):
        raise ImportFailed(
            f"the UNet maps {list(x_in.shape)} to {list(out.shape)} (mismatched shapes): ddserve "
            "serves UNets that predict ε, v or x_0 of the input's shape (no learned variance)"
        )
    for stage in stages:
        vae = modules[stage.component or ""]
        try:
            with torch.no_grad():
                image = vae.decode(x).sample
        except Exception as exc:
            raise ImportFailed(
                f"the first stage {stage.component!r} fails to decode {list(x.shape)} latents "
                f"(mismatched shapes): {first_line(str(exc))}"
            ) from None
        expected = (1, stage.image.channels, stage.image.height, stage.image.width)
        if tuple(image.shape) != expected:
            raise ImportFailed(
                f"the first stage {stage.component!r} decodes {list(x.shape)} latents to "
                f"{list(image.shape)}, not {list(expected)} (mismatched shapes)"
            )


def empty_prompt_states(main: ModelEntry, modules: dict[str, Any], unet: Any) -> Any:
    """A text pipeline's encoding of "" [1, L, D] (its ∅), by the prompt encoder the workers will
    use, checked against the UNet's cross-attention width D."""
    from models.diffusers_format.entries import text_layout
    from models.diffusers_format.text import PROMPT_ENCODERS

    layout = text_layout(main.pipeline)
    encoder = PROMPT_ENCODERS[layout.tokenizer](
        modules["tokenizer"], modules[layout.encoder], cache_size=0
    )
    try:
        states = encoder.null_condition()[None]  # [1, L, D]
    except Exception as exc:
        raise ImportFailed(
            f"the tokenizer and {layout.encoder} fail on the empty prompt: {first_line(str(exc))}"
        ) from None
    width = unet.config.cross_attention_dim
    if isinstance(width, int) and states.shape[-1] != width:
        raise ImportFailed(
            f"the text encoder gives {states.shape[-1]}-wide hidden states but the UNet's "
            f"cross-attention takes {width} (mismatched shapes)"
        )
    return states


def write_card(folder: Path, origin: str, checked: Checked) -> None:
    """`card.md`: where the model came from and what ddserve serves of it."""
    import diffusers

    main = checked.entries[0]
    scheduler = json.dumps(main.scheduler or {}, indent=2, sort_keys=True)
    counts = "\n".join(f"| `{part}` | {count:,} |" for part, count in checked.parameters.items())
    served = "\n".join(
        f"- `{entry.name}` ({entry.kind}): {', '.join(entry.tasks) or 'not served yet'}"
        for entry in checked.entries
    )
    image = f"{main.image.channels}×{main.image.height}×{main.image.width}"
    text = f"""# {main.name}

Imported by `ddserve import` on {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
(diffusers {diffusers.__version__}).

- source: {origin}
- pipeline class: `{main.pipeline}`
- images: {image}{f", latents {'×'.join(map(str, main.latent_shape))}" if main.latent_shape else ""}
- conditioning: {describe_conditioning(main)}
- licence: {main.license or "not stated in the source (no README.md license: field, no LICENSE file)"}
- parameters: {sum(checked.parameters.values()):,}
- precision of the denoiser: {main.dtype or "float32"} (`{OPTIONS_FILE}`; `DDSERVE_DTYPE` overrides it)

| component | parameters |
|---|---|
{counts}

## Served as
{served}

## Scheduler config
```json
{scheduler}
```
"""
    (folder / CARD).write_text(text)


def describe_conditioning(entry: ModelEntry) -> str:
    cond = entry.conditioning
    if cond is None:
        return "none (unconditional)"
    if cond.type == "class":
        return f"class labels 0 … {len(cond.classes or []) - 1} (always required)"
    negative = "" if cond.negative_prompt else "; no negative prompt, as its pipeline"
    return f"text prompt ({cond.tokenizer} tokenizer, {cond.context_len} tokens{negative})"
