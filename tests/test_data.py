"""Datasets: shapes (determinism, labels ↔ pixels ↔ captions), the prompt tokenizer, folder loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import load_dataset
from models.data.shapes import BACKGROUND, COLOUR_RGB, load_shapes, render_shapes
from models.data.text import COLOURS, SHAPES, VOCABULARY, encode_prompt, null_tokens


def test_shapes_is_deterministic_and_prefix_stable() -> None:
    a = load_shapes("test", n=64)
    b = load_shapes("test", n=64)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels["shape"], b.labels["shape"])
    longer = load_shapes("test", n=100)
    assert torch.equal(longer.images[:64], a.images)
    other = load_shapes("test", n=64, seed=123)
    assert not torch.equal(other.images, a.images)


def test_shapes_train_and_test_differ_and_have_default_sizes() -> None:
    test = load_shapes("test")
    assert test.images.shape == (1000, 3, 32, 32)
    assert test.images.dtype == torch.float32
    assert float(test.images.min()) >= -1.0 and float(test.images.max()) <= 1.0
    train_head = load_shapes("train", n=len(test))
    assert not torch.equal(train_head.images, test.images)
    assert set(test.labels["shape"].tolist()) == set(range(len(SHAPES)))
    assert set(test.labels["colour"].tolist()) == set(range(len(COLOURS)))


def test_shapes_labels_match_pixels_and_captions() -> None:
    data = load_shapes("train", n=200, seed=7)
    assert data.captions is not None
    background = torch.tensor(BACKGROUND * 2 - 1)[:, None]  # [3, 1]
    for i in range(len(data)):
        shape = SHAPES[int(data.labels["shape"][i])]
        colour = int(data.labels["colour"][i])
        assert data.captions[i] == f"{COLOURS[colour]} {shape}"
        pixels = data.images[i].reshape(3, -1)  # [3, 1024]
        # The pixel farthest from the background is fully covered by the shape: its colour.
        far = (pixels - background).abs().sum(0).argmax()
        expected = torch.tensor(COLOUR_RGB[colour] * 2 - 1)
        assert torch.allclose(pixels[:, far], expected, atol=1e-5)


def test_shape_kinds_have_their_geometry() -> None:
    # Same centre, radius, angle: the circle covers more than the square's corners-in, the cross
    # leaves its quadrant corners empty, the triangle is the smallest.
    n = len(SHAPES)
    pixels = render_shapes(
        np.arange(n),
        np.zeros(n, dtype=np.int64),
        np.full((n, 2), 16.0),
        np.full(n, 10.0),
        np.zeros(n),
    )
    coverage = (np.abs(pixels - BACKGROUND[None, :, None, None]).sum(1) > 0.5).sum((1, 2))
    by_name = dict(zip(SHAPES, coverage.tolist(), strict=True))
    assert abs(by_name["circle"] - np.pi * 100) < 0.05 * np.pi * 100
    assert abs(by_name["square"] - 16**2) < 0.1 * 16**2
    assert by_name["triangle"] < by_name["cross"] < by_name["square"] < by_name["circle"]
    cross = pixels[SHAPES.index("cross")]
    assert np.allclose(cross[:, 16 + 6, 16 + 6], BACKGROUND)  # a corner between the arms


def test_shapes_rejects_bad_split() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_shapes("validation")
    with pytest.raises(ValueError, match="'all'"):
        load_shapes("all", n=3)


def test_encode_prompt_pads_and_is_case_insensitive() -> None:
    tokens = encode_prompt("Red  Triangle!", VOCABULARY, 4)
    assert tokens == [VOCABULARY.index("red"), VOCABULARY.index("triangle"), 0, 0]
    assert null_tokens(4) == [0, 0, 0, 0]
    assert VOCABULARY[0] == "<pad>"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("purple blob", "unknown word.*'purple', 'blob'.*Vocabulary: red"),
        ("red <pad>", "unknown word.*'<pad>'"),
        ("   ", "no words"),
        ("red red red red red", "at most 4"),
    ],
)
def test_encode_prompt_errors_are_clear(prompt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_prompt(prompt, VOCABULARY, 4)


def test_text_module_does_not_import_torch() -> None:
    code = "import sys, models.data.text; assert 'torch' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def _write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for label, value in (("cats", 40), ("dogs", 200)):
        (root / label).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(value, 5, size=(20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    (root / "notes.txt").write_text("not an image")


def test_folder_loader_labels_from_subfolders(tmp_path: Path) -> None:
    from models.data.folder import load_folder

    _write_folder(tmp_path)
    train = load_folder(tmp_path, split="train", image_size=8, channels=3)
    test = load_folder(tmp_path, split="test", image_size=8, channels=3)
    everything = load_folder(tmp_path, split="all", image_size=8, channels=1)
    assert train.images.shape[1:] == (3, 8, 8) and everything.images.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == len(everything) == 20
    assert len(test) >= 2
    assert train.label_names["class"] == ["cats", "dogs"]
    # Dark images are cats, bright ones dogs: the labels follow the sub-folders.
    for data in (train, test):
        brightness = data.images.mean((1, 2, 3))
        assert torch.equal(brightness > 0, data.labels["class"] == 1)
    again = load_folder(tmp_path, split="test", image_size=8, channels=3)
    assert torch.equal(again.images, test.images)
    assert len(load_dataset("folder", "train", root=tmp_path, image_size=8, channels=3)) == len(
        train
    )


def test_folder_loader_without_subfolders_and_errors(tmp_path: Path) -> None:
    from models.data.folder import load_folder

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        Image.fromarray(np.full((9, 9), i * 50, dtype=np.uint8)).save(flat / f"{i}.jpg")
    data = load_folder(flat, split="all", image_size=4, channels=1)
    assert len(data) == 5 and data.labels == {}
    with pytest.raises(ValueError, match="no images"):
        load_folder(tmp_path / "missing", split="all")
    with pytest.raises(ValueError, match="channels"):
        load_folder(flat, split="all", channels=2)
