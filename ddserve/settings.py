"""Every setting of ddserve in one place, read from environment variables (prefix `DDSERVE_`) or an
`.env` file by pydantic-settings. The README's configuration table is generated from this class
(`python -m ddserve.settings`). Components receive a `Settings` instance; nothing reads os.environ
elsewhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.catalog import DEFAULT_ZOO

DEFAULT_IMPORT_DIR = Path("var/models")


def env_file() -> str | None:
    """The `.env` file settings are read from: `DDSERVE_ENV_FILE`, `.env` in the working directory
    when unset, none when empty (the test suite sets it empty so a developer's `.env` stays out)."""
    return os.environ.get("DDSERVE_ENV_FILE", ".env") or None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DDSERVE_", env_file=env_file(), extra="ignore")

    # --- infrastructure ---
    redis_url: str | None = Field(
        None,
        description="Redis URL; unset = embedded mode (in-process fakeredis and worker thread)",
    )
    key_prefix: str = Field("ddserve", description="prefix of every Redis key and RQ queue of ours")
    zoo_dir: Path = Field(DEFAULT_ZOO, description="the model zoo (one folder per model)")
    model_dirs: str = Field(
        "",
        description="comma-separated folders of models, searched in order: every sub-folder with "
        "a ddserve card (config.json) or a diffusers pipeline (model_index.json) is a model; "
        "`ddserve import` writes into the first. Empty = DDSERVE_ZOO_DIR when it is set (alone), "
        "else the shipped zoo, then ./var/models (where `ddserve import` then writes)",
    )
    models: str = Field("", description="comma-separated models to serve; empty = every zoo model")

    # --- gateway ---
    host: str = Field("127.0.0.1", description="gateway bind address")
    port: int = Field(8000, description="gateway port")
    public_url: str = Field(
        "", description="external base URL for image links; empty = from request"
    )
    auth_enabled: bool = Field(
        True, description="require API keys (the embedded mode turns it off)"
    )
    api_keys: str = Field(
        "", description="comma-separated SHA-256 hashes of API keys (or name:hash)"
    )
    api_keys_file: Path | None = Field(None, description="file of API key hashes, one per line")
    max_wait_s: float = Field(60.0, description="largest `Prefer: wait=N` honoured")
    openai_wait_s: float = Field(
        120.0,
        gt=0,
        description="how long an OpenAI Images API call (`/v1/images/*`, synchronous for its "
        "clients) waits for its job before a 503 naming the job",
    )
    openai_default_model: str | None = Field(
        None,
        description="the model of `/v1/images/*` calls that name none (default: the first served "
        "diffusion model)",
    )
    wait_poll_s: float = Field(
        2.0,
        gt=0.0,
        description="held `Prefer: wait` requests wake on job-finished notifications; this safety "
        "poll reads all their jobs' statuses this often, for a notification lost while Redis was "
        "unreachable",
    )
    job_events: bool = Field(
        True,
        description="workers write each job's event stream (started, progress, previews) and "
        "gateways serve `GET /jobs/{id}/events`; false: neither (the route is a 404)",
    )
    sse_heartbeat_s: float = Field(
        15.0,
        gt=0.0,
        description="`GET /jobs/{id}/events` sends a comment line this often so that proxies keep an "
        "idle stream open; the shared reader also re-reads every open stream's job this often, for "
        "a wake-up lost while Redis was unreachable",
    )
    sse_queue_position_s: float = Field(
        2.0,
        ge=0.0,
        description="`GET /jobs/{id}/events` of a queued job sends a new `queued` event when its "
        "position in the queue changes, read this often for all such streams together (two Redis "
        "round trips per pass, whatever their number); 0: the position is sent once, at connect",
    )
    graceful_shutdown_s: float = Field(
        65.0,
        gt=0.0,
        description="on SIGTERM the gateway stops accepting connections and gives the requests it "
        "holds (`Prefer: wait` included) this long to finish; keep it above max_wait_s, and the "
        "pod's or container's stop grace period above it",
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        description="largest request body, Content-Length or counted as a chunked body arrives "
        "(413 above). The other limits allow 16 images of max_image_bytes (16 x 1.40 MB base64 = "
        "22.4 MB); the default is well under that: it holds the largest one-image request (inpaint: "
        "image and mask at max_image_bytes, 2 x 1.40 MB) with room to spare, while 16 images of a "
        "model's own size are small (the zoo's largest, 32x32 RGB, is <= 4.3 KB base64: 68 KB)",
    )
    max_body_values: int = Field(
        65536,
        description="most JSON values in a request body, counted as its commas before it is "
        "parsed (422 above): the parse of a body of many small values costs far more than its "
        "size. The default is 16 latents of 4096 numbers (4x32x32), 16x the zoo's largest decode",
    )
    max_image_bytes: int = Field(
        1024 * 1024, description="largest decoded upload image (413 above)"
    )
    max_image_pixels: int = Field(1024 * 1024, description="largest pixel count before decoding")
    max_image_side: int = Field(
        512,
        ge=1,
        le=4096,
        description="largest height or width a request may ask of a model that makes other sizes "
        "(`size_multiple` in GET /models: imported diffusers pipelines; 422 above); a model's own "
        "size is always allowed. Activation memory grows with height x width: the workers scale "
        "a size's rows per call down by its area",
    )
    max_queue_length: int = Field(1000, description="queued + running jobs per model before 429")
    rate_limit_per_minute: int = Field(600, description="requests per API key per minute (0 = off)")
    header_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="a connection whose request headers are not complete this long after their "
        "first byte (or after connecting) is closed with 408 (slow clients, slowloris)",
    )
    max_header_bytes: int = Field(
        64 * 1024, gt=0, description="largest request line + headers of one request (431 above)"
    )
    keep_alive_s: int = Field(
        75,
        gt=0,
        description="an idle keep-alive connection is closed after this; longer than the idle "
        "timeout of the clients' and load balancer's pools, so they close first",
    )
    max_concurrency: int = Field(
        1000,
        ge=0,
        description="open connections or running requests per gateway process before uvicorn "
        "answers 503 (0 = no limit)",
    )

    # --- jobs ---
    job_ttl_s: int = Field(3600, description="a queued job not started within this is dropped")
    result_ttl_s: int = Field(3600, description="how long finished job records are kept")
    failure_ttl_s: int = Field(86400, description="how long failed job records are kept")
    job_deadline_s: float = Field(600.0, description="per-job run-time deadline (fails that job)")
    idempotency_ttl_s: int = Field(86400, description="how long an Idempotency-Key is remembered")

    # --- workers ---
    batching: Literal["continuous", "request", "none"] = Field(
        "continuous", description="continuous (per step), request (per request) or no batching"
    )
    max_batch: int = Field(64, description="largest number of network rows in one call")
    max_wait_ms: float = Field(5.0, description="request batching: wait this long for more jobs")
    max_job_share: float = Field(1.0, description="largest share of a batch one job may take")
    progress_every: int = Field(5, description="write job progress every N denoising steps")
    overlap_redis: bool = Field(
        True,
        description="send a round's Redis writes and cancel read beside the next network call "
        "(a second thread); false: before it, on the stepping thread",
    )
    redis_interval_ms: float = Field(
        50.0,
        ge=0.0,
        description="a busy worker exchanges with Redis (progress, outcomes, the cancel-set read) "
        "at most this often; the rounds between merge their writes (0 = every round)",
    )
    store_threads: int = Field(
        2,
        ge=0,
        description="threads that encode and write a worker's finished images while its next "
        "denoising steps run (0 = on the stepping thread)",
    )
    prepare_thread: bool = Field(
        True,
        description="encode the prompts a text pipeline's encoder has not cached, and a latent "
        "model's inpaint / img2img images (its first stage), on a thread of their own while the "
        "running set steps (continuous batching); false: on the stepping thread, which every "
        "running job then waits for",
    )
    retain_freed_memory: bool = Field(
        True,
        description="keep memory freed by network calls in the worker's heap (glibc); false: "
        "return it to the OS, and page-fault it in again on the next call",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of a worker (`ddserve worker --threads`); unset: every "
        "core for `ddserve worker`, every core but one (the gateway's) for the embedded `ddserve "
        "serve`. torch's own default oversubscribes a loaded machine",
    )
    ort_threads: int | None = Field(
        None,
        ge=1,
        description="ONNX Runtime intra-op threads of the autoencoders; unset: as torch's",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="torch device of a worker: auto (CUDA when present), cpu, cuda or cuda:N "
        "(`ddserve worker --device`; `--devices all` runs one worker process per GPU)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="precision of every diffusion network (weights and activations; the sampler's "
        "arithmetic and the autoencoders stay float32); unset: each model card's `dtype`, else "
        "float32. float16 needs CUDA",
    )
    compile: bool = Field(
        False,
        description="torch.compile the diffusion networks, one graph per batch-size bucket, "
        "compiled and warmed up before the worker takes jobs",
    )
    compile_buckets: str = Field(
        "",
        description="comma-separated batch sizes (rows) a network call is padded up to, so that "
        "continuous batching does not recompile for every new batch size; empty: powers of two "
        "up to max_batch (with compile on)",
    )
    cuda_graphs: bool = Field(
        False,
        description="with compile on a CUDA device: capture each bucket's call as a CUDA graph "
        "(inductor's reduce-overhead mode: one graph launch per step instead of one launch per "
        "kernel); refused on the CPU",
    )
    memory_fraction: float = Field(
        0.85,
        ge=0.0,
        le=1.0,
        description="GPU: the share of the device's free memory (measured after loading, by two "
        "probe calls) that one network call may use; it lowers max_batch per model. 0: no probe "
        "(max_batch alone). The CPU is not probed",
    )
    onnx_providers: str = Field(
        "", description="comma-separated ONNX Runtime providers; empty = CUDA first when available"
    )
    text_cache_size: int = Field(
        128,
        ge=0,
        description="prompts whose text-encoder outputs a worker keeps per text pipeline (LRU), "
        "so a repeated prompt costs no text-encoder call; 0 = none",
    )
    heartbeat_s: float = Field(10.0, description="worker heartbeat and started-job refresh period")
    abandoned_after_s: float = Field(
        60.0, description="a dead worker's jobs are retried after this"
    )
    max_retries: int = Field(1, description="retries of a job whose worker died")
    recovery_grace_s: float | None = Field(
        None,
        ge=0.0,
        description="the recovery sweeps (workers' maintenance, gateway janitor) retry or fail "
        "abandoned jobs only once Redis has been reachable this long without a break, so that "
        "after an outage live workers heartbeat their jobs first; unset = 3 × heartbeat_s",
    )
    shutdown_grace_s: float = Field(
        90.0,
        description="a stopping worker (SIGTERM) hands back to the queue the jobs it has not "
        "finished within this time",
    )

    # --- webhooks ---
    webhook_secret: str = Field(
        "",
        description="Standard Webhooks signing secret (`whsec_` + base64 key) of the deliveries; "
        "empty (and no webhook_secrets): webhooks are off, a job asking for one is refused (422). "
        "Per API key: webhook_secrets",
    )
    webhook_secrets: str = Field(
        "",
        description="comma-separated `key_id=whsec_...`: the signing secret of the jobs of that "
        "API key (its id: the name in DDSERVE_API_KEYS); others use webhook_secret",
    )
    webhook_allowed_hosts: str = Field(
        "",
        description="comma-separated host names, IP addresses or CIDR networks that webhooks may "
        "reach by http and at private, loopback or link-local addresses (everything else: https "
        "to public addresses only)",
    )
    webhook_connect_timeout_s: float = Field(
        3.0, gt=0.0, description="a webhook delivery's connect timeout"
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0.0, description="a webhook delivery's total time (connect, send, answer)"
    )
    webhook_max_age_s: int = Field(
        3600,
        ge=1,
        description="a webhook delivery is retried (exponential backoff with jitter) until this "
        "long after its event, then dropped (logged and counted)",
    )
    webhook_retry_base_s: int = Field(
        2, ge=1, description="first retry delay of a failed webhook delivery (then doubling)"
    )
    webhook_retry_cap_s: int = Field(
        300, ge=1, description="longest delay between two attempts of a webhook delivery"
    )
    webhook_poll_s: float = Field(
        0.5,
        gt=0.0,
        description="the webhook worker reads the state of the jobs that have a webhook this "
        "often (their start and progress events; a finished job wakes it at once); also the "
        "shortest interval between two progress events of a job",
    )

    # --- storage ---
    storage: Literal["local", "s3"] = Field("local", description="where images are written")
    storage_dir: Path = Field(Path("var/images"), description="local storage directory")
    image_ttl_s: int = Field(86400, description="images older than this are deleted")
    cleanup_interval_s: float = Field(
        300.0, description="how often the gateway deletes expired images and stale job records"
    )
    link_ttl_s: int = Field(3600, description="lifetime of signed image links")
    signing_secret: str = Field("", description="HMAC key of image links; empty = random per run")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto)")
    s3_public_url: str | None = Field(
        None,
        description="endpoint that image links name, when clients reach the store by another "
        "address than the workers (MinIO in docker compose); unset = s3_endpoint_url",
    )
    s3_bucket: str = Field("ddserve-images", description="bucket for images")
    s3_region: str = Field("us-east-1", description="S3 region")
    s3_access_key_id: str | None = Field(None, description="S3 access key id")
    s3_secret_access_key: str | None = Field(None, description="S3 secret key")

    # --- logging ---
    log_level: str = Field("INFO", description="log level")
    log_json: bool = Field(False, description="structured JSON logs")

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    def model_repository(self) -> list[Path]:
        """The folders of models, in search order: `model_dirs`; else a `zoo_dir` set to another
        folder than the shipped zoo, alone (what that setting always meant: the repository); else
        the shipped zoo and ./var/models."""
        named = [Path(part.strip()) for part in self.model_dirs.split(",") if part.strip()]
        if named:
            return named
        if Path(self.zoo_dir).resolve() != DEFAULT_ZOO.resolve():
            return [self.zoo_dir]
        return [self.zoo_dir, DEFAULT_IMPORT_DIR]

    def import_dir(self) -> Path:
        """Where `ddserve import` writes: the first folder of `model_repository()`, except the
        shipped zoo (then ./var/models)."""
        first = self.model_repository()[0]
        return DEFAULT_IMPORT_DIR if Path(first).resolve() == DEFAULT_ZOO.resolve() else first

    def recovery_grace(self) -> float:
        """`recovery_grace_s`, or 3 heartbeats when unset (≥ 2 heartbeats: every live worker
        heartbeats within one after Redis answers again, one more covers a slow round)."""
        if self.recovery_grace_s is not None:
            return self.recovery_grace_s
        return 3 * self.heartbeat_s

    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


def settings_table() -> str:
    """The README's configuration table, in Markdown."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default not in (None, "") else "—"
        rows.append(f"| `DDSERVE_{name.upper()}` | `{default}` | {field.description} |")
    rows.append(
        "| `DDSERVE_ENV_FILE` | `.env` | the file these are also read from (environment wins); "
        "empty = none |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
