"""Data-parallel training on the CPU: train samples/s with num_processes 2 against 1.

    python -m bench.bench_train_dist [--rows 72] [--epochs 8] [--batch 8]

Builds (untimed) the tiny Gemma 3 and `--rows` rendered lines in a temp project, then runs the train
stage (`python -m stages.train`, a subprocess) twice with the same params and the same global batch:
num_processes 1, then 2 (torchrun, gloo). Prints for each the trainer's train samples/s (the
training loop only: no imports, no model loading, no validation CER), the whole command's wall time,
and the ratios 2 / 1. On one machine the processes share its cores: torchrun gives each worker
OMP_NUM_THREADS=1, where the single process uses every core for its matrix products, so this
measures what data parallelism costs or gains here, not a multi-GPU speed-up.
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERIF = "NotoSerifCJK-Regular.ttc:Noto Serif CJK TC"


def make_project(folder, n_rows):
    from stages.lib.synthetic import charset, random_line, render_line
    from stages.lib.tinymodel import build_tiny_model

    build_tiny_model(folder / "base", charset(), seed=0)
    (folder / "rows").mkdir()
    rows = []
    for i in range(n_rows):
        rng = random.Random(f"bench-{i}")
        text = random_line(rng)
        path = folder / "rows" / f"line_{i:04d}.png"
        render_line(text, SERIF, 24, 128, rng).save(path)
        rows.append({"image_path": str(path), "ocr_text": text})
    (folder / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


def run(folder, n, args):
    work = folder / f"n{n}"
    work.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params.update(num_train_epochs=float(args.epochs), per_device_train_batch_size=args.batch, eval_steps=16,
                  logging_steps=8, warmup_ratio=0.0, backend="transformers", val_ratio=8 / args.rows, num_processes=n)
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--base-dir", str(folder / "base"),
                           "--non-test", str(folder / "rows.json")], cwd=work, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    wall = time.time() - start
    if proc.returncode:
        sys.exit(f"num_processes {n} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((work / "metrics/train.json").read_text())
    return metrics, wall


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=72, help="rendered lines; 8 go to validation")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="global batch (per_device_train_batch_size)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_train_dist_") as tmp:
        folder = Path(tmp)
        make_project(folder, args.rows)
        results = {n: run(folder, n, args) for n in (1, 2)}
    for n, (m, wall) in results.items():
        print(f"num_processes {n}: {m['samples_per_second']:.1f} train samples/s ({m['global_step']} steps of "
              f"{args.batch}, {m['runtime_s']:.1f} s training), {wall:.1f} s whole command, "
              f"train_loss {m['train_loss']:.4f}, backend {m['distributed_backend']}")
    (m1, w1), (m2, w2) = results[1], results[2]
    print(f"2 processes / 1: train samples/s x{m2['samples_per_second'] / m1['samples_per_second']:.2f}, "
          f"whole command x{w1 / w2:.2f} as fast")


if __name__ == "__main__":
    main()
