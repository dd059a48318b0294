"""A failing network call fails only the rows that fail on their own: split the call and retry.

One network call carries the rows of many jobs. When it raises (out of memory, a kernel error) or
returns NaN/±inf in some rows, failing the whole call would fail every job in it for one bad row.
`IsolatingNetwork` wraps the network instead:

    f(rows): y = net(rows); if it raised or y has non-finite rows:
                 if len(rows) = 1: the row fails (its cause is recorded, its output is NaN)
                 else: f(first half) ++ f(second half)

so innocent rows are recomputed in calls without the bad rows (bisection, as for a poisoned batch in
dynamic-batching servers), and a row is declared bad only when it fails on its own. With k bad rows
among n this costs at most about 2·k·log₂ n extra calls, and nothing while every call is fine.
A call that ran out of memory only because it was too large splits until the halves fit, and no
row fails at all; the network then remembers the size that fitted (`max_rows`: the largest piece
that ran) and cuts every later call into pieces of at most that many rows, so a running set larger
than the device allows costs one out-of-memory error, not one per step (the lane also lowers its
admission limit to it: `workers.memory_budget`). A row that runs out of memory even alone is that
job's own problem: the call teaches nothing about size then, and the limit stays.

The output rows of failed rows are NaN, so that whatever the sampler computes from them stays
non-finite; the caller (the engine) finds the samples whose x_t is no longer finite and fails their
jobs with the recorded cause (`cause`), while every other row goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from models.diffusion.sampler import DenoisingBatch, NetworkFn, Sample
from workers.errors import ModelCallFailed, ModelOutOfMemory, NonFiniteOutput

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError (a RuntimeError), a host MemoryError, or an allocator message."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc)


def finite_rows(y: torch.Tensor) -> torch.Tensor:
    """[N] True where every value of row i of y [N, ...] is finite."""
    return torch.isfinite(y.reshape(y.shape[0], -1)).all(dim=1)


class IsolatingNetwork:
    """ε_θ(x [N, C, H, W], t [N], cond [N, ...] | None) → [N, C, H, W], splitting failed calls.

    After each call, `failures` maps the row index (in that call) of every row that failed on its
    own to the reason (`NonFiniteOutput`, `ModelOutOfMemory` or `ModelCallFailed`). `max_rows`
    (None: no limit) is the largest call made; calls over it are cut into pieces. `out_channels`:
    the output's channels where they are not the input's (an inpainting UNet reads x_t with its
    mask and masked image, 2C + 1 channels, and predicts C): a failed row's NaN row has them."""

    def __init__(
        self, network: NetworkFn, max_rows: int | None = None, out_channels: int | None = None
    ) -> None:
        self.network = network
        self.out_channels = out_channels
        self.failures: dict[int, BaseException] = {}
        self.splits = 0  # calls split so far (for the logs and tests)
        self.max_rows = max_rows
        self._out_of_memory = False
        self._largest_ran = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        self.failures = {}
        self._out_of_memory = False  # some piece of this call ran out of memory
        self._largest_ran = 0  # rows of the largest piece of this call that ran
        size = self.max_rows
        if size is None or x.shape[0] <= size:
            y = self._run(x, t, cond, offset=0)
        else:
            parts = []
            for start in range(0, x.shape[0], size):  # pieces of a call too large for the device
                stop = start + size
                part_cond = None if cond is None else cond[start:stop]
                parts.append(self._run(x[start:stop], t[start:stop], part_cond, offset=start))
            y = torch.cat(parts)
        alone = any(isinstance(f, ModelOutOfMemory) for f in self.failures.values())
        fitted = self._largest_ran
        if (
            self._out_of_memory
            and not alone
            and fitted
            and (self.max_rows is None or fitted < self.max_rows)
        ):
            log.warning("out of memory at %d rows: calls now hold at most %d", x.shape[0], fitted)
            self.max_rows = fitted
        return y

    def _nan_rows(self, x: torch.Tensor) -> torch.Tensor:
        """NaN rows of the output's shape for the input `x` [N, C_in, H, W]."""
        channels = self.out_channels or x.shape[1]
        shape = (x.shape[0], channels, *x.shape[2:])
        return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)

    def _run(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, offset: int
    ) -> torch.Tensor:
        rows = x.shape[0]
        try:
            y = self.network(x, t, cond)  # [rows, C, H, W]
        except Exception as exc:
            if is_out_of_memory(exc):
                self._out_of_memory = True
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the halves need the memory the failed call cached
            if rows == 1:
                self.failures[offset] = row_error(exc, t, "model")
                return self._nan_rows(x)
            log.warning("network call over %d rows failed (%s); splitting it", rows, exc)
            return self._split(x, t, cond, offset)
        self._largest_ran = max(self._largest_ran, rows)
        if bool(torch.isfinite(y).all()):  # the usual case, in one reduction
            return y
        finite = finite_rows(y)
        if rows == 1:
            self.failures[offset] = NonFiniteOutput(
                f"the model produced NaN or infinite values for this job's sample at timestep "
                f"t={int(t[0])}, also when run alone; the rest of its batch went on without it"
            )
            return torch.full_like(y, float("nan"))
        log.warning(
            "network call over %d rows returned %d non-finite rows; splitting it",
            rows,
            int((~finite).sum()),
        )
        return self._split(x, t, cond, offset)

    def _split(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, offset: int
    ) -> torch.Tensor:
        self.splits += 1
        half = x.shape[0] // 2
        parts = []
        for start, stop in ((0, half), (half, x.shape[0])):
            part_cond = None if cond is None else cond[start:stop]
            parts.append(self._run(x[start:stop], t[start:stop], part_cond, offset + start))
        return torch.cat(parts)


class IsolatingClassifier:
    """f_φ(x_t [N, C, H, W], t [N]) → logits [N, K] for classifier guidance, splitting failed calls.

    The classifier's gradient g = ∇ log f_φ(y | x_t) is taken through this call, so a row that
    fails on its own gets logits that are NaN *and depend on its x_t* (NaN · Σ x_t): its gradient,
    and through it its x_t, turn non-finite, and the engine fails its job like a network failure.
    Rows that fail alone are found by the same bisection as `IsolatingNetwork`; when no row succeeds
    (K unknown, every job would fail anyway) the first error is raised as before.

    `failures` maps the row index (among the classifier-guided rows of the call) to the reason."""

    def __init__(self, classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.classifier = classifier
        self.failures: dict[int, BaseException] = {}
        self.splits = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.failures = {}
        parts: list[torch.Tensor | int] = []  # in row order: logits [rows, K], or a failed row
        errors: list[BaseException] = []
        self._run(x, t, 0, parts, errors)
        classes = next((p.shape[1] for p in parts if isinstance(p, torch.Tensor)), None)
        if classes is None:
            raise errors[0]
        return torch.cat(
            [
                p
                if isinstance(p, torch.Tensor)
                else (x[p : p + 1].flatten(1).sum(1, keepdim=True) * float("nan")).expand(
                    -1, classes
                )
                for p in parts
            ]
        )

    def _run(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        offset: int,
        parts: list[torch.Tensor | int],
        errors: list[BaseException],
    ) -> None:
        rows = x.shape[0]
        try:
            parts.append(self.classifier(x, t))  # [rows, K]
            return
        except Exception as exc:
            if is_out_of_memory(exc) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if rows == 1:
                errors.append(exc)
                self.failures[offset] = row_error(exc, t, "guidance classifier")
                parts.append(offset)
                return
            log.warning("classifier call over %d rows failed (%s); splitting it", rows, exc)
        self.splits += 1
        half = rows // 2
        self._run(x[:half], t[:half], offset, parts, errors)
        self._run(x[half:], t[half:], offset + half, parts, errors)


def row_error(exc: BaseException, t: torch.Tensor, component: str) -> BaseException:
    """Why one row failed even when run alone: out of memory, or another error of `component`."""
    if is_out_of_memory(exc):
        return ModelOutOfMemory(
            f"the {component} ran out of memory on this job's sample at timestep t={int(t[0])} "
            f"even when run alone ({type(exc).__name__}: {exc}); the rest of its batch went on"
        )
    return ModelCallFailed(
        f"the {component} failed on this job's sample at timestep t={int(t[0])} even when run "
        f"alone ({type(exc).__name__}: {exc}); the rest of its batch went on without it"
    )


def non_finite_samples(
    batch: DenoisingBatch,
    row_samples: list[Sample],
    finished: list[Sample],
    network: IsolatingNetwork,
    classifier: IsolatingClassifier | None,
) -> dict[int, BaseException | None]:
    """After a step: the samples whose x_t is no longer finite (by `id(sample)`; running ones in
    `batch`, and `finished` ones), each with the cause the isolating wrappers recorded for its row
    (None: the output was NaN/±inf without a recorded cause). A row that failed on its own gets
    NaN output, which the sampler's update carries into x_t.

    `row_samples` is the sample behind each row of the step's network call; the classifier's rows
    are the step's samples with classifier guidance, in batch order."""
    bad: set[int] = set()
    if len(batch) and not bool(torch.isfinite(batch.x).all()):
        running_ok = finite_rows(batch.x).tolist()  # [B]
        bad.update(id(s) for s, ok in zip(batch.samples, running_ok, strict=True) if not ok)
    for sample in finished:
        if not bool(torch.isfinite(sample.x).all()):
            bad.add(id(sample))
    if not bad:
        return {}
    causes: dict[int, BaseException] = {}  # id(sample) → why its row failed
    for row, cause in network.failures.items():
        causes.setdefault(id(row_samples[row]), cause)
    if classifier is not None and classifier.failures:
        samples = list({id(s): s for s in row_samples}.values())
        steered = [s for s in samples if s.settings.classifier_scale != 0.0]
        for row, cause in classifier.failures.items():
            causes.setdefault(id(steered[row]), cause)
    return {key: causes.get(key) for key in bad}
