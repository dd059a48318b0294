"""ddserve against the per-request diffusers server, on the architectures of real models (issue #19).

Three systems behind the same HTTP load generator, each serving the same pipeline saved locally
with random weights (speed does not depend on the weights; nothing is downloaded):
- `diffusers`: `benchmarks/diffusers_baseline.py`, one `pipeline(...)` call per request, one at a
  time (the obvious server a user would write);
- `request`: a ddserve gateway + one `ddserve worker --batching request` (the jobs waiting when a
  batch starts run together until the last of them ends);
- `continuous`: a ddserve gateway + one `ddserve worker --batching continuous` (jobs join and
  leave the batch at every denoising step).
Each ddserve stack has its own key prefix on the real Redis (`--redis-url`), deleted afterwards.
Every process uses `--threads` torch threads (`DDSERVE_TORCH_THREADS`, `torch.set_num_threads`).

Models (`--models`):
- `cifar`: `google/ddpm-cifar10-32`'s UNet2DModel config written out here (35.7 M parameters,
  3×32×32 pixels, attention at the 16×16 level) in a `DDIMPipeline` with its linear β schedule;
  requests use DDIM (η = 0), no guidance (the model is unconditional);
- `sd`: a `StableDiffusionPipeline` of SD 1.x's layout at reduced width: UNet2DConditionModel with
  block_out_channels (64, 128, 256, 256), two layers per block, cross-attention in the first three
  levels (8 heads) on `--sd-latent`² × 4 latents (64 as SD 1.x at 512 px), a 2-layer CLIP text
  encoder (width 256), an f = 8 AutoencoderKL of reduced width, SD's DDIM scheduler config;
  requests carry a prompt and guidance s = 7.5 or 1 (none), half the guided ones a negative
  prompt;
- `tiny`, `tiny-sd`: the test suite's tiny pipelines (the smoke test).

Workload: every request one image, its step count drawn from `--steps` with `--step-weights`
(default 60 % 20, 30 % 50, 10 % 100) times `--step-scale` (a CPU cannot run the full counts in a
few minutes: the README states the scale used). Closed loop: c clients (`--concurrency`, default
1, 8, 32), each sending its next request when the last one is answered (after one warm-up request
each, not counted). Open loop: Poisson arrivals at `--loads` (fractions of the diffusers server's
capacity: its requests/s at the first closed-loop point, c = 1 by default), `--open-requests`
requests each, drained.
Latency: POST to answer, seen by the client (ddserve: `Prefer: wait=60`, then polling).
Points run one after the other, the three systems back to back at each point (the order rotating),
so that the machine's drift hits all three alike; ratios are to the diffusers server at the same
point.

    .venv/bin/python -m benchmarks.bench_diffusers --models cifar sd --step-scale 0.1
        [--concurrency 1 8 32] [--loads 0.5 0.9 1.3] [--open-requests 16] [--out FILE]

Writes benchmarks/results/diffusers_<model>.json and prints a Markdown table per model.
Not a test (tests/test_bench_diffusers.py runs its smallest configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.bench_continuous import start, stop_all, thread_env, wait_for
from benchmarks.support import cleanup_redis, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SYSTEMS = ("diffusers", "request", "continuous")
PROMPT_WORDS = ["red", "green", "blue", "yellow", "circle", "square", "cross", "cat", "dog"]
TERMINAL = {"succeeded", "failed", "canceled"}


# --- the pipelines --------------------------------------------------------------------------------
def cifar_pipeline(folder: Path, latent: int) -> None:
    """`google/ddpm-cifar10-32`'s UNet2DModel (its config.json, written out) with random weights,
    in a DDIMPipeline with that model's β schedule (linear 1e-4 … 0.02, T = 1000, clipped x̂_0)."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    del latent  # a pixel model: 32×32, as the original
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,  # one head over all channels, as the original
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_num_groups=32,
    ).eval()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
    )
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)


def sd_pipeline(folder: Path, latent: int) -> None:
    """An SD-1.x-shaped StableDiffusionPipeline at reduced width on latent×latent×4 latents (see the
    module docstring), random weights, SD's DDIM scheduler config."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_sd import CONTEXT_LEN, SD_SCHEDULER, write_tokenizer_files

    write_tokenizer_files(folder.parent / "tokenizer-src")
    tokenizer = CLIPTokenizer.from_pretrained(folder.parent / "tokenizer-src")
    torch.manual_seed(0)
    width = 256  # text encoder width = the UNet's cross_attention_dim (SD 1.x: 768)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT_LEN,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=width,
        )
    ).eval()
    unet = UNet2DConditionModel(  # SD 1.x's layout, block_out_channels (320, 640, 1280, 1280) ÷ 5
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=width,
        attention_head_dim=8,  # SD 1.x's config value (read by diffusers as 8 heads)
    ).eval()
    vae = AutoencoderKL(  # f = 8 as SD's, at reduced width
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=8 * latent,
        scaling_factor=0.18215,
    ).eval()
    StableDiffusionPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def tiny_pipeline(folder: Path, latent: int) -> None:
    from tests.diffusers_fixtures import ddim_pipeline

    del latent
    ddim_pipeline(folder, clip_sample=False)


def tiny_sd(folder: Path, latent: int) -> None:
    from tests.tiny_sd import tiny_sd_pipeline

    del latent
    tiny_sd_pipeline(folder.parent / "tiny-sd-build")
    shutil.move(folder.parent / "tiny-sd-build" / "pipeline", folder)


BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "cifar": cifar_pipeline,
    "sd": sd_pipeline,
    "tiny": tiny_pipeline,
    "tiny-sd": tiny_sd,
}
TEXT_MODELS = {"sd", "tiny-sd"}


def parameter_count(folder: Path) -> int:
    """Parameters of the pipeline's denoising UNet (from its saved weights' shapes)."""
    from safetensors import safe_open

    total = 0
    for path in (folder / "unet").glob("*.safetensors"):
        with safe_open(path, "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                total += math.prod(weights.get_slice(key).get_shape())
    return total


def bare_seconds_per_row(
    folder: Path, text: bool, batches: list[int], repeats: int
) -> dict[str, float]:
    """Seconds per row of the pipeline's bare UNet (diffusers' module alone: no sampler, server or
    PNG) at each batch size, in this process: the most batching can gain on this machine is the
    ratio of the batch-1 figure to the best one."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    unet_class = UNet2DConditionModel if text else UNet2DModel
    unet = unet_class.from_pretrained(folder / "unet").eval()
    config = unet.config
    per_row = {}
    for batch in batches:
        x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size)
        t = torch.full((batch,), 500)
        # text: CLIP states of L = 77 tokens, the width of the UNet's cross-attention
        context = (torch.randn(batch, 77, config.cross_attention_dim),) if text else ()
        with torch.inference_mode():
            unet(x, t, *context)  # warm-up
            start_at = time.perf_counter()
            for _ in range(repeats):
                unet(x, t, *context)
        per_row[str(batch)] = (time.perf_counter() - start_at) / (repeats * batch)
    return per_row


# --- the workload ---------------------------------------------------------------------------------
def step_counts(steps: list[int], scale: float) -> list[int]:
    return [max(1, round(s * scale)) for s in steps]


def make_requests(
    model: str, text: bool, count: int, steps: list[int], weights: list[float], seed: int
) -> list[dict[str, Any]]:
    """`count` request bodies of the mix, the same for every system (drawn from `seed`)."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        body: dict[str, Any] = {
            "model": model,
            "n": 1,
            "sampler": "ddim",
            "eta": 0.0,
            "num_inference_steps": rng.choices(steps, weights)[0],
            "seed": rng.randrange(2**31),
        }
        if text:
            body["prompt"] = " ".join(rng.choices(PROMPT_WORDS, k=3))
            body["guidance_scale"] = rng.choice([7.5, 1.0])  # s = 1: no guidance, one row
            # half the guided requests with a negative prompt (s = 1 has no unconditional row
            # for it to replace: ddserve refuses the pair with a 422)
            if rng.random() < 0.5 and body["guidance_scale"] > 1.0:
                body["negative_prompt"] = rng.choice(PROMPT_WORDS)
        bodies.append(body)
    return bodies


def mean_steps(steps: list[int], weights: list[float]) -> float:
    return sum(s * w for s, w in zip(steps, weights, strict=True)) / sum(weights)


# --- one system's HTTP call -------------------------------------------------------------------------
@dataclass
class System:
    """One server under test: its base URL and how one request is sent and awaited."""

    name: str
    url: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    async def call(self, client: httpx.AsyncClient, body: dict[str, Any]) -> float:
        """Send `body`, wait for the image; return the latency in seconds."""
        start_at = time.perf_counter()
        if self.name == "diffusers":
            r = await client.post(f"{self.url}/generate", json=body)
            if r.status_code != 200 or r.headers.get("content-type") != "image/png":
                raise RuntimeError(f"diffusers server: {r.status_code} {r.text[:300]}")
            return time.perf_counter() - start_at
        r = await client.post(f"{self.url}/generate", json=body, headers={"Prefer": "wait=60"})
        if r.status_code not in (200, 202):
            raise RuntimeError(f"ddserve ({self.name}): {r.status_code} {r.text[:300]}")
        job = r.json()
        while job["status"] not in TERMINAL:  # past the 60 s a wait may hold
            await asyncio.sleep(0.1)
            job = (await client.get(f"{self.url}/jobs/{job['id']}")).json()
        if job["status"] != "succeeded":
            raise RuntimeError(f"ddserve ({self.name}): {str(job)[:300]}")
        return time.perf_counter() - start_at


def client_for(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=concurrency + 4,
        max_keepalive_connections=concurrency + 4,
        keepalive_expiry=2.0,  # inside the servers' keep-alive: no close/reuse race
    )
    return httpx.AsyncClient(timeout=3600, limits=limits)


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "seconds": elapsed,
        "requests_per_s": len(ordered) / elapsed,
        "images_per_s": len(ordered) / elapsed,  # one image per request
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "mean_s": statistics.fmean(ordered),
    }


async def closed_loop(
    system: System, bodies: list[dict[str, Any]], concurrency: int, rounds: int
) -> dict[str, float]:
    """c clients, each: one warm-up request (not counted), then `rounds` requests back to back.
    Client k sends bodies[k], bodies[k + c], …: every system gets the same requests in the same
    order."""
    async with client_for(concurrency) as client:
        await asyncio.gather(*(system.call(client, bodies[k]) for k in range(concurrency)))
        latencies: list[float] = []

        async def client_loop(k: int) -> None:
            for j in range(rounds):
                latencies.append(await system.call(client, bodies[(j + 1) * concurrency + k]))

        start_at = time.perf_counter()
        await asyncio.gather(*(client_loop(k) for k in range(concurrency)))
        return summary(latencies, time.perf_counter() - start_at)


async def open_loop(
    system: System, bodies: list[dict[str, Any]], rate: float, seed: int
) -> dict[str, float]:
    """Poisson arrivals at `rate` req/s (the same arrival times for every system: from `seed`),
    one request per body, sent whether or not the earlier ones are answered; drained."""
    rng = random.Random(seed)
    offsets = []
    at = 0.0
    for _ in bodies:
        at += rng.expovariate(rate)
        offsets.append(at)
    async with client_for(len(bodies)) as client:
        start_at = time.perf_counter()

        async def one(offset: float, body: dict[str, Any]) -> float:
            await asyncio.sleep(max(0.0, start_at + offset - time.perf_counter()))
            return await system.call(client, body)

        latencies = await asyncio.gather(*(one(o, b) for o, b in zip(offsets, bodies, strict=True)))
        return summary(list(latencies), time.perf_counter() - start_at)


# --- the servers ------------------------------------------------------------------------------------
def start_baseline(folder: Path, threads: int, workdir: Path) -> System:
    port = free_port()
    log = (workdir / "diffusers-server.log").open("w")
    command = [sys.executable, "-m", "benchmarks.diffusers_baseline", "--pipeline", str(folder)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--threads", str(threads)],
        cwd=ROOT,
        env=os.environ | thread_env(threads),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return System("diffusers", f"http://127.0.0.1:{port}", [process])


def start_ddserve(
    mode: str, model: str, models_dir: Path, args: argparse.Namespace, workdir: Path, prefix: str
) -> System:
    """A gateway and one worker (`--batching mode`) under their own key prefix."""
    port = free_port()
    env = (
        os.environ
        | {
            "DDSERVE_REDIS_URL": args.redis_url,
            "DDSERVE_KEY_PREFIX": f"{prefix}-{mode}",
            "DDSERVE_ZOO_DIR": str(workdir / "no-zoo"),
            "DDSERVE_MODEL_DIRS": str(models_dir),
            "DDSERVE_MODELS": model,
            "DDSERVE_AUTH_ENABLED": "false",
            "DDSERVE_RATE_LIMIT_PER_MINUTE": "0",
            "DDSERVE_MAX_QUEUE_LENGTH": "100000",
            "DDSERVE_STORAGE_DIR": str(workdir / f"images-{mode}"),
            "DDSERVE_MAX_BATCH": str(args.max_batch),
            "DDSERVE_TORCH_THREADS": str(args.threads),
            "DDSERVE_DEVICE": "cpu",
            "DDSERVE_LOG_LEVEL": "WARNING",
            "DDSERVE_JOB_DEADLINE_S": "3600",
        }
        | thread_env(args.threads)
    )
    gateway = start(["serve", "--port", str(port)], env, workdir / f"gateway-{mode}.log")
    worker = start(
        ["worker", "--models", model, "--batching", mode, "--name", f"{prefix}-{mode}-w"],
        env,
        workdir / f"worker-{mode}.log",
    )
    return System(mode, f"http://127.0.0.1:{port}", [gateway, worker])


def wait_up(system: System, workdir: Path, timeout: float = 600) -> None:
    path = "/healthz" if system.name == "diffusers" else "/readyz"

    def up() -> bool:
        for process in system.processes:
            if process.poll() is not None:
                logs = "".join(p.read_text()[-2000:] for p in workdir.glob("*.log"))
                raise SystemExit(f"{system.name}: a process exited ({process.args}):\n{logs}")
        return httpx.get(f"{system.url}{path}", timeout=5).status_code == 200

    wait_for(up, timeout, f"the {system.name} server")


# --- one model --------------------------------------------------------------------------------------
def run_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    from ddserve.settings import Settings
    from models.diffusers_format.importer import import_pipeline

    workdir = Path(tempfile.mkdtemp(prefix=f"bench-diffusers-{model}-"))
    source = workdir / "source" / model
    print(f"{model}: building the pipeline (random weights) …", flush=True)
    BUILDERS[model](source, args.sd_latent)
    models_dir = workdir / "models"
    settings = Settings(
        redis_url=None, zoo_dir=workdir / "no-zoo", model_dirs=str(models_dir), device="cpu"
    )
    import_pipeline(str(source), name=model, settings=settings)
    parameters = parameter_count(source)
    print(f"{model}: UNet {parameters / 1e6:.1f} M parameters, imported", flush=True)

    steps = step_counts(args.steps, args.step_scale)
    text = model in TEXT_MODELS
    prefix = f"benchdf-{uuid.uuid4().hex[:8]}"
    systems = []
    try:
        for name in args.systems:
            if name == "diffusers":
                systems.append(start_baseline(source, args.threads, workdir))
            else:
                systems.append(start_ddserve(name, model, models_dir, args, workdir, prefix))
        for system in systems:
            wait_up(system, workdir)
        points: list[dict[str, Any]] = []
        seed = args.seed

        def point(kind: str, value: float, run: Callable[[System], Any]) -> dict[str, Any]:
            """One load point: every system back to back (the order rotating per point)."""
            shift = len(points) % len(systems)
            found = {}
            for system in systems[shift:] + systems[:shift]:
                found[system.name] = asyncio.run(run(system))
                print(f"  {kind} {value:g} {system.name}: {json.dumps(found[system.name])}")
            row = {"kind": kind, "value": value, "systems": found}
            points.append(row)
            # the points so far, in case the run is stopped before its end
            partial = args.out / f"diffusers_{model}.partial.json"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"model": model, "points": points}, indent=2) + "\n")
            return row

        # The first closed-loop point (c = 1 by default) gives the diffusers server's capacity.
        capacity = None
        for c in args.concurrency:
            seed += 1
            rounds = max(1, args.closed_requests // c)
            bodies = make_requests(model, text, c * (rounds + 1), steps, args.step_weights, seed)
            row = point(
                "closed",
                c,
                lambda s, b=bodies, c=c, r=rounds: closed_loop(s, b, c, r),
            )
            if capacity is None:
                # one request at a time: its throughput is its capacity, whatever the c (its
                # latency counts the queue from c = 2 on)
                measured = row["systems"].get("diffusers") or next(iter(row["systems"].values()))
                capacity = measured["requests_per_s"]
            if c == args.concurrency[0]:
                for load in args.loads:
                    seed += 1
                    bodies = make_requests(
                        model, text, args.open_requests, steps, args.step_weights, seed
                    )
                    point(
                        "open",
                        load,
                        lambda s, b=bodies, rate=load * capacity, k=seed: open_loop(s, b, rate, k),
                    )
        bare = bare_seconds_per_row(source, text, args.bare_batches, args.bare_repeats)
        print(f"  bare UNet, seconds per row by batch size: {json.dumps(bare)}", flush=True)
        return {
            "model": model,
            "bare_seconds_per_row": bare,
            "unet_parameters": parameters,
            "sd_latent": args.sd_latent if text else None,
            "steps": steps,
            "step_weights": args.step_weights,
            "mean_steps": mean_steps(steps, args.step_weights),
            "diffusers_capacity_req_s": capacity,
            "threads": args.threads,
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "points": points,
        }
    finally:
        stop_all([process for system in systems for process in system.processes])
        for system in systems:
            if system.name != "diffusers":
                cleanup_redis(args.redis_url, f"{prefix}-{system.name}")
        shutil.rmtree(workdir, ignore_errors=True)


def bare_only(model: str, args: argparse.Namespace) -> dict[str, float]:
    """`--bare-only`: build the pipeline and time its bare UNet (no servers)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-diffusers-{model}-"))
    try:
        BUILDERS[model](workdir / model, args.sd_latent)
        bare = bare_seconds_per_row(
            workdir / model, model in TEXT_MODELS, args.bare_batches, args.bare_repeats
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"  bare UNet, seconds per row by batch size: {json.dumps(bare)}", flush=True)
    return bare


# --- the report -------------------------------------------------------------------------------------
def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Each ddserve system against the diffusers server at every point (throughput and p50), and
    the issue's three targets."""
    found: dict[str, Any] = {}
    for p in result["points"]:
        base = p["systems"].get("diffusers")
        if base is None:
            continue
        for name, figures in p["systems"].items():
            if name == "diffusers":
                continue
            found.setdefault(name, {})[f"{p['kind']} {p['value']:g}"] = {
                "throughput": figures["requests_per_s"] / base["requests_per_s"],
                "p50": figures["p50_s"] / base["p50_s"],
            }
    return found


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for continuous batching: throughput ≥ 1.5× at the largest c, p50 ≤ 0.5×
    at the middle open-loop rate, p50 within 10 % at c = 1."""
    table = ratios(result).get("continuous", {})
    closed = [p["value"] for p in result["points"] if p["kind"] == "closed"]
    opened = [p["value"] for p in result["points"] if p["kind"] == "open"]
    checks = {}
    if closed and f"closed {max(closed):g}" in table:
        value = table[f"closed {max(closed):g}"]["throughput"]
        checks[f"throughput at c = {max(closed):g} ≥ 1.5×"] = (value, value >= 1.5)
    if opened and f"open {sorted(opened)[len(opened) // 2]:g}" in table:
        value = table[f"open {sorted(opened)[len(opened) // 2]:g}"]["p50"]
        checks["p50 at the middle rate ≤ 0.5×"] = (value, value <= 0.5)
    if 1 in closed and "closed 1" in table:
        value = table["closed 1"]["p50"]
        checks["p50 at c = 1 within 10 %"] = (value, value <= 1.1)
    return checks


def markdown_table(result: dict[str, Any]) -> str:
    names = [n for n in SYSTEMS if result["points"] and n in result["points"][0]["systems"]]
    header = (
        "| load | "
        + " | ".join(f"{n} req/s | {n} p50 / p99 (s)" for n in names)
        + " | continuous / diffusers: throughput, p50 |"
    )
    rows = [header, "|" + "---|" * (2 * len(names) + 2)]
    table = ratios(result).get("continuous", {})
    capacity = result["diffusers_capacity_req_s"]
    for p in result["points"]:
        label = (
            f"closed c = {p['value']:g}"
            if p["kind"] == "closed"
            else f"open {p['value']:g}× ({p['value'] * capacity:.3f} req/s)"
        )
        cells = " | ".join(
            f"{f['requests_per_s']:.3f} | {f['p50_s']:.1f} / {f['p99_s']:.1f}"
            for f in (p["systems"][n] for n in names)
        )
        r = table.get(f"{p['kind']} {p['value']:g}")
        ratio = f"{r['throughput']:.2f}×, {r['p50']:.2f}×" if r else "—"
        rows.append(f"| {label} | {cells} | {ratio} |")
    bare = result.get("bare_seconds_per_row") or {}
    if "1" in bare:
        best = min(bare, key=bare.__getitem__)
        timings = ", ".join(f"{b}: {s:.3f}" for b, s in bare.items())
        rows.append(
            f"\nbare UNet, seconds per row at batch {timings}; the most batching can gain "
            f"here: {bare['1'] / bare[best]:.2f}× (batch {best})"
        )
    rows.append("")
    for name, (value, met) in targets(result).items():
        rows.append(f"- target {name}: {value:.2f}× — {'met' if met else 'NOT met'}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(BUILDERS), default=["cifar", "sd"])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--closed-requests",
        type=int,
        default=32,
        help="measured requests per closed-loop point (at least one per client)",
    )
    parser.add_argument(
        "--loads",
        type=float,
        nargs="*",
        default=[0.5, 0.9, 1.3],
        help="open-loop rates, as fractions of the diffusers server's capacity (none: no open loop)",
    )
    parser.add_argument("--open-requests", type=int, default=16, help="requests per open point")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--step-weights", type=float, nargs="+", default=[0.6, 0.3, 0.1])
    parser.add_argument(
        "--step-scale", type=float, default=1.0, help="multiply every step count (CPU: 0.1)"
    )
    parser.add_argument("--sd-latent", type=int, default=64, help="sd: latent side (SD 1.x: 64)")
    parser.add_argument(
        "--bare-batches",
        type=int,
        nargs="+",
        default=[1, 4, 16],
        help="batch sizes of the bare UNet timing (the most batching can gain here)",
    )
    parser.add_argument("--bare-repeats", type=int, default=2, help="bare calls per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    parser.add_argument("--max-batch", type=int, default=64, help="ddserve's DDSERVE_MAX_BATCH")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder of the diffusers_<model>.json results"
    )
    parser.add_argument(
        "--bare-only",
        action="store_true",
        help="only time the bare UNet and add it to an existing diffusers_<model>.json",
    )
    args = parser.parse_args(argv)
    if len(args.step_weights) != len(args.steps):
        parser.error("--step-weights needs one weight per --steps count")
    torch.set_num_threads(args.threads)
    for model in args.models:
        out = args.out / f"diffusers_{model}.json"
        if args.bare_only:
            result = json.loads(out.read_text())
            result["bare_seconds_per_row"] = bare_only(model, args)
        else:
            result = run_model(model, args)
        args.out.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".partial.json").unlink(missing_ok=True)
        out.write_text(
            json.dumps(
                result | {"ratios": ratios(result), "targets": targets(result)},
                indent=2,
                default=str,
            )
            + "\n"
        )
        print(
            f"\n{model} ({result['unet_parameters'] / 1e6:.1f} M UNet parameters, steps "
            f"{result['steps']} weighted {result['step_weights']}, {args.threads} thread(s)):"
        )
        print(markdown_table(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
