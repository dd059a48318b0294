"""Take the README's screenshot of the playground (`docs/playground.png`) in headless Chromium.

Starts the stack in this process (`LocalServer`) on a zoo (default: the shipped one, every model
served, so the header shows its full readiness line), opens the page at 1280 px and runs one panel: `generate` (a diffusion model: a class-conditional grid and its trajectory)
or `autoencoder` (a VAE: reconstructions and a latent interpolation strip). `auto` picks generate
when the zoo has a pixel diffusion model, else autoencoder.

    .venv/bin/python scripts/playground_screenshot.py [--zoo models/zoo] [--panel auto] [--out docs/playground.png]
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import Page

from ddserve.embedded import LocalServer
from ddserve.settings import Settings
from models.catalog import load_catalog

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync"]
LOADED = "(s => [...document.querySelectorAll(s)].length > 0 && [...document.querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0))"


def pick(zoo: Path, panel: str) -> tuple[str, str]:
    """(panel, model) to show."""
    catalog = load_catalog(zoo)
    diffusion = [n for n, e in catalog.items() if e.kind == "diffusion" and "generate" in e.tasks]
    codecs = [n for n, e in catalog.items() if e.latent_shape and "decode" in e.tasks]
    vaes = [n for n in codecs if catalog[n].kind == "vae"]
    if panel in ("auto", "generate") and diffusion:
        return "generate", diffusion[0]
    if panel in ("auto", "autoencoder") and (vaes or codecs):
        return "autoencoder", (vaes or codecs)[0]
    raise SystemExit(f"{zoo} has no model for the {panel} panel")


def roughness(png: bytes, box: dict[str, float]) -> float:
    """Mean absolute difference of neighbouring grey pixels inside `box`: high for x_T, low for x_0."""
    crop = Image.open(io.BytesIO(png)).convert("L")
    crop = crop.crop((box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"]))
    pixels = np.asarray(crop, dtype=np.float32)
    return float(np.abs(np.diff(pixels, axis=1)).mean() + np.abs(np.diff(pixels, axis=0)).mean())


def settled_frame(page: Page, selector: str, tries: int = 40) -> bytes:
    """A screenshot showing the trajectory GIF near its end (x_0, held 1 s): the animation loops
    and starts when first painted, so shoot a few times and keep the least noisy frame."""
    box = page.locator(selector).bounding_box()
    best, best_score = page.screenshot(), float("inf")
    for _ in range(tries):
        page.wait_for_timeout(150)
        png = page.screenshot()
        score = roughness(png, box) if box else 0.0
        if score < best_score:
            best, best_score = png, score
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "models" / "zoo")
    parser.add_argument("--panel", choices=["auto", "generate", "autoencoder"], default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    panel, model = pick(args.zoo, args.panel)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium on PATH: make browser")
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(
            redis_url=None,
            zoo_dir=args.zoo,
            storage_dir=Path(scratch),
            auth_enabled=False,
            log_level="WARNING",
        )
        with LocalServer(settings) as server, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(120_000)
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready=true]")
            shot = None
            if panel == "generate":
                page.select_option("#gen-model", model)
                page.select_option("#gen-class", "7")
                page.fill("#gen-steps", "20")  # DDIM: enough for clean digits, quick on a CPU
                page.fill("#gen-seed", "1234")
                page.click("#gen-submit")
                page.wait_for_function(f"{LOADED}('#gen-grid img')")
                page.wait_for_function(f"{LOADED}('#gen-trajectory-img')")
                shot = settled_frame(page, "#gen-trajectory-img")
            else:
                page.click("button[data-tab=autoencoder]")
                page.select_option("#ae-model", model)
                page.wait_for_function("document.getElementById('ae-b').width > 0")
                for file, modifiers in (("digits-3.png", []), ("digits-8.png", ["Shift"])):
                    page.click(f"#ae-picker img[data-file='{file}']", modifiers=modifiers)
                page.fill("#ae-steps", "10")
                page.click("#ae-reconstruct")
                page.wait_for_function(f"{LOADED}('#ae-outputs img')")
                page.click("#ae-interpolate")
                page.wait_for_function(f"{LOADED}('#ae-strip img')")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            if shot is None:
                page.screenshot(path=str(args.out))
            else:
                args.out.write_bytes(shot)
            browser.close()
    print(f"wrote {args.out} ({panel} panel, {model})")


if __name__ == "__main__":
    main()
