"""The playground page (`GET /`) in a real headless browser: Debian's Chromium driven by Playwright's
Python package (`executable_path`, no downloaded browser), against the gateway and a worker thread
on a zoo of tiny models with auth on. The page asks for the API key, then: a generation is
submitted and its images and trajectory appear; a mask is drawn with the mouse and the inpainted
variations appear (the mask sent is checked pixel by pixel); the DAE-style corrupted input and the
reconstruction appear; a latent interpolation strip appears. Plus the static routes without a
browser. `make test` installs Chromium (`make browser`); without it the browser test is skipped."""

from __future__ import annotations

import base64
import io
import json
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from ddserve.embedded import LocalServer
from tests.client_support import CODEC, DIFFUSION, start_stack

API_KEY = "playground-" + uuid.uuid4().hex
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 40_000  # per wait: generous for a loaded 2-core machine; a pass takes a few seconds


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    stack = start_stack(tmp_path_factory.mktemp("playground"), API_KEY)
    try:
        yield stack
    finally:
        stack.stop()


def test_page_and_files_are_served_without_a_key(server: LocalServer) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="playground/playground.js"' in page.text
    script = httpx.get(server.url + "/playground/playground.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    index = httpx.get(server.url + "/playground/samples/index.json").json()
    for sample in index["samples"]:
        png = httpx.get(f"{server.url}/playground/samples/{sample['file']}")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(png.content))
        assert picture.size == (sample["width"], sample["height"])
    for escape in ("../routers/playground.py", "..%2F..%2Fapp.py", "nothing.js", "samples"):
        answer = httpx.get(f"{server.url}/playground/{escape}")
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/models").status_code == 401  # the API itself still needs it
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/playground") for p in paths)


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def all_loaded(selector: str, count: int) -> str:
    """JS predicate: `count` images under `selector`, every one decoded."""
    return (
        f"(() => {{ const imgs = [...document.querySelectorAll({json.dumps(selector)})];"
        f" return imgs.length === {count} && imgs.every(i => i.complete && i.naturalWidth > 0); }})()"
    )


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (make browser installs it)")
def test_playground_in_a_browser(server: LocalServer) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            run_the_page(page, server.url)
            assert errors == []
        finally:
            browser.close()


def run_the_page(page: Any, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    # Auth is on: the page says so, then works once the key is typed (kept in localStorage).
    assert "needs an API key" in page.inner_text("#global-error")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelectorAll('#gen-model option').length > 0")
    assert page.evaluate("localStorage.getItem('ddserve.apiKey')") == API_KEY
    assert page.is_hidden("#global-error")
    assert page.input_value("#gen-model") == DIFFUSION

    # Generate: 4 images of class 3 and the trajectory GIF.
    page.fill("#gen-steps", "4")
    page.fill("#gen-n", "4")
    page.fill("#gen-seed", "7")
    page.select_option("#gen-class", "3")
    # The model list reloads (the key is entered again): the choices made stay.
    loads = int(page.get_attribute("body", "data-model-loads"))
    page.dispatch_event("#api-key", "change")
    page.wait_for_function(f"Number(document.body.dataset.modelLoads) > {loads}")
    assert page.input_value("#gen-class") == "3" and page.input_value("#gen-steps") == "4"
    with page.expect_request(lambda r: r.url.endswith("/generate")) as sent:
        page.click("#gen-submit")
    body = json.loads(sent.value.post_data)
    assert body["class_label"] == 3 and body["num_inference_steps"] == 4 and body["seed"] == 7
    page.wait_for_function(all_loaded("#gen-grid img", 4))
    page.wait_for_function(all_loaded("#gen-trajectory-img", 1))
    assert page.inner_text("#gen-progress").startswith("succeeded")
    assert page.get_attribute("#gen-progress", "data-state") == "done"
    assert "seed 7" in page.inner_text("#gen-caption")

    # Inpaint: a test image is preselected; drag a diagonal stroke across the mask canvas.
    page.click("button[data-tab=inpaint]")
    page.wait_for_function("document.getElementById('inp-image').width === 8")
    page.fill("#inp-brush", "2")
    page.dispatch_event("#inp-brush", "input")
    box = page.locator("#inp-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.8, steps=10)
    page.mouse.up()
    painted = int(page.get_attribute("#inp-mask", "data-generated"))
    assert 0 < painted < 64
    page.fill("#inp-steps", "4")
    page.fill("#inp-n", "2")
    with page.expect_request(lambda r: r.url.endswith("/inpaint")) as sent:
        page.click("#inp-submit")
    body = json.loads(sent.value.post_data)
    mask = decode_png(body["mask"])
    assert mask.shape[:2] == (8, 8) and decode_png(body["image"]).shape[:2] == (8, 8)
    generate = mask[..., 0] == 0 if mask.ndim == 3 else mask == 0
    assert set(np.unique(mask[..., :3] if mask.ndim == 3 else mask)) <= {0, 255}
    assert generate.sum() == painted  # black = generate, exactly the painted pixels
    assert generate[np.diag_indices(8)][2:6].all() and not generate[0, 7] and not generate[7, 0]
    page.wait_for_function(all_loaded("#inp-grid img", 2))
    assert page.get_attribute("#inp-progress", "data-state") == "done"

    # Autoencoder: corrupted inputs and reconstructions, then the latent interpolation strip.
    page.click("button[data-tab=autoencoder]")
    page.select_option("#ae-model", CODEC)
    page.wait_for_function("document.getElementById('ae-b').width === 8")
    page.select_option("#ae-noise", "masking")
    page.fill("#ae-amount", "0.5")
    page.click("#ae-reconstruct")
    page.wait_for_function(all_loaded("#ae-corrupted img", 2))
    page.wait_for_function(all_loaded("#ae-outputs img", 2))
    page.fill("#ae-steps", "6")
    page.click("#ae-interpolate")
    page.wait_for_function(all_loaded("#ae-strip img", 6))
    assert page.is_visible("#ae-interpolation-figure")
