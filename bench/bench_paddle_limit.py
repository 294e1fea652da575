"""Which detector resize (runs.engines.paddleocr.limit_type) reads which images: every image is read
with `min` (short side up to 736 px) and with `max` (long side down to 960 px, never upscaled), so
that any per-image rule (auto, ...) is scored from the same predictions.

Two kinds of images:
  grid   the default dataset's lines (stages/lib/synthetic.render_line: 128 px squares, one
         character per 32 px cell), as the synth stage renders them;
  crops  line crops as a receipt photo or scan gives them: proportional text (Noto Sans/Serif CJK,
         DejaVu Sans), tight margins, text 16-60 px high, grey paper, a slight tilt, blur, JPEG.
         Real phone photos are not available offline; these are rendered and say nothing of
         real-world lighting, curvature or print quality. Short crops (`$39.0`, `八達通`, `Tel:`)
         are included on purpose: they are the ones whose shape is not a long strip.

    python -m bench.bench_paddle_limit [--crops 100] [--grid 60]

Prints corpus CER (normalized text), empty predictions and CPU seconds per image for min, max and
each rule in RULES, per kind.
"""
import argparse
import io
import random
import time

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from stages.lib import metrics as M
from stages.lib.evaluation.engines import paddleocr as E
from stages.lib.synthetic import load_font, random_line, render_line

SHORT = ["$39.0", "八達通", "Tel:", "現金", "找續", "HK$", "多謝惠顧", "總數", "收據", "$128.50", "No.", "x2",
         "凍檸茶", "餐蛋麵", "Total", "Cash", "VISA", "09:41", "2024/03/15", "$7.5", "小計", "合共", "Qty", "#12"]
FONTS = ["NotoSansCJK-Regular.ttc:Noto Sans CJK TC", "NotoSerifCJK-Regular.ttc:Noto Serif CJK TC",
         "NotoSansCJK-Bold.ttc:Noto Sans CJK TC"]
LATIN = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"

RULES = {
    "auto (the former rule: max for strips, long/short > 2.78)":
        lambda w, h: "max" if min(w, h) < 736 and max(w, h) * 736 / min(w, h) > 2048 else "min",
    "auto (stages/lib/evaluation/engines/paddleocr.py)": lambda w, h: E.detector_limit(w, h, "auto")[0],
    "max when wider than tall by 1.2 or more": lambda w, h: "max" if w >= 1.2 * h else "min",
    "max when the short side is under 100 px": lambda w, h: "max" if min(w, h) < 100 else "min",
}


def crop(text, rng):
    """A tight line crop of `text` (module docstring)."""
    size = rng.choice([16, 20, 24, 28, 32, 40, 48, 60])
    latin = all(ord(c) < 0x2E80 for c in text) and rng.random() < 0.5
    font = ImageFont.truetype(LATIN, size) if latin else load_font(rng.choice(FONTS), size)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = rng.randint(2, max(3, size // 2)), rng.randint(2, max(3, size // 4))
    paper, ink = rng.randint(190, 250), rng.randint(0, 90)
    image = Image.new("L", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), paper)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, fill=ink, font=font)
    image = image.rotate(rng.uniform(-1.5, 1.5), resample=Image.BICUBIC, fillcolor=paper, expand=False)
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=rng.randint(50, 90))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def images(kind, n, seed):
    rng = random.Random(f"{kind}-{seed}")
    for i in range(n):
        if kind == "grid":
            text = random_line(rng)
            yield render_line(text, rng.choice(FONTS[1:2]), rng.choice([24, 26]), 128, rng, noise=0.01), text
        else:
            text = rng.choice(SHORT) if i % 3 == 0 else random_line(rng)
            yield crop(text, rng), text


def read_all(kind, n, seed):
    import numpy as np

    settings = {"det_model": "small", "rec_model": "small", "use_cls": False, "limit_type": "min", "threads": 1}
    files = E.model_files(settings)
    engines = {"min": E.build_engine(settings, files, ("min", E.MIN_SIDE)),
               "max": E.build_engine(settings, files, ("max", E.MAX_SIDE))}
    rows = []
    for image, text in images(kind, n, seed):
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        row = {"w": image.width, "h": image.height, "label": text}
        for name, engine in engines.items():
            started = time.process_time()
            result = engine(bgr)
            row[name] = E.join_lines(getattr(result, "boxes", None), getattr(result, "txts", None))
            row[f"{name}_s"] = time.process_time() - started
        rows.append(row)
    return rows


def report(kind, rows):
    refs = M.normalize_many([r["label"] for r in rows])
    choices = {"min": lambda w, h: "min", "max": lambda w, h: "max", **RULES}
    print(f"{kind}: {len(rows)} images, {min(r['w'] for r in rows)}-{max(r['w'] for r in rows)} x "
          f"{min(r['h'] for r in rows)}-{max(r['h'] for r in rows)} px")
    for name, rule in choices.items():
        picked = [rule(r["w"], r["h"]) for r in rows]
        preds = M.normalize_many([r[p] for r, p in zip(rows, picked)])
        empty = sum(1 for p, ref in zip(preds, refs) if not p and ref)
        seconds = sum(r[f"{p}_s"] for r, p in zip(rows, picked)) / len(rows)
        print(f"  {name:58s} CER {M.corpus_cer(refs, preds):.4f}  empty {empty:3d}  "
              f"{seconds:.3f} CPU s/image  (max on {picked.count('max')})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=100)
    parser.add_argument("--grid", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for kind, n in (("crops", args.crops), ("grid", args.grid)):
        if n:
            report(kind, read_all(kind, n, args.seed))


if __name__ == "__main__":
    main()
