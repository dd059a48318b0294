"""U-Net ε_θ(x_t, t, c): shapes for every supported input, conditioning paths, and that it learns."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.losses import diffusion_loss
from models.diffusion.schedule import NoiseSchedule
from models.nets.unet import UNet, UNetConfig
from tests.tiny_zoo import randomized_unet


def tiny_config(**overrides: object) -> UNetConfig:
    """An 8×8 single-level U-Net with one block a level and no attention, unless overridden."""
    fields: dict[str, object] = {
        "in_channels": 1,
        "image_size": 8,
        "base_channels": 8,
        "channel_mults": (1,),
        "num_res_blocks": 1,
        "attention_resolutions": (),
    }
    return UNetConfig(**{**fields, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("channels", "size", "mults", "attn"),
    [
        (1, 8, (1, 2), (4,)),
        (1, 16, (1, 2, 2), (8,)),
        (3, 32, (1, 2, 2), (8,)),
        (4, 8, (1, 2), (8, 4)),
    ],
)
def test_output_shape_matches_input(
    channels: int, size: int, mults: tuple[int, ...], attn: tuple[int, ...]
) -> None:
    net = UNet(
        tiny_config(
            in_channels=channels, image_size=size, channel_mults=mults, attention_resolutions=attn
        )
    )
    x = torch.randn(3, channels, size, size)
    out = net(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape


def test_class_conditioning_and_null_class() -> None:
    net = randomized_unet(tiny_config(num_classes=4))
    x = torch.randn(1, 1, 8, 8).expand(5, -1, -1, -1)
    t = torch.full((5,), 300)
    with torch.no_grad():
        out = net(x, t, torch.tensor([0, 1, 2, 3, 4]))  # 4 = ∅
        unconditional = net(x[:1], t[:1])  # cond=None means ∅
    assert net.null_condition().item() == 4
    assert not torch.allclose(out[0], out[1])
    assert torch.allclose(out[4], unconditional[0], atol=1e-6)


def test_text_conditioning_through_cross_attention() -> None:
    net = randomized_unet(
        tiny_config(
            in_channels=4,
            channel_mults=(1, 2),
            attention_resolutions=(4,),
            vocab_size=12,
            context_len=3,
            context_dim=16,
        )
    )
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)
    tokens = torch.tensor([[3, 7, 0], [4, 7, 0], [0, 0, 0]])
    with torch.no_grad():
        out = net(x, torch.full((3,), 100), tokens)
        unconditional = net(x[:1], torch.full((1,), 100))
    assert torch.equal(net.null_condition(), torch.zeros(3, dtype=torch.long))
    assert not torch.allclose(out[0], out[1])  # the words matter
    assert torch.allclose(out[2], unconditional[0], atol=1e-6)  # all padding is ∅


def test_timestep_changes_the_output() -> None:
    net = randomized_unet(tiny_config())
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.tensor([10, 900]))
    assert not torch.allclose(out[0], out[1])


def test_loss_falls_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    net = UNet(
        tiny_config(
            base_channels=16, channel_mults=(1, 2), attention_resolutions=(4,), num_classes=2
        )
    )
    schedule = NoiseSchedule.create("linear", 1000)
    x0 = torch.rand((8, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = torch.tensor([0, 1] * 4)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)

    def loss_at(seed: int) -> torch.Tensor:  # a fixed (t, ε) draw so the two losses compare alike
        return diffusion_loss(
            lambda x, t: net(x, t, cond),
            schedule,
            x0,
            generator=torch.Generator().manual_seed(seed),
        )

    with torch.no_grad():
        before = sum(loss_at(s).item() for s in range(4))
    for step in range(150):
        loss = loss_at(step % 4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = sum(loss_at(s).item() for s in range(4))
    assert after < 0.5 * before, (before, after)
