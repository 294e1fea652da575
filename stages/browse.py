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
import errno
import hashlib
import json
import math
import os
import re
import shutil
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .lib import params as P
from .lib.breakdowns import tags_of
from .lib.cli import UserError, run_main
from .lib.evaluation.client import sample_key   # the image (path and content hash) and the label
from .lib.failures import FLAGS
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


# A scored file is data that may come from elsewhere (a teammate's `dvc pull`, another server): every
# field that reaches the page, a file name or a link has the type it should, or the file is refused.
SHA256 = re.compile(r"[0-9a-f]{64}")
TEXT_FIELDS = ("image_path", "label", "prediction", "error", "finish_reason")
NUMBER_FIELDS = ("cer_score", "f1_score", "confidence")
RUN_FIGURES = ("overall_cer", "overall_f1", "scored_samples", "failed_samples", "truncated_predictions")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_scored(doc, path):
    """One line naming the first field of a scored document with the wrong type (see above)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("samples"), list):
        raise UserError(f"{path}: expected an object with a 'samples' list (a normalize-score output)")
    for key in RUN_FIGURES:
        if doc.get(key) is not None and not is_number(doc[key]):
            raise UserError(f"{path}: '{key}' must be a number, got {str(doc[key])[:60]!r}")
    if doc.get("confidence_source") is not None and not isinstance(doc["confidence_source"], str):
        raise UserError(f"{path}: 'confidence_source' must be a string")
    for i, sample in enumerate(doc["samples"]):
        where = f"{path}: samples[{i}]"
        if not isinstance(sample, dict):
            raise UserError(f"{where}: expected an object")
        for key in TEXT_FIELDS:
            if sample.get(key) is not None and not isinstance(sample[key], str):
                raise UserError(f"{where}: '{key}' must be a string, got {type(sample[key]).__name__}")
        for key in NUMBER_FIELDS:
            if sample.get(key) is not None and not is_number(sample[key]):
                raise UserError(f"{where}: '{key}' must be a number, got {str(sample[key])[:60]!r}")
        flags = sample.get("flags")   # (tags: breakdowns.tags_of keeps only strings)
        if flags is not None and not (isinstance(flags, list) and all(isinstance(v, str) for v in flags)):
            raise UserError(f"{where}: 'flags' must be a list of strings")
        sha = sample.get("image_sha256")
        if sha is not None and not (isinstance(sha, str) and SHA256.fullmatch(sha)):
            raise UserError(f"{where}: 'image_sha256' must be 64 lowercase hex digits, got {str(sha)[:80]!r}")


def read_scored(runs, scored_dir):
    """{run name: scored document}; every run must have been scored."""
    docs = {}
    for run in runs:
        path = scored_path(run["name"], scored_dir)
        if not path.is_file():
            raise UserError(f"{path}: not found (run `dvc repro normalize-score` first)")
        doc = read_json(path)
        check_scored(doc, path)
        docs[run["name"]] = doc
    return docs


def inside(path, folder):
    """Is `path`, links resolved, inside `folder` (links resolved)?"""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def diff_ops(ref, pred):
    """The non-equal edit blocks turning ref into pred: [[i1, i2, j1, j2], ...] (rapidfuzz opcodes)."""
    from rapidfuzz.distance import Levenshtein

    return [[i1, i2, j1, j2] for tag, i1, i2, j1, j2 in Levenshtein.opcodes(ref, pred).as_list() if tag != "equal"]


def full_size_link(image_path, out_dir):
    """The original file's URL relative to the page (quoted: a file name is never markup or a scheme),
    where a browser can show its format and the file is inside the project (links resolved); else None."""
    try:
        path, page = split_ref(image_path)
    except ImageError:
        return None
    if page is not None or Path(path).suffix.lower() not in BROWSER_FORMATS or not Path(path).is_file() \
            or not inside(path, Path.cwd()):
        return None
    return urllib.parse.quote(Path(os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())).as_posix())


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
                rows[key] = {"image_path": sample.get("image_path") or "", "sha": sample.get("image_sha256"),
                             "label_raw": sample.get("label") or "", "runs": {}}
            rows[key]["runs"][run["name"]] = sample
    labels = normalize_many([rows[key]["label_raw"] for key in order])
    samples = []
    for index, (key, label) in enumerate(zip(order, labels)):
        row = rows[key]
        samples.append({"i": index, "image_path": row["image_path"], "sha": row["sha"] or image_sha(row["image_path"]),
                        "full": full_size_link(row["image_path"], out_dir), "label": label, "runs": {}})
    for run in runs:
        name = run["name"]
        have = [(s, rows[key]["runs"][name]) for s, key in zip(samples, order) if name in rows[key]["runs"]]
        preds = normalize_many([r.get("prediction") or "" for _, r in have])
        for (s, r), pred in zip(have, preds):
            failed = bool(r.get("error"))
            s["runs"][name] = {"p": None if failed else pred, "c": r.get("cer_score"), "f": r.get("f1_score"),
                               "r": r.get("finish_reason"), "e": str(r["error"]) if failed else None,
                               "d": None if failed else diff_ops(s["label"], pred), **flags_and_confidence(r)}
            if tags_of(r) and "t" not in s:
                s["t"] = tags_of(r)
    return {"runs": [{"name": run["name"], "title": run["title"], "kind": run["kind"],
                      **{k: docs[run["name"]].get(k) for k in (*RUN_FIGURES, "confidence_source")}} for run in runs],
            "samples": samples, **filter_values(samples)}


def flags_and_confidence(record):
    """The scored sample's failure-mode flags ("g") and confidence ("k"), where it has them."""
    out = {}
    if record.get("flags"):
        out["g"] = [str(f) for f in record["flags"]]
    if isinstance(record.get("confidence"), (int, float)) and not isinstance(record.get("confidence"), bool):
        out["k"] = record["confidence"]
    return out


def filter_values(samples):
    """The flags and tags the page offers as filters: only those some sample has."""
    flags = {f for s in samples for r in s["runs"].values() for f in r.get("g", ())}
    return {"flags": [f for f in FLAGS if f in flags] + sorted(flags - set(FLAGS)),
            "tags": sorted({t for s in samples for t in s.get("t", ())})}


def image_sha(image_path):
    """The content hash of a sample's image; for a file that cannot be read, the hash of its name
    (a key for thumbs/ that no image has: the page says "image unreadable")."""
    try:
        return content_hash(image_path)
    except (OSError, ImageError):
        return hashlib.sha256(f"unreadable:{image_path}".encode()).hexdigest()


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
    project = Path.cwd().resolve()
    if not (out_dir / "data.js").is_file():
        raise UserError(f"{out_dir}: no results page (run `dvc repro browse` first)")
    if not inside(out_dir, project):
        raise UserError(f"{out_dir}: --serve serves a page inside the project ({project}) only")
    text = (out_dir / "data.js").read_text(encoding="utf-8")
    try:
        data = json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))
        links = [urllib.parse.unquote(s["full"]) for s in data["samples"] if s.get("full")]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{out_dir / 'data.js'}: not a results page's data (run `dvc repro browse`)") from None
    # Only files inside the project, links resolved: a linked image that points elsewhere is not served.
    allowed = {target for target in ((out_dir / link).resolve() for link in links) if inside(target, project)}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def translate_path(self, path):
            target = Path(super().translate_path(path)).resolve()
            if (inside(target, out_dir) or target in allowed) and inside(target, project):
                return str(target)
            return str(out_dir / "__not_served__")

    # The page's links to originals are relative to browse/, so the server's root is the folder that
    # holds every linked file and browse/; translate_path serves only browse/ and those files.
    root = Path(os.path.commonpath([out_dir, *allowed])) if allowed else out_dir
    page = out_dir.relative_to(root).as_posix()
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, directory=str(root)))
    except OSError as err:
        hint = " (another program uses it: pick another --port, or 0 for any free one)" \
            if err.errno == errno.EADDRINUSE else ""
        raise UserError(f"--port {port}: cannot listen on 127.0.0.1:{port}: {err.strerror}{hint}") from None
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
