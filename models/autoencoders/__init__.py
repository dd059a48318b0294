"""The autoencoder family behind one interface (`models.autoencoders.base.AutoencoderBase`):
plain, denoising, sparse, VAE, adversarial, VQ-VAE and the KL-regularized first stage of latent
diffusion. `build_autoencoder(kind, network)` makes one from config.json's `network` section."""

from __future__ import annotations

from typing import Any

from models.autoencoders.adversarial import AdversarialAutoencoder, AdversarialConfig
from models.autoencoders.autoencoder import Autoencoder, AutoencoderConfig
from models.autoencoders.base import AutoencoderBase
from models.autoencoders.corruption import NOISE_KINDS, corrupt
from models.autoencoders.denoising import DenoisingAutoencoder, DenoisingConfig
from models.autoencoders.kl_autoencoder import KLAutoencoder, KLAutoencoderConfig
from models.autoencoders.sparse import SparseAutoencoder, SparseConfig
from models.autoencoders.vae import VAE, VAEConfig
from models.autoencoders.vqvae import VQVAE, VQEncoding, VQVAEConfig

# kind (models.catalog.ModelKind) → (model class, its config class)
AUTOENCODERS: dict[str, tuple[type[AutoencoderBase], type]] = {
    "autoencoder": (Autoencoder, AutoencoderConfig),
    "denoising-autoencoder": (DenoisingAutoencoder, DenoisingConfig),
    "sparse-autoencoder": (SparseAutoencoder, SparseConfig),
    "vae": (VAE, VAEConfig),
    "adversarial-autoencoder": (AdversarialAutoencoder, AdversarialConfig),
    "vqvae": (VQVAE, VQVAEConfig),
    "kl-autoencoder": (KLAutoencoder, KLAutoencoderConfig),
}


def build_autoencoder(kind: str, network: dict[str, Any]) -> AutoencoderBase:
    """An untrained autoencoder of `kind` from its config dict (unknown keys are ignored)."""
    if kind not in AUTOENCODERS:
        raise KeyError(
            f"{kind!r} is not an autoencoder kind; expected one of {', '.join(AUTOENCODERS)}"
        )
    model_cls, config_cls = AUTOENCODERS[kind]
    return model_cls(config_cls.from_dict(network))  # type: ignore[call-arg]


__all__ = [
    "AUTOENCODERS",
    "NOISE_KINDS",
    "VAE",
    "VQVAE",
    "AdversarialAutoencoder",
    "Autoencoder",
    "AutoencoderBase",
    "DenoisingAutoencoder",
    "KLAutoencoder",
    "SparseAutoencoder",
    "VQEncoding",
    "build_autoencoder",
    "corrupt",
]
