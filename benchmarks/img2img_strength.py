"""What `strength` does on the zoo's models: image-to-image (SDEdit) sweeps, measured side by side.

For each strength, n images (seeds s, s + 1, …) are drawn from one input through the worker's own
path (`workers.execute.prepare_denoise`, the model's running set, `to_pixels`), and scored:

- digits-ddpm (pixel space): the example seven (`examples/digit.png`) redrawn with class_label 3
  (DDIM 50, guidance 4): the mean |output − input| in 0–255 units, and the share of outputs the
  zoo's evaluation classifier reads as 7 (kept) and as 3 (the new condition);
- shapes-ldm (latent): a "red circle" it generated itself, redrawn with the prompt "blue square":
  the mean |output − input|, and the evaluation classifier's colour and shape reads (shares).

Small strengths keep the input (up to the noise of the first level and, for the latent model, its
autoencoder's reconstruction), strength 1 ignores it (= generate with the same seed).

    .venv/bin/python benchmarks/img2img_strength.py [--n 16] [--strengths 0.1 0.3 0.5 0.7 0.9 1.0]

Writes benchmarks/results/img2img_strength.json. Not a test: CPU minutes on the real zoo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddserve.settings import Settings
from ddserve.spec import Img2ImgSpec, parse_job_spec
from models.data.text import encode_prompt
from models.evaluation.features import load_eval_classifier
from workers.execute import encode_image, prepare_denoise
from workers.model_pool import DiffusionModel, ModelPool

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run(model: DiffusionModel, spec: Any) -> torch.Tensor:
    """The spec's images [n, C, H, W] in [−1, 1], run alone through the worker's path."""
    work = prepare_denoise(spec, model, "bench")
    batch = model.new_batch()
    batch.add(work.samples)
    with torch.no_grad():
        while len(batch):
            batch.step()
    return model.to_pixels(torch.stack([s.x for s in work.samples]))


def b64(image: torch.Tensor) -> str:
    import base64

    return base64.b64encode(encode_image(image)).decode("ascii")


def spec_of(model: DiffusionModel, image: torch.Tensor, strength: float, n: int, **cond: Any):
    fields = {
        "kind": "img2img",
        "model": model.name,
        "image": b64(image),
        "strength": strength,
        "n": n,
        "sampler": "ddim",
        "num_inference_steps": 50,
        "eta": 0.0,
        "guidance_scale": 4.0,
        "classifier_scale": 0.0,
        "clip_denoised": model.clip_denoised,
        "seed": 100,
        **cond,
    }
    spec = parse_job_spec(fields)
    assert isinstance(spec, Img2ImgSpec)
    return spec


def tokens(model: DiffusionModel, prompt: str) -> dict[str, Any]:
    cond = model.entry.conditioning
    assert cond is not None and cond.vocabulary
    ids = encode_prompt(prompt, cond.vocabulary, cond.context_len or len(cond.vocabulary))
    return {"prompt": prompt, "prompt_tokens": ids}


def share(predicted: torch.Tensor, names: list[str], name: str) -> float:
    return float((predicted == names.index(name)).float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9, 1])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pool = ModelPool(Settings(device="cpu", onnx_providers="CPUExecutionProvider"))
    results: dict[str, Any] = {"n": args.n, "sampler": "ddim", "steps": 50, "guidance": 4.0}

    digits = pool.get("digits-ddpm")
    assert isinstance(digits, DiffusionModel)
    seven = np.asarray(Image.open(ROOT / "examples" / "digit.png").convert("L"), np.float32)
    seven_t = torch.from_numpy(seven / 127.5 - 1.0)[None]  # [1, 16, 16]
    digit_clf = load_eval_classifier("digits")
    digit_names = next(iter(digit_clf.label_names.values()))
    rows = []
    for strength in args.strengths:
        out = run(digits, spec_of(digits, seven_t, strength, args.n, class_label=3))
        read = next(iter(digit_clf.measure(out).predicted.values()))
        rows.append(
            {
                "strength": strength,
                "mean_abs_diff_255": float((out - seven_t).abs().mean() * 127.5),
                "read_as_7": share(read, digit_names, "7"),
                "read_as_3": share(read, digit_names, "3"),
            }
        )
        print("digits-ddpm", rows[-1], flush=True)
    results["digits-ddpm (7 → class 3)"] = rows

    shapes = pool.get("shapes-ldm")
    assert isinstance(shapes, DiffusionModel)
    source = run(
        shapes, spec_of(shapes, torch.zeros(3, 32, 32), 1.0, 1, **tokens(shapes, "red circle"))
    )[0]
    shape_clf = load_eval_classifier("shapes")
    rows = []
    for strength in args.strengths:
        out = run(
            shapes, spec_of(shapes, source, strength, args.n, **tokens(shapes, "blue square"))
        )
        reads = shape_clf.measure(out).predicted
        row: dict[str, Any] = {
            "strength": strength,
            "mean_abs_diff_255": float((out - source).abs().mean() * 127.5),
        }
        for label_set, predicted in reads.items():  # the share of each class read, where > 0
            names = shape_clf.label_names[label_set]
            shares = {name: share(predicted, names, name) for name in names}
            row[label_set] = {name: value for name, value in shares.items() if value > 0}
        rows.append(row)
        print("shapes-ldm", row, flush=True)
    results["shapes-ldm (red circle → blue square)"] = rows

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "img2img_strength.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
