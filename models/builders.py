"""One constructor per model kind: config.json's `network` section → an untrained nn.Module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.catalog import ModelEntry
from models.nets.unet import UNet, UNetConfig


def _unet(entry: ModelEntry) -> nn.Module:
    return UNet(UNetConfig.from_dict(entry.network["unet"]))


BUILDERS: dict[str, Callable[[ModelEntry], nn.Module]] = {
    "diffusion": _unet,
    "latent-diffusion": _unet,
}


def build_module(entry: ModelEntry) -> nn.Module:
    builder = BUILDERS.get(entry.kind)
    if builder is None:
        raise KeyError(f"no builder for model kind {entry.kind!r}")
    return builder(entry)
