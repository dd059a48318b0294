"""Gateway CPU per job with webhooks on and off, side by side in one run, at c = 64 (issue #20:
the webhook path may add at most 5 %).

What the webhook path adds to the gateway is all in the submission: the body's two extra fields,
the URL check (`service.webhooks.targets`: parsing, the allowlist, DNS resolution of a name) and
one ZADD in the enqueue's existing transaction. After that the gateway does nothing more for a
job with a webhook (events are derived and delivered by the webhook worker, not the gateway, and
a held `Prefer: wait` costs the same), so this measures the submission alone: one gateway process
in front of the real Redis, no GPU worker (the jobs stay queued), c = 64 clients submitting
`POST /generate` (202, no wait) in a closed loop, in windows that alternate between

- off: no webhook;
- on (IP): `webhook` = http://127.0.0.1:9/hook (allowlisted literal: no DNS lookup);
- on (name): `webhook` = http://localhost:9/hook (allowlisted name, resolved by getaddrinfo from
  /etc/hosts — a DNS server's answer would cost the gateway a thread's wait, not CPU);

`--repeats` windows of each (medians reported), so a busy machine's load hits all alike. The
gateway's CPU is read from /proc (user + system) before and after each window. Then (part 2) the
submission steps a webhook touches are timed in this process (`in_process`), where a loaded
machine's noise is far smaller than a few-% effect on a whole request.

    .venv/bin/python benchmarks/bench_webhooks.py [--concurrency 64] [--submits 2000]
        [--repeats 3] [--redis-url redis://127.0.0.1:6379/0] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's packages
from bench_http import MODEL, ROOT, cleanup_redis, cpu_seconds, free_port, wait_healthy

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a fixed test key (base64 of 24 bytes)
VARIANTS = {
    "off": None,
    "on (IP)": "http://127.0.0.1:9/hook",
    "on (name)": "http://localhost:9/hook",
}


async def window(url: str, concurrency: int, submits: int, webhook: str | None) -> float:
    """`submits` POST /generate (202) from `concurrency` closed-loop clients; wall seconds."""
    limits = httpx.Limits(
        max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4
    )
    counter = iter(range(submits))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def loop() -> None:
            for i in counter:
                body = {"model": MODEL, "num_inference_steps": 1, "class_label": i % 10, "seed": i}
                if webhook is not None:
                    body["webhook"] = webhook
                r = await client.post("/generate", json=body)
                if r.status_code != 202:
                    raise RuntimeError(f"submit failed: {r.status_code} {r.text[:300]}")

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return time.perf_counter() - start


def in_process(redis_url: str, prefix: str, rounds: int, block: int = 100) -> dict[str, float]:
    """CPU µs per job of the submission steps a webhook touches, in this process: the body's
    validation, the webhook check (`WebhookTargets.target`, its cache warm as for a client that
    sends many jobs to one receiver) and the enqueue transaction (with the ZADD of a watched job)
    against the real Redis. Variants alternate in blocks of `block` jobs; `time.process_time`
    counts this process's CPU only, so Redis's own time and the machine's other load stay out."""
    from ddserve.jobs import META_WEBHOOK
    from ddserve.requests import GenerateBody
    from ddserve.settings import Settings
    from service.jobstore import JobStore
    from service.webhooks.targets import WebhookTargets

    settings = Settings(
        redis_url=redis_url,
        key_prefix=prefix,
        webhook_secret=SECRET,
        webhook_allowed_hosts="127.0.0.1,localhost",
        max_retries=0,
    )
    from redis import Redis

    store = JobStore(Redis.from_url(redis_url), settings, [MODEL])
    targets = WebhookTargets(settings)
    spent = dict.fromkeys(VARIANTS, 0.0)
    for start in range(0, rounds, block):
        for name, webhook in VARIANTS.items():
            began = time.process_time()
            for i in range(start, start + block):
                raw = {"model": MODEL, "num_inference_steps": 1, "class_label": i % 10, "seed": i}
                if webhook is not None:
                    raw["webhook"] = webhook
                body = GenerateBody.model_validate(raw)
                meta = {"owner": None, "kind": "generate", "model": MODEL}
                target = targets.target(body)
                if target is not None:
                    meta[META_WEBHOOK] = target
                store.enqueue(MODEL, body.model_dump(mode="json"), str(uuid.uuid4()), meta)
            spent[name] += time.process_time() - began
    return {name: 1e6 * total / rounds for name, total in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--submits", type=int, default=2000, help="submits per window")
    parser.add_argument("--repeats", type=int, default=3, help="windows of each variant")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--in-process", type=int, default=3000, help="jobs per variant, part 2")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DDSERVE_REDIS_URL": args.redis_url,
        "DDSERVE_KEY_PREFIX": prefix,
        "DDSERVE_ZOO_DIR": str(ROOT / "models" / "zoo"),  # the gateway reads config.json only
        "DDSERVE_MODELS": MODEL,
        "DDSERVE_STORAGE_DIR": str(scratch / "images"),
        "DDSERVE_AUTH_ENABLED": "false",
        "DDSERVE_RATE_LIMIT_PER_MINUTE": "0",
        "DDSERVE_MAX_QUEUE_LENGTH": "1000000",
        "DDSERVE_LOG_LEVEL": "WARNING",
        "DDSERVE_PORT": str(port),
        "DDSERVE_WEBHOOK_SECRET": SECRET,
        "DDSERVE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1,localhost",
    }
    # `python -m` from the repository root: this checkout's code, whatever the venv installed
    command = [sys.executable, "-m", "ddserve.cli", "serve", "--workers", "1"]
    gateway = subprocess.Popen(command, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    cpu_ms: dict[str, list[float]] = {name: [] for name in VARIANTS}
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        wait_healthy(url)
        for webhook in VARIANTS.values():  # warm-up of each path, not counted
            asyncio.run(window(url, args.concurrency, 200, webhook))
        for _ in range(args.repeats):
            for name, webhook in VARIANTS.items():
                before = cpu_seconds(gateway.pid)
                elapsed = asyncio.run(window(url, args.concurrency, args.submits, webhook))
                after = cpu_seconds(gateway.pid)
                if before is None or after is None:
                    raise SystemExit("needs Linux /proc to read the gateway's CPU time")
                cpu_ms[name].append(1000 * (after - before) / args.submits)
                rates[name].append(args.submits / elapsed)
    finally:
        gateway.terminate()
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
        cleanup_redis(args.redis_url, prefix)

    off = statistics.median(cpu_ms["off"])
    print(
        f"one gateway process, c = {args.concurrency}, {args.submits} submits (202) per window, "
        f"{args.repeats} windows of each variant, alternating; medians"
    )
    print(
        "| webhook | gateway CPU per job | vs off (medians) | vs off (median of each repeat's "
        "ratio) | submits/s | windows (CPU ms per job) |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    for name in VARIANTS:
        cpu = statistics.median(cpu_ms[name])
        rate = statistics.median(rates[name])
        # each repeat's windows ran back to back: their ratio cancels most of the machine's drift
        paired = statistics.median(
            on / base for on, base in zip(cpu_ms[name], cpu_ms["off"], strict=True)
        )
        windows = ", ".join(f"{v:.3f}" for v in cpu_ms[name])
        print(
            f"| {name} | {cpu:.3f} ms | {100 * (cpu / off - 1):+.1f} % | "
            f"{100 * (paired - 1):+.1f} % | {rate:.0f} | {windows} |"
        )
        rows.append(
            {"variant": name, "cpu_ms_per_job": cpu, "paired_ratio": paired, "submits_per_s": rate}
        )
    # 2. The same steps in this process, where CPU time is not shared with a server's other work.
    try:
        steps = in_process(args.redis_url, prefix, args.in_process)
    finally:
        cleanup_redis(args.redis_url, prefix)
    print(
        f"\nthe submission steps a webhook touches (validation, webhook check, enqueue "
        f"transaction), in-process, {args.in_process} jobs per variant, CPU µs per job:"
    )
    print("| webhook | CPU per job | added | added / gateway CPU per job (off, above) |")
    print("|---|---|---|---|")
    for name, micros in steps.items():
        added = micros - steps["off"]
        print(
            f"| {name} | {micros:.0f} µs | {added:+.0f} µs | {100 * added / (1000 * off):+.1f} % |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "in_process_us": steps, "args": vars(args)}, indent=2)
        )


if __name__ == "__main__":
    main()
