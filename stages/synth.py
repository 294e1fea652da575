"""synth: render the embedded default dataset (receipt-like Traditional Chinese lines).

Writes data/synthetic/ocr.json ([{"img_path", "ocr_results", "tags"}], the original scripts' raw
format plus the kind of line as its tag: date, amount, invoice, address, item) and the PNGs under
data/synthetic/images/doc_NNN/. Same params + same fonts give byte-identical files. A folder of its
own, where nobody puts their files: this stage replaces it whole. Replace it with your own data
(data/raw_data/, params.yaml split.data): see the README.
"""
import argparse
import random

from tqdm import tqdm

from .lib import params as P
from .lib.cli import run_main
from .lib.io import atomic_dir, atomic_write_json
from .lib.synthetic import render_line, tagged_line

OUT_DIR = "data/synthetic"
PARAMS = ["synth"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=OUT_DIR)
    args = parser.parse_args(argv)

    params = P.load_params(PARAMS)
    n_lines = P.get(params, "synth.n_lines", int, minimum=1)
    per_doc = P.get(params, "synth.lines_per_document", int, minimum=1)
    seed = P.get(params, "synth.seed", int)
    image_size = P.get(params, "synth.image_size", int, minimum=32)
    fonts = P.get(params, "synth.fonts", list)
    sizes = P.get(params, "synth.font_sizes", list)
    noise = P.get(params, "synth.noise", float, minimum=0.0, maximum=0.5)

    rows = []
    with atomic_dir(args.output_dir) as tmp:
        for i in tqdm(range(n_lines), desc="synth", unit="line"):
            rng = random.Random(f"{seed}-{i}")  # one stream per line: stable under n_lines changes
            text, kind = tagged_line(rng)   # the same draws as before: same text, same images
            image = render_line(text, rng.choice(fonts), rng.choice(sizes), image_size, rng, noise)
            rel = f"images/doc_{i // per_doc:04d}/line_{i % per_doc:03d}.png"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            image.save(tmp / rel, format="PNG")
            rows.append({"img_path": f"{args.output_dir}/{rel}", "ocr_results": text, "tags": [kind]})
        atomic_write_json(tmp / "ocr.json", rows, indent=1)
    print(f"synth: wrote {len(rows)} lines to {args.output_dir}/ocr.json")


if __name__ == "__main__":
    run_main(main)
