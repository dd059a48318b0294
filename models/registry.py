"""Loading the zoo's models with torch: networks built from config.json, EMA weights from safetensors.

`models.catalog` is the torch-free view of the same folders (what the gateway reads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.catalog import ModelEntry, load_catalog, read_entry

WEIGHTS_FILE = "weights.safetensors"


def save_weights(model: nn.Module, path: Path) -> None:
    """The state dict as safetensors (contiguous CPU tensors; tied tensors cloned)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def write_entry(folder: Path, entry: dict[str, Any]) -> ModelEntry:
    """Validate and write config.json; return the entry as the catalog will read it."""
    folder.mkdir(parents=True, exist_ok=True)
    validated = ModelEntry.model_validate(entry)
    data = validated.model_dump(mode="json", exclude={"path"}, exclude_none=True)
    (folder / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    return read_entry(folder)


def load_network(entry: ModelEntry, device: torch.device | str = "cpu") -> nn.Module:
    """The model's PyTorch module with its EMA weights, in eval mode, on device."""
    from models.builders import build_module  # the per-kind constructors

    module = build_module(entry)
    weights = entry.file("weights")
    if weights is None:
        raise FileNotFoundError(f"model {entry.name!r} has no weights file in {entry.path}")
    return load_weights(module, weights).to(device)


def find_entry(name: str, zoo_dir: Path | str | None = None) -> ModelEntry:
    catalog = load_catalog(zoo_dir)
    if name not in catalog:
        raise KeyError(f"unknown model {name!r}; the zoo has: {', '.join(sorted(catalog))}")
    return catalog[name]
