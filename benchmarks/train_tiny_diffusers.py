"""Train a tiny diffusers DDPM on the zoo's digits, with diffusers' own training step, and save it
as a `DDPMPipeline` folder: an imported diffusers model that has learned something, for
`benchmarks/precision_quality.py --diffusers` (issue #21 item 2: bf16 FID on an imported model).

The step is diffusers' (its `train_unconditional.py` example): x_0 from the data, ε ~ N(0, I),
t ~ U{0, …, T−1}, x_t = `DDPMScheduler.add_noise`(x_0, ε, t) = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, and the loss
‖ε − ε_θ(x_t, t)‖² (the simple objective of Ho et al. 2020, eq. 14), AdamW with a cosine learning
rate after a warm-up, and an EMA of the weights (`diffusers.training_utils.EMAModel`) saved as the
model. The data is the digits model's (`models.data`, train split: 1,437 images of 1×16×16 in
[−1, 1]); the UNet is unconditional, as `DDPMPipeline` is.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python -m benchmarks.train_tiny_diffusers \\
        --out var/tiny-digits-diffusers --steps 1500 --batch-size 48 --lr 1e-3 --warmup 100

Deterministic for a given seed and thread count (one thread here). Writes `train_log.json`
(steps, seconds, loss) beside the pipeline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.data import load_dataset

DEFAULT_OUT = Path("var/tiny-digits-diffusers")


def tiny_digits_unet(seed: int) -> Any:
    """A UNet2DModel for 1×16×16 images: levels of 16, 32, 32 channels (16², 8², 4²), self-attention
    at 8² and 4² and in the middle block. Half the zoo digits-ddpm's widths: this CPU has no bf16
    convolution kernels (PyTorch falls back to `slow_conv2d`, ~30× fp32's time), and the bf16
    sampling of the benchmark's 1,000 images has to fit in minutes."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )


def train(
    out: Path, *, steps: int, batch_size: int, lr: float, warmup: int, ema_decay: float, seed: int
) -> dict[str, Any]:
    from diffusers import DDPMPipeline, DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    data = load_dataset("digits", "train").images  # [1437, 1, 16, 16] in [−1, 1]
    unet = tiny_digits_unet(seed).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=3 / 4)
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    losses: list[float] = []
    log: list[dict[str, float]] = []
    for step in range(1, steps + 1):
        index = torch.randint(0, len(data), (batch_size,), generator=g)
        x0 = data[index]  # [B, 1, 16, 16]
        noise = torch.randn(x0.shape, generator=g)  # ε [B, 1, 16, 16]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        x_t = scheduler.add_noise(x0, noise, t)  # √ᾱ_t·x_0 + √(1−ᾱ_t)·ε
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % 100 == 0 or step == steps:
            row = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "seconds": round(time.perf_counter() - started, 1),
            }
            log.append(row)
            losses.clear()
            print(json.dumps(row), flush=True)
    seconds = time.perf_counter() - started
    ema.copy_to(unet.parameters())
    pipeline = DDPMPipeline(unet=unet.eval(), scheduler=scheduler)
    pipeline.save_pretrained(out)
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "ema_decay": ema_decay,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "final_loss": log[-1]["loss"],
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary = train(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        ema_decay=args.ema_decay,
        seed=args.seed,
    )
    print(
        f"trained {summary['parameters']:,} parameters for {summary['steps']} steps in "
        f"{summary['train_seconds']} s (loss {summary['final_loss']:.4f}) → {args.out}"
    )


if __name__ == "__main__":
    main()
