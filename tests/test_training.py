"""`ddserve train` for diffusion models: deterministic resume, condition dropout, zoo export, and the
latent-diffusion path through a first-stage autoencoder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ddserve.cli import main as ddserve
from models.catalog import load_catalog
from models.registry import find_entry, load_network
from models.training.diffusion import DiffusionTask
from models.training.recipes import load_recipe
from models.training.trainer import TrainConfig, Trainer

TINY_UNET = {
    "base_channels": 8,
    "channel_mults": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "heads": 2,
}


def _digits_recipe(steps: int) -> dict:
    recipe = load_recipe("digits-ddpm")
    recipe["unet"].update(TINY_UNET)
    recipe["train"].update(steps=steps, batch_size=8, checkpoint_every=5, sample_every=0)
    return recipe


def test_resume_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    straight = Trainer(
        DiffusionTask(_digits_recipe(10)),
        TrainConfig.from_dict(_digits_recipe(10)["train"]),
        tmp_path / "a",
    ).run(progress=False)
    Trainer(
        DiffusionTask(_digits_recipe(5)),
        TrainConfig.from_dict(_digits_recipe(5)["train"]),
        tmp_path / "b",
    ).run(progress=False)
    resumed = Trainer(
        DiffusionTask(_digits_recipe(10)),
        TrainConfig.from_dict(_digits_recipe(10)["train"]),
        tmp_path / "b",
    ).run(progress=False)
    for (name, p), q in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name


def test_condition_is_dropped_with_probability_p_uncond() -> None:
    recipe = _digits_recipe(1)
    recipe["train"]["batch_size"] = 4000
    task = DiffusionTask(recipe)
    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        def null_condition(self) -> torch.Tensor:
            return torch.tensor(10)

        def forward(self, x, t, cond):
            seen.append(cond)
            return torch.zeros_like(x)

    task.loss(Spy(), 0, torch.Generator().manual_seed(0))
    dropped = (seen[0] == 10).float().mean().item()
    assert abs(dropped - 0.1) < 0.02


def test_train_cli_writes_a_loadable_zoo_model(tmp_path: Path) -> None:
    recipe = _digits_recipe(3)
    path = tmp_path / "digits-tiny.json"
    recipe["name"] = "digits-tiny"
    path.write_text(json.dumps(recipe))
    assert (
        ddserve(
            [
                "train",
                str(path),
                "--run-dir",
                str(tmp_path / "run"),
                "--zoo-dir",
                str(tmp_path / "zoo"),
                "--no-progress",
            ]
        )
        == 0
    )
    entry = load_catalog(tmp_path / "zoo")["digits-tiny"]
    assert entry.kind == "diffusion" and entry.conditioning.classes[7] == "7"
    net = load_network(entry)
    out = net(torch.zeros(2, 1, 16, 16), torch.tensor([5, 500]), torch.tensor([1, 10]))
    assert out.shape == (2, 1, 16, 16)


def test_latent_diffusion_trains_on_scaled_first_stage_latents(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    first = load_recipe("shapes-autoencoder")
    first.update(name="tiny-first-stage", dataset_options={"n": 64})
    first["network"].update(channels=[8, 8, 8], num_res_blocks=0)
    first["train"].update(steps=2, batch_size=8, sample_every=0)
    (tmp_path / "first.json").write_text(json.dumps(first))
    assert (
        ddserve(
            [
                "train",
                str(tmp_path / "first.json"),
                "--run-dir",
                str(tmp_path / "r1"),
                "--zoo-dir",
                str(zoo),
                "--no-progress",
            ]
        )
        == 0
    )

    recipe = copy.deepcopy(load_recipe("shapes-ldm"))
    recipe.update(
        name="tiny-ldm", first_stage="tiny-first-stage", dataset_options={"n": 64}, zoo_dir=str(zoo)
    )
    recipe["entry"]["first_stage"] = "tiny-first-stage"
    recipe["unet"].update(TINY_UNET, attention_resolutions=[4], context_dim=16)
    recipe["train"].update(steps=2, batch_size=8, sample_every=0)
    task = DiffusionTask(recipe)
    assert task.x0.shape == (64, 4, 8, 8)
    assert abs(task.x0.std().item() - 1.0) < 1e-4  # latents scaled to unit variance
    assert task.conditions.shape == (64, 4) and (task.conditions[:, :2] > 0).all()  # "colour shape"
    model = Trainer(task, TrainConfig.from_dict(recipe["train"]), tmp_path / "r2").run(
        zoo / "tiny-ldm", progress=False
    )
    images = task.sample_images(model, torch.Generator().manual_seed(0))
    assert images.shape == (24, 3, 32, 32)  # decoded through the first stage
    entry = find_entry("tiny-ldm", zoo)
    assert entry.first_stage == "tiny-first-stage"
    assert entry.network["latent_scale"] == task.latent_scale
