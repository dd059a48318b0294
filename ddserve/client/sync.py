"""`Client`: the synchronous ddserve client (httpx).

    from ddserve.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        job = client.generate("digits-ddpm", n=4, class_label=7, seed=1234)  # waits by default
        pngs = client.download_images(job)

Every job route returns a `Job`. With `wait=True` (the default) the call sends `Prefer: wait=N` so
that a quick job comes back finished in one round trip, then polls `GET /jobs/{id}` until the job is
terminal or `timeout` passes (`WaitTimeout`); a failed or canceled job raises `JobFailed` /
`JobCanceled`. With `on_progress`, the job is polled from the start and the callback sees every
state (`job.progress.step / total`). With `wait=False` the queued job comes back at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from ddserve.client import bodies
from ddserve.client.base import (
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    DEFAULT_WAIT_TIMEOUT_S,
    ClientConfig,
    answer_error,
    find_model,
    inline_bytes,
    job_id_of,
    link_of,
    parse_job,
    parse_models,
    read_answer,
)
from ddserve.client.bodies import ImageInput, ReturnMode
from ddserve.client.errors import ApiError, ConnectionFailed, WaitTimeout
from ddserve.client.polling import Deadline, outcome, prefer_wait, retry_delay
from ddserve.client.types import Image, Job, Model, Readiness

ProgressCallback = Callable[[Job], None]


class Client:
    """Synchronous client of a ddserve gateway. `http` may be a configured `httpx.Client` (its base
    URL is then ignored in favour of `base_url`); otherwise one is created and closed with this."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 0,
        http: httpx.Client | None = None,
    ) -> None:
        self.config = ClientConfig(
            base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
        )
        self._owns_http = http is None
        self.http = http if http is not None else httpx.Client()

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ---

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        prefer_wait_s: int | None = None,
    ) -> Any:
        """One API call (retried on 429/503 up to max_retries): its JSON, or the mapped error."""
        url = self.config.base_url + path
        attempt = 0
        while True:
            try:
                response = self.http.request(
                    method,
                    url,
                    json=json,
                    headers=self.config.headers(headers),
                    timeout=self.config.request_timeout(prefer_wait_s),
                )
                return read_answer(response)
            except ApiError as error:
                delay = retry_delay(error, attempt, self.config.max_retries)
                if delay is None:
                    raise
                time.sleep(delay)
                attempt += 1
            except httpx.TransportError as error:
                raise ConnectionFailed(
                    f"{method} {url}: {type(error).__name__}: {error}"
                ) from error

    def _create(
        self,
        route: str,
        body: dict[str, Any],
        *,
        wait: bool,
        timeout: float | None,
        poll_interval: float,
        on_progress: ProgressCallback | None,
        idempotency_key: str | None,
    ) -> Job:
        headers: dict[str, str] = {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        deadline = Deadline.after(timeout)
        held = prefer_wait(deadline) if wait and on_progress is None else None
        if held is not None:
            headers["Prefer"] = f"wait={held}"
        job = parse_job(
            self._request("POST", route, json=body, headers=headers, prefer_wait_s=held)
        )
        if not wait:
            return job
        return self._wait_until(job, deadline, timeout, poll_interval, on_progress, True)

    def _wait_until(
        self,
        job: Job,
        deadline: Deadline,
        timeout: float | None,
        poll_interval: float,
        on_progress: ProgressCallback | None,
        raise_on_failure: bool,
    ) -> Job:
        while True:
            if on_progress is not None:
                on_progress(job)
            if job.done:
                return outcome(job, raise_on_failure)
            if deadline.expired():
                raise WaitTimeout(job, timeout if timeout is not None else 0.0)
            time.sleep(deadline.sleep_for(poll_interval))
            job = self.get_job(job.id)

    # --- catalog and health ---

    def models(self) -> list[Model]:
        """`GET /models`: the served models, their tasks, shapes, classes, samplers, defaults."""
        return parse_models(self._request("GET", "/models"))

    def model(self, name: str) -> Model:
        """One served model (`NotFound` if it is not served)."""
        return find_model(self.models(), name)

    def health(self) -> bool:
        """`GET /healthz`: True when the gateway answers."""
        try:
            self._request("GET", "/healthz")
        except (ApiError, ConnectionFailed):
            return False
        return True

    def ready(self) -> Readiness:
        """`GET /readyz`: Redis reachable and a live worker for every model (200 or 503 alike)."""
        try:
            response = self.http.get(
                self.config.base_url + "/readyz",
                headers=self.config.headers(),
                timeout=self.config.request_timeout(),
            )
        except httpx.TransportError as error:
            raise ConnectionFailed(f"GET /readyz: {error}") from error
        if response.status_code not in (200, 503):
            raise answer_error(response)
        return Readiness.model_validate(response.json())

    # --- job routes ---

    def generate(
        self,
        model: str,
        *,
        n: int = 1,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        eta: float | None = None,
        class_label: int | None = None,
        prompt: str | None = None,
        guidance_scale: float | None = None,
        classifier_scale: float | None = None,
        seed: int | None = None,
        trajectory: bool = False,
        return_: ReturnMode = "url",
        wait: bool = True,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        on_progress: ProgressCallback | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """`POST /generate`: sample n images (DDPM/DDIM, classifier-free w / classifier s guidance).
        `None` fields take the model's defaults."""
        body = bodies.generate_body(
            model,
            n=n,
            sampler=sampler,
            num_inference_steps=num_inference_steps,
            eta=eta,
            class_label=class_label,
            prompt=prompt,
            guidance_scale=guidance_scale,
            classifier_scale=classifier_scale,
            seed=seed,
            trajectory=trajectory,
            return_=return_,
        )
        return self._create(
            "/generate",
            body,
            wait=wait,
            timeout=timeout,
            poll_interval=poll_interval,
            on_progress=on_progress,
            idempotency_key=idempotency_key,
        )

    def inpaint(
        self,
        model: str,
        image: ImageInput,
        mask: ImageInput,
        *,
        n: int = 1,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        eta: float | None = None,
        jump_length: int | None = None,
        jump_n_sample: int | None = None,
        class_label: int | None = None,
        prompt: str | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        return_: ReturnMode = "url",
        wait: bool = True,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        on_progress: ProgressCallback | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """`POST /inpaint` (RePaint): fill the mask's black (0) region; white (255) is kept."""
        body = bodies.inpaint_body(
            model,
            image,
            mask,
            n=n,
            sampler=sampler,
            num_inference_steps=num_inference_steps,
            eta=eta,
            jump_length=jump_length,
            jump_n_sample=jump_n_sample,
            class_label=class_label,
            prompt=prompt,
            guidance_scale=guidance_scale,
            seed=seed,
            return_=return_,
        )
        return self._create(
            "/inpaint",
            body,
            wait=wait,
            timeout=timeout,
            poll_interval=poll_interval,
            on_progress=on_progress,
            idempotency_key=idempotency_key,
        )

    def encode(
        self,
        model: str,
        images: list[ImageInput],
        *,
        wait: bool = True,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        idempotency_key: str | None = None,
    ) -> Job:
        """`POST /encode`: images → `job.output.latents` [n, C, H, W] (or `codes` for a VQ-VAE)."""
        return self._create(
            "/encode",
            bodies.encode_body(model, images),
            wait=wait,
            timeout=timeout,
            poll_interval=poll_interval,
            on_progress=None,
            idempotency_key=idempotency_key,
        )

    def decode(
        self,
        model: str,
        *,
        latents: Any = None,
        codes: Any = None,
        return_: ReturnMode = "url",
        wait: bool = True,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        idempotency_key: str | None = None,
    ) -> Job:
        """`POST /decode`: latents [n, C, H, W] (or VQ codes [n, H, W]) → images."""
        return self._create(
            "/decode",
            bodies.decode_body(model, latents=latents, codes=codes, return_=return_),
            wait=wait,
            timeout=timeout,
            poll_interval=poll_interval,
            on_progress=None,
            idempotency_key=idempotency_key,
        )

    def reconstruct(
        self,
        model: str,
        images: list[ImageInput],
        *,
        noise: str | None = None,
        amount: float | None = None,
        seed: int | None = None,
        return_: ReturnMode = "url",
        wait: bool = True,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        idempotency_key: str | None = None,
    ) -> Job:
        """`POST /reconstruct`: images (corrupted first with `noise` gaussian | masking |
        salt_pepper by `amount`) → reconstructions; `job.output.corrupted` holds the inputs the
        model saw."""
        return self._create(
            "/reconstruct",
            bodies.reconstruct_body(
                model, images, noise=noise, amount=amount, seed=seed, return_=return_
            ),
            wait=wait,
            timeout=timeout,
            poll_interval=poll_interval,
            on_progress=None,
            idempotency_key=idempotency_key,
        )

    # --- jobs ---

    def get_job(self, job: Job | str) -> Job:
        """`GET /jobs/{id}`: the job's current state."""
        return parse_job(self._request("GET", f"/jobs/{job_id_of(job)}"))

    def cancel(self, job: Job | str) -> Job:
        """`POST /jobs/{id}/cancel`: a queued job is canceled at once, a running one at its next
        step; a finished job comes back as it is."""
        return parse_job(self._request("POST", f"/jobs/{job_id_of(job)}/cancel"))

    def wait(
        self,
        job: Job | str,
        *,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        on_progress: ProgressCallback | None = None,
        raise_on_failure: bool = True,
    ) -> Job:
        """Poll the job until it is terminal: the finished job; `WaitTimeout` after `timeout` s
        (None = no limit); `JobFailed` / `JobCanceled` unless `raise_on_failure=False`."""
        deadline = Deadline.after(timeout)
        current = self.get_job(job) if isinstance(job, str) else job
        return self._wait_until(
            current, deadline, timeout, poll_interval, on_progress, raise_on_failure
        )

    # --- images ---

    def download(self, image: Image | str) -> bytes:
        """The bytes of an output image (an `Image`: inline b64 or its signed link) or of a URL
        such as `job.output.trajectory_url`. No API key is sent: the link is the credential."""
        inline = inline_bytes(image)
        if inline is not None:
            return inline
        try:
            response = self.http.get(
                link_of(image),
                headers=self.config.headers(auth=False),
                timeout=self.config.request_timeout(),
            )
        except httpx.TransportError as error:
            raise ConnectionFailed(f"GET {link_of(image)}: {error}") from error
        if response.status_code >= 400:
            raise answer_error(response)
        return response.content

    def download_images(self, job: Job) -> list[bytes]:
        """The PNG bytes of every output image of a finished job, in order."""
        return [self.download(image) for image in job.images]
