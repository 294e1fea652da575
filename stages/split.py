"""split: raw OCR data -> data/input/ocr_non_test.json + data/input/ocr_test.json.

Seeded and byte-for-byte reproducible. `test_ratio` is a float (default 5/6, the original's
1:5 non_test:test) rounded to the nearest row count, never truncated. With group_by=parent,
all pages of one document (one folder) land on the same side.
"""
import argparse
import random
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

from .lib import params as P
from .lib.cli import UserError, run_main
from .lib.io import atomic_write_json, atomic_write_text, read_json

OUT_DIR = "data/input"
METRICS = "metrics/split.json"
PLOT_DIR = "plots/split"


def read_raw(path, empty_text):
    """Validate the raw rows; return [{"image_path", "ocr_text"}] and the number of dropped empties."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of {{img_path, ocr_results}} rows, got {type(rows).__name__}")
    out, seen, dropped = [], {}, 0
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object, got {type(row).__name__}")
        for field in ("img_path", "ocr_results"):
            if field not in row:
                raise UserError(f"{where}: missing field '{field}'")
            if not isinstance(row[field], str):
                raise UserError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
        image_path, text = row["img_path"], row["ocr_results"]
        if image_path in seen:
            raise UserError(f"{where}: duplicate img_path '{image_path}' (first in row {seen[image_path]})")
        seen[image_path] = i
        check_image(image_path, where)
        if not text.strip():
            if empty_text == "error":
                raise UserError(f"{where}: empty ocr_results (set split.empty_text to 'drop' or 'keep')")
            if empty_text == "drop":
                dropped += 1
                continue
        out.append({"image_path": image_path, "ocr_text": text})
    return out, dropped


def check_image(image_path, where):
    if not Path(image_path).is_file():
        raise UserError(f"{where}: image '{image_path}' does not exist (paths are relative to the project root)")
    try:
        with Image.open(image_path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types for a bad file
        raise UserError(f"{where}: image '{image_path}' is not a readable image ({type(err).__name__})") from None


def group_key(image_path, group_by):
    return str(Path(image_path).parent) if group_by == "parent" else image_path


def split_rows(rows, test_ratio, seed, group_by):
    """Shuffle groups with `seed`; fill the test side up to round(n * test_ratio) rows."""
    groups = defaultdict(list)
    for row in rows:
        groups[group_key(row["image_path"], group_by)].append(row)
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
    for name, rows in (("non_test", non_test), ("test", test)):
        ax.hist([len(r["ocr_text"]) for r in rows], bins=range(0, 42), alpha=0.6, label=f"{name} ({len(rows)})")
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
    params = P.load_params()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="data/raw_data/ocr.json")
    parser.add_argument("--output-dir", default=OUT_DIR)
    parser.add_argument("--test-ratio", type=float, default=P.get(params, "split.test_ratio", float))
    parser.add_argument("--seed", type=int, default=P.get(params, "split.seed", int))
    parser.add_argument("--group-by", choices=["none", "parent"], default=P.get(params, "split.group_by", str))
    parser.add_argument("--empty-text", choices=["error", "drop", "keep"], default=P.get(params, "split.empty_text", str))
    parser.add_argument("--metrics", default=METRICS)
    parser.add_argument("--plots-dir", default=PLOT_DIR)
    args = parser.parse_args(argv)
    if not 0.0 < args.test_ratio < 1.0:
        raise UserError(f"--test-ratio (split.test_ratio) must be between 0 and 1, got {args.test_ratio}")

    rows, dropped = read_raw(args.input, args.empty_text)
    if len(rows) < 2:
        raise UserError(f"{args.input}: need at least 2 usable rows to split, found {len(rows)}")
    non_test, test = split_rows(rows, args.test_ratio, args.seed, args.group_by)
    if not non_test or not test:
        n_groups = len({group_key(r["image_path"], args.group_by) for r in rows})
        raise UserError(f"{args.input}: split left one side empty ({len(non_test)} non-test, {len(test)} test, "
                        f"{n_groups} group(s) with group_by={args.group_by}); check split.test_ratio and split.group_by")

    out = Path(args.output_dir)
    atomic_write_json(out / "ocr_non_test.json", non_test, indent=1)
    atomic_write_json(out / "ocr_test.json", test, indent=1)
    metrics = {"non_test": stats(non_test), "test": stats(test), "dropped_empty": dropped,
               "test_fraction": round(len(test) / len(rows), 4)}
    atomic_write_json(args.metrics, metrics)
    write_plots(non_test, test, args.plots_dir)
    print(f"split: {len(non_test)} non-test, {len(test)} test, {dropped} empty dropped -> {out}/")


if __name__ == "__main__":
    run_main(main)
