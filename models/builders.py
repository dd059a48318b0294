"""One constructor per model kind: config.json's `network` section → an untrained nn.Module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.catalog import AUTOENCODER_KINDS, ModelEntry
from models.nets.unet import UNet, UNetConfig


def _unet(entry: ModelEntry) -> nn.Module:
    return UNet(UNetConfig.from_dict(entry.network["unet"]))


def _classifier(entry: ModelEntry) -> nn.Module:
    from models.nets.classifier import ClassifierConfig, ImageClassifier

    return ImageClassifier(ClassifierConfig.from_dict(entry.network["classifier"]))


def _noisy_classifier(entry: ModelEntry) -> nn.Module:
    from models.nets.classifier import NoisyClassifier, NoisyClassifierConfig

    return NoisyClassifier(NoisyClassifierConfig.from_dict(entry.network["noisy_classifier"]))


def _autoencoder(entry: ModelEntry) -> nn.Module:
    from models.autoencoders import build_autoencoder

    return build_autoencoder(entry.kind, entry.network)


BUILDERS: dict[str, Callable[[ModelEntry], nn.Module]] = {
    "diffusion": _unet,
    "latent-diffusion": _unet,
    "classifier": _classifier,
    "noisy-classifier": _noisy_classifier,
    **dict.fromkeys(AUTOENCODER_KINDS, _autoencoder),
}


def build_module(entry: ModelEntry) -> nn.Module:
    builder = BUILDERS.get(entry.kind)
    if builder is None:
        raise KeyError(f"no builder for model kind {entry.kind!r}")
    return builder(entry)
