"""`ddserve generate`: in-process (no URL: the stack starts inside the command) and against a
gateway URL with an API key; the PNG grid's layout, the trajectory GIF, the progress bar, and a
clear exit code for contract errors."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddserve.cli import main
from ddserve.client.grid import image_grid
from ddserve.embedded import LocalServer
from ddserve.generate import resolve_api_key
from tests.client_support import DIFFUSION, tiny_stack, write_zoo

API_KEY = "cli-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with tiny_stack(tmp_path_factory.mktemp("cli"), API_KEY) as stack:
        yield stack


def cells(grid: Image.Image, size: int, padding: int = 2) -> list[np.ndarray]:
    """The images of a grid laid out by image_grid (size = one cell's side)."""
    pixels = np.asarray(grid)
    out = []
    for top in range(padding, grid.height, size + padding):
        for left in range(padding, grid.width, size + padding):
            out.append(pixels[top : top + size, left : left + size])
    return out


def test_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zoo = write_zoo(tmp_path)
    for name in ("DDSERVE_URL", "DDSERVE_API_KEY", "DDSERVE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DDSERVE_ZOO_DIR", str(zoo))
    monkeypatch.setenv("DDSERVE_DEVICE", "cpu")
    out = tmp_path / "grids" / "grid.png"
    argv = ["generate", "--model", DIFFUSION, "--class", "7", "--n", "4", "--steps", "3"]
    code = main([*argv, "--seed", "1", "--out", str(out), "--quiet"])
    assert code == 0
    grid = Image.open(out)
    # 4 images of 8×8, enlarged 4×, 2 per row, 2-pixel padding: 2·32 + 3·2 = 70
    assert grid.size == (70, 70) and grid.mode == "L"
    images = cells(grid, 32)
    assert len(images) == 4 and not np.array_equal(images[0], images[1])
    assert all(np.array_equal(im[::4, ::4].repeat(4, 0).repeat(4, 1), im) for im in images)


def test_against_a_url(server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, gif = tmp_path / "grid.png", tmp_path / "x_t.gif"
    argv = ["generate", "--model", DIFFUSION, "--url", server.url, "--api-key", API_KEY]
    options = ["--n", "3", "--steps", "5", "--seed", "4", "--scale", "1", "--columns", "3"]
    assert main([*argv, *options, "--out", str(out), "--trajectory", str(gif)]) == 0
    assert Image.open(out).size == (3 * 8 + 4 * 2, 8 + 2 * 2)
    assert Image.open(gif).n_frames >= 2
    err = capsys.readouterr().err
    assert "5/5" in err  # the progress bar reached the job's total
    assert f"wrote {out}" in err and "seed 4" in err
    again = tmp_path / "again.png"
    assert main([*argv, *options, "--out", str(again), "--quiet"]) == 0
    assert again.read_bytes() == out.read_bytes()  # same seed, same grid


def test_errors_exit_with_a_message(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "grid.png"
    base = ["generate", "--model", DIFFUSION, "--url", server.url, "--out", str(out), "--quiet"]
    assert main([*base, "--api-key", "wrong"]) == 1
    assert "Unauthorized" in capsys.readouterr().err
    assert main([*base, "--api-key", API_KEY, "--class", "12"]) == 1
    err = capsys.readouterr().err
    assert "ValidationError" in err and "class_label" in err
    assert main([*base, "--api-key", API_KEY, "--class", "seven"]) == 1  # not a class name
    assert "has the classes 0, 1" in capsys.readouterr().err
    assert not out.exists()


def test_an_empty_api_key_counts_as_not_given_with_a_note(
    server: LocalServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "grid.png"
    base = ["generate", "--model", DIFFUSION, "--url", server.url, "--out", str(out), "--quiet"]
    fast = ["--n", "1", "--steps", "2"]
    # `--api-key "$KEY"` with KEY unset: the key of the environment is used, and the user told.
    monkeypatch.setenv("DDSERVE_API_KEY", API_KEY)
    assert main([*base, *fast, "--api-key", ""]) == 0
    err = capsys.readouterr().err
    assert "--api-key is empty (an unset shell variable?): ignored" in err
    assert "sending no API key" not in err and out.exists()
    # `--api-key $KEY` unquoted: the shell drops the value; no key anywhere: a note, then the 401.
    monkeypatch.setenv("DDSERVE_API_KEY", "  ")
    assert main([*base[:-1], "--api-key", "--quiet", *fast]) == 1
    err = capsys.readouterr().err
    assert "--api-key is empty" in err and "DDSERVE_API_KEY is empty" in err
    assert "sending no API key: a gateway with auth on answers 401" in err
    assert "Unauthorized" in err


def test_api_key_resolution() -> None:
    env = {"DDSERVE_API_KEY": "from-env"}
    assert resolve_api_key("flag", env) == ("flag", [])
    assert resolve_api_key(None, env) == ("from-env", [])
    assert resolve_api_key(" key-from-a-file\n", {}) == ("key-from-a-file", [])
    assert resolve_api_key(None, {}) == (None, [])  # no key and no empty one: nothing to say
    key, notes = resolve_api_key(None, {"DDSERVE_API_KEY": ""})
    assert (
        key is None and notes[0] == "DDSERVE_API_KEY is empty (an unset shell variable?): ignored"
    )


def test_image_grid_layout() -> None:
    def png(value: int, mode: str = "L") -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, (4, 3), value if mode == "L" else (value, 0, 0)).save(buffer, "PNG")
        return buffer.getvalue()

    grid = image_grid([png(v) for v in (10, 20, 30, 40, 50)], scale=2, padding=1)
    assert grid.size == (3 * 8 + 4, 2 * 6 + 3) and grid.mode == "L"  # ⌈√5⌉ = 3 columns
    pixels = np.asarray(grid)
    assert pixels[1, 1] == 10 and pixels[1, 10] == 20 and pixels[8, 1] == 40 and pixels[8, 19] == 0
    assert image_grid([png(10), png(99, "RGB")]).mode == "RGB"
    with pytest.raises(ValueError):
        image_grid([])


def test_url_mode_never_imports_torch() -> None:
    """Against a URL the command needs only the client: it runs where torch cannot be imported
    (here nothing listens on the port, so it ends with ConnectionFailed and exit code 1)."""
    import subprocess
    import sys

    program = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnxruntime", "workers"):
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Block())
from ddserve.cli import main
code = main(["generate", "--model", "m", "--url", "http://127.0.0.1:9", "--quiet"])
print("exit", code, "torch" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "exit 1 False", result.stderr[-2000:]
    assert "ConnectionFailed" in result.stderr
