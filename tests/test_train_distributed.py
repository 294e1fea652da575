"""num_processes: data-parallel training under torchrun (gloo on this CPU) matches one process.

The train stage runs as a subprocess in a temp project, once with 1 process and once with 2, at the
same global batch (per_device_train_batch_size 4: 2 rows per process). 16 training rows / 4 = 4 steps
an epoch, 5 epochs: 20 logged train losses. Both runs take the same rows in each step (the same seeded
order; accelerate gives rank 0 the first half of each batch and rank 1 the second) and the loss is
averaged over the tokens of the whole global batch (transformers' average_tokens_across_devices).
"""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Measured (2 processes vs 1, this test's settings): train losses differ by at most 9.5e-7 absolute,
# 1.9e-7 relative (float32 sums in another order: DDP all-reduces the two halves' gradients). 1e-4 leaves
# a 500x margin and still fails on any real difference (another batch split or a per-rank mean: ~1e-2).
TRAIN_LOSS_RTOL = 1e-4
# eval_loss is a mean of per-batch losses, and an eval batch is 2 rows per process instead of 4 rows,
# so it is weighted differently: measured 5.4071 vs 5.4116 (0.08%). 1% is the margin.
EVAL_LOSS_RTOL = 1e-2


def project(tmp_path, name, rows_file, **changes):
    """A temp project dir with params.yaml: small, fast training (val_ratio 0.34: 8 of the 24 rows, so
    16 training rows split into whole batches)."""
    path = tmp_path / name
    path.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params.update(num_train_epochs=5.0, per_device_train_batch_size=4, eval_steps=10, logging_steps=1,
                  warmup_ratio=0.0, backend="transformers", val_ratio=0.34, num_processes=1)
    params.update(changes)
    (path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return path


def train(path, base_dir, rows_file, timeout=180):
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--base-dir", str(base_dir), "--non-test", str(rows_file)],
                          cwd=path, capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    return proc.returncode, proc.stdout, proc.stderr.strip()


def train_losses(path):
    with open(path / "plots/train/plots/metrics/train/loss.tsv", encoding="utf-8") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")]


def files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "params.yaml")


def test_two_processes_train_like_one(tmp_path, tiny_base_dir, tiny_rows_file):
    runs = {}
    for n in (1, 2):
        path = project(tmp_path, f"n{n}", tiny_rows_file, num_processes=n)
        rc, out, err = train(path, tiny_base_dir, tiny_rows_file)
        assert rc == 0, err[-3000:]
        assert out.count("train: eval_loss") == 1   # the summary: rank 0 only
        runs[n] = path
    one, two = runs[1], runs[2]
    assert files(one) == files(two)   # the same outputs, nothing extra from rank 1 (no half-written temp files)
    assert not (two / "models/checkpoints/train.log").exists()   # the workers' log goes after a success

    m1, m2 = (json.loads((p / "metrics/train.json").read_text()) for p in (one, two))
    assert m1.keys() == m2.keys()
    assert (m1["num_processes"], m1["distributed_backend"]) == (1, None)
    assert (m2["num_processes"], m2["distributed_backend"]) == (2, "gloo")
    assert m1["global_step"] == m2["global_step"] == 20

    l1, l2 = train_losses(one), train_losses(two)
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 21))
    worst = max(abs(a - b) / a for (_, a), (_, b) in zip(l1, l2))
    assert worst < TRAIN_LOSS_RTOL, (worst, l1, l2)
    assert l2[-1][1] < l2[0][1] - 0.5   # it did learn
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], rel=EVAL_LOSS_RTOL)
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=TRAIN_LOSS_RTOL)


def test_batch_not_divisible_is_refused_before_loading_anything(tmp_path):
    path = project(tmp_path, "bad", None, num_processes=3)
    # no base model and no data exist here: the params check comes first
    rc, out, err = train(path, tmp_path / "no_base", tmp_path / "no_rows.json", timeout=60)
    assert rc == 2 and err == ("error: params.yaml: 'per_device_train_batch_size' 4 is not divisible by "
                               "'num_processes' 3 (each process takes an equal share of the batch)"), err


def test_a_failing_rank_is_one_line(tmp_path, tiny_base_dir, tiny_rows_file):
    # max_seq_length below the prompt's length: every worker stops in its row-length check
    path = project(tmp_path, "fail", tiny_rows_file, num_processes=2, max_seq_length=20)
    rc, out, err = train(path, tiny_base_dir, tiny_rows_file)
    assert rc == 2 and err.count("\n") == 0, err
    assert re.fullmatch(r"error: train: rank [01] failed: \d+ of 24 training/validation rows are longer than "
                        r"max_seq_length, 20 tokens .*\(every worker's output: models/checkpoints/train\.log\)", err), err
    assert "[default" in (path / "models/checkpoints/train.log").read_text()   # kept, with every rank's stderr
    assert not (path / "models/lora").exists() and not (path / "metrics").exists()
