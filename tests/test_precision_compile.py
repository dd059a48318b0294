"""The denoiser's precision and compile buckets, on the CPU: bf16 weights and activations with a
float32 output, padding to a bucket that never changes the real rows, one compile per bucket (not
per batch size), warm-up before jobs, and a model served end to end in bf16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ddserve.settings import Settings
from tests.tiny_zoo import tiny_unet, write_diffusion_model
from workers.model_pool import (
    Denoiser,
    DiffusionModel,
    ModelPool,
    batch_buckets,
    compile_mode,
)


def inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    cond = torch.randint(0, 10, (rows,), generator=g)
    return x, t, cond


def test_buckets_default_to_powers_of_two_up_to_max_batch() -> None:
    assert batch_buckets("", 64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets("", 48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets("8, 3,64", 64) == (3, 8, 64)
    with pytest.raises(ValueError):
        batch_buckets("0,4", 64)


def test_padding_to_a_bucket_never_changes_the_real_rows() -> None:
    network = tiny_unet().eval()
    plain = Denoiser(network, channels_last=False)
    padded = Denoiser(network, channels_last=False, buckets=(4, 8))
    for rows in (1, 3, 5, 8, 9):  # 9 is beyond the largest bucket: not padded
        x, t, cond = inputs(rows, seed=rows)
        assert padded.bucket(rows) == {1: 4, 3: 4, 5: 8, 8: 8, 9: 9}[rows]
        out = padded(x, t, cond)
        assert out.shape == (rows, 1, 8, 8)
        torch.testing.assert_close(out, plain(x, t, cond), rtol=0, atol=1e-6)


def test_bfloat16_runs_the_network_in_bf16_and_answers_float32() -> None:
    network = tiny_unet().eval()
    reference = Denoiser(network, channels_last=False)(*inputs(4))
    half = Denoiser(tiny_unet().eval().to(torch.bfloat16), False, dtype=torch.bfloat16)
    out = half(*inputs(4))
    assert out.dtype == torch.float32
    assert not torch.equal(out, reference)  # it did run in bf16
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, graph: Any, example_inputs: Any) -> Any:
        self.compiles += 1
        return graph.forward


class RowWise(torch.nn.Module):
    """A stand-in network with the denoiser's signature (compiling the U-Net takes a minute)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.embed = torch.nn.Embedding(11, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        shift = t.float()[:, None, None, None] / 1000.0
        if cond is not None:
            shift = shift + self.embed(cond)[:, :, None, None]
        return self.conv(x) + shift


def test_one_compile_per_bucket_not_per_batch_size() -> None:
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(RowWise(), dynamic=False, backend=backend)
    bucketed = Denoiser(compiled, channels_last=False, buckets=(2, 4, 8))
    for rows in (3, 4, 1, 2, 6, 7, 5, 8, 3):
        bucketed(*inputs(rows))
    assert backend.compiles == 3  # buckets 2, 4, 8
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(RowWise(), dynamic=False, backend=backend)
    unbucketed = Denoiser(compiled, channels_last=False)
    for rows in (3, 4, 1, 2, 6):
        unbucketed(*inputs(rows))
    assert backend.compiles == 5  # one per new size without buckets
    torch._dynamo.reset()


class ShapeRecorder(torch.nn.Module):
    """What `torch.compile` returns in the warm-up test: the network, recording each batch size it
    is called with (a compiled graph per size)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.network(x, t, cond)


def test_a_compiled_model_warms_up_each_bucket_before_jobs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_diffusion_model(tmp_path, "tiny-ddpm")
    asked: dict[str, Any] = {}

    def fake_compile(network: torch.nn.Module, **options: Any) -> ShapeRecorder:
        asked.update(options)
        return ShapeRecorder(network)

    monkeypatch.setattr(torch, "compile", fake_compile)
    caplog.set_level("INFO", logger="workers.model_pool")
    pool = ModelPool(Settings(zoo_dir=tmp_path, device="cpu", compile=True, compile_buckets="2,8"))
    model = pool.get("tiny-ddpm")
    assert isinstance(model, DiffusionModel)
    recorder = model.denoiser.network
    assert isinstance(recorder, ShapeRecorder)
    assert asked == {"dynamic": False, "backend": "inductor", "mode": "default"}
    assert recorder.sizes == [2, 8]  # warmed up before any job
    assert "compiled for batch 2" in caplog.text and "compiled for batch 8" in caplog.text
    model.denoiser(*inputs(5))  # a job's call of 5 rows runs at bucket 8
    assert recorder.sizes == [2, 8, 8]


def test_the_precision_comes_from_the_setting_or_the_card(tmp_path: Path) -> None:
    write_diffusion_model(tmp_path, "tiny-ddpm")
    pool = ModelPool(Settings(zoo_dir=tmp_path, device="cpu", dtype="bfloat16"))
    model = pool.get("tiny-ddpm")
    assert isinstance(model, DiffusionModel)
    assert model.denoiser.dtype == torch.bfloat16
    assert next(model.denoiser.network.parameters()).dtype == torch.bfloat16
    batch = model.new_batch()  # a whole sampling run in bf16 gives finite float32 images
    from models.diffusion.noise import sample_generator
    from models.diffusion.sampler import Sample, SamplerSettings

    settings = SamplerSettings(sampler="ddim", num_inference_steps=4, guidance_scale=1.0)
    samples = [
        Sample(settings=settings, generator=sample_generator(1, i), cond=torch.tensor(3), tag=i)
        for i in range(2)
    ]
    batch.add(samples)
    while len(batch):
        batch.step()
    assert all(s.x.dtype == torch.float32 and torch.isfinite(s.x).all() for s in samples)
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        ModelPool(Settings(zoo_dir=tmp_path, device="cpu", dtype="float16")).get("tiny-ddpm")


def test_cuda_graphs_are_reduce_overhead_on_cuda_and_refused_elsewhere(tmp_path: Path) -> None:
    """#21 item 3: CUDA graphs per bucket through inductor's reduce-overhead mode; asked for on
    the CPU, or without compile, the worker refuses at load rather than run without them."""
    cuda = torch.device("cuda", 0)
    graphs = Settings(zoo_dir=tmp_path, compile=True, cuda_graphs=True)
    assert compile_mode(graphs, cuda) == "reduce-overhead"
    assert compile_mode(Settings(zoo_dir=tmp_path, compile=True), cuda) == "default"
    with pytest.raises(ValueError, match="needs DDSERVE_COMPILE=true"):
        compile_mode(Settings(zoo_dir=tmp_path, cuda_graphs=True), cuda)
    write_diffusion_model(tmp_path, "tiny-ddpm")
    pool = ModelPool(Settings(zoo_dir=tmp_path, device="cpu", compile=True, cuda_graphs=True))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        pool.get("tiny-ddpm")
