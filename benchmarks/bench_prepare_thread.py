"""What the prepare thread saves a running job: its step-to-step gaps while new prompts arrive.

A text pipeline's worker encodes each new prompt with the pipeline's CLIP text encoder (~0.5 s on a
CPU for SD 1.x's). Inline (`Engine(prepare_thread=False)`, `DDSERVE_PREPARE_THREAD=false`) that
forward runs on the stepping thread when the job is taken, and every running job waits for it;
with the prepare thread it runs beside the steps. This runs, in one process and alternating, the
same workload through both: one long guided job running, and every `--every` of its steps a new
job with a prompt never seen before (guided, one image, `--new-steps` steps) arriving; it records
when each of the long job's steps ends and prints the gaps between them (p50, p90, max), the new
jobs' mean latency (taken to completed) and the wall time.

Model (random weights, nothing downloaded): SD 1.x's text encoder shape (`bench_text_cache`:
CLIPTextModel, 12 layers, width 768, L = 77) and SD 1.x's UNet2DConditionModel layout at reduced
width (block_out_channels (64, 128, 256, 256), cross-attention 768) on 4 × `--latent`² latents,
SD's DDIM scheduler config; the first stage is left out (the latents' first three channels are
stored as the image: decoding is not what is measured).

    .venv/bin/python -m benchmarks.bench_prepare_thread [--threads 1] [--latent 8]
        [--steps 40] [--every 5] [--new-steps 5] [--repeats 3] [--out FILE]

Writes benchmarks/results/prepare_thread.json (`--out`). Not a test (the engine's behaviour is
checked by tests/test_engine_prepare_thread.py): run it by hand, with the machine to itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_text_cache import sd_text_encoder

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NAME = "sd-shaped"


class LatentsAsImage:
    """A stand-in first stage: the latents' first three channels as the image (no decoder)."""

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[:, :3]  # [N, 3, h, w]


class OneModelPool:
    def __init__(self, model: Any) -> None:
        self.model = model

    def get(self, name: str) -> Any:
        assert name == NAME
        return self.model


def sd_shaped_model(latent: int) -> Any:
    """The worker's `DiffusionModel` of an SD-1.x-shaped text pipeline (see the module docstring)."""
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
        image=ImageSpec(channels=3, height=latent, width=latent),
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
        first_stage=LatentsAsImage(),  # type: ignore[arg-type]
        prompt_encoder=encoder,
        scheduler=options,
    )


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

    encoder = model.prompt_encoder
    encode = encoder._encode
    encodings: list[float] = []  # seconds of each text-encoder call (tokenizer + forward)

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
                arrivals += 1  # a prompt never seen: a text-encoder call
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
    return {
        "prepare_thread": prepare_thread,
        "long_job_steps": len(step_ends),
        "new_prompts": arrivals,
        "gap_ms_p50": 1e3 * statistics.median(gaps),
        "gap_ms_mean": 1e3 * statistics.mean(gaps),
        "gap_ms_p90": 1e3 * percentile(gaps, 0.9),
        "gap_ms_max": 1e3 * max(gaps),
        "new_job_latency_s_mean": statistics.mean(latencies),
        "encode_ms_mean": 1e3 * statistics.mean(encodings),
        "wall_s": time.perf_counter() - started,
        "jobs_succeeded": engine.stats.jobs_succeeded,
        "jobs_failed": engine.stats.jobs_failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    model = sd_shaped_model(args.latent)
    model.prompt_encoder.rows(["warm up"])  # the encoder's first call
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
