"""split: raw OCR data -> data/input/ocr_non_test.json + data/input/ocr_test.json.

Seeded and byte-for-byte reproducible. `test_ratio` is a float (default 5/6, the original's
1:5 non_test:test) rounded to the nearest row count, never truncated. With group_by=parent,
all pages of one document (one folder) land on the same side; the pages of one PDF or one
multi-page TIFF always do.

Raw rows ([{"img_path", "ocr_results"}], paths relative to the project root or absolute; a row may
carry `tags`, a list of strings such as ["table", "seal"], or the original's `focus_layout`; every
output row, evaluation result and scored sample carries them as `tags`):
  {"img_path": "scans/a.png", "ocr_results": "text"}          one image (PNG, JPEG, TIFF, BMP, ...)
  {"img_path": "scans/doc.pdf#page=2", "ocr_results": "..."}   one page of a PDF or multi-page TIFF (1-based)
  {"img_path": "scans/doc.pdf", "ocr_results": ["p1", "p2"]}   a whole PDF / multi-page TIFF: one text per page
A file of several pages given with a single text is refused (name the page, or give a list).
PDF pages are rendered with pypdfium2 at `split.pdf_dpi` into data/input/pages/ (part of this
stage's output, so the rendering is versioned with the data); their rows name the PNG and keep
the original as `source`. Every image is decoded with the one loader (stages/lib/images.py) here:
a missing, unreadable or non-image file stops the split with one line naming the row, so no
later stage ever meets it. Each output row carries `image_sha256`, the hash of the image's
bytes: changing an image's pixels changes the split, and the evaluation re-predicts exactly
that sample (its resume key includes the hash).
"""
import argparse
import os
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

from .lib import params as P
from .lib.cli import UserError, run_main
from .lib.images import (ImageError, check_page_count, check_pixels, content_hash, iter_pages, load_image, page_count,
                          page_ref, split_ref)
from .lib.io import atomic_dir, atomic_write_json, atomic_write_text, read_json

OUT_DIR = "data/input"
PAGES_DIR = "pages"   # rendered PDF pages, inside OUT_DIR
METRICS = "metrics/split.json"
PLOT_DIR = "plots/split"
PARAMS = ["split"]
SYNTH_DIR, OWN_DATA = "data/synthetic", "data/raw_data/ocr.json"   # the synth stage's folder; the README's
GROUP_BY = ("none", "parent")
EMPTY_TEXT = ("error", "drop", "keep")


def read_raw(path, empty_text, pdf_dpi=200, pages_dir=None, pages_name=None):
    """Validate the raw rows; return ([{"image_path", "ocr_text", "image_sha256", ("source")}], counts)."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of {{img_path, ocr_results}} rows, got {type(rows).__name__}")
    out, seen, checked, counts = [], {}, set(), {"dropped_empty": 0, "pdf_pages": 0}
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object, got {type(row).__name__}")
        for field in ("img_path", "ocr_results"):
            if field not in row:
                raise UserError(f"{where}: missing field '{field}'")
        if not isinstance(row["img_path"], str):
            raise UserError(f"{where}: field 'img_path' must be a string, got {type(row['img_path']).__name__}")
        texts = row["ocr_results"]
        if not (isinstance(texts, str) or (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts))):
            raise UserError(f"{where}: field 'ocr_results' must be a string (or, for a whole PDF/TIFF, a list of "
                            f"page texts), got {type(texts).__name__}")
        tags = row_tags(row, where)
        for ref, text in expand_pages(canonical_ref(row["img_path"], where), texts, where):
            same = image_identity(ref)   # one image under two spellings (a/../b, a link) is one image
            if same in seen:
                raise UserError(f"{where}: duplicate img_path '{ref}' (the same image as row {seen[same]})")
            seen[same] = i
            if not text.strip():
                if empty_text == "error":
                    raise UserError(f"{where}: empty ocr_results for '{ref}' (set split.empty_text to 'drop' or 'keep')")
                if empty_text == "drop":
                    counts["dropped_empty"] += 1
                    continue
            if is_pdf(ref):
                rendered = render_pdf_page(ref, pdf_dpi, pages_dir, where)
                counts["pdf_pages"] += 1
                out.append({"image_path": str(Path(pages_name) / rendered.name), "ocr_text": text, "source": ref,
                            "image_sha256": content_hash(rendered), **tags})
            else:
                check_image(ref, where, checked)
                out.append({"image_path": ref, "ocr_text": text, "image_sha256": content_hash(ref), **tags})
    return out, counts


def canonical_ref(img_path, where):
    """The row's path written one way: 'img/docB/../docA/l0.png' -> 'img/docA/l0.png' (lexically, so a
    relative path stays relative and a linked data folder keeps its name)."""
    try:
        path, page = split_ref(img_path)
    except ImageError as err:
        raise UserError(f"{where}: {err}") from None
    path = os.path.normpath(path)
    return path if page is None else page_ref(path, page)


def image_identity(ref):
    """What makes two references the same image: the real file (links resolved) and the page."""
    path, page = split_ref(ref)
    return os.path.realpath(path), page


def row_tags(row, where):
    """{"tags": [...]} of a raw row (its `tags` list, or the original's `focus_layout`, a string or
    a list), {} when it has none. Every result and the score stage's per-tag table carry them."""
    field = "tags" if "tags" in row else "focus_layout" if "focus_layout" in row else None
    if field is None:
        return {}
    value = row[field]
    tags = [value] if isinstance(value, str) else value
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        raise UserError(f"{where}: field '{field}' must be a non-empty string or a list of them, got {value!r}")
    return {"tags": list(dict.fromkeys(t.strip() for t in tags))} if tags else {}


def is_pdf(ref):
    return split_ref(ref)[0].suffix.lower() == ".pdf"


def expand_pages(img_path, texts, where):
    """[(image reference, text)]: one row, or one per page of a whole PDF / multi-page TIFF."""
    try:
        path, page = split_ref(img_path)
    except ImageError as err:
        raise UserError(f"{where}: {err}") from None
    if not path.is_file():
        raise UserError(f"{where}: image '{path}' does not exist (paths are relative to the project root)")
    n_pages = pdf_page_count(path, where) if is_pdf(img_path) else image_page_count(path, where)
    if page is not None:
        if not isinstance(texts, str):
            raise UserError(f"{where}: '{img_path}' names one page: 'ocr_results' must be one string")
        if page > n_pages:
            raise UserError(f"{where}: '{path}' has {n_pages} page(s), not page {page}")
        return [(img_path, texts)]
    if isinstance(texts, list):
        if len(texts) != n_pages:
            raise UserError(f"{where}: '{path}' has {n_pages} page(s) but 'ocr_results' has {len(texts)} texts")
        return [(page_ref(path, k + 1), text) for k, text in enumerate(texts)]
    if n_pages > 1:
        raise UserError(f"{where}: '{path}' has {n_pages} pages: give 'ocr_results' as a list of {n_pages} texts, "
                        f"or name one page as '{path}#page=N'")
    return [(page_ref(path, 1) if is_pdf(img_path) else img_path, texts)]


def image_page_count(path, where):
    try:
        return page_count(path)
    except ImageError as err:
        raise UserError(f"{where}: image {err}") from None


def pdf_page_count(path, where):
    import pypdfium2 as pdfium

    try:
        with pdfium.PdfDocument(str(path)) as pdf:
            count = len(pdf)
    except pdfium.PdfiumError as err:
        raise UserError(f"{where}: '{path}' is not a readable PDF ({err})") from None
    try:
        check_page_count(path, count)
    except ImageError as err:
        raise UserError(f"{where}: {err}") from None
    return count


def render_pdf_page(ref, dpi, pages_dir, where):
    """Render one PDF page to PNG in pages_dir (named by the PDF's hash and the page); return the file."""
    import pypdfium2 as pdfium

    path, page = split_ref(ref)
    name = f"{content_hash(path)[:16]}_p{page}.png"
    target = Path(pages_dir) / name
    try:
        with pdfium.PdfDocument(str(path)) as pdf:
            width, height = pdf[page - 1].get_size()   # points: the pixels are known before rendering
            check_pixels(ref, (round(width * dpi / 72), round(height * dpi / 72)), f"page at {dpi} dpi")
            bitmap = pdf[page - 1].render(scale=dpi / 72)
            bitmap.to_pil().convert("RGB").save(target, format="PNG")
    except pdfium.PdfiumError as err:
        raise UserError(f"{where}: page {page} of '{path}' could not be rendered ({err})") from None
    except ImageError as err:
        raise UserError(f"{where}: {err} (or lower split.pdf_dpi)") from None
    return target


def check_image(ref, where, checked):
    """Decode the image with the loader every later stage uses: what passes here, they can read.
    Every page of a multi-page file is decoded in one pass, the first time one of its pages comes."""
    path, page = split_ref(ref)
    try:
        if page is None:
            load_image(ref)
        elif path not in checked:
            for _ in iter_pages(path):
                pass
            checked.add(path)
    except ImageError as err:
        raise UserError(f"{where}: image {err}") from None


def group_key(row, group_by):
    """The unit kept on one side: the folder (group_by parent), else the file (all pages of a PDF/TIFF)."""
    path = split_ref(row.get("source", row["image_path"]))[0]
    return str(path.parent) if group_by == "parent" else str(path)


def split_rows(rows, test_ratio, seed, group_by):
    """Shuffle groups with `seed`; fill the test side up to round(n * test_ratio) rows."""
    groups = defaultdict(list)
    for row in rows:
        groups[group_key(row, group_by)].append(row)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target = round(len(rows) * test_ratio)
    test, non_test = [], []
    for key in keys:
        side = test if len(test) + len(groups[key]) / 2 <= target else non_test
        side.extend(groups[key])
    return non_test, test


def stats(rows):
    lengths = [len(r["ocr_text"]) for r in rows]
    return {
        "count": len(rows),
        "characters": sum(lengths),
        "unique_characters": len(set("".join(r["ocr_text"] for r in rows))),
        "label_length_min": min(lengths, default=0),
        "label_length_mean": round(sum(lengths) / len(lengths), 3) if lengths else 0,
        "label_length_max": max(lengths, default=0),
    }


def write_plots(non_test, test, plot_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["split,label_length,count"]
    for name, rows in (("non_test", non_test), ("test", test)):
        for length, count in sorted(Counter(len(r["ocr_text"]) for r in rows).items()):
            lines.append(f"{name},{length},{count}")
    atomic_write_text(Path(plot_dir) / "label_lengths.csv", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    longest = max(len(r["ocr_text"]) for r in non_test + test)
    bins = range(0, longest + 2) if longest < 60 else 50   # every label is inside a bin (long pages too)
    for name, rows in (("non_test", non_test), ("test", test)):
        ax.hist([len(r["ocr_text"]) for r in rows], bins=bins, alpha=0.6, label=f"{name} ({len(rows)})")
    ax.set_xlabel("label length (characters)")
    ax.set_ylabel("lines")
    ax.set_title("Label lengths by split")
    ax.legend()
    fig.tight_layout()
    tmp = Path(plot_dir) / ".label_lengths.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(Path(plot_dir) / "label_lengths.png")


def main(argv=None):
    params = P.load_params(PARAMS)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = P.get(params, "split.data", str)
    parser.add_argument("--input", default=f"{data}/ocr.json", help="raw rows (default: params split.data/ocr.json)")
    parser.add_argument("--output-dir", default=OUT_DIR)
    parser.add_argument("--test-ratio", type=float, default=P.get(params, "split.test_ratio", float))
    parser.add_argument("--seed", type=int, default=P.get(params, "split.seed", int))
    parser.add_argument("--group-by", choices=GROUP_BY, default=P.get(params, "split.group_by", str, choices=GROUP_BY))
    parser.add_argument("--empty-text", choices=EMPTY_TEXT, default=P.get(params, "split.empty_text", str, choices=EMPTY_TEXT))
    parser.add_argument("--pdf-dpi", type=int, default=P.get(params, "split.pdf_dpi", int, minimum=36, maximum=1200))
    parser.add_argument("--metrics", default=METRICS)
    parser.add_argument("--plots-dir", default=PLOT_DIR)
    args = P.parse_checked(parser, argv)
    if args.input == f"{SYNTH_DIR}/ocr.json" and Path(OWN_DATA).is_file():
        print(f"note: {OWN_DATA} is there but split.data is {SYNTH_DIR} (the generated data): set split.data "
              "to data/raw_data to split your data (README: Bring your own data)", file=sys.stderr)
    if not 0.0 < args.test_ratio < 1.0:
        raise UserError(f"--test-ratio (split.test_ratio) must be between 0 and 1, got {args.test_ratio}")

    # Everything is written into a temp folder that replaces data/input only when the split succeeded.
    with atomic_dir(args.output_dir, inputs=[args.input]) as out:
        (out / PAGES_DIR).mkdir()
        rows, counts = read_raw(args.input, args.empty_text, args.pdf_dpi, out / PAGES_DIR,
                                Path(args.output_dir) / PAGES_DIR)
        if len(rows) < 2:
            raise UserError(f"{args.input}: need at least 2 usable rows to split, found {len(rows)}")
        non_test, test = split_rows(rows, args.test_ratio, args.seed, args.group_by)
        if not non_test or not test:
            n_groups = len({group_key(r, args.group_by) for r in rows})
            raise UserError(f"{args.input}: split left one side empty ({len(non_test)} non-test, {len(test)} test, "
                            f"{n_groups} group(s) with group_by={args.group_by}); check split.test_ratio and split.group_by")
        atomic_write_json(out / "ocr_non_test.json", non_test, indent=1)
        atomic_write_json(out / "ocr_test.json", test, indent=1)
    dropped = counts["dropped_empty"]
    metrics = {"non_test": stats(non_test), "test": stats(test), "dropped_empty": dropped,
               "pdf_pages": counts["pdf_pages"], "test_fraction": round(len(test) / len(rows), 4)}
    atomic_write_json(args.metrics, metrics)
    write_plots(non_test, test, args.plots_dir)
    pdf = f", {counts['pdf_pages']} PDF pages rendered at {args.pdf_dpi} dpi" if counts["pdf_pages"] else ""
    print(f"split: {len(non_test)} non-test, {len(test)} test, {dropped} empty dropped{pdf} -> {args.output_dir}/")


if __name__ == "__main__":
    run_main(main)
