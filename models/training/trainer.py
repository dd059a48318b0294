"""The training loop shared by every model of the zoo: Adam, an EMA of the weights, checkpoint and
resume, a deterministic seed, a progress bar with loss and rate, periodic sample grids, and the
export of the EMA weights into the zoo format at the end."""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models.imaging import save_grid
from models.training.ema import EMA


@dataclass
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 2_000
    threads: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """One gradient step on `loss` for the optimizer's parameters, their gradients' global L2 norm
    first clipped to `grad_clip` (g ← g · min(1, c / ‖g‖₂); 0: no clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


class TrainingTask(ABC):
    """What differs between models: the network, its loss, its samples and its zoo entry."""

    name: str

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def loss(
        self, model: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One batch's loss (the task draws the batch from its data with `generator`)."""

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Optimizers by name; tasks with an adversary (AAE) have more than one."""
        return {"main": list(model.parameters())}

    def training_step(
        self,
        model: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        step: int,
        generator: torch.Generator,
        grad_clip: float,
    ) -> dict[str, float]:
        loss, logs = self.loss(model, step, generator)
        optimizer_step(optimizers["main"], loss, grad_clip)
        return {"loss": float(loss.detach()), **logs}

    def sample_images(self, model: nn.Module, generator: torch.Generator) -> torch.Tensor | None:
        """A few images in [−1, 1] for the periodic grid (None: nothing to show)."""
        return None

    @abstractmethod
    def export(self, model: nn.Module, folder: Path) -> None:
        """Write config.json, the weights (and ONNX files) of the trained model into folder."""


class Trainer:
    def __init__(self, task: TrainingTask, config: TrainConfig, run_dir: Path | str) -> None:
        self.task = task
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoint_path = self.run_dir / "checkpoint.pt"

    def run(self, zoo_folder: Path | None = None, progress: bool = True) -> nn.Module:
        """Train to `config.steps` (resuming from the run's checkpoint), export, return the EMA model."""
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        model = self.task.build_model()
        groups = self.task.parameter_groups(model)
        optimizers = {k: torch.optim.Adam(p, lr=cfg.lr) for k, p in groups.items()}
        ema = EMA(model, cfg.ema_decay)
        generator = torch.Generator().manual_seed(cfg.seed)
        start = self._resume(model, optimizers, ema, generator)
        (self.run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

        bar = tqdm(
            range(start, cfg.steps),
            initial=start,
            total=cfg.steps,
            disable=not progress,
            desc=self.task.name,
            dynamic_ncols=True,
        )
        logs: dict[str, float] = {}
        started = time.perf_counter()
        with open(self.run_dir / "log.jsonl", "a") as log_file:
            for step in bar:
                model.train()
                lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
                for optimizer in optimizers.values():
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                logs = self.task.training_step(model, optimizers, step, generator, cfg.grad_clip)
                ema.update(model)
                rate = (step + 1 - start) / (time.perf_counter() - started)
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()} | {"it/s": f"{rate:.2f}"})
                if (step + 1) % 50 == 0:
                    log_file.write(json.dumps({"step": step + 1, **logs}) + "\n")
                    log_file.flush()
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                    self._save(model, optimizers, ema, generator, step + 1)
                if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                    self._sample_grid(ema.model, step + 1)
        if zoo_folder is not None:
            zoo_folder.mkdir(parents=True, exist_ok=True)
            self.task.export(ema.model, zoo_folder)
        return ema.model

    def _sample_grid(self, model: nn.Module, step: int) -> None:
        model.eval()
        with torch.no_grad():
            images = self.task.sample_images(model, torch.Generator().manual_seed(0))
        if images is not None:
            (self.run_dir / "samples").mkdir(exist_ok=True)
            save_grid(images, str(self.run_dir / "samples" / f"step_{step:06d}.png"), scale=2)

    def _save(
        self,
        model: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        ema: EMA,
        generator: torch.Generator,
        step: int,
    ) -> None:
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "ema": ema.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)  # atomic: a kill mid-save keeps the previous checkpoint

    def _resume(
        self,
        model: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        ema: EMA,
        generator: torch.Generator,
    ) -> int:
        if not self.checkpoint_path.exists():
            return 0
        state = torch.load(self.checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])


def iterate_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
