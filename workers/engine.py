"""Continuous batching: iteration-level scheduling of denoising steps across jobs.

The engine keeps, per diffusion model, one running set of samples (a `DenoisingBatch`): each sample
carries its own x_t, plan of timesteps (sampler, step count, RePaint jumps), position in it, guidance,
condition, inpainting mask and known image, and noise generator. Every scheduling round
(`run_once`) does, for all jobs at once:

1. one check of the cancel set and of the per-job deadlines: a canceled or late job leaves the
   running set (its samples are dropped) and only that job ends;
2. per model, admission at the step boundary (`workers.admission`, a pure policy): waiting
   samples join the running set by age, while the next network call has room (`max_batch` rows, a
   guided sample counting two rows for its unconditional copy) and while the job stays within its
   share of the call (`max_job_share`); the queue is read only while there is room;
3. per model, one network call over all running samples at their own timesteps; finished samples
   leave and their images are decoded (latent diffusion, one call per step); a job completes as
   soon as its last image is stored; progress is written every `progress_every` steps and once
   more (step = total) when the job completes. A job that asked for live previews
   (`output.preview_every` = k) also gets, every k of its steps, the x̂_0 its samples went through
   in that step, decoded like a final image (the first-stage decoder of a latent model: exact,
   not a latent→RGB approximation, at one decoder call per job every k steps) and shrunk to a small
   PNG, with its progress; a job that did not ask costs nothing (its samples keep no x̂_0).

Storing (PNG encoding and the storage backend's write: a file, or an HTTP request to S3) runs on
the engine's store threads (`store_threads`) while the next steps run, so a step boundary never
waits for storage: with S3 a write costs milliseconds, which the whole running set would otherwise
wait out for every finished image. Each step ends by collecting the writes that are done; a
failed write fails only its job. Without store threads (`store_threads=0`), images are stored on
the stepping thread at once.

Likewise a job whose inputs need an encoder's forward is prepared off the stepping thread in
continuous mode (`prepare_thread`): a prompt the model's text encoder has not cached (diffusers
text pipelines: `PromptEncoder`, a CLIP forward of ~0.5 s on CPU for SD-sized encoders), and the
image of an inpaint or img2img job on a latent model (the first stage's encoder, a VAE/VQ forward:
hundreds of ms on CPU at SD's sizes). The lane takes it, holds it while the prepare thread encodes
its inputs (`workers.execute.encode_inputs`: it can be canceled, pass its deadline or be aborted
meanwhile, and ends exactly once), and builds its samples at the first step boundary after they
are ready; the running set keeps stepping meanwhile. Its samples are those the stepping thread
would build (the encoders draw no noise: the first stage gives its posterior's mean; each sample's
noise generator is made on the stepping thread, as inline) — bit for bit at the same torch thread
count (a PyTorch encoder on fewer CPU threads may sum in another order, ~1e-6) — and an
encoding's error fails it, and only it, with that error. Anything else — a cache hit, a generate
job, a pixel-space model's image — is prepared at once, on the stepping thread. The order of
admission stays by arrival: a job keeps the place its arrival gave it, so once prepared it goes
before every job that arrived after it (it is not starved) and after every job that arrived
before it (it does not jump ahead); while it is being prepared it holds no rows and blocks no
one, as if it had not arrived yet — jobs ready earlier may use the free rows meanwhile. The queue
is read only while the running set, plus the rows of the jobs in preparation, leaves room.
(`request` and `none` read the queue only into an empty running set, where nothing waits for an
encoding: they prepare every job at once.)

A failing network call fails only its own jobs: the call is split and retried without the rows that
fail on their own (`workers.isolation`: out of memory, an error, NaN/±inf), and only the jobs whose
samples are no longer finite after the step fail (`non_finite_output`, `out_of_memory`,
`model_error`); the others go on in the same running set. This holds in every batching mode.

Because each image draws all of its noise from its own stream (`noise.sample_generator`), a job's
images do not depend on what shared its network calls (up to float rounding of batched kernels).

Batching modes (`Settings.batching`), for comparison on the same engine:
- `continuous`: admission at every step boundary (Orca-style iteration-level scheduling, Yu et al.
  2022, applied to denoising steps);
- `request`: admission only into an empty running set, gathering jobs for up to `max_wait_ms`; the
  set then runs until all of its samples are done (classic dynamic batching);
- `none`: one job at a time.

Image sizes: samples of different sizes cannot share a tensor, so a model whose requests ask for
other sizes (`height` / `width`, `ModelEntry.size_multiple`) has one lane per size in flight: the
lane of the model's own size reads the model's queue and hands a ticket of another size to the lane
of that size (`Engine.sized_lanes`, made on demand, with the row limit scaled by the area, dropped
once idle). Requests of one size share calls exactly as above.

Jobs arrive through a `JobFeed` (the RQ worker's queues, or an in-memory feed in tests) as `Ticket`s
that carry the job's request and report its end.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ddserve.job_events import Preview
from ddserve.jobs import ImageRecord, JobOutput
from ddserve.settings import Settings
from ddserve.spec import GenerateSpec, Img2ImgSpec, InpaintSpec, JobSpec, PriorSampleSpec
from ddserve.storage import Storage
from models.diffusion.sampler import DenoisingBatch, NetworkFn, Sample
from workers.admission import AdmissionPolicy, BatchingMode, WaitingJob
from workers.errors import (
    InvalidJobRequest,
    JobDeadlineExceeded,
    NonFiniteOutput,
    WorkerStopped,
)
from workers.execute import (
    CodecCall,
    DenoiseWork,
    EncodedInputs,
    EncodedSource,
    encode_inputs,
    encodes_image,
    image_size,
    prepare_codec,
    prepare_denoise,
    preview_png,
    run_codec,
    run_codec_calls,
    text_prompts,
)
from workers.isolation import IsolatingClassifier, IsolatingNetwork, non_finite_samples
from workers.memory_budget import row_limit_at
from workers.model_pool import CodecModel, DiffusionModel, ModelPool
from workers.threads import limit_this_thread, spare_threads

log = logging.getLogger(__name__)

StoreFuture = Future[dict[int, ImageRecord]]  # image index → record, once written
REQUEST_POLL_S = 0.001  # request mode: how often the queue is polled while gathering
RECENT_CALLS = 10_000  # rows of this many recent calls are kept for inspection
# Autoencoder jobs run per round, so that a flood of them cannot stall denoising steps.
CODEC_JOBS_PER_ROUND = 8
# A lane with nothing to step but images being written waits this long at most for one write
# (then the round ends, and the next one admits newcomers).
STORE_WAIT_S = 0.01


class Ticket(Protocol):
    """One accepted job as the engine sees it. The engine calls exactly one of succeed, fail and
    cancel for every ticket it was given (the worker's is `workers.rq_adaptor.WorkerJob`)."""

    @property
    def id(self) -> str: ...

    @property
    def key(self) -> str:
        """This execution of the job, unique among the tickets a worker holds: a job handed out
        again while a stale execution of it still runs here is a second ticket (the engine keys
        its jobs by this, never by `id`)."""
        ...

    spec: JobSpec  # parsed once, when the job was taken (`workers.rq_adaptor.spec_of`)
    arrived_at: float  # when it was queued (seconds since the epoch): older is admitted first
    deadline: float  # when it fails with JobDeadlineExceeded (seconds since the epoch)

    def progress(
        self, step: int, total: int, batch_rows: int, previews: list[Preview] | None = None
    ) -> None: ...

    def succeed(self, output: JobOutput, batch_rows: int) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def cancel(self) -> None: ...


# Hands a ticket of another image size to that size's lane.
Divert = Callable[["Ticket", tuple[int, int]], None]


class JobFeed(Protocol):
    """Where jobs come from: a non-blocking pop per model queue and the cancel set."""

    def take(self, model: str) -> Ticket | None: ...

    def canceled(self, tickets: list[Ticket]) -> set[str]:
        """The keys (`Ticket.key`) of the tickets to stop now."""
        ...


@dataclass(frozen=True)
class BatchingPolicy:
    """The engine's settings: the admission limits (`admission`) and how it runs and reports."""

    mode: BatchingMode = "continuous"
    max_batch: int = 64  # network rows of one call (classifier-free guidance: 2 per sample)
    max_wait_s: float = 0.005  # request mode: how long to gather jobs into an empty set
    max_job_share: float = 1.0  # largest fraction of max_batch one job may hold
    progress_every: int = 5  # write progress every N steps

    def __post_init__(self) -> None:
        self.admission  # noqa: B018 -- validates max_batch and max_job_share
        if self.progress_every < 1:
            raise ValueError("progress_every must be ≥ 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchingPolicy:
        return cls(
            mode=settings.batching,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_job_share=settings.max_job_share,
            progress_every=settings.progress_every,
        )

    @property
    def admission(self) -> AdmissionPolicy:
        """The pure admission policy of these limits (`workers.admission`)."""
        return AdmissionPolicy(self.mode, self.max_batch, self.max_job_share)


@dataclass
class EngineStats:
    """Counters for tests, logs and the benchmark (occupancy = rows per call / max_batch)."""

    network_calls: int = 0
    rows_total: int = 0
    images_done: int = 0
    jobs_succeeded: int = 0
    jobs_failed: int = 0
    jobs_canceled: int = 0
    network_s: float = 0.0  # time inside the network's forward calls
    step_s: float = 0.0  # time inside DenoisingBatch.step (network + per-sample updates)
    row_limit_lowered: int = 0  # a call ran out of memory and a lane's row limit went down
    _recent_rows: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_CALLS))

    def record_call(self, rows: int) -> None:
        self.network_calls += 1
        self.rows_total += rows
        self._recent_rows.append(rows)

    @property
    def rows_per_call(self) -> list[int]:
        """Rows of the most recent network calls (at most RECENT_CALLS), oldest first."""
        return list(self._recent_rows)

    def as_dict(self) -> dict[str, float]:
        return {
            "network_s": self.network_s,
            "step_s": self.step_s,
            "network_calls": self.network_calls,
            "rows_total": self.rows_total,
            "images_done": self.images_done,
            "jobs_succeeded": self.jobs_succeeded,
            "jobs_failed": self.jobs_failed,
            "jobs_canceled": self.jobs_canceled,
            "row_limit_lowered": self.row_limit_lowered,
        }

    def occupancy(self, max_batch: int) -> float:
        return self.rows_total / (self.network_calls * max_batch) if self.network_calls else 0.0


class TimedNetwork:
    """The network callable of a running set, adding each call's duration to `stats.network_s`."""

    def __init__(self, network: NetworkFn, stats: EngineStats) -> None:
        self.network = network
        self.stats = stats

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        started = time.perf_counter()
        try:
            out = self.network(x, t, cond)
            if out.is_cuda:  # kernels run asynchronously: time them to the end
                torch.cuda.synchronize(out.device)
            return out
        finally:
            self.stats.network_s += time.perf_counter() - started


class StoreThreads:
    """The threads that write finished images (`DenoiseWork.write_images`), started on the first
    write and again after `close` (a worker may run its loop more than once)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., dict[int, ImageRecord]], *args: Any) -> StoreFuture:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="store")
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Wait for the writes under way; cancel those not started."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class PrepareThread:
    """The one thread that encodes jobs' inputs (`DenoiseLane.accept`: prompts the text encoder has
    not cached, a latent model's inpaint or img2img image) while the running sets step; started on
    the first such job and again after `close`. Its torch calls use the cores the stepping thread's
    pool leaves free, at least one (`workers.threads.spare_threads`), so an encoding beside a step
    oversubscribes the cores by one thread at most, and only while it runs. On a GPU both threads
    queue their kernels on the device's default stream: the encoder's run between two steps'
    kernels, and a step that reads the rows comes after them in stream order (no synchronisation
    needed; the first stage's latents come to the host before the encoding returns)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., EncodedInputs], *args: Any) -> Future[EncodedInputs]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="prepare", initializer=_own_torch_threads
            )
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Wait for the encoding under way, if any; cancel those not started."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _own_torch_threads() -> None:
    """The prepare thread's torch intra-op threads: the cores the process's count leaves free."""
    shared = torch.get_num_threads()  # a fresh thread reads the process's count
    threads = limit_this_thread(spare_threads(shared))
    log.debug("prepare thread: %d torch threads (the stepping thread: %d)", threads, shared)


@dataclass(eq=False)
class PreparingJob:
    """A job taken by a lane whose inputs the prepare thread is encoding: held (it may be
    canceled, pass its deadline or be aborted), not yet waiting for admission."""

    ticket: Ticket
    seq: int  # its order of arrival at this worker, kept for its admission
    inputs: Future[EncodedInputs]  # `encode_inputs(spec, model)`, or the error it raised

    @property
    def id(self) -> str:
        return self.ticket.id

    @property
    def key(self) -> str:
        return self.ticket.key

    @property
    def network_rows(self) -> int:
        """The rows its samples will take in a call (two per guided sample)."""
        spec = self.ticket.spec
        assert isinstance(spec, GenerateSpec | InpaintSpec | Img2ImgSpec)  # `_prepares_aside`
        return spec.n * (2 if spec.guided else 1)

    @property
    def stage(self) -> str:
        """Where it was when it ended early (for its error)."""
        return "while its inputs were being encoded"


@dataclass(eq=False)
class JobState:
    """A job held by a lane: its samples not yet admitted, and its bookkeeping."""

    ticket: Ticket
    work: DenoiseWork
    seq: int  # order of arrival at this worker (tie-breaker after age)
    pending: list[Sample]
    storing: list[StoreFuture] = field(default_factory=list)  # its images being written
    running_rows: int = 0
    largest_call_rows: int = 0  # rows of the largest network call it shared (its batch_size)
    steps_since_progress: int = 0
    image_steps: int = 0  # network calls made for this job's images, summed over its images
    previewed_at: int = 0  # its progress step at its last x̂_0 preview (output.preview_every)

    @property
    def id(self) -> str:
        return self.ticket.id

    @property
    def key(self) -> str:
        return self.ticket.key

    def progress_step(self) -> int:
        """Mean network calls done per image (what GET /jobs shows as progress.step)."""
        return self.image_steps // self.work.n

    @property
    def stage(self) -> str:
        """Where it was when it ended early (for its error)."""
        return f"after {self.progress_step()} of {self.work.steps_per_image} steps"


def network_row_samples(batch: DenoisingBatch) -> list[Sample]:
    """The sample behind each row of the batch's next network call: every sample in order, then
    the unconditional copy of each guided one (the order `DenoisingBatch._guided_eps` stacks them
    in). Used only to name the cause of a failure: which jobs fail is decided by their x_t."""
    return [*batch.samples, *(s for s in batch.samples if s.guided)]


class BaseLane:
    """What every lane shares: its model's name and the tickets it holds (idle: none)."""

    model: DiffusionModel | CodecModel

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def idle(self) -> bool:
        return not self.tickets()

    def tickets(self) -> list[Ticket]:
        raise NotImplementedError


class DenoiseLane(BaseLane):
    """The running set and waiting jobs of one diffusion model."""

    def __init__(
        self,
        model: DiffusionModel,
        feed: JobFeed,
        storage: Storage,
        policy: BatchingPolicy,
        stats: EngineStats,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        store_threads: StoreThreads | None = None,
        prepare_thread: PrepareThread | None = None,
        *,
        size: tuple[int, int] | None = None,
        divert: Divert | None = None,
        others_waiting: Callable[[], bool] | None = None,
    ) -> None:
        """`size`: (height, width) of this lane's images (default: the model's own). The lane of
        the model's own size reads the model's queue and hands a ticket of another size to
        `divert` (the engine's lane of that size), and reads no further while `others_waiting`
        (a lane of another size holds samples its running set has no room for: as for its own
        waiting samples, more jobs would only wait); a lane of another size (`divert` None)
        reads no queue and holds only what it is handed."""
        self.model = model
        self.feed = feed
        self.storage = storage
        self.policy = policy
        self.size = size or model.image_size
        self.sample_shape = model.sample_shape_at(*self.size)  # (C, h, w) of its samples' x_t
        self.divert = divert
        self.others_waiting = others_waiting
        self.reads_queue = size is None or size == model.image_size
        # Rows per call: max_batch, lowered to what the device holds (`workers.memory_budget`:
        # measured at load — scaled by the area for another size — then lowered again by any
        # call that still runs out of memory).
        row_limit = row_limit_at(model.row_limit, model.image_size, self.size, policy.max_batch)
        self.row_limit = row_limit
        self.admission = policy.admission
        self.stats = stats
        self.clock = clock
        self.sleep = sleep
        self.store_threads = store_threads  # None: images are stored on the stepping thread
        self.prepare_thread = prepare_thread  # None: every job is prepared on the stepping thread
        self.batch = self._new_batch()
        self.jobs: dict[str, JobState] = {}
        self.preparing: dict[str, PreparingJob] = {}  # by ticket key, in order of arrival
        self._owner: dict[int, JobState] = {}  # id(sample) → its job
        self._seq = 0
        if row_limit is not None:
            self._lower_row_limit(row_limit)

    def tickets(self) -> list[Ticket]:
        """The tickets it holds: jobs in preparation, waiting and running."""
        return [job.ticket for job in self._held()]

    def _new_batch(self) -> DenoisingBatch:
        """An empty running set whose network calls are split when they fail (`isolation`) and
        timed into the stats (each call actually made)."""
        batch = self.model.new_batch(self.sample_shape)
        self.isolation = IsolatingNetwork(
            TimedNetwork(batch.network, self.stats),
            max_rows=self.row_limit,
            out_channels=self.sample_shape[0],  # an inpainting UNet reads more than it predicts
        )
        batch.network = self.isolation
        self.classifier_isolation = None
        if batch.classifier is not None:
            self.classifier_isolation = IsolatingClassifier(batch.classifier)
            batch.classifier = self.classifier_isolation
        return batch

    def _lower_row_limit(self, rows: int) -> None:
        """Calls of this lane hold at most `rows` rows from now on: the network cuts larger ones,
        and admission builds no running set larger than that (two rows at least: a guided sample
        needs its pair; the network then runs it one row per piece)."""
        self.row_limit = rows
        self.isolation.max_rows = rows
        limit = max(2, min(self.policy.max_batch, rows))
        if limit < self.admission.max_batch:
            self.admission = dataclasses.replace(self.admission, max_batch=limit)
            log.warning("model %s: at most %d rows per network call from now on", self.name, limit)

    # --- arrivals -------------------------------------------------------------------------------
    def accept(self, ticket: Ticket) -> None:
        """Turn a ticket into samples; a request that cannot run fails at once (only itself). A
        ticket of another image size goes to that size's lane (`divert`); a job whose inputs an
        encoder must encode goes to the prepare thread first (`_prepares_aside`)."""
        try:
            size = image_size(ticket.spec, self.model)
            if size != self.size and self.divert is None:
                raise InvalidJobRequest(f"this lane makes {self.size} images, not {size}")
        except Exception as exc:
            _end(ticket.fail, exc, self.stats, "failed")
            return
        if size != self.size and self.divert is not None:
            self.divert(ticket, size)
            return
        self._seq += 1
        if self.prepare_thread is not None and self._prepares_aside(ticket.spec):
            inputs = self.prepare_thread.submit(encode_inputs, ticket.spec, self.model)
            self.preparing[ticket.key] = PreparingJob(ticket, self._seq, inputs)
            return
        self._prepare(ticket, self._seq)

    def _prepares_aside(self, spec: JobSpec) -> bool:
        """Whether a spec's inputs are encoded on the prepare thread: its prompts miss the text
        encoder's cache, or its image goes through the first stage's encoder (`encodes_image`).
        Never in a lane without the thread, nor in a mode that reads the queue only into an empty
        running set (where nothing would step while it waited)."""
        if self.prepare_thread is None or self.policy.mode != "continuous":
            return False
        if encodes_image(spec, self.model):
            return True
        encoder = self.model.prompt_encoder
        prompts = text_prompts(spec, self.model)
        return encoder is not None and prompts is not None and not encoder.cached(prompts)

    def _prepare(self, ticket: Ticket, seq: int, encoded: EncodedSource | None = None) -> None:
        """The job's samples join the waiting jobs, or the job fails (only itself)."""
        try:
            work = prepare_denoise(ticket.spec, self.model, ticket.id, encoded)
        except Exception as exc:
            _end(ticket.fail, exc, self.stats, "failed")
            return
        self.jobs[ticket.key] = JobState(ticket, work, seq, list(work.samples))

    def _collect_prepared(self) -> None:
        """The jobs whose inputs are encoded (or whose encoding failed: `prepare_denoise` raises
        its error where it would have raised it inline) become waiting jobs, in order of
        arrival."""
        for key, job in list(self.preparing.items()):
            if job.inputs.done():
                del self.preparing[key]
                self._prepare(job.ticket, job.seq, job.inputs.result)

    def _preparing_rows(self) -> int:
        return sum(job.network_rows for job in self.preparing.values())

    def _take_one(self) -> bool:
        """Take one ticket from the model's queue (only the lane of the model's own size reads
        it, and not while a lane of another size has samples waiting); False when none came."""
        if not self.reads_queue or (self.others_waiting is not None and self.others_waiting()):
            return False
        ticket = self.feed.take(self.name)
        if ticket is None:
            return False
        self.accept(ticket)
        return True

    def take_diverted(self, ticket: Ticket) -> None:
        """A ticket of this lane's size, taken from the queue by the model's own lane: held, and
        admitted at once where the running set has room."""
        self.accept(ticket)
        self._admit()

    @property
    def waiting(self) -> bool:
        """Samples are held that the running set has no room for yet (or will be, once their
        inputs are encoded)."""
        return bool(self.preparing) or any(job.pending for job in self.jobs.values())

    # --- admission ------------------------------------------------------------------------------
    def _admit(self) -> bool:
        """Move the waiting samples that `workers.admission` lets in into the running set; True
        if the lane should read its queue no further this round (the call is full, or a waiting
        sample found no room)."""
        waiting = [
            WaitingJob(
                job.key,
                job.ticket.arrived_at,
                job.seq,
                tuple(s.rows for s in job.pending),
                job.running_rows,
            )
            for job in self.jobs.values()
            if job.pending
        ]
        running_rows = self.batch.rows
        decision = self.admission.admit(waiting, running_rows)
        admitted: list[Sample] = []
        for key, count in decision.counts.items():
            job = self.jobs[key]
            joining, job.pending = job.pending[:count], job.pending[count:]
            for sample in joining:
                job.running_rows += sample.rows
                self._owner[id(sample)] = job
            admitted.extend(joining)
        if admitted:
            self.batch.add(admitted)
        return self.admission.is_full(running_rows, decision)

    def _pending_rows(self) -> int:
        return sum(s.rows for j in self.jobs.values() for s in j.pending)

    def fill(self) -> None:
        """Admission at a step boundary, reading the queue as the batching mode says."""
        self._collect_prepared()
        mode = self.policy.mode
        if mode == "continuous":
            # Take from the queue only while the running set has room the held jobs cannot use
            # (the jobs in preparation counting the rows they will take).
            while not self._admit():
                if self.batch.rows + self._preparing_rows() >= self.admission.max_batch:
                    break
                if not self._take_one():
                    break
            return
        if not self.admission.admits_into(self.batch.rows):
            return  # request / none: the running set runs to its end first
        if not any(j.pending for j in self.jobs.values()) and not self._take_one():
            return
        if mode == "request" and self.reads_queue:
            # Gather for up to max_wait (measured, and counted in polls so a frozen clock ends too).
            give_up = self.clock() + self.policy.max_wait_s
            polls_left = math.ceil(self.policy.max_wait_s / REQUEST_POLL_S)
            while self._pending_rows() < self.admission.max_batch:
                if self._take_one():
                    continue
                remaining = give_up - self.clock()
                if remaining <= 0 or polls_left <= 0:
                    break
                polls_left -= 1
                self.sleep(min(REQUEST_POLL_S, remaining))
        self._admit()

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> None:
        """One network call over the running set; store finished images; complete finished jobs."""
        if not len(self.batch):
            self._collect_stores(block=True)  # or, with nothing to write, wait for a preparation
            return
        rows = self.batch.rows
        row_samples = network_row_samples(self.batch)
        running: dict[int, JobState] = {}
        for sample in self.batch.samples:
            job = self._owner[id(sample)]
            running[id(job)] = job
            job.image_steps += 1  # counted before the call: a failed call ends the job anyway
        started = time.perf_counter()
        try:
            finished = self.batch.step()
        except Exception as exc:  # the call failed for every running sample: fail their jobs
            log.exception("model %s: denoising step failed", self.name)
            self.batch = self._new_batch()
            for job in running.values():
                self._forget(job)
                _end(job.ticket.fail, exc, self.stats, "failed")
            return
        self.stats.step_s += time.perf_counter() - started
        self.stats.record_call(rows)
        learned = self.isolation.max_rows
        if learned is not None and (self.row_limit is None or learned < self.row_limit):
            self.stats.row_limit_lowered += 1
            self._lower_row_limit(learned)
        for job in running.values():
            job.largest_call_rows = max(job.largest_call_rows, rows)
            job.steps_since_progress += 1
        finished = self._fail_non_finite(row_samples, finished)
        if finished:
            self._store(finished)
        for job in running.values():
            if self.jobs.get(job.key) is not job:
                continue
            if job.work.done:
                self._complete(job)
            elif self._preview_due(job):
                job.steps_since_progress = 0
                _report(job, self._previews(job))
            elif job.steps_since_progress >= self.policy.progress_every:
                job.steps_since_progress = 0
                _report(job)
        self._collect_stores(block=False)

    def _preview_due(self, job: JobState) -> bool:
        """Whether the job asked for previews and made `preview_every` more steps since its last."""
        every = job.work.spec.preview_every
        return every is not None and job.progress_step() - job.previewed_at >= every

    def _previews(self, job: JobState) -> list[Preview]:
        """x̂_0 of the job's samples now running, decoded to pixels as its final images would be
        (the first-stage decoder for latent models, one call for the job's samples), as small PNGs
        (`workers.execute.preview_png`). Only for jobs that asked; a failure costs the preview,
        never the job."""
        job.previewed_at = job.progress_step()
        samples = [
            s for s in self.batch.samples if s.x0 is not None and self._owner.get(id(s)) is job
        ]
        if not samples:
            return []
        try:
            pixels = self.model.to_pixels(torch.stack([s.x0 for s in samples]))  # [k, C, H, W]
            return [
                {"index": int(s.tag), "png": preview_png(image)}
                for s, image in zip(samples, pixels, strict=True)
            ]
        except Exception:
            log.exception("job %s: could not make its previews", job.id)
            return []

    def _fail_non_finite(self, row_samples: list[Sample], finished: list[Sample]) -> list[Sample]:
        """Fail the jobs with a sample whose x_t is no longer finite after the step, with the
        cause the isolating network recorded for its row (NaN output, out of memory, an error:
        `isolation.non_finite_samples`); return the finished samples of the other jobs. The rest
        of the running set goes on untouched."""
        bad = non_finite_samples(
            self.batch, row_samples, finished, self.isolation, self.classifier_isolation
        )
        if not bad:
            return finished
        failed: dict[int, tuple[JobState, BaseException]] = {}
        for sample in row_samples:  # every sample of the step, finished ones included
            job = self._owner.get(id(sample))
            if id(sample) not in bad or job is None or id(job) in failed:
                continue
            cause = bad[id(sample)] or NonFiniteOutput(
                f"the model produced NaN or infinite values for job {job.id}'s sample; the rest "
                "of its batch went on without it"
            )
            failed[id(job)] = (job, cause)
        kept = [s for s in finished if id(self._owner.get(id(s))) not in failed]
        for job, cause in failed.values():
            log.warning("model %s: job %s failed on its own: %s", self.name, job.id, cause)
            self._drop(job)
            _end(job.ticket.fail, cause, self.stats, "failed")
        return kept

    def _store(self, finished: list[Sample]) -> None:
        """Decode (latent diffusion) and store finished samples, in one decoder call per step."""
        by_job: dict[int, tuple[JobState, list[Sample]]] = {}
        for sample in finished:
            job = self._owner.pop(id(sample))
            job.running_rows -= sample.rows
            by_job.setdefault(id(job), (job, []))[1].append(sample)
        try:
            pixels = self.model.to_pixels(torch.stack([s.x for s in finished]))  # [k, C, H, W]
        except Exception as exc:
            for job, _ in by_job.values():
                self._drop(job)
                _end(job.ticket.fail, exc, self.stats, "failed")
            return
        index = {id(s): i for i, s in enumerate(finished)}
        for job, samples in by_job.values():
            try:
                rows = torch.stack([pixels[index[id(s)]] for s in samples])  # [k, C, H, W]
                if self.store_threads is not None:
                    write = self.store_threads.submit(
                        job.work.write_images, samples, rows, self.storage
                    )
                    job.storing.append(write)
                else:
                    job.work.store(samples, rows, self.storage)
                    self.stats.images_done += len(samples)
            except Exception as exc:
                self._drop(job)
                _end(job.ticket.fail, exc, self.stats, "failed")

    def _collect_stores(self, block: bool) -> None:
        """Take in the image writes that are done (with `block`, wait up to STORE_WAIT_S for one
        of them or for a job's preparation, so that a lane waiting for threads does not spin): a
        job whose write failed fails, a job with every image stored completes."""
        writing = [job for job in self.jobs.values() if job.storing]
        if block:
            futures: list[Future[Any]] = [future for job in writing for future in job.storing]
            futures.extend(job.inputs for job in self.preparing.values())
            if futures:
                wait(futures, timeout=STORE_WAIT_S, return_when=FIRST_COMPLETED)
        if not writing:
            return
        for job in writing:
            done = [future for future in job.storing if future.done()]
            if not done:
                continue
            job.storing = [future for future in job.storing if not future.done()]
            try:
                for future in done:
                    records = future.result()
                    job.work.records.update(records)
                    self.stats.images_done += len(records)
            except Exception as exc:
                self._drop(job)
                _end(job.ticket.fail, exc, self.stats, "failed")
                continue
            if job.work.done:
                self._complete(job)

    def _complete(self, job: JobState) -> None:
        self._forget(job)
        try:
            output = job.work.complete(self.storage)
        except Exception as exc:
            _end(job.ticket.fail, exc, self.stats, "failed")
            return
        _report(job)  # the last progress, step = total: also for jobs shorter than progress_every
        try:
            job.ticket.succeed(output, job.largest_call_rows)
            self.stats.jobs_succeeded += 1
        except Exception:
            log.exception("job %s: could not record its success", job.id)

    # --- leaving early --------------------------------------------------------------------------
    def _forget(self, job: JobState) -> None:
        if self.jobs.get(job.key) is job:
            del self.jobs[job.key]

    def _drop(self, job: JobState) -> None:
        """Take a job's samples out of the running set and forget the job (writes of its images
        not yet started are canceled; the files of those already written expire with the rest)."""
        self.batch.remove(lambda s: self._owner.get(id(s)) is not job)
        for key in [k for k, owner in self._owner.items() if owner is job]:
            del self._owner[key]
        job.pending.clear()
        for future in job.storing:
            future.cancel()
        job.storing.clear()
        self._forget(job)

    def sweep(self, canceled: set[str], now: float) -> None:
        """End canceled jobs (`canceled`: ticket keys) and jobs past their deadline (only those),
        whether in preparation, waiting or running."""
        for job in self._held():
            if job.key in canceled:
                self._leave(job)
                _end_canceled(job.ticket, self.stats)
            elif now > job.ticket.deadline:
                self._leave(job)
                error = JobDeadlineExceeded(f"job {job.id} passed its deadline {job.stage}")
                _end(job.ticket.fail, error, self.stats, "failed")

    def _held(self) -> list[PreparingJob | JobState]:
        """The jobs it holds: in preparation, then waiting and running."""
        return [*self.preparing.values(), *self.jobs.values()]

    def _leave(self, job: PreparingJob | JobState) -> None:
        """Forget a job that ends early. One in preparation: its encoding is canceled if not
        started, and its result never read if it is (prompt rows stay in the encoder's cache for
        the next job with that prompt). Waiting or running: its samples leave (`_drop`)."""
        if isinstance(job, PreparingJob):
            del self.preparing[job.key]
            job.inputs.cancel()
        else:
            self._drop(job)

    def abort(self, error: BaseException) -> None:
        for job in self._held():
            self._leave(job)
            _end(job.ticket.fail, error, self.stats, "failed")


class CodecLane(BaseLane):
    """Autoencoder jobs of one model: up to CODEC_JOBS_PER_ROUND a round, batched into one ONNX
    Runtime call per kind of input (encode, decode from latents or codes, reconstruct)."""

    def __init__(
        self, model: CodecModel, feed: JobFeed, storage: Storage, stats: EngineStats
    ) -> None:
        self.model = model
        self.feed = feed
        self.storage = storage
        self.stats = stats
        self.jobs: dict[str, Ticket] = {}

    def tickets(self) -> list[Ticket]:
        return list(self.jobs.values())

    def accept(self, ticket: Ticket) -> None:
        self.jobs[ticket.key] = ticket

    def fill(self) -> None:
        while len(self.jobs) < CODEC_JOBS_PER_ROUND:
            ticket = self.feed.take(self.name)
            if ticket is None:
                break
            self.accept(ticket)

    def step(self) -> None:
        """The round's jobs: one ONNX Runtime call per kind of input (`run_codec_calls`), prior
        sampling (generate on a VAE/AAE) job by job; a job's bad input fails only that job."""
        tickets = list(self.jobs.values())
        self.jobs.clear()
        batched: list[tuple[Ticket, CodecCall]] = []
        for ticket in tickets:
            try:
                if isinstance(ticket.spec, GenerateSpec | PriorSampleSpec):
                    output = run_codec(ticket.spec, self.model, ticket.id, self.storage)
                    self._succeed(ticket, output, len(output.get("images") or []) or 1)
                else:
                    call = prepare_codec(ticket.spec, self.model, ticket.id, self.storage)
                    batched.append((ticket, call))
            except Exception as exc:
                _end(ticket.fail, exc, self.stats, "failed")
        results = run_codec_calls(self.model, [call for _, call in batched])
        for (ticket, _), (output, rows) in zip(batched, results, strict=True):
            if isinstance(output, Exception):
                _end(ticket.fail, output, self.stats, "failed")
            else:
                self._succeed(ticket, output, rows)

    def _succeed(self, ticket: Ticket, output: JobOutput, rows: int) -> None:
        try:
            ticket.succeed(output, rows)
            self.stats.jobs_succeeded += 1
        except Exception:
            log.exception("job %s: could not record its success", ticket.id)

    def sweep(self, canceled: set[str], now: float) -> None:
        for ticket in list(self.jobs.values()):
            if ticket.key in canceled:
                del self.jobs[ticket.key]
                _end_canceled(ticket, self.stats)

    def abort(self, error: BaseException) -> None:
        for ticket in list(self.jobs.values()):
            del self.jobs[ticket.key]
            _end(ticket.fail, error, self.stats, "failed")


Lane = DenoiseLane | CodecLane


def _report(job: JobState, previews: list[Preview] | None = None) -> None:
    try:
        step, total, rows = job.progress_step(), job.work.steps_per_image, job.largest_call_rows
        if previews:
            job.ticket.progress(step, total, rows, previews=previews)
        else:
            job.ticket.progress(step, total, rows)
    except Exception:
        log.exception("job %s: could not write progress", job.id)


def _end_canceled(ticket: Ticket, stats: EngineStats) -> None:
    _end(lambda _exc: ticket.cancel(), None, stats, "canceled")


def _end(
    action: Callable[[Any], None], error: BaseException | None, stats: EngineStats, outcome: str
) -> None:
    """End a ticket (fail or cancel); a Redis error here is logged, never raised into the loop."""
    try:
        action(error)
    except Exception:
        log.exception("could not record a job's end (%s)", outcome)
    if outcome == "canceled":
        stats.jobs_canceled += 1
    else:
        stats.jobs_failed += 1


class Engine:
    """The scheduler of one worker over its models; see the module docstring."""

    def __init__(
        self,
        pool: ModelPool,
        models: list[str],
        feed: JobFeed,
        storage: Storage,
        policy: BatchingPolicy,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        store_threads: int = 0,
        prepare_thread: bool = False,
    ) -> None:
        """`store_threads`: threads that encode and write finished images while the next steps
        run (0: on the stepping thread, at once); `prepare_thread`: encode the prompts the text
        encoders have not cached on a thread of their own while the running sets step (False: on
        the stepping thread, when the job is taken); `close()` stops them."""
        self.feed = feed
        self.policy = policy
        self.stats = EngineStats()
        self.clock = clock
        self._store_threads = StoreThreads(store_threads) if store_threads > 0 else None
        self._prepare_thread = PrepareThread() if prepare_thread else None
        self._sleep = sleep
        self.storage = storage
        # One lane per model (its own image size), and one per (model, other size) in flight.
        self.lanes: dict[str, Lane] = {}
        self.sized_lanes: dict[tuple[str, tuple[int, int]], DenoiseLane] = {}
        for name in models:
            model = pool.get(name)
            if isinstance(model, DiffusionModel):
                self.lanes[name] = DenoiseLane(
                    model,
                    feed,
                    storage,
                    policy,
                    self.stats,
                    clock,
                    sleep,
                    self._store_threads,
                    self._prepare_thread,
                    divert=functools.partial(self._divert, name),
                    others_waiting=functools.partial(self._sizes_waiting, name),
                )
            else:
                self.lanes[name] = CodecLane(model, feed, storage, self.stats)

    def _every_lane(self) -> list[Lane]:
        return [*self.lanes.values(), *self.sized_lanes.values()]

    def _sizes_waiting(self, name: str) -> bool:
        """A lane of model `name` at another size holds samples waiting for room."""
        return any(lane.waiting for (model, _), lane in self.sized_lanes.items() if model == name)

    def _divert(self, name: str, ticket: Ticket, size: tuple[int, int]) -> None:
        """A ticket of model `name` at another image size than the model's own: to the lane of
        that size, made on demand (its samples cannot share the own size's tensors)."""
        lane = self.sized_lanes.get((name, size))
        if lane is None:
            own = self.lanes[name]
            assert isinstance(own, DenoiseLane)
            lane = DenoiseLane(
                own.model,
                self.feed,
                self.storage,
                self.policy,
                self.stats,
                self.clock,
                self._sleep,
                self._store_threads,
                self._prepare_thread,
                size=size,
            )
            self.sized_lanes[(name, size)] = lane
            log.info("model %s: a running set for %d×%d images", name, size[1], size[0])
        lane.take_diverted(ticket)

    @property
    def idle(self) -> bool:
        """No job held: nothing running, nothing waiting for admission."""
        return all(lane.idle for lane in self._every_lane())

    def held_tickets(self) -> list[Ticket]:
        """Every ticket held (running, waiting for admission, or in preparation)."""
        return [ticket for lane in self._every_lane() for ticket in lane.tickets()]

    def held_job_ids(self) -> list[str]:
        """The ids of the jobs held (once each, whatever the number of their executions here)."""
        return list(dict.fromkeys(ticket.id for ticket in self.held_tickets()))

    def offer(self, model: str, ticket: Ticket) -> None:
        """A job the worker dequeued itself (the blocking wait of an idle worker)."""
        lane = self.lanes.get(model)
        if lane is None:
            _end(
                ticket.fail, KeyError(f"this worker does not serve {model!r}"), self.stats, "failed"
            )
            return
        lane.accept(ticket)

    def run_once(self) -> None:
        """One scheduling round: `admit`, then `step`."""
        self.admit()
        self.step()

    def admit(self) -> None:
        """The first half of a round: cancellations and deadlines, then admission into every
        model's running set (the only half that reads the queues)."""
        tickets = self.held_tickets()
        canceled = self.feed.canceled(tickets) if tickets else set()
        now = self.clock()
        for lane in self._every_lane():
            lane.sweep(canceled, now)
        for lane in self._every_lane():
            lane.fill()

    def step(self) -> None:
        """The second half: one step per model and image size in flight (round-robin). It reads
        nothing from the feed, so the worker sends the previous round's writes while it runs. A
        lane of another size than its model's own is dropped once it holds nothing."""
        for lane in self._every_lane():
            lane.step()
        for key, lane in list(self.sized_lanes.items()):
            if lane.idle:
                del self.sized_lanes[key]

    def run_until_idle(self, max_rounds: int | None = None) -> int:
        """Run rounds until nothing is held (and the feed is empty); returns the rounds run."""
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            self.admit()
            # Nothing held once the queues were read: the feed is empty too. (Checked here, not
            # after the step: a codec lane finishes its whole round in one step, with more of its
            # jobs still queued.)
            held = not self.idle
            self.step()
            rounds += 1
            if not held:
                break
        return rounds

    def abort(self, error: BaseException | None = None) -> None:
        """Fail every held job (a worker stopping cold); RQ retries those with retries left."""
        failure = error or WorkerStopped("the worker stopped before the job finished")
        for lane in self._every_lane():
            lane.abort(failure)

    def close(self) -> None:
        """Stop the prepare thread once its encoding under way is done, and the store threads once
        the writes they started are (the held jobs, if any, are the caller's to end first:
        `run_until_idle` or `abort`)."""
        if self._prepare_thread is not None:
            self._prepare_thread.close()
        if self._store_threads is not None:
            self._store_threads.close()
