"""browse: every sample of every run in one offline page -> browse/ (index.html, data.js, thumbs/).

    python -m stages.browse                  # the DVC stage: writes browse/ from scored/ and `runs`
    python -m stages.browse --serve [--port 8765]   # the same page on http://127.0.0.1:PORT only

Open browse/index.html straight from disk (file://): no server, no network, no CDN. One row per
test image: the image, the label, each run's prediction with a character diff against the label
and its CER / F1 (normalized text, the figures normalize-score computed). Sort by any run's CER
or by the difference between two runs; filter by text, "worse after fine-tuning" (the main run
against `browse.before`), empty, failed or truncated predictions; j / k (or the arrow keys) step
through the samples; "side by side" shows two runs of one sample, like the original's compare app.
The view is in the URL (#sort=...&filter=...), so a link reopens it.

Images: one PNG thumbnail per distinct image content, thumbs/<sha256>.png (the loader's pixels,
stages/lib/images.py: EXIF, transparency, 16-bit, TIFF pages, fitted into browse.thumb_px), and
the page shows browse.page_size rows at a time with lazily loaded thumbnails, so 10,000 page-size
scans stay fast. "full size" opens the original file by its relative path where browsers can
show its format (PNG, JPEG, GIF, WebP, BMP; not TIFF pages): from file://, or with --serve, which
serves browse/ and exactly those image files, nothing else.
"""
import argparse
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .lib import params as P
from .lib.cli import UserError, run_main
from .lib.evaluation.client import sample_key   # the image (path and content hash) and the label
from .lib.images import ImageError, content_hash, load_image, png_bytes, split_ref
from .lib.io import atomic_dir, atomic_write_text, check_replaceable, read_json
from .lib.metrics import normalize_many
from .lib.runs import load_runs, scored_path

OUT_DIR = "browse"
PAGE_DIR = Path(__file__).parent / "lib" / "browse_page"   # index.html, app.js, style.css (static)
PAGE_FILES = ("index.html", "app.js", "style.css")
BROWSER_FORMATS = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}
PARAMS = ["runs", "browse"]


def settings(params):
    runs = load_runs(params)
    before = P.get(params, "browse.before", str)
    if before not in [run["name"] for run in runs]:
        raise UserError(f"params.yaml: 'browse.before' {before!r} is not a run of the `runs` table")
    return {"runs": runs, "before": before, "page_size": P.get(params, "browse.page_size", int, minimum=1),
            "thumb_px": P.get(params, "browse.thumb_px", int, minimum=16),
            "workers": P.get(params, "browse.workers", int, minimum=1)}


def read_scored(runs, scored_dir):
    """{run name: scored document}; every run must have been scored."""
    docs = {}
    for run in runs:
        path = scored_path(run["name"], scored_dir)
        if not path.is_file():
            raise UserError(f"{path}: not found (run `dvc repro normalize-score` first)")
        doc = read_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("samples"), list):
            raise UserError(f"{path}: expected an object with a 'samples' list (a normalize-score output)")
        docs[run["name"]] = doc
    return docs


def diff_ops(ref, pred):
    """The non-equal edit blocks turning ref into pred: [[i1, i2, j1, j2], ...] (rapidfuzz opcodes)."""
    from rapidfuzz.distance import Levenshtein

    return [[i1, i2, j1, j2] for tag, i1, i2, j1, j2 in Levenshtein.opcodes(ref, pred).as_list() if tag != "equal"]


def full_size_link(image_path, out_dir):
    """The original file's path relative to the page, where a browser can show its format; else None."""
    path, page = split_ref(image_path)
    if page is not None or Path(path).suffix.lower() not in BROWSER_FORMATS or not Path(path).is_file():
        return None
    return Path(os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())).as_posix()


def collect(runs, docs, out_dir):
    """The page's data: {"runs": [...], "samples": [...]}, samples in the main run's input order, then
    any sample only other runs have; each with every run's normalized prediction, figures and diff."""
    order, rows = [], {}
    for run in runs:
        seen = {}
        for sample in docs[run["name"]]["samples"]:
            key = sample_key(sample)
            seen[key] = seen.get(key, 0) + 1
            key = (key, seen[key])   # the same image and label twice in the split: two samples
            if key not in rows:
                order.append(key)
                rows[key] = {"image_path": sample.get("image_path", ""), "sha": sample.get("image_sha256"),
                             "label_raw": sample.get("label", ""), "runs": {}}
            rows[key]["runs"][run["name"]] = sample
    labels = normalize_many([rows[key]["label_raw"] for key in order])
    samples = []
    for index, (key, label) in enumerate(zip(order, labels)):
        row = rows[key]
        samples.append({"i": index, "image_path": row["image_path"], "sha": row["sha"] or content_hash(row["image_path"]),
                        "full": full_size_link(row["image_path"], out_dir), "label": label, "runs": {}})
    for run in runs:
        name = run["name"]
        have = [(s, rows[key]["runs"][name]) for s, key in zip(samples, order) if name in rows[key]["runs"]]
        preds = normalize_many([r.get("prediction") or "" for _, r in have])
        for (s, r), pred in zip(have, preds):
            failed = bool(r.get("error"))
            s["runs"][name] = {"p": None if failed else pred, "c": r.get("cer_score"), "f": r.get("f1_score"),
                               "r": r.get("finish_reason"), "e": str(r["error"]) if failed else None,
                               "d": None if failed else diff_ops(s["label"], pred)}
    figures = ("overall_cer", "overall_f1", "scored_samples", "failed_samples", "truncated_predictions")
    return {"runs": [{"name": run["name"], "title": run["title"], "kind": run["kind"],
                      **{k: docs[run["name"]].get(k) for k in figures}} for run in runs],
            "samples": samples}


def thumbnail_png(image_path, px):
    """The loader's image fitted into px x px, as PNG bytes; None when it cannot be read."""
    try:
        image = load_image(image_path)
    except (ImageError, OSError):
        return None
    image.thumbnail((px, px))
    return png_bytes(image)


def write_thumbnails(samples, thumb_dir, px, workers):
    """thumbs/<sha256>.png once per distinct image; sample["thumb"] is its relative path (or None)."""
    from tqdm import tqdm

    first = {}
    for s in samples:
        first.setdefault(s["sha"], s["image_path"])
    thumb_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    with ThreadPoolExecutor(workers) as pool:
        jobs = {sha: pool.submit(thumbnail_png, path, px) for sha, path in first.items()}
        for sha, job in tqdm(jobs.items(), desc="browse: thumbnails", unit="image"):
            data = job.result()
            if data is not None:
                (thumb_dir / f"{sha}.png").write_bytes(data)
                made[sha] = f"thumbs/{sha}.png"
    for s in samples:
        s["thumb"] = made.get(s["sha"])
    return len(made)


def write_page(out_dir, data, config, inputs=()):
    """browse/: the static page, data.js (the data as one JS assignment: file:// pages cannot fetch
    JSON) and thumbs/, built in a temp folder that replaces the old one whole."""
    with atomic_dir(out_dir, inputs=inputs) as tmp:
        tmp = Path(tmp)
        made = write_thumbnails(data["samples"], tmp / "thumbs", config["thumb_px"], config["workers"])
        for name in PAGE_FILES:
            shutil.copyfile(PAGE_DIR / name, tmp / name)
        data = {**data, "main": config["runs"][0]["name"], "before": config["before"],
                "page_size": config["page_size"]}
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        atomic_write_text(tmp / "data.js", f"window.BROWSE_DATA = {payload};\n")
    return made


def serve(out_dir, port):
    """browse/ and the images its data links to, on 127.0.0.1 only (never other interfaces)."""
    import http.server
    from functools import partial

    out_dir = Path(out_dir).resolve()
    if not (out_dir / "data.js").is_file():
        raise UserError(f"{out_dir}: no results page (run `dvc repro browse` first)")
    text = (out_dir / "data.js").read_text(encoding="utf-8")
    data = json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))
    allowed = {(out_dir / s["full"]).resolve() for s in data["samples"] if s.get("full")}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def translate_path(self, path):
            target = Path(super().translate_path(path)).resolve()
            if target == out_dir or out_dir in target.parents or target in allowed:
                return str(target)
            return str(out_dir / "__not_served__")

    # The page's links to originals are relative to browse/, so the server's root is the folder that
    # holds every linked file and browse/; translate_path serves only browse/ and those files.
    root = Path(os.path.commonpath([out_dir, *allowed])) if allowed else out_dir
    page = out_dir.relative_to(root).as_posix()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, directory=str(root)))
    url = f"http://127.0.0.1:{server.server_port}/{page + '/' if page != '.' else ''}index.html"
    print(f"browse: serving {url} (127.0.0.1 only; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scored-dir", default="scored")
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--serve", action="store_true", help="serve the page on 127.0.0.1 instead of building it")
    ap.add_argument("--port", type=int, default=8765, help="--serve port (0: any free port)")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.out, args.port)
        return
    check_replaceable(args.out, inputs=[args.scored_dir])   # before any work: never `--out results`
    config = settings(P.load_params(PARAMS))
    docs = read_scored(config["runs"], args.scored_dir)
    data = collect(config["runs"], docs, args.out)
    made = write_page(args.out, data, config, inputs=[args.scored_dir])
    print(f"browse: {len(data['samples'])} samples x {len(config['runs'])} runs, {made} thumbnails -> "
          f"{args.out}/index.html (opens offline)")


if __name__ == "__main__":
    run_main(main)
