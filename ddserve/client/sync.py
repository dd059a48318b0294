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
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
from httpx_sse import connect_sse

from ddserve.client import bodies, operations, streaming
from ddserve.client.base import (
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    DEFAULT_WAIT_TIMEOUT_S,
    ClientConfig,
    answer_error,
    job_id_of,
)
from ddserve.client.bodies import ImageInput, ReturnMode
from ddserve.client.errors import ConnectionFailed
from ddserve.client.operations import Done, Effect, Operation, Send, Sleep, Waiting, resume
from ddserve.client.types import Image, Job, JobEvent, Model, Readiness
from ddserve.requests import GenerateBody, Img2ImgBody, InpaintBody

T = TypeVar("T")
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

    # --- I/O: the one place this client differs from AsyncClient ---

    def _run(self, operation: Operation[T]) -> T:
        """Carry out an operation's requests, sleeps and progress reports, blocking."""
        reply: Any = None
        while not isinstance(effect := resume(operation, reply), Done):
            reply = self._perform(effect)
        return effect.value

    def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Send):
            try:
                return self.http.request(
                    effect.method,
                    effect.url,
                    json=effect.json,
                    headers=effect.headers,
                    timeout=effect.timeout,
                )
            except httpx.TransportError as error:
                return error
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
        else:
            effect.callback(effect.job)
        return None

    # --- catalog and health ---

    def models(self) -> list[Model]:
        """`GET /models`: the served models, their tasks, shapes, classes, samplers, defaults."""
        return self._run(operations.models(self.config))

    def model(self, name: str) -> Model:
        """One served model (`NotFound` if it is not served)."""
        return self._run(operations.model(self.config, name))

    def health(self) -> bool:
        """`GET /healthz`: True when the gateway answers."""
        return self._run(operations.health(self.config))

    def ready(self) -> Readiness:
        """`GET /readyz`: Redis reachable and a live worker for every model (200 or 503 alike)."""
        return self._run(operations.ready(self.config))

    # --- job routes ---

    def generate(
        self,
        model: str,
        *,
        trajectory: bool = False,
        return_: ReturnMode = "url",
        preview_every: int | None = None,
        wait: bool = True,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        on_progress: ProgressCallback | None = None,
        idempotency_key: str | None = None,
        **parameters: Any,
    ) -> Job:
        """`POST /generate`: sample n images (DDPM/DDIM; classifier-free `guidance_scale` s as in
        diffusers, 1 = none; classifier guidance `classifier_scale`). `parameters` are the body's
        (listed below); a name it does not have is a TypeError."""
        body = bodies.generate_body(
            model, trajectory=trajectory, return_=return_, preview_every=preview_every, **parameters
        )
        waiting = Waiting(wait, timeout, poll_interval, on_progress, idempotency_key)
        return self._run(operations.submit(self.config, "/generate", body, waiting))

    def inpaint(
        self,
        model: str,
        image: ImageInput,
        mask: ImageInput,
        *,
        return_: ReturnMode = "url",
        preview_every: int | None = None,
        wait: bool = True,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        on_progress: ProgressCallback | None = None,
        idempotency_key: str | None = None,
        **parameters: Any,
    ) -> Job:
        """`POST /inpaint` (RePaint): fill the mask's black (0) region; white (255) is kept.
        `parameters` are the body's (listed below); a name it does not have is a TypeError."""
        body = bodies.inpaint_body(
            model, image, mask, return_=return_, preview_every=preview_every, **parameters
        )
        waiting = Waiting(wait, timeout, poll_interval, on_progress, idempotency_key)
        return self._run(operations.submit(self.config, "/inpaint", body, waiting))

    def img2img(
        self,
        model: str,
        image: ImageInput,
        *,
        trajectory: bool = False,
        return_: ReturnMode = "url",
        wait: bool = True,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        on_progress: ProgressCallback | None = None,
        idempotency_key: str | None = None,
        **parameters: Any,
    ) -> Job:
        """`POST /img2img` (SDEdit): noise the image part of the way (`strength`) and denoise it
        again, steered like `generate`. `parameters` are the body's (listed below); a name it does
        not have is a TypeError."""
        body = bodies.img2img_body(
            model, image, trajectory=trajectory, return_=return_, **parameters
        )
        waiting = Waiting(wait, timeout, poll_interval, on_progress, idempotency_key)
        return self._run(operations.submit(self.config, "/img2img", body, waiting))

    def encode(
        self,
        model: str,
        images: list[ImageInput],
        *,
        wait: bool = True,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """`POST /encode`: images → `job.output.latents` [n, C, H, W] (or `codes` for a VQ-VAE)."""
        body = bodies.encode_body(
            model, images, webhook=webhook, webhook_events_filter=webhook_events_filter
        )
        waiting = Waiting(wait, timeout, poll_interval, idempotency_key=idempotency_key)
        return self._run(operations.submit(self.config, "/encode", body, waiting))

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
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """`POST /decode`: latents [n, C, H, W] (or VQ codes [n, H, W]) → images."""
        body = bodies.decode_body(
            model,
            latents=latents,
            codes=codes,
            return_=return_,
            webhook=webhook,
            webhook_events_filter=webhook_events_filter,
        )
        waiting = Waiting(wait, timeout, poll_interval, idempotency_key=idempotency_key)
        return self._run(operations.submit(self.config, "/decode", body, waiting))

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
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """`POST /reconstruct`: images (corrupted first with `noise` gaussian | masking |
        salt_pepper by `amount`) → reconstructions; `job.output.corrupted` holds the inputs the
        model saw."""
        body = bodies.reconstruct_body(
            model,
            images,
            noise=noise,
            amount=amount,
            seed=seed,
            return_=return_,
            webhook=webhook,
            webhook_events_filter=webhook_events_filter,
        )
        waiting = Waiting(wait, timeout, poll_interval, idempotency_key=idempotency_key)
        return self._run(operations.submit(self.config, "/reconstruct", body, waiting))

    # --- jobs ---

    def get_job(self, job: Job | str) -> Job:
        """`GET /jobs/{id}`: the job's current state."""
        return self._run(operations.get_job(self.config, job))

    def cancel(self, job: Job | str) -> Job:
        """`POST /jobs/{id}/cancel`: a queued job is canceled at once, a running one at its next
        step; a finished job comes back as it is."""
        return self._run(operations.cancel(self.config, job))

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
        waiting = Waiting(
            wait=True, timeout=timeout, poll_interval=poll_interval, on_progress=on_progress
        )
        return self._run(
            operations.wait(self.config, job, waiting, raise_on_failure=raise_on_failure)
        )

    def stream(
        self, job: Job | str, *, preview: bool = False, last_event_id: str | None = None
    ) -> Iterator[JobEvent]:
        """`GET /jobs/{id}/events`: the job's events as they happen — queued, started, progress
        (with `preview`, the x̂_0 previews of a job submitted with `preview_every`), then one of
        succeeded / failed / canceled, where the iteration ends. A broken stream is reopened from
        the last event received (`Last-Event-ID`): nothing is lost or repeated.

            for event in client.stream(job, preview=True):
                print(event.event, event.data.get("step"), len(event.previews))
        """
        job_id = job_id_of(job)
        failures = 0
        while True:
            try:
                with connect_sse(
                    self.http,
                    "GET",
                    streaming.events_url(self.config, job_id, preview),
                    headers=streaming.events_headers(self.config, last_event_id),
                    timeout=streaming.events_timeout(self.config),
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise answer_error(source.response)
                    for sse in source.iter_sse():
                        event = streaming.to_event(sse)
                        failures = 0
                        if event.id is not None:
                            last_event_id = event.id
                        yield event
                        if event.terminal:
                            return
            except httpx.TransportError as error:  # reopened from the last event below
                lost: Exception | None = error
            else:  # the stream closed before the terminal event (a gateway shutting down)
                lost = None
            failures += 1
            if failures > streaming.MAX_RECONNECTS:
                raise ConnectionFailed(
                    f"the event stream of job {job_id} broke {failures} times in a row"
                ) from lost
            time.sleep(streaming.RECONNECT_DELAY_S)

    # --- images ---

    def download(self, image: Image | str) -> bytes:
        """The bytes of an output image (an `Image`: inline b64 or its signed link) or of a URL
        such as `job.output.trajectory_url`. No API key is sent: the link is the credential."""
        return self._run(operations.download(self.config, image))

    def download_images(self, job: Job) -> list[bytes]:
        """The PNG bytes of every output image of a finished job, in order."""
        return [self.download(image) for image in job.images]


# The parameters each job method forwards, listed from their one declaration (ddserve.params).
Client.generate.__doc__ = (Client.generate.__doc__ or "") + bodies.parameters_doc(GenerateBody)
Client.inpaint.__doc__ = (Client.inpaint.__doc__ or "") + bodies.parameters_doc(InpaintBody)
Client.img2img.__doc__ = (Client.img2img.__doc__ or "") + bodies.parameters_doc(Img2ImgBody)
