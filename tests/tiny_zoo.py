"""A zoo of tiny, randomly initialised models for worker and engine tests (no training, no files
outside a temporary folder). Weights are random but non-zero everywhere, so every path of the
network — class embedding, time embedding, convolutions — changes the output."""

from __future__ import annotations

from pathlib import Path

import torch

from models.catalog import ModelEntry
from models.nets.unet import UNet, UNetConfig
from models.registry import WEIGHTS_FILE, save_weights, write_entry

CLASSES = [str(i) for i in range(10)]


def tiny_unet(seed: int = 0, image_size: int = 8, channels: int = 1, **config: object) -> UNet:
    cfg = UNetConfig(
        in_channels=channels,
        image_size=image_size,
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        heads=2,
        **({"num_classes": 10} | config),  # type: ignore[arg-type]
    )
    return randomized_unet(cfg, seed)


def randomized_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A U-Net with random (non-zero) weights everywhere, so that every path affects the output
    (a freshly built U-Net zero-initializes its last layers and predicts ε = 0)."""
    net = UNet(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def write_diffusion_model(
    zoo: Path,
    name: str = "tiny-ddpm",
    *,
    kind: str = "diffusion",
    seed: int = 0,
    image_size: int = 8,
    channels: int = 1,
    first_stage: str | None = None,
    latent_scale: float = 1.0,
    pixel_image: tuple[int, int, int] | None = None,
    classifier: str | None = None,
) -> ModelEntry:
    """A class-conditional tiny U-Net saved as a zoo model (`kind` diffusion or latent-diffusion)."""
    net = tiny_unet(seed, image_size, channels)
    folder = zoo / name
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(net, folder / WEIGHTS_FILE)
    c, h, w = pixel_image or (channels, image_size, image_size)
    network: dict[str, object] = {"unet": net.config.to_dict()}
    if kind == "latent-diffusion":
        network["latent_scale"] = latent_scale
    entry: dict[str, object] = {
        "name": name,
        "kind": kind,
        "tasks": ["generate", "inpaint"] if kind == "diffusion" else ["generate"],
        "dataset": "digits",
        "image": {"channels": c, "height": h, "width": w},
        "conditioning": {"type": "class", "classes": CLASSES},
        "schedule": {"kind": "linear", "num_timesteps": 1000},
        "samplers": ["ddpm", "ddim"],
        "defaults": {
            "sampler": "ddim",
            "num_inference_steps": 10,
            "guidance_scale": 1.0,
            "clip_denoised": kind == "diffusion",
        },
        "network": network,
        "files": {"weights": WEIGHTS_FILE},
    }
    if first_stage:
        entry["first_stage"] = first_stage
    if classifier:
        entry["classifier"] = classifier
    return write_entry(folder, entry)


def write_noisy_classifier(
    zoo: Path, name: str = "tiny-noisy-classifier", image_size: int = 8, seed: int = 0
) -> ModelEntry:
    """A random-weight noisy classifier f_φ(y | x_t, t) for classifier guidance."""
    from models.nets.classifier import NoisyClassifier, NoisyClassifierConfig

    cfg = NoisyClassifierConfig(
        in_channels=1, image_size=image_size, base_channels=8, channel_mults=(1,), num_classes=10
    )
    torch.manual_seed(seed)
    net = NoisyClassifier(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    folder = zoo / name
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(net, folder / WEIGHTS_FILE)
    return write_entry(
        folder,
        {
            "name": name,
            "kind": "noisy-classifier",
            "dataset": "digits",
            "image": {"channels": 1, "height": image_size, "width": image_size},
            "conditioning": {"type": "class", "classes": CLASSES},
            "network": {"noisy_classifier": cfg.to_dict()},
            "files": {"weights": WEIGHTS_FILE},
        },
    )


def write_onnx_autoencoder(
    zoo: Path, name: str = "tiny-kl", image_size: int = 8, latent_channels: int = 2, seed: int = 0
) -> ModelEntry:
    """A tiny KL-style autoencoder written directly as ONNX graphs (no export step, so it is
    fast): encoder images [N, 1, S, S] → AveragePool 2×2 → 1×1 conv → latents [N, L, S/2, S/2];
    decoder latents → 1×1 conv → nearest ×2 → tanh → images. Random fixed weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    half = image_size // 2
    enc_w = rng.normal(0, 1, (latent_channels, 1, 1, 1)).astype(np.float32)
    dec_w = rng.normal(0, 0.7, (1, latent_channels, 1, 1)).astype(np.float32)

    def save(graph: onnx.GraphProto, path: Path) -> None:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(path))

    folder = zoo / name
    folder.mkdir(parents=True, exist_ok=True)
    encoder = helper.make_graph(
        [
            helper.make_node(
                "AveragePool", ["images"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]
            ),
            helper.make_node("Conv", ["pooled", "w"], ["latents"]),
        ],
        "encoder",
        [
            helper.make_tensor_value_info(
                "images", TensorProto.FLOAT, ["N", 1, image_size, image_size]
            )
        ],
        [
            helper.make_tensor_value_info(
                "latents", TensorProto.FLOAT, ["N", latent_channels, half, half]
            )
        ],
        [numpy_helper.from_array(enc_w, "w")],
    )
    scales = np.array([1, 1, 2, 2], dtype=np.float32)
    decoder = helper.make_graph(
        [
            helper.make_node("Conv", ["latents", "w"], ["mixed"]),
            helper.make_node("Resize", ["mixed", "", "scales"], ["big"], mode="nearest"),
            helper.make_node("Tanh", ["big"], ["images"]),
        ],
        "decoder",
        [
            helper.make_tensor_value_info(
                "latents", TensorProto.FLOAT, ["N", latent_channels, half, half]
            )
        ],
        [
            helper.make_tensor_value_info(
                "images", TensorProto.FLOAT, ["N", 1, image_size, image_size]
            )
        ],
        [numpy_helper.from_array(dec_w, "w"), numpy_helper.from_array(scales, "scales")],
    )
    save(encoder, folder / "encoder.onnx")
    save(decoder, folder / "decoder.onnx")
    return write_entry(
        folder,
        {
            "name": name,
            "kind": "kl-autoencoder",
            "tasks": ["encode", "decode", "reconstruct"],
            "dataset": "digits",
            "image": {"channels": 1, "height": image_size, "width": image_size},
            "latent_shape": [latent_channels, half, half],
            "network": {"latent_std": 2.0},
            "files": {"encoder_onnx": "encoder.onnx", "decoder_onnx": "decoder.onnx"},
        },
    )
