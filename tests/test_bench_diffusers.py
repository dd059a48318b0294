"""`benchmarks/bench_diffusers.py` keeps working: its smallest configuration end to end (the tiny
pixel pipeline, the per-request diffusers server and a continuous-batching ddserve stack on the
real Redis, a few requests), and its report on figures made up here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_diffusers import main, make_requests, markdown_table, ratios, targets
from tests.redis_sandbox import REDIS_URL, redis_or_skip

pytest.importorskip("diffusers")


def figures(rate: float, p50: float) -> dict[str, float]:
    return {"requests_per_s": rate, "images_per_s": rate, "p50_s": p50, "p99_s": 2 * p50}


def test_report_ratios_and_targets() -> None:
    result = {
        "diffusers_capacity_req_s": 0.5,
        "bare_seconds_per_row": {"1": 0.6, "4": 0.4, "16": 0.45},
        "points": [
            {
                "kind": "closed",
                "value": 1,
                "systems": {"continuous": figures(0.48, 2.1), "diffusers": figures(0.5, 2.0)},
            },
            *(
                {
                    "kind": "open",
                    "value": load,
                    "systems": {"diffusers": figures(0.4, 8.0), "continuous": figures(0.4, p50)},
                }
                for load, p50 in ((0.5, 3.0), (0.9, 3.0), (1.3, 3.0))
            ),
            {
                "kind": "closed",
                "value": 32,
                "systems": {"diffusers": figures(0.5, 60.0), "continuous": figures(0.6, 50.0)},
            },
        ],
    }
    assert ratios(result)["continuous"]["closed 32"]["throughput"] == pytest.approx(1.2)
    found = targets(result)
    assert found["throughput at c = 32 ≥ 1.5×"] == (pytest.approx(1.2), False)
    assert found["p50 at the middle rate ≤ 0.5×"] == (pytest.approx(0.375), True)
    assert found["p50 at c = 1 within 10 %"] == (pytest.approx(1.05), True)
    table = markdown_table(result)
    # columns in the fixed order diffusers, request, continuous whatever order the run took
    assert "| closed c = 1 | 0.500 | 2.0 / 4.0 | 0.480 | 2.1 / 4.2 | 0.96×, 1.05× |" in table
    assert "throughput at c = 32 ≥ 1.5×: 1.20× — NOT met" in table
    assert "the most batching can gain here: 1.50× (batch 4)" in table


def test_request_mix_is_seeded_and_weighted() -> None:
    bodies = make_requests("m", True, 400, [2, 5, 10], [0.6, 0.3, 0.1], seed=3)
    assert bodies == make_requests("m", True, 400, [2, 5, 10], [0.6, 0.3, 0.1], seed=3)
    share = sum(b["num_inference_steps"] == 2 for b in bodies) / len(bodies)
    assert 0.5 < share < 0.7
    assert {b["guidance_scale"] for b in bodies} == {1.0, 7.5}
    assert all(b["prompt"] for b in bodies)
    # a negative prompt only where there is guidance (ddserve refuses it with s = 1)
    assert {b["guidance_scale"] for b in bodies if "negative_prompt" in b} == {7.5}
    assert "prompt" not in make_requests("m", False, 5, [2], [1.0], seed=3)[0]


def test_smallest_configuration_end_to_end(tmp_path: Path) -> None:
    redis_or_skip()
    argv = ["--models", "tiny", "--systems", "diffusers", "continuous"]
    argv += ["--concurrency", "1", "2", "--closed-requests", "2", "--loads", "1.0"]
    argv += ["--open-requests", "2", "--step-scale", "0.1", "--redis-url", REDIS_URL]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "diffusers_tiny.json").read_text())
    assert [(p["kind"], p["value"]) for p in result["points"]] == [
        ("closed", 1),
        ("open", 1.0),
        ("closed", 2),
    ]
    for point in result["points"]:
        assert set(point["systems"]) == {"diffusers", "continuous"}
        for found in point["systems"].values():
            assert found["requests"] == 2 and found["p50_s"] > 0
    assert result["steps"] == [2, 5, 10]
    # the open loop's rates are fractions of the diffusers server's throughput at c = 1
    first = result["points"][0]["systems"]["diffusers"]["requests_per_s"]
    assert result["diffusers_capacity_req_s"] == first
    assert set(result["targets"]) == {
        "throughput at c = 2 ≥ 1.5×",
        "p50 at the middle rate ≤ 0.5×",
        "p50 at c = 1 within 10 %",
    }


def test_text_pipeline_end_to_end(tmp_path: Path) -> None:
    """The text pipeline's mix (prompts, guidance 7.5 or 1, negative prompts) is accepted by both
    servers: one closed-loop point at c = 1."""
    redis_or_skip()
    # --seed 7: the point's requests (drawn from seed 8) hold s = 1, s = 7.5 and a negative prompt
    sent = make_requests("tiny-sd", True, 4, [2, 5, 10], [0.6, 0.3, 0.1], seed=8)
    assert {b["guidance_scale"] for b in sent} == {1.0, 7.5}
    assert any("negative_prompt" in b for b in sent)
    argv = ["--models", "tiny-sd", "--systems", "diffusers", "continuous", "--concurrency", "1"]
    argv += ["--closed-requests", "3", "--loads", "--step-scale", "0.1", "--seed", "7"]
    assert main([*argv, "--redis-url", REDIS_URL, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "diffusers_tiny-sd.json").read_text())
    (point,) = result["points"]
    assert {name: f["requests"] for name, f in point["systems"].items()} == {
        "diffusers": 3,
        "continuous": 3,
    }
