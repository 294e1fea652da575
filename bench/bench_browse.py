"""The results page with many samples, in headless Chromium.

    python -m bench.bench_browse [--samples 10000] [--images 200] [--label-chars 60]

Builds a scratch project: --images rendered lines (page-size text when --label-chars is large),
--samples samples over them, three runs with garbled predictions; scores them with the score stage,
builds browse/ with the browse stage, then loads the page in headless Chromium from file:// with
each view below and reads how long the first render took (performance.now() at the end of app.js,
navigation start included: parsing data.js, filtering, sorting, drawing one page of rows).
Prints the stage's time, data.js size, and per view the time to the first render, and the ratio
to the default view (these machines are noisy: compare ratios, not seconds).
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VIEWS = ["", "sort=cer:finetuned:desc", "filter=worse&sort=diff:desc&a=finetuned&b=base", "q=台北",
         "mode=compare&sort=cer:base:desc"]


def build(root, n_samples, n_images, label_chars):
    from stages.lib.synthetic import random_line, render_line

    rng = random.Random(0)
    images = []
    (root / "data").mkdir(parents=True)
    for i in range(n_images):   # thumbnails are made once per distinct image: a few images, many samples
        path = root / "data" / f"img_{i:05d}.png"
        render_line(random_line(rng)[:16], "NotoSerifCJK-Regular.ttc:Noto Serif CJK TC", 24, 128, rng).save(path)
        images.append(f"data/{path.name}")
    labels = []
    for _ in range(n_samples):
        text = ""
        while len(text) < label_chars:
            text += random_line(rng)
        labels.append(text[:label_chars])
    (root / "results").mkdir()
    for name, rate in (("finetuned", 0.05), ("base", 0.2), ("tesseract", 0.1)):
        samples = []
        for k, text in enumerate(labels):
            path = images[k % n_images]
            pred = "".join("口" if rng.random() < rate else c for c in text)
            samples.append({"image_path": path, "label": text, "prediction": pred, "finish_reason": "stop",
                            "image_sha256": f"{k % n_images:064x}"})
        (root / "results" / f"{name}.json").write_text(json.dumps({"samples": samples}, ensure_ascii=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["runs"] = {"main": "finetuned", "models": {"finetuned": {"dir": "m", "title": "fine-tuned"},
                                                      "base": {"dir": "b", "title": "base"}},
                      "engines": {"tesseract": {"title": "Tesseract", "lang": "eng", "psm": 6}}}
    params["score"]["bootstrap_samples"] = 0
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")


def stage(root, name):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=root, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - start


def first_render_ms(chromium, page, view):
    url = page.as_uri() + (f"#{view}" if view else "")
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=300, check=True).stdout
    found = re.search(r'data-render-ms="(\d+)"', out)
    view_ms = re.search(r'data-view-ms="([\d.]+)"', out)
    if not found or not view_ms:
        raise SystemExit(f"the page did not render for view {view!r}")
    return int(found.group(1)), float(view_ms.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--label-chars", type=int, default=60)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("bench_browse: chromium is not installed (make setup installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.samples, args.images, args.label_chars)
        stage(root, "score")
        seconds = stage(root, "browse")
        size = (root / "browse" / "data.js").stat().st_size
        print(f"browse stage: {args.samples} samples x 3 runs ({args.label_chars}-character labels, {args.images} "
              f"images): {seconds:.1f} s; data.js {size / 2**20:.1f} MiB")
        times = {view: first_render_ms(chromium, root / "browse" / "index.html", view) for view in VIEWS}
        default = max(times[""][0], 1)
        for view, (ms, view_ms) in times.items():
            print(f"  {view or '(default view)':<50} first render {ms:6d} ms ({ms / default:.2f}x the default view); "
                  f"filter + sort + draw alone {view_ms:.0f} ms")


if __name__ == "__main__":
    main()
