"""The playground page (`GET /`) in a real headless browser: Debian's Chromium driven by Playwright's
Python package (`executable_path`, no downloaded browser), against the gateway and a worker thread
on a zoo of tiny models with auth on. The page asks for the API key, then: a generation is
submitted and its images and trajectory appear; a mask is drawn with the mouse and the inpainted
variations appear (the mask sent is checked pixel by pixel); the DAE-style corrupted input and the
reconstruction appear; a latent interpolation strip appears. Then one test each: the page starts
on the diffusion model though a generating autoencoder comes first in `/models`; switching models
clears the previous model's outputs; a canceled job shows as canceled, not as an error; the header
stays one line at 1280, 1024, 768 and 390 px; the test images follow the model's image spec
(gray for a one-channel model, RGB for a three-channel one); the guidance slider is diffusers' s
(1 … 21) starting at the model's default. Plus the static routes and the test images' coverage of
the shipped zoo without a browser. `make test` installs Chromium (`make browser`); without it the
browser tests are skipped."""

from __future__ import annotations

import base64
import io
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from ddserve.embedded import LocalServer
from models.catalog import DEFAULT_ZOO, load_catalog, read_entry
from models.registry import write_entry
from service.routers.playground import STATIC_DIR
from tests.client_support import CODEC, DIFFUSION, tiny_stack, write_zoo
from tests.tiny_zoo import write_diffusion_model, write_onnx_autoencoder

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
# Beside the client tests' zoo (DIFFUSION, an 8×8 gray class-conditional DDPM, and CODEC): a
# generating autoencoder listed before DIFFUSION (as digits-aae is before digits-ddpm in the shipped
# zoo), and an RGB inpainting model of the same size.
GENERATOR, RGB_DIFFUSION = "tiny-aae", "tiny-rgb-ddpm"
GUIDANCE_DEFAULT = 4.0  # DIFFUSION's defaults.guidance_scale here (the zoo's default, s = 4)


def write_playground_zoo(root: Path) -> None:
    zoo = write_zoo(root)
    entry = read_entry(zoo / DIFFUSION).model_dump(mode="json", exclude={"path"})
    entry["defaults"]["guidance_scale"] = GUIDANCE_DEFAULT
    write_entry(zoo / DIFFUSION, entry)
    generator = write_onnx_autoencoder(zoo, GENERATOR).model_dump(mode="json", exclude={"path"})
    generator.update(kind="adversarial-autoencoder", tasks=["generate", "encode", "decode"])
    write_entry(zoo / GENERATOR, generator)
    write_diffusion_model(zoo, RGB_DIFFUSION, channels=3, seed=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    root = tmp_path_factory.mktemp("playground")
    write_playground_zoo(root)
    with tiny_stack(root, API_KEY) as stack:
        yield stack


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (make browser installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser: Any, url: str, width: int = 1200) -> tuple[Any, Any, list[str]]:
    """A fresh context (the API key already in its localStorage) and the page loaded and ready;
    (context, page, the page's uncaught errors)."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    context.add_init_script(f"localStorage.setItem('ddserve.apiKey', {json.dumps(API_KEY)})")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return context, page, errors


@pytest.fixture
def page(browser: Any, server: LocalServer) -> Iterator[Any]:
    context, opened, errors = open_page(browser, server.url)
    try:
        yield opened
        assert errors == []
    finally:
        context.close()


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


def test_playground_in_a_browser(browser: Any, server: LocalServer) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})  # no key stored yet
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        run_the_page(page, server.url)
        assert errors == []
    finally:
        context.close()


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
    page.wait_for_function(all_loaded("#gen-grid img:not(.preview)", 4))  # (not x̂₀ previews)
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


def test_the_page_starts_on_the_diffusion_model(page: Any) -> None:
    """A generating autoencoder comes first in `/models`; the generate panel starts on the first
    model with a diffusion schedule, and the other panels on their first model."""
    page.wait_for_function("document.querySelectorAll('#gen-model option').length === 3")
    listed = page.eval_on_selector_all("#gen-model option", "options => options.map(o => o.value)")
    assert listed == [GENERATOR, DIFFUSION, RGB_DIFFUSION]  # /models order, the generator first
    assert page.input_value("#gen-model") == DIFFUSION
    assert page.is_visible("#gen-sampler") and page.is_visible("#gen-guidance")
    assert page.input_value("#inp-model") == DIFFUSION
    assert page.input_value("#ae-model") == GENERATOR


def generate_once(page: Any) -> None:
    page.select_option("#gen-model", DIFFUSION)
    page.fill("#gen-steps", "2")
    page.fill("#gen-n", "2")
    page.click("#gen-submit")
    page.wait_for_function(all_loaded("#gen-grid img", 2))
    page.wait_for_function(all_loaded("#gen-trajectory-img", 1))
    assert page.get_attribute("#gen-progress", "data-state") == "done"


# Every change of #gen-grid's images, in order: (src kind, is a preview). Installed before a submit.
RECORD_GRID = """(() => {
  window.gridLog = [];
  const log = (img) => window.gridLog.push([img.src.startsWith('data:') ? 'data' : 'link',
                                            img.classList.contains('preview')]);
  new MutationObserver((changes) => {
    for (const change of changes) {
      if (change.type === 'attributes' && change.target.src) log(change.target);
      for (const node of change.addedNodes || []) if (node.src) log(node);
    }
  }).observe(document.getElementById('gen-grid'),
             { childList: true, subtree: true, attributes: true, attributeFilter: ['src'] });
})()"""


def test_previews_appear_over_sse_before_the_final_images(page: Any) -> None:
    """The page follows the job over GET /jobs/{id}/events?preview=1 and shows each image's x̂₀
    preview in the grid while it samples; the final images replace them."""
    page.select_option("#gen-model", DIFFUSION)
    page.fill("#gen-steps", "40")  # a preview every 2 steps (the floor; 40 / 20 = 2)
    page.fill("#gen-n", "2")
    page.evaluate(RECORD_GRID)
    with (
        page.expect_request(lambda r: r.url.endswith("/generate")) as sent,
        page.expect_request(lambda r: "/events?preview=1" in r.url) as stream,
    ):
        page.click("#gen-submit")
    assert json.loads(sent.value.post_data)["output"]["preview_every"] == 2
    assert stream.value.headers["authorization"] == f"Bearer {API_KEY}"
    page.wait_for_function(all_loaded("#gen-grid img:not(.preview)", 2))
    assert page.get_attribute("#gen-progress", "data-state") == "done"
    log = [tuple(entry) for entry in page.evaluate("window.gridLog")]
    previews = [i for i, entry in enumerate(log) if entry == ("data", True)]
    finals = [i for i, entry in enumerate(log) if entry == ("link", False)]
    assert len(previews) >= 2 and len(finals) == 2, log  # both images previewed at least once
    assert max(previews) < min(finals), log  # every preview came before the final images
    assert page.locator("#gen-grid img.preview").count() == 0


def test_switching_models_clears_the_previous_models_outputs(page: Any) -> None:
    generate_once(page)
    assert page.inner_text("#gen-caption") and page.text_content("#gen-job")
    # Reloading the model list (the key entered again) keeps the same model: the outputs stay.
    loads = int(page.get_attribute("body", "data-model-loads"))
    page.dispatch_event("#api-key", "change")
    page.wait_for_function(f"Number(document.body.dataset.modelLoads) > {loads}")
    assert page.locator("#gen-grid img").count() == 2 and page.is_visible("#gen-trajectory-figure")
    page.select_option("#gen-model", RGB_DIFFUSION)
    assert page.locator("#gen-grid img").count() == 0
    assert page.inner_text("#gen-caption") == "" and page.text_content("#gen-job") == ""
    assert page.is_hidden("#gen-trajectory-figure") and page.is_hidden("#gen-error")
    assert page.get_attribute("#gen-progress", "data-state") == "idle"
    assert page.inner_text("#gen-progress") == "idle"
    # The autoencoder panel likewise: the reconstruction rows go with the model.
    page.click("button[data-tab=autoencoder]")
    page.select_option("#ae-model", CODEC)
    page.wait_for_function("document.getElementById('ae-b').width === 8")
    page.click("#ae-reconstruct")
    page.wait_for_function(all_loaded("#ae-outputs img", 2))
    page.select_option("#ae-model", GENERATOR)
    assert page.is_hidden("#ae-rows") and page.locator("#ae-rows img").count() == 0
    assert page.get_attribute("#ae-progress", "data-state") == "idle"


def test_a_canceled_job_shows_as_canceled_not_as_an_error(page: Any) -> None:
    """A 1000-step DDPM job of 16 images takes ~20 s here: it is canceled while it runs."""
    page.select_option("#gen-model", DIFFUSION)
    page.select_option("#gen-sampler", "ddpm")
    page.fill("#gen-steps", "1000")
    page.fill("#gen-n", "16")
    page.click("#gen-submit")
    page.wait_for_function(
        "document.querySelector('#gen-progress .label').textContent.startsWith('step')"
    )
    page.click("#gen-cancel")
    page.wait_for_function("document.getElementById('gen-progress').dataset.state === 'canceled'")
    page.wait_for_function("!document.getElementById('gen-submit').disabled")
    assert page.inner_text("#gen-progress").startswith("canceled")
    assert page.is_hidden("#gen-error") and page.inner_text("#gen-error") == ""
    classes = page.get_attribute("#gen-progress", "class").split()
    assert "canceled" in classes and "failed" not in classes
    bar = page.eval_on_selector(
        "#gen-progress .bar", "bar => getComputedStyle(bar).backgroundColor"
    )
    red, green, blue = (int(c) for c in bar[bar.index("(") + 1 : -1].split(",")[:3])
    assert max(red, green, blue) - min(red, green, blue) < 24  # gray, not the failure's red
    assert page.is_disabled("#gen-cancel")
    assert json.loads(page.text_content("#gen-job"))["status"] == "canceled"


def test_a_job_in_flight_stays_off_the_next_models_outputs(page: Any) -> None:
    """Switching models while a job runs: its progress and result are no longer shown (the
    Cancel button still stops it)."""
    page.select_option("#gen-model", DIFFUSION)
    page.select_option("#gen-sampler", "ddpm")
    page.fill("#gen-steps", "1000")
    page.fill("#gen-n", "16")
    page.click("#gen-submit")
    running = "document.querySelector('#gen-progress .label').textContent.startsWith('step')"
    page.wait_for_function(running)
    page.select_option("#gen-model", RGB_DIFFUSION)
    assert page.get_attribute("#gen-progress", "data-state") == "idle"
    page.wait_for_timeout(1000)  # several polls (every 150 ms) of the running job
    assert page.inner_text("#gen-progress") == "idle" and page.text_content("#gen-job") == ""
    page.click("#gen-cancel")
    page.wait_for_function("!document.getElementById('gen-submit').disabled")
    assert page.inner_text("#gen-progress") == "idle" and page.is_hidden("#gen-error")
    assert page.locator("#gen-grid img").count() == 0


# The header's text items: each must be one line, side by side.
HEADER_LAYOUT = """(() => {
  const header = document.querySelector('header');
  const lines = (element) => {
    const range = document.createRange();
    range.selectNodeContents(element);
    return new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top))).size;
  };
  const visible = [...header.querySelectorAll('h1, .status, .key-text, .docs')]
    .filter(e => e.getClientRects().length > 0);
  const items = [...header.children].map(e => e.getBoundingClientRect());
  const style = getComputedStyle(header);
  const chrome = ['paddingTop', 'paddingBottom', 'borderTopWidth', 'borderBottomWidth']
    .reduce((sum, key) => sum + parseFloat(style[key]), 0);
  return {
    height: header.getBoundingClientRect().height,
    oneLine: Math.max(...items.map(r => r.height)) + chrome,
    lines: Object.fromEntries(visible.map(e => [e.className || e.tagName, lines(e)])),
    sameRow: items.every(a => items.every(b => a.top < b.bottom && b.top < a.bottom)),
    overflow: header.scrollWidth - header.clientWidth,
    pageOverflow: document.documentElement.scrollWidth - window.innerWidth,
  };
})()"""


def assert_one_line_header(page: Any) -> None:
    page.wait_for_function("document.getElementById('status').classList.contains('ok')")
    layout = page.evaluate(HEADER_LAYOUT)
    assert set(layout["lines"].values()) == {1}, layout  # no item wraps inside
    assert layout["sameRow"], layout  # nor do the items wrap onto a second row
    assert layout["height"] <= layout["oneLine"] + 1, layout
    assert layout["overflow"] <= 0 and layout["pageOverflow"] <= 0, layout


def shipped_zoo_readiness(route: Any) -> None:
    """The gateway's real `/readyz` answer with the workers of the shipped zoo's models: its
    readiness line is the longest the header shows (it wrapped the header at 1280 px)."""
    answer = route.fetch()
    body = answer.json()
    body["workers"] = {name: 1 for name, e in load_catalog(DEFAULT_ZOO).items() if e.tasks}
    route.fulfill(response=answer, json=body)


@pytest.mark.parametrize("width", [1280, 1024, 768, 390])
def test_the_header_stays_one_line(browser: Any, server: LocalServer, width: int) -> None:
    context, page, errors = open_page(browser, server.url, width)
    try:
        assert_one_line_header(page)
        assert all(f"{n}×1" in page.inner_text("#status") for n in (GENERATOR, DIFFUSION, CODEC))
        page.route("**/readyz", shipped_zoo_readiness)
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert_one_line_header(page)
        status = page.inner_text("#status")  # cut to fit at narrow widths: the title has it all
        assert page.get_attribute("#status", "title").endswith(status)
        assert "shapes-ldm×1" in page.get_attribute("#status", "title")
        assert errors == []
    finally:
        context.close()


def shown_samples(page: Any) -> list[str]:
    return page.eval_on_selector_all("#inp-picker img", "imgs => imgs.map(i => i.dataset.file)")


def test_the_inpainting_images_follow_the_models_image_spec(page: Any) -> None:
    """No test image is 8×8: the gray model is offered the one-channel ones, the RGB model the
    three-channel ones (both models say dataset `digits`: the spec decides, not the name)."""
    index = json.loads((STATIC_DIR / "samples" / "index.json").read_text())["samples"]
    gray = [s["file"] for s in index if s["channels"] == 1]
    rgb = [s["file"] for s in index if s["channels"] == 3]
    assert gray and rgb
    page.click("button[data-tab=inpaint]")
    page.select_option("#inp-model", DIFFUSION)
    page.wait_for_function("document.getElementById('inp-image').width === 8")
    assert sorted(shown_samples(page)) == sorted(gray)
    assert page.get_attribute("#inp-picker img.selected", "data-file") in gray
    page.select_option("#inp-model", RGB_DIFFUSION)
    page.wait_for_function(
        "(document.querySelector('#inp-picker img.selected') || {dataset: {}}).dataset.file"
        f" === {json.dumps(rgb[0])}"
    )
    assert sorted(shown_samples(page)) == sorted(rgb)
    page.wait_for_function(all_loaded("#inp-picker img", len(rgb)))
    # What the model will get: the RGB test image drawn at 8×8, in colour.
    page.wait_for_function(
        """(() => { const c = document.getElementById('inp-image');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 0; i < px.length; i += 4) if (px[i] !== px[i + 1] || px[i] !== px[i + 2]) return true;
        return false; })()"""
    )
    assert page.locator("#inp-picker").get_attribute("data-spec") == "8x8x3"
    # back to the gray model: its own images again, a gray one preselected
    page.select_option("#inp-model", DIFFUSION)
    assert sorted(shown_samples(page)) == sorted(gray)
    page.wait_for_function(
        "(document.querySelector('#inp-picker img.selected') || {dataset: {}}).dataset.file"
        f" === {json.dumps(gray[0])}"
    )


def test_every_shipped_image_model_has_test_images_of_its_spec() -> None:
    """Each zoo model that takes images (inpaint, encode, reconstruct) is offered test images of
    exactly its size and channels (`scripts/make_playground_samples.py` writes them)."""
    index = json.loads((STATIC_DIR / "samples" / "index.json").read_text())["samples"]
    specs = {(s["width"], s["height"], s["channels"]) for s in index}
    for sample in index:
        with Image.open(STATIC_DIR / "samples" / sample["file"]) as picture:
            assert (picture.width, picture.height, len(picture.getbands())) == (
                sample["width"],
                sample["height"],
                sample["channels"],
            )
    takes_images = {"inpaint", "encode", "reconstruct"}
    models = [e for e in load_catalog(DEFAULT_ZOO).values() if takes_images & set(e.tasks)]
    assert models
    for entry in models:
        spec = (entry.image.width, entry.image.height, entry.image.channels)
        assert spec in specs, f"{entry.name} ({spec}) has no test image of its spec"


def set_guidance(page: Any, value: float) -> None:
    page.eval_on_selector(
        "#gen-guidance",
        f"s => {{ s.value = '{value}'; s.dispatchEvent(new Event('input', {{bubbles: true}})); }}",
    )


def test_the_guidance_slider_is_diffusers_s_from_the_models_default(page: Any) -> None:
    page.select_option("#gen-model", DIFFUSION)
    slider = page.locator("#gen-guidance")
    assert slider.get_attribute("type") == "range"
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("1", "21")
    assert "guidance scale s" in page.inner_text("#tab-generate label.slider")
    assert "s = 1 is none" in page.inner_text("#gen-guidance-help")
    assert float(slider.input_value()) == GUIDANCE_DEFAULT
    assert page.inner_text("#gen-guidance-value") == f"{GUIDANCE_DEFAULT:g}"
    assert f"s = {GUIDANCE_DEFAULT:g}" in page.inner_text("#gen-guidance-help")
    page.fill("#gen-steps", "2")
    page.fill("#gen-n", "1")
    page.select_option("#gen-class", "3")
    # untouched: the request leaves it to the server's default
    with page.expect_request(lambda r: r.url.endswith("/generate")) as sent:
        page.click("#gen-submit")
    assert "guidance_scale" not in json.loads(sent.value.post_data)
    page.wait_for_function(all_loaded("#gen-grid img", 1))
    set_guidance(page, 7.5)
    assert page.inner_text("#gen-guidance-value") == "7.5"
    with page.expect_request(lambda r: r.url.endswith("/generate")) as sent:
        page.click("#gen-submit")
    assert json.loads(sent.value.post_data)["guidance_scale"] == 7.5
    page.wait_for_function(all_loaded("#gen-grid img", 1))
    assert page.get_attribute("#gen-progress", "data-state") == "done"
    set_guidance(page, 0)  # below the range: the slider holds at 1, no guidance
    assert slider.input_value() == "1" and page.inner_text("#gen-guidance-value") == "1 · none"
    # another model: its own default (0 in the old meaning w, 1 in s) shows as the minimum, 1
    page.select_option("#gen-model", RGB_DIFFUSION)
    assert slider.input_value() == "1"
