"""A job as the contract shows it: a `JobSnapshot` plus signed links for its images."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ddserve.jobs import JobStatus
from ddserve.storage import Storage
from service.jobstore import JobSnapshot


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 6)


def _image(record: dict[str, Any], storage: Storage, base_url: str) -> dict[str, Any]:
    key = record.get("key")
    image = {
        "url": storage.url(key, base_url) if key else None,
        "width": record.get("width"),
        "height": record.get("height"),
        "seed": record.get("seed"),
    }
    if record.get("b64") is not None:
        image["b64"] = record["b64"]
    return image


def output_view(output: dict[str, Any], storage: Storage, base_url: str) -> dict[str, Any]:
    """The worker's JobOutput (storage keys) → the public output (URLs)."""
    trajectory = output.get("trajectory_key")
    corrupted = output.get("corrupted")
    view: dict[str, Any] = {
        "images": [_image(r, storage, base_url) for r in output.get("images") or []],
        "latents": output.get("latents"),
        "trajectory_url": storage.url(trajectory, base_url) if trajectory else None,
    }
    if output.get("codes") is not None:
        view["codes"] = output["codes"]
    if corrupted is not None:
        view["corrupted"] = [_image(r, storage, base_url) for r in corrupted]
    return view


def job_view(snap: JobSnapshot, storage: Storage, base_url: str) -> dict[str, Any]:
    """The contract's job object."""
    progress = None
    if snap.progress and snap.progress.get("total"):
        total = int(snap.progress["total"])
        step = total if snap.status == JobStatus.SUCCEEDED else int(snap.progress.get("step", 0))
        progress = {"step": step, "total": total, "fraction": round(min(1.0, step / total), 4)}
    error = None
    if snap.error:
        error = {
            "type": str(snap.error.get("type", "server_error")),
            "code": str(snap.error.get("code", "job_failed")),
            "message": str(snap.error.get("message", "the job failed")),
        }
    return {
        "id": snap.id,
        "kind": snap.kind,
        "model": snap.model,
        "status": snap.status.value,
        "created_at": _iso(snap.created_at),
        "started_at": _iso(snap.started_at),
        "completed_at": _iso(snap.ended_at) if snap.terminal else None,
        "queue_position": snap.queue_position,
        "progress": progress,
        "input": snap.input,
        "output": output_view(snap.output, storage, base_url) if snap.output else None,
        "error": error,
        "metrics": {
            "queue_time_s": _seconds(snap.enqueued_at or snap.created_at, snap.started_at),
            "run_time_s": _seconds(snap.started_at, snap.ended_at) if snap.terminal else None,
            "batch_size": snap.batch_size,
        },
    }
