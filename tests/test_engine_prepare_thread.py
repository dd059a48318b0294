"""A job whose prompt the text encoder has not cached, or whose image (inpaint, img2img) a latent
model's first stage must encode, is prepared on the engine's prepare thread while the running set
keeps stepping: the other jobs' network calls go on during the encoding, the new job joins once its
inputs are ready and gives the images it gives alone (an image's latents bit for bit those of the
inline path), it ends exactly once whatever ends it mid-encoding (cancel, deadline, abort), an
encoder error fails only that job with the error the inline path raises, and a cache hit never
uses the thread.

The model is a tiny `StableDiffusionPipeline` (`tests/tiny_sd.py`) imported and loaded as a worker
loads it; its encoder is wrapped so that chosen prompts wait for an Event (a slow CLIP forward),
and its first stage so that image encodings do (a slow VAE encode)."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ddserve.settings import Settings
from models.diffusers_format.importer import import_pipeline
from models.diffusers_format.text import PromptEncoder
from tests import specs
from tests.test_engine import Clock
from tests.tiny_sd import tiny_sd_pipeline
from tests.worker_doubles import MemoryFeed, MemoryStorage, MemoryTicket
from workers import engine as engine_module
from workers.engine import BatchingPolicy, DenoiseLane, Engine
from workers.errors import InvalidJobRequest, JobDeadlineExceeded, WorkerStopped
from workers.execute import DenoiseWork, prepare_denoise
from workers.model_pool import DiffusionModel, ModelPool

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

NAME = "tiny-sd"
WAIT_S = 10.0  # an encoding held longer than this is a hung test, not a slow encoder
MAX_ROUNDS = 200


class GatedEncoder(PromptEncoder):
    """The model's prompt encoder, whose calls for `gated` prompts wait for `release` (signalling
    `entered` first) and for `failing` prompts raise; it records the thread of every call."""

    def __init__(self, base: PromptEncoder) -> None:
        super().__init__(base.tokenizer, base.text_encoder, base.cache_size)
        self._null = base.null_condition()  # the model's ∅, as loaded
        self.gated: set[str] = set()
        self.failing: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        self.threads.append(threading.current_thread().name)
        if self.gated.intersection(prompts):
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the encoder"
        if self.failing.intersection(prompts):
            raise RuntimeError("the text encoder broke")
        return super()._encode(prompts)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> ModelPool:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("prepare-thread")
    tiny_sd_pipeline(root / "source")
    settings = Settings(
        zoo_dir=root / "no-zoo",
        model_dirs=str(root / "models"),
        device="cpu",
        log_level="WARNING",
    )
    import_pipeline(str(root / "source" / "pipeline"), name=NAME, settings=settings)
    return ModelPool(settings)


@pytest.fixture
def encoder(pool: ModelPool) -> Iterator[GatedEncoder]:
    """A fresh gated encoder (empty cache) in the model, for one test; the loaded one after."""
    model = pool.get(NAME)
    assert isinstance(model, DiffusionModel) and model.prompt_encoder is not None
    loaded = model.prompt_encoder
    gated = GatedEncoder(loaded)
    model.prompt_encoder = gated
    try:
        yield gated
    finally:
        gated.release.set()
        model.prompt_encoder = loaded


def generate(prompt: str, seed: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"guidance_scale": 7.5, "num_inference_steps": 4, "seed": seed}
    return specs.generate(NAME, prompt=prompt, **{**base, **fields})


def new_engine(
    pool: ModelPool, feed: MemoryFeed, storage: MemoryStorage, *, prepare_thread: bool, **kw: Any
) -> Engine:
    return Engine(
        pool,
        [NAME],
        feed,
        storage,
        BatchingPolicy(max_batch=kw.pop("max_batch", 16), mode=kw.pop("mode", "continuous")),
        clock=kw.pop("clock", Clock()),
        sleep=lambda _s: None,
        prepare_thread=prepare_thread,
    )


def lane_of(engine: Engine) -> DenoiseLane:
    lane = engine.lanes[NAME]
    assert isinstance(lane, DenoiseLane)
    return lane


def run_until(engine: Engine, done: Any) -> None:
    """Rounds until `done()` (a round with nothing to step waits for the prepare thread, so this
    is bounded by the encoding, not by spinning)."""
    for _ in range(MAX_ROUNDS):
        if done():
            return
        engine.run_once()
    raise AssertionError("the engine did not get there")


def pixels(storage: MemoryStorage, ticket: MemoryTicket) -> list[np.ndarray]:
    assert ticket.output is not None, ticket.error
    return [
        np.asarray(Image.open(io.BytesIO(storage.get(image["key"])))).astype(int)
        for image in ticket.output["images"]
    ]


def alone(pool: ModelPool, request: dict[str, Any]) -> list[np.ndarray]:
    """The request's images from an engine without the prepare thread, run by itself."""
    feed, storage = MemoryFeed(), MemoryStorage()
    engine = new_engine(pool, feed, storage, prepare_thread=False)
    ticket = feed.submit(request)
    engine.run_until_idle()
    engine.close()
    return pixels(storage, ticket)


def test_the_running_set_steps_while_a_prompt_is_encoded(
    pool: ModelPool, encoder: GatedEncoder
) -> None:
    encoder.gated.add("a blue dog")
    feed, storage = MemoryFeed(), MemoryStorage()
    engine = new_engine(pool, feed, storage, prepare_thread=True)
    lane = lane_of(engine)
    try:
        running = feed.submit(generate("a red circle", 1, num_inference_steps=30))
        run_until(engine, lambda: len(lane.batch) > 0)
        late_request = generate("a blue dog", 2, n=2, negative_prompt="green")
        late = feed.submit(late_request)
        engine.run_once()  # takes it: to the prepare thread
        assert encoder.entered.wait(WAIT_S)
        assert set(lane.preparing) == {late.key} and late.key not in lane.jobs
        calls = engine.stats.network_calls
        steps = lane.jobs[running.key].image_steps
        for _ in range(5):  # the encoder is held: the running job steps on, the late one waits
            engine.run_once()
        assert engine.stats.network_calls == calls + 5
        assert lane.jobs[running.key].image_steps == steps + 5
        assert late in engine.held_tickets() and not engine.idle and not late.finished
        encoder.release.set()
        run_until(engine, lambda: late.key not in lane.preparing)  # joins at a step boundary
        assert late.key in lane.jobs
        engine.run_until_idle()
    finally:
        engine.close()
    assert encoder.threads.count("prepare_0") == 2  # the two misses: "a red circle", the late pair
    assert running.ends == late.ends == 1
    late_images = pixels(storage, late)
    for got, solo in zip(late_images, alone(pool, late_request), strict=True):
        assert int(np.abs(got - solo).max()) <= 1  # rounding of batched float sums


def test_an_encoder_error_fails_only_its_job_with_the_inline_error(
    pool: ModelPool, encoder: GatedEncoder
) -> None:
    encoder.failing.add("photo of a cat")
    outcomes: dict[bool, tuple[MemoryTicket, MemoryTicket]] = {}
    for prepare_thread in (False, True):
        feed, storage = MemoryFeed(), MemoryStorage()
        engine = new_engine(pool, feed, storage, prepare_thread=prepare_thread)
        try:
            good = feed.submit(generate("a red circle", 1))
            bad = feed.submit(generate("yellow square", 2, negative_prompt="photo of a cat"))
            engine.run_until_idle()
        finally:
            engine.close()
        outcomes[prepare_thread] = (good, bad)
    for good, bad in outcomes.values():
        assert good.output is not None and good.ends == 1
        assert bad.ends == 1 and bad.output is None
    inline, threaded = outcomes[False][1].error, outcomes[True][1].error
    assert type(threaded) is type(inline) is RuntimeError and str(threaded) == str(inline)
    assert "prepare_0" in encoder.threads  # the second run's misses went to the thread


def test_cache_hits_and_other_modes_never_use_the_thread(
    pool: ModelPool, encoder: GatedEncoder
) -> None:
    encoder.rows(["a red circle", "green"])  # cached now (on this thread)
    feed, storage = MemoryFeed(), MemoryStorage()
    engine = new_engine(pool, feed, storage, prepare_thread=True)
    lane = lane_of(engine)
    try:
        hit = feed.submit(generate("a red circle", 1, negative_prompt="green"))
        empty = feed.submit(generate("a red circle", 2, negative_prompt=""))  # "" is ∅, cached
        engine.run_once()
        assert not lane.preparing and {hit.key, empty.key} <= set(lane.jobs)  # prepared at once
        engine.run_until_idle()
        assert engine._prepare_thread is not None and engine._prepare_thread._pool is None
    finally:
        engine.close()
    assert hit.output is not None and empty.output is not None
    assert encoder.threads == ["MainThread"]  # the warm-up call only
    # request / none read the queue only into an empty running set: a miss is encoded at once
    for mode in ("request", "none"):
        engine = new_engine(pool, feed, storage, prepare_thread=True, mode=mode)
        try:
            miss = feed.submit(generate(f"a {mode} dog", 3))
            engine.run_once()
            assert not lane_of(engine).preparing and miss.key in lane_of(engine).jobs
            engine.run_until_idle()
        finally:
            engine.close()
        assert miss.output is not None
    assert encoder.threads == ["MainThread"] * 3


def test_a_ready_job_is_not_held_back_by_an_older_one_being_encoded(
    pool: ModelPool, encoder: GatedEncoder
) -> None:
    """The job in preparation holds no rows and blocks no one: a younger cache hit runs at once;
    the older job joins when its rows are ready, and both give their images alone."""
    encoder.gated.add("a blue dog")
    encoder.rows(["a red circle"])
    feed, storage = MemoryFeed(), MemoryStorage()
    engine = new_engine(pool, feed, storage, prepare_thread=True)
    lane = lane_of(engine)
    older_request = generate("a blue dog", 3)
    younger_request = generate("a red circle", 4, num_inference_steps=8)
    try:
        older = feed.submit(older_request)
        younger = feed.submit(younger_request)
        engine.run_once()
        assert encoder.entered.wait(WAIT_S)
        assert list(lane.preparing) == [older.key] and lane.jobs[younger.key].running_rows == 2
        # its place in admission is its arrival's (admission orders by (arrived_at, seq))
        assert lane.preparing[older.key].seq < lane.jobs[younger.key].seq
        encoder.release.set()
        engine.run_until_idle()
    finally:
        engine.close()
    for ticket, request in ((older, older_request), (younger, younger_request)):
        assert ticket.ends == 1
        for got, solo in zip(pixels(storage, ticket), alone(pool, request), strict=True):
            assert int(np.abs(got - solo).max()) <= 1


def test_the_queue_is_read_only_while_the_jobs_in_preparation_leave_room(
    pool: ModelPool, encoder: GatedEncoder
) -> None:
    """Jobs in preparation count the rows they will take: a burst of new prompts is not drained
    from the queue into this worker's prepare thread beyond what one call can hold."""
    encoder.gated.update({"a blue dog", "yellow square", "green cross", "photo of a cat"})
    feed, storage = MemoryFeed(), MemoryStorage()
    engine = new_engine(pool, feed, storage, prepare_thread=True, max_batch=4)
    lane = lane_of(engine)
    try:
        burst = [
            feed.submit(generate(prompt, i))  # guided: two rows each
            for i, prompt in enumerate(
                ["a blue dog", "yellow square", "green cross", "photo of a cat"]
            )
        ]
        engine.run_once()
        assert list(lane.preparing) == [burst[0].key, burst[1].key]  # 2 + 2 rows = max_batch
        assert feed.taken == [burst[0].id, burst[1].id]
        encoder.release.set()
        engine.run_until_idle()
    finally:
        engine.close()
    assert all(t.ends == 1 and t.output is not None for t in burst)


def test_close_stops_the_prepare_thread(pool: ModelPool, encoder: GatedEncoder) -> None:
    feed, storage = MemoryFeed(), MemoryStorage()
    engine = new_engine(pool, feed, storage, prepare_thread=True)
    feed.submit(generate("a green cat", 1))
    engine.run_until_idle()
    assert any(t.name.startswith("prepare") for t in threading.enumerate())
    engine.close()
    assert not any(t.name.startswith("prepare") for t in threading.enumerate())


def test_a_cache_hit_does_not_wait_for_an_encoding_under_way(
    pool: ModelPool, encoder: GatedEncoder
) -> None:
    """The encoder's LRU is shared by the stepping thread and the prepare thread: its lock guards
    the cache alone, never the forward."""
    encoder.gated.add("a blue dog")
    cached = encoder.rows(["a red circle"])[0]
    assert encoder.cached(["a red circle", ""]) and not encoder.cached(["a blue dog"])
    encoding = threading.Thread(target=encoder.rows, args=(["a blue dog", "a red circle"],))
    encoding.start()
    try:
        assert encoder.entered.wait(WAIT_S)  # the other thread is inside the forward now
        assert encoder.rows(["a red circle"])[0] is cached  # answered from the cache meanwhile
        assert not encoder.cached(["a blue dog"])
    finally:
        encoder.release.set()
        encoding.join(WAIT_S)
    assert encoder.cached(["a blue dog", "a red circle"])


def test_a_job_of_another_size_is_prepared_off_the_thread_in_its_own_lane(
    pool: ModelPool, encoder: GatedEncoder
) -> None:
    """The two features together: a 24×16 job (another image size: its own lane) whose prompt
    misses the cache waits in that lane's preparation while the own-size job steps on; that
    lane is not dropped while it only prepares, and the job gives its images alone."""
    encoder.gated.add("a blue dog")
    feed, storage = MemoryFeed(), MemoryStorage()
    engine = new_engine(pool, feed, storage, prepare_thread=True)
    try:
        running = feed.submit(generate("a red circle", 1, num_inference_steps=20))
        run_until(engine, lambda: len(lane_of(engine).batch) > 0)
        late_request = generate("a blue dog", 2, height=24, width=16)
        late = feed.submit(late_request)
        engine.run_once()
        assert encoder.entered.wait(WAIT_S)
        sized = engine.sized_lanes[(NAME, (24, 16))]
        assert set(sized.preparing) == {late.key}
        calls = engine.stats.network_calls
        for _ in range(3):
            engine.run_once()
        assert engine.stats.network_calls == calls + 3  # the own-size job stepped meanwhile
        assert engine.sized_lanes[(NAME, (24, 16))] is sized  # kept while it prepares
        encoder.release.set()
        engine.run_until_idle()
    finally:
        engine.close()
    assert running.ends == late.ends == 1 and not engine.sized_lanes
    (got,) = pixels(storage, late)
    (solo,) = alone(pool, late_request)
    assert got.shape[:2] == (24, 16) and int(np.abs(got - solo).max()) <= 1


# --- an inpaint or img2img image through a latent model's first stage ---------------------------
class GatedFirstStage:
    """The model's first stage, whose encodings wait for `release` while `gated` (signalling
    `entered` first) and raise while `failing`; it records the thread of every encoding."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.gated = False
        self.failing = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        self.threads.append(threading.current_thread().name)
        if self.gated:
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the first stage"
        if self.failing:
            raise RuntimeError("the first stage broke")
        return self.base.encode(images)


@pytest.fixture
def first_stage(pool: ModelPool) -> Iterator[GatedFirstStage]:
    """The model's first stage, gated, for one test (also for images of other sizes: the
    diffusers module takes any); the loaded one after."""
    model = pool.get(NAME)
    assert isinstance(model, DiffusionModel) and model.first_stage is not None
    loaded, resizable = model.first_stage, model.resizable_first_stage
    gated = GatedFirstStage(loaded)
    model.first_stage = gated  # type: ignore[assignment]
    model.resizable_first_stage = lambda: gated  # type: ignore[assignment,return-value]
    try:
        yield gated
    finally:
        gated.release.set()
        model.first_stage, model.resizable_first_stage = loaded, resizable


@pytest.fixture
def works(monkeypatch: pytest.MonkeyPatch) -> dict[str, DenoiseWork]:
    """Each job's samples as the engine prepared them, by job id (on whichever path)."""
    seen: dict[str, DenoiseWork] = {}

    def spy(spec: Any, model: DiffusionModel, job_id: str, *rest: Any) -> DenoiseWork:
        seen[job_id] = prepare_denoise(spec, model, job_id, *rest)
        return seen[job_id]

    monkeypatch.setattr(engine_module, "prepare_denoise", spy)
    return seen


def b64png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def picture(height: int = 16, width: int = 16) -> np.ndarray:
    """A smooth RGB gradient with a bright square, [height, width, 3] uint8."""
    rows, columns = np.linspace(0, 255, height), np.linspace(0, 255, width)
    image = np.stack(
        np.broadcast_arrays(columns[None, :], rows[:, None], 255 - columns[None, :]), -1
    )
    image[height // 4 : height // 2, width // 4 : width // 2] = 255
    return image.astype(np.uint8)


def keep_left(height: int = 16, width: int = 16) -> np.ndarray:
    """An inpainting mask: keep (white) the left half, generate the right one."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    return mask


def edit(kind: str, prompt: str, seed: int, **fields: Any) -> dict[str, Any]:
    """An img2img or inpaint job on the tiny SD model (guided: two rows per image)."""
    base: dict[str, Any] = {"guidance_scale": 7.5, "num_inference_steps": 4, "seed": seed}
    fields = {"prompt": prompt, **base, **fields}
    image = b64png(fields.pop("image", picture()))
    if kind == "img2img":
        fields.pop("mask", None)
        return specs.img2img(NAME, image, **{"strength": 0.75, **fields})
    mask = b64png(fields.pop("mask", keep_left()))
    return specs.inpaint(NAME, image, mask, **fields)


def image_inputs(work: DenoiseWork) -> list[torch.Tensor]:
    """What the first stage made of a job's image: img2img's x_0, inpaint's known latents and
    latent mask (the same tensors for every sample of a job)."""
    sample = work.samples[0]
    return [t for t in (sample.init_x0, sample.known, sample.mask) if t is not None]


def assert_same_tensors(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_the_running_set_steps_while_an_image_is_encoded(
    pool: ModelPool,
    encoder: GatedEncoder,
    first_stage: GatedFirstStage,
    works: dict[str, DenoiseWork],
    kind: str,
) -> None:
    """The late job's prompt is cached: only its image sends it to the prepare thread, where the
    first stage encodes it while the running job steps; its image latents are the inline path's
    bit for bit, and its images are its own alone."""
    feed, storage = MemoryFeed(), MemoryStorage()
    engine = new_engine(pool, feed, storage, prepare_thread=True)
    lane = lane_of(engine)
    try:
        running = feed.submit(generate("a red circle", 1, num_inference_steps=30))
        run_until(engine, lambda: len(lane.batch) > 0)
        first_stage.gated = True
        late_request = edit(kind, "a red circle", 2, n=2)
        late = feed.submit(late_request)
        engine.run_once()  # takes it: to the prepare thread
        assert first_stage.entered.wait(WAIT_S)
        assert set(lane.preparing) == {late.key} and late.key not in lane.jobs
        calls = engine.stats.network_calls
        steps = lane.jobs[running.key].image_steps
        for _ in range(5):  # the first stage is held: the running job steps on, the late one waits
            engine.run_once()
        assert engine.stats.network_calls == calls + 5
        assert lane.jobs[running.key].image_steps == steps + 5
        assert late in engine.held_tickets() and not engine.idle and not late.finished
        first_stage.release.set()
        run_until(engine, lambda: late.key not in lane.preparing)  # joins at a step boundary
        assert late.key in lane.jobs
        engine.run_until_idle()
    finally:
        engine.close()
    assert first_stage.threads == ["prepare_0"]
    assert encoder.threads.count("prepare_0") == 1  # "a red circle", the running job's miss
    assert running.ends == late.ends == 1
    first_stage.gated = False
    model = pool.get(NAME)
    assert isinstance(model, DiffusionModel)
    inline = prepare_denoise(MemoryTicket("inline", late_request).spec, model, "inline")
    assert first_stage.threads[-1] == "MainThread"
    assert_same_tensors(image_inputs(works[late.id]), image_inputs(inline))
    for got, solo in zip(pixels(storage, late), alone(pool, late_request), strict=True):
        assert int(np.abs(got - solo).max()) <= 1  # rounding of batched float sums


@pytest.mark.parametrize("size", [(16, 16), (24, 16)])
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_an_image_encoded_aside_gives_the_inline_images_bit_for_bit(
    pool: ModelPool,
    encoder: GatedEncoder,
    first_stage: GatedFirstStage,
    works: dict[str, DenoiseWork],
    kind: str,
    size: tuple[int, int],
) -> None:
    """The same job alone, prepare thread on (a new prompt too: both encodings aside) and off:
    the same latents from the first stage, the same noise (each sample's generator is made on
    the stepping thread, and the encoders draw none), the same x_0 and pixels, bit for bit; also
    for an image of another size than the model's (its own lane, the resizable first stage)."""
    images = {"image": picture(*size), "mask": keep_left(*size)}
    request = edit(kind, "a blue dog", 5, n=2, negative_prompt="green", **images)
    results: dict[bool, tuple[DenoiseWork, list[np.ndarray]]] = {}
    for prepare_thread in (True, False):
        feed, storage = MemoryFeed(), MemoryStorage()
        engine = new_engine(pool, feed, storage, prepare_thread=prepare_thread)
        try:
            ticket = feed.submit(request)
            engine.run_until_idle()
        finally:
            engine.close()
        assert ticket.ends == 1 and not engine.sized_lanes
        results[prepare_thread] = (works[ticket.id], pixels(storage, ticket))
        assert results[prepare_thread][1][0].shape[:2] == size
    assert first_stage.threads == ["prepare_0", "MainThread"]
    assert encoder.threads == ["prepare_0"]  # the prompts' miss; the inline run hit the cache
    (inline, inline_pixels), (threaded, threaded_pixels) = results[False], results[True]
    assert_same_tensors(image_inputs(threaded), image_inputs(inline))
    assert torch.equal(
        torch.stack([s.x for s in threaded.samples]), torch.stack([s.x for s in inline.samples])
    )
    for got, want in zip(threaded_pixels, inline_pixels, strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("kind", ["prompt", "img2img", "inpaint"])
@pytest.mark.parametrize("ending", ["cancel", "deadline", "abort"])
def test_a_job_ended_while_its_inputs_are_encoded_ends_exactly_once(
    request: pytest.FixtureRequest, pool: ModelPool, kind: str, ending: str
) -> None:
    """A job held on the prepare thread — its prompt, or its image, being encoded — that is
    canceled, passes its deadline or is aborted ends then, once; its encoding finishing later
    ends nothing again, and the running job is unaffected."""
    gate: GatedEncoder | GatedFirstStage
    if kind == "prompt":
        gate = request.getfixturevalue("encoder")
        gate.gated.add("a blue dog")
        spec = generate("a blue dog", 2)
    else:
        gate = request.getfixturevalue("first_stage")
        gate.gated = True
        spec = edit(kind, "a blue dog", 2)
    feed, storage, clock = MemoryFeed(), MemoryStorage(), Clock()
    engine = new_engine(pool, feed, storage, prepare_thread=True, clock=clock)
    lane = lane_of(engine)
    try:
        other = feed.submit(generate("a red circle", 1, num_inference_steps=6))
        held = feed.submit(spec, deadline=10.0)
        engine.run_once()
        assert gate.entered.wait(WAIT_S) and held.key in lane.preparing
        if ending == "cancel":
            feed.cancel_set.add(held.id)
            engine.run_once()
        elif ending == "deadline":
            clock.now = 11.0
            engine.run_once()
        else:
            engine.abort()
        assert held.ends == 1 and held.key not in lane.preparing
        assert held not in engine.held_tickets()
        gate.release.set()  # its encoding finishes now: nothing may end it again
        engine.run_until_idle()
    finally:
        engine.close()
    assert held.ends == 1 and other.ends == 1 and engine.idle
    if ending == "cancel":
        assert held.canceled and held.error is None
        assert other.output is not None
    elif ending == "deadline":
        assert isinstance(held.error, JobDeadlineExceeded) and not held.canceled
        assert "while its inputs were being encoded" in str(held.error)
        assert other.output is not None  # no deadline of its own (∞)
    else:
        assert isinstance(held.error, WorkerStopped) and isinstance(other.error, WorkerStopped)


@pytest.mark.parametrize(
    ("kind", "breaks"),
    [("img2img", "first stage"), ("inpaint", "first stage"), ("inpaint", "mask")],
)
def test_an_image_encoding_error_fails_only_its_job_with_the_inline_error(
    pool: ModelPool, first_stage: GatedFirstStage, kind: str, breaks: str
) -> None:
    """The first stage raising (a model error), or a mask the image's size does not fit (the
    user's): the job fails with the error the inline path raises; the job beside it completes."""
    fields: dict[str, Any] = {"mask": keep_left(8, 8)} if breaks == "mask" else {}
    first_stage.failing = breaks == "first stage"
    outcomes: dict[bool, tuple[MemoryTicket, MemoryTicket]] = {}
    for prepare_thread in (False, True):
        feed, storage = MemoryFeed(), MemoryStorage()
        engine = new_engine(pool, feed, storage, prepare_thread=prepare_thread)
        try:
            good = feed.submit(generate("a red circle", 1))
            bad = feed.submit(edit(kind, "yellow square", 2, **fields))
            engine.run_until_idle()
        finally:
            engine.close()
        outcomes[prepare_thread] = (good, bad)
    for good, bad in outcomes.values():
        assert good.output is not None and good.ends == 1
        assert bad.ends == 1 and bad.output is None
    inline, threaded = outcomes[False][1].error, outcomes[True][1].error
    expected = RuntimeError if breaks == "first stage" else InvalidJobRequest
    assert type(threaded) is type(inline) is expected and str(threaded) == str(inline)
    if breaks == "first stage":
        assert first_stage.threads == ["MainThread", "prepare_0"]


def test_other_modes_encode_an_image_at_once(pool: ModelPool, first_stage: GatedFirstStage) -> None:
    """request / none read the queue only into an empty running set, where nothing would step
    while the image was encoded: the first stage runs when the job is taken."""
    for mode in ("request", "none"):
        feed, storage = MemoryFeed(), MemoryStorage()
        engine = new_engine(pool, feed, storage, prepare_thread=True, mode=mode)
        try:
            job = feed.submit(edit("img2img", "a red circle", 3))
            engine.run_once()
            assert not lane_of(engine).preparing and job.key in lane_of(engine).jobs
            engine.run_until_idle()
        finally:
            engine.close()
        assert job.output is not None
    assert first_stage.threads == ["MainThread"] * 2
