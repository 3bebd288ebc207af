"""Screenshots of the extension in a running Forge / A1111 UI, for the README (docs/images/).

Needs playwright (``pip install playwright`` in any venv; no browser download: it drives the
system Chromium) and a web UI started *with* its UI (no ``--nowebui``) that has the extension,
a LoRA in its Lora folder and a reference in ``models/fid_stats``, e.g. the data folder that
``tools/check_webui.py --data-dir D`` left behind:

    python tools/webui_screenshots.py --url http://127.0.0.1:7860 --out docs/images \
        --lora fd_check_lora --reference real_faces.npz

It generates for real (a small txt2img with the FID accordion on; the LoRA-vs-base script with
N = 2), so the pictures show the numbers the UI printed. Each PNG is cropped to the part of the
page that matters and palette-quantised to stay small (< 200 KB).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_BYTES = 200_000


def _save_small(png: bytes, out: Path, width: int = 1100) -> int:
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
    for colours in (256, 128, 64, 32):
        buf = io.BytesIO()
        im.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() < MAX_BYTES:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return buf.tell()


def _union_box(page, selectors: list[str], pad: int = 8) -> dict:
    boxes = [page.locator(s).first.bounding_box() for s in selectors]
    boxes = [b for b in boxes if b]
    x0, y0 = min(b["x"] for b in boxes) - pad, min(b["y"] for b in boxes) - pad
    x1, y1 = max(b["x"] + b["width"] for b in boxes) + pad, max(b["y"] + b["height"] for b in boxes) + pad
    return {"x": max(0, x0), "y": max(0, y0), "width": x1 - max(0, x0), "height": y1 - max(0, y0)}


def _set_text(page, selector: str, text: str) -> None:
    box = page.locator(f"{selector} textarea, {selector} input").first
    box.fill(text)
    box.dispatch_event("input")


def _pick(page, selector: str, value: str) -> None:
    """Choose ``value`` in a gradio 4 dropdown."""
    page.locator(f"{selector} input").first.click()
    page.locator(f"ul.options li[data-value='{value}']").first.click()


def shoot(url: str, out: Path, lora: str, reference: str, timeout_s: float) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(profile, executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS,
                                                        headless=True, viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        page.set_default_timeout(timeout_s * 1000)
        page.goto(url)
        page.wait_for_selector("#txt2img_prompt textarea")
        time.sleep(2)

        # 1. the accordion, after a generation scored against the reference
        _set_text(page, "#txt2img_prompt", "a photo of a face")
        for sel, value in (("#txt2img_width", "64"), ("#txt2img_height", "64"), ("#txt2img_steps", "2"), ("#txt2img_batch_size", "4")):
            inp = page.locator(f"{sel} input[type=number]").first
            inp.fill(value)
            inp.press("Enter")
        acc = "#script_txt2img_facediffuser_fid_accordion"
        page.locator(f"{acc} > button, {acc} .label-wrap").first.click()
        page.locator("#script_txt2img_facediffuser_fid_enabled input").check()
        _pick(page, "#script_txt2img_facediffuser_fid_reference", reference)
        page.locator("#txt2img_generate").click()
        page.wait_for_function("document.querySelector('#html_info_txt2img') && "
                               "document.querySelector('#html_info_txt2img').innerText.includes('FaceDiffuser FID')")
        time.sleep(1)
        page.locator(acc).scroll_into_view_if_needed()
        box = _union_box(page, [acc, "#html_info_txt2img", "#txt2img_gallery"])
        print("fid accordion:", _save_small(page.screenshot(clip=box, full_page=True), out / "webui_fid_accordion.png"), "bytes")
        page.locator("#script_txt2img_facediffuser_fid_enabled input").uncheck()

        # 2. the LoRA-vs-base script, run with N = 2
        _pick(page, "#tab_txt2img #script_list", "FaceDiffuser: LoRA vs base")
        time.sleep(1)
        _pick(page, "#script_txt2img_facediffuser_lora_vs_base_lora", lora)
        n = page.locator("#script_txt2img_facediffuser_lora_vs_base_n input[type=number]").first
        n.fill("2")
        n.press("Enter")
        slider = page.locator("#script_txt2img_facediffuser_lora_vs_base_weight input[type=number]").first
        slider.fill("1")
        slider.press("Enter")
        _pick(page, "#script_txt2img_facediffuser_lora_vs_base_reference", reference)
        page.locator("#txt2img_generate").click()
        page.wait_for_function("document.querySelector('#html_info_txt2img').innerText.includes('Real vs LoRA')")
        time.sleep(2)
        box = _union_box(page, ["#script_txt2img_facediffuser_lora_vs_base_lora", "#script_txt2img_facediffuser_lora_vs_base_real_folder",
                                "#html_info_txt2img", "#txt2img_gallery"])
        print("lora vs base:", _save_small(page.screenshot(clip=box, full_page=True), out / "webui_lora_vs_base.png"), "bytes")

        # 3. the training tab
        page.locator("#tabs button", has_text="FaceDiffuser").first.click()
        page.wait_for_selector("#facediffuser_train_start")
        time.sleep(3)
        box = _union_box(page, ["#facediffuser_train_checkpoint", "#facediffuser_train_start", "#facediffuser_train_loss",
                                "#facediffuser_train_log"])
        print("train tab:", _save_small(page.screenshot(clip=box, full_page=True), out / "webui_train_tab.png"), "bytes")
        browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images")
    ap.add_argument("--lora", required=True, help="A LoRA name in the web UI's Lora folder.")
    ap.add_argument("--reference", required=True, help="A stats file name in models/fid_stats.")
    ap.add_argument("--timeout", type=float, default=600, help="Seconds to wait for each step (CPU generation is slow).")
    args = ap.parse_args(argv)
    shoot(args.url, args.out, args.lora, args.reference, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
