"""Gateway CPU per job with webhooks on and off, side by side in one run, at c = 64 (issue #20:
the webhook path may add at most 5 %).

What the webhook path adds to the gateway is all in the submission: the body's two extra fields,
the URL check (`service.webhooks.targets`: parsing, the allowlist, DNS resolution of a name) and
one ZADD in the enqueue's existing transaction. After that the gateway does nothing more for a
job with a webhook (events are derived and delivered by the webhook worker, not the gateway, and
a held `Prefer: wait` costs the same), so this measures the submission alone, with no GPU
worker (the jobs stay queued):

1. Two gateway processes in front of the real Redis, loaded at the same time by c = 64 closed-loop
   clients each, `POST /generate` (202, no wait): one gateway's clients send a `webhook`, the
   other's do not; then they swap, so a difference between the two processes cancels out. Loading
   both at once makes the machine's other load (these 2-core machines are shared) hit "on" and
   "off" alike, which alternating windows did not achieve: their "off" windows alone spread
   ±20 %. Each window's ratio is CPU on / CPU off (user + system, from /proc), the median reported.
   Variants: "on (IP)" `http://127.0.0.1:9/hook` (an allowlisted literal, no lookup) and
   "on (name)" `http://localhost:9/hook` (an allowlisted name, resolved by getaddrinfo — once per
   30 s per gateway, `service.webhooks.targets.ACCEPTED_FOR_S`).
2. The submission steps a webhook touches, timed in this process (`in_process`: validation, the
   webhook check, the enqueue transaction against the real Redis; variants alternating in blocks):
   the exact cost added, where CPU time is not shared with a server's other work.

    .venv/bin/python benchmarks/bench_webhooks.py [--concurrency 64] [--submits 1000]
        [--repeats 4] [--in-process 5000] [--redis-url redis://127.0.0.1:6379/0] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's packages
from benchmarks.support import (
    MODEL,
    ROOT,
    cleanup_redis,
    cpu_seconds,
    free_port,
    gateway_env,
    wait_healthy,
)

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


async def paired_window(
    urls: tuple[str, str], webhooks: tuple[str | None, str | None], concurrency: int, submits: int
) -> None:
    """Both gateways loaded at once, each by `concurrency` clients with its own body."""
    await asyncio.gather(
        *(window(url, concurrency, submits, hook) for url, hook in zip(urls, webhooks, strict=True))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=64, help="clients per gateway")
    parser.add_argument("--submits", type=int, default=1000, help="submits per gateway and window")
    parser.add_argument("--repeats", type=int, default=4, help="window pairs of each variant")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--in-process", type=int, default=5000, help="jobs per variant, part 2")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    ports = (free_port(), free_port())
    urls = (f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}")
    env = gateway_env(
        args.redis_url,
        prefix,
        ROOT / "models" / "zoo",  # the gateway reads config.json only
        MODEL,
        scratch / "images",
        signing_secret="bench",
        max_queue_length=1000000,
        webhook_secret=SECRET,
        webhook_allowed_hosts="127.0.0.1,localhost",
    )
    env["PYTHONPATH"] = str(ROOT)
    # `python -m` from the repository root: this checkout's code, whatever the venv installed
    command = [sys.executable, "-m", "ddserve.cli", "serve", "--workers", "1"]
    gateways = [
        subprocess.Popen(command, env={**env, "DDSERVE_PORT": str(port)}, cwd=ROOT)
        for port in ports
    ]
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS if name != "off"}
    off_ms: list[float] = []
    try:
        for url in urls:
            wait_healthy(url)
        for webhook in VARIANTS.values():  # warm-up of each path on both, not counted
            asyncio.run(paired_window(urls, (webhook, webhook), args.concurrency, 100))
        for _ in range(args.repeats):
            for name, webhook in VARIANTS.items():
                if webhook is None:
                    continue
                for on_side in (0, 1):  # each gateway takes the webhooks in turn
                    hooks = (webhook, None) if on_side == 0 else (None, webhook)
                    before = [cpu_seconds(g.pid) for g in gateways]
                    asyncio.run(paired_window(urls, hooks, args.concurrency, args.submits))
                    after = [cpu_seconds(g.pid) for g in gateways]
                    if None in before or None in after:
                        raise SystemExit("needs Linux /proc to read the gateways' CPU time")
                    spent = [b - a for a, b in zip(before, after, strict=True)]  # type: ignore[operator]
                    on, off = spent[on_side], spent[1 - on_side]
                    ratios[name].append(on / off)
                    off_ms.append(1000 * off / args.submits)
    finally:
        for gateway in gateways:
            gateway.terminate()
        for gateway in gateways:
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
        cleanup_redis(args.redis_url, prefix)

    print(
        f"two gateway processes loaded at the same time, c = {args.concurrency} clients each, "
        f"{args.submits} submits (202) per gateway and window; one takes webhook bodies, the other "
        f"none, then they swap; {args.repeats} pairs per variant"
    )
    print(f"gateway CPU per job without webhook: {statistics.median(off_ms):.3f} ms (median)")
    print("| webhook | gateway CPU per job, on / off (median) | each window's on / off |")
    print("|---|---|---|")
    rows = []
    for name, values in ratios.items():
        ratio = statistics.median(values)
        shown = ", ".join(f"{v:.3f}" for v in values)
        print(f"| {name} | {100 * (ratio - 1):+.1f} % | {shown} |")
        rows.append({"variant": name, "on_over_off": ratio, "windows": values})

    # 2. The same steps in this process, where CPU time is not shared with a server's other work.
    try:
        steps = in_process(args.redis_url, prefix, args.in_process)
    finally:
        cleanup_redis(args.redis_url, prefix)
    off = statistics.median(off_ms)
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
