"""What the prepare thread saves a running job: its step-to-step gaps while new prompts (or
img2img images) arrive.

A text pipeline's worker encodes each new prompt with the pipeline's CLIP text encoder (~0.5 s on a
CPU for SD 1.x's). Inline (`Engine(prepare_thread=False)`, `DDSERVE_PREPARE_THREAD=false`) that
forward runs on the stepping thread when the job is taken, and every running job waits for it;
with the prepare thread it runs beside the steps. This runs, in one process and alternating, the
same workload through both: one long guided job running, and every `--every` of its steps a new
job with a prompt never seen before (guided, one image, `--new-steps` steps) arriving; it records
when each of the long job's steps ends and prints the gaps between them (p50, p90, max), the new
jobs' mean latency (taken to completed) and the wall time.

`--variant img2img`: the new jobs are img2img jobs instead (the long job's prompt, cached: no
text encoding), each with an image of its own that the first stage encodes — SD 1.x's VAE encoder
(AutoencoderKL, block_out_channels (128, 256, 512, 512), f = 8: 8·`--latent`² RGB images), inline
or on the prepare thread; strength 0.8, so `--new-steps` 5 makes 4 steps.

Model (random weights, nothing downloaded): SD 1.x's text encoder shape (`bench_text_cache`:
CLIPTextModel, 12 layers, width 768, L = 77) and SD 1.x's UNet2DConditionModel layout at reduced
width (block_out_channels (64, 128, 256, 256), cross-attention 768) on 4 × `--latent`² latents,
SD's DDIM scheduler config; the first stage's decoder is left out (the latents' first three
channels are stored as the image: decoding is not what is measured).

    .venv/bin/python -m benchmarks.bench_prepare_thread [--variant prompt|img2img] [--threads 1]
        [--latent 8] [--steps 40] [--every 5] [--new-steps 5] [--repeats 3] [--out FILE]

Writes benchmarks/results/prepare_thread.json (`--out`). Not a test (the engine's behaviour is
checked by tests/test_engine_prepare_thread.py): run it by hand, with the machine to itself.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_text_cache import sd_text_encoder

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NAME = "sd-shaped"


class LatentsAsImage:
    """A stand-in first stage: the latents' first three channels as the image (no decoder)."""

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[:, :3]  # [N, 3, h, w]


class SdShapedFirstStage(LatentsAsImage):
    """SD 1.x's VAE encoder (random weights) as the first stage's encoder: the posterior's mean,
    as `DiffusersCodec.encode` gives it; decoding stays the stand-in's."""

    def __init__(self) -> None:
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        self.vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        ).eval()
        self.encodings: list[float] = []  # seconds of each encoding

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        begun = time.perf_counter()
        try:
            mean = self.vae.encode(torch.from_numpy(images)).latent_dist.mean  # [N, 4, h, w]
            return {"latents": mean.numpy(), "codes": None}
        finally:
            self.encodings.append(time.perf_counter() - begun)


class OneModelPool:
    def __init__(self, model: Any) -> None:
        self.model = model

    def get(self, name: str) -> Any:
        assert name == NAME
        return self.model


def sd_shaped_model(latent: int, vae: bool = False) -> Any:
    """The worker's `DiffusionModel` of an SD-1.x-shaped text pipeline (see the module docstring);
    `vae`: with SD's VAE encoder as its first stage (8·latent² images), for img2img."""
    from diffusers import UNet2DConditionModel

    from models.catalog import Conditioning, ImageSpec, ModelEntry
    from models.diffusers_format.text import CrossAttentionUNet, PromptEncoder
    from models.diffusion.scheduler_config import from_diffusers
    from tests.tiny_sd import SD_SCHEDULER
    from workers.model_pool import Denoiser, DiffusionModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder = sd_text_encoder(Path(tmp))
    encoder = PromptEncoder(tokenizer, text_encoder, cache_size=1024)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent,
        block_out_channels=(64, 128, 256, 256),
        cross_attention_dim=768,
        attention_head_dim=8,
    ).eval()
    schedule, options = from_diffusers({"_class_name": "DDIMScheduler", **SD_SCHEDULER})
    entry = ModelEntry(
        name=NAME,
        kind="latent-diffusion",
        tasks=["generate"],
        dataset="",
        image=ImageSpec(
            channels=3, height=latent * (8 if vae else 1), width=latent * (8 if vae else 1)
        ),
        latent_shape=[4, latent, latent],
        conditioning=Conditioning(type="text", context_len=77),
        prediction_type=options.prediction_type,
    )
    return DiffusionModel(
        entry=entry,
        denoiser=Denoiser(CrossAttentionUNet(unet), channels_last=False),
        schedule=schedule,
        sample_shape=(4, latent, latent),
        device=torch.device("cpu"),
        null_condition=encoder.null_condition(),
        first_stage=SdShapedFirstStage() if vae else LatentsAsImage(),  # type: ignore[arg-type]
        prompt_encoder=encoder,
        scheduler=options,
    )


def picture(side: int, seed: int) -> str:
    """A random RGB image, side² (base64 PNG): every img2img job brings its own."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(model: Any, prepare_thread: bool, tag: str, args: argparse.Namespace) -> dict[str, Any]:
    """One long job stepping while new prompts arrive; the gaps between its steps."""
    from tests import specs
    from tests.worker_doubles import MemoryFeed, MemoryStorage
    from workers.engine import BatchingPolicy, DenoiseLane, Engine

    feed = MemoryFeed()
    engine = Engine(
        OneModelPool(model),  # type: ignore[arg-type]
        [NAME],
        feed,
        MemoryStorage(),
        BatchingPolicy(max_batch=32),
        prepare_thread=prepare_thread,
    )
    lane = engine.lanes[NAME]
    assert isinstance(lane, DenoiseLane)

    def generate(prompt: str, steps: int, seed: int) -> dict[str, Any]:
        return specs.generate(
            NAME, prompt=prompt, guidance_scale=7.5, num_inference_steps=steps, seed=seed
        )

    def img2img(prompt: str, steps: int, seed: int) -> dict[str, Any]:
        image = picture(model.entry.image.height, seed)
        return specs.img2img(
            NAME,
            image,
            prompt=prompt,
            guidance_scale=7.5,
            num_inference_steps=steps,
            strength=0.8,
            seed=seed,
        )

    encoder = model.prompt_encoder
    encode = encoder._encode
    encodings: list[float] = []  # seconds of each text-encoder call (tokenizer + forward)
    image_encodings: list[float] = getattr(model.first_stage, "encodings", [])
    image_encodings.clear()

    def timed_encode(prompts: list[str]) -> torch.Tensor:
        begun = time.perf_counter()
        try:
            return encode(prompts)
        finally:
            encodings.append(time.perf_counter() - begun)

    encoder._encode = timed_encode
    long_prompt = "a photo of a red cat"
    model.prompt_encoder.rows([long_prompt])  # cached: the long job starts at once
    encodings.clear()
    running = feed.submit(generate(long_prompt, args.steps, 0))
    step_ends: list[float] = []  # when each round that stepped the long job ended
    new_jobs: dict[str, tuple[Any, float]] = {}  # job id → its ticket, when it arrived
    latencies: list[float] = []  # arrival → end, of each new job
    arrivals = 0
    started = time.perf_counter()

    def collect_ended() -> None:
        now = time.perf_counter()
        for job_id, (ticket, arrived) in list(new_jobs.items()):
            if ticket.finished:
                latencies.append(now - arrived)
                del new_jobs[job_id]

    try:
        while not running.finished:
            job = lane.jobs.get(running.key)
            done = job.image_steps if job is not None else 0
            if done and done % args.every == 0 and done // args.every > arrivals:
                arrivals += 1
                if args.variant == "img2img":  # a new image: a first-stage encoding
                    ticket = feed.submit(img2img(long_prompt, args.new_steps, arrivals))
                else:  # a prompt never seen: a text-encoder call
                    prompt = f"a {tag} photo {arrivals} of a dog"
                    ticket = feed.submit(generate(prompt, args.new_steps, arrivals))
                new_jobs[ticket.id] = (ticket, time.perf_counter())
            engine.run_once()
            job = lane.jobs.get(running.key)
            if job is None or job.image_steps > done:
                step_ends.append(time.perf_counter())
            collect_ended()
        while new_jobs:
            engine.run_once()
            collect_ended()
    finally:
        engine.close()
        del encoder._encode  # the class's again
    gaps = [b - a for a, b in itertools.pairwise(step_ends)]
    timed = image_encodings if args.variant == "img2img" else encodings
    return {
        "variant": args.variant,
        "prepare_thread": prepare_thread,
        "long_job_steps": len(step_ends),
        "new_prompts": arrivals,
        "gap_ms_p50": 1e3 * statistics.median(gaps),
        "gap_ms_mean": 1e3 * statistics.mean(gaps),
        "gap_ms_p90": 1e3 * percentile(gaps, 0.9),
        "gap_ms_max": 1e3 * max(gaps),
        "new_job_latency_s_mean": statistics.mean(latencies),
        "encode_ms_mean": 1e3 * statistics.mean(timed),
        "wall_s": time.perf_counter() - started,
        "jobs_succeeded": engine.stats.jobs_succeeded,
        "jobs_failed": engine.stats.jobs_failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--variant",
        choices=("prompt", "img2img"),
        default="prompt",
        help="new jobs: generate with a new prompt, or img2img with a new image",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="the stepping thread's torch threads"
    )
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="steps of the long job")
    parser.add_argument("--every", type=int, default=5, help="a new prompt every N of its steps")
    parser.add_argument("--new-steps", type=int, default=5, help="steps of each new job")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating")
    parser.add_argument("--out", type=Path, default=RESULTS / "prepare_thread.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sd_shaped_model(args.latent, vae=args.variant == "img2img")
    model.prompt_encoder.rows(["warm up"])  # the encoder's first call
    if args.variant == "img2img":  # the first stage's first call
        side = model.entry.image.height
        model.first_stage.encode(np.zeros((1, 3, side, side), dtype=np.float32))
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for prepare_thread in (False, True):
            tag = f"{'thread' if prepare_thread else 'inline'}{repeat}"
            runs.append(run(model, prepare_thread, tag, args))
            print(json.dumps(runs[-1]))
    summary: dict[str, Any] = {
        "cores": os.cpu_count(),
        **{k: v for k, v in vars(args).items() if k != "out"},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        "| mode | step gap p50 ms | p90 ms | max ms | encoding ms | new jobs' latency s | wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        mode = "prepare thread" if r["prepare_thread"] else "inline"
        print(
            f"| {mode} | {r['gap_ms_p50']:.0f} | {r['gap_ms_p90']:.0f} | {r['gap_ms_max']:.0f} "
            f"| {r['encode_ms_mean']:.0f} | {r['new_job_latency_s_mean']:.2f} | {r['wall_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
