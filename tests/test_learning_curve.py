"""The learning curve (issue 22): nested subsets of whole documents, the fit and its one prediction, and
the stage in a real DVC project re-running only when its params, data or code change."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from stages.lib import learning_curve as LC
from stages.lib.training import split_train_val
from test_workflow import copy_project


def rows_in_documents(n_docs, sizes):
    """Documents of uneven sizes: doc k holds sizes[k % len(sizes)] lines."""
    return [{"image_path": f"docs/d{k:02d}/l{i}.png", "ocr_text": "x"}
            for k in range(n_docs) for i in range(sizes[k % len(sizes)])]


def test_subsets_are_nested_keep_documents_whole_and_follow_the_seed():
    rows = rows_in_documents(30, [3, 5, 7])
    subsets = LC.nested_subsets(rows, [10, 25, 60, "all"], seed=3)
    paths = [[r["image_path"] for r in subsets[k]] for k in (10, 25, 60, "all")]
    for small, large in zip(paths, paths[1:]):
        assert set(small) < set(large)                     # nested
    order = [r["image_path"] for r in rows]
    assert all(sorted(sub, key=order.index) == sub for sub in paths)   # the rows keep their order
    assert subsets["all"] == rows                          # 'all' is what the train stage trains on
    for asked, subset in subsets.items():
        n = len(rows) if asked == "all" else asked
        docs = {Path(p).parent for p in (r["image_path"] for r in subset)}
        assert sum(1 for r in rows if Path(r["image_path"]).parent in docs) == len(subset)   # whole documents
        assert n <= len(subset) < n + 7                    # at least the asked rows, less than one more document
    again = LC.nested_subsets(rows, [10, 25], seed=3)
    other = LC.nested_subsets(rows, [10, 25], seed=4)
    assert again[25] == subsets[25] and other[25] != subsets[25]


def test_power_law_fit_recovers_the_exponent_and_predicts_only_at_twice_the_largest_point():
    rng = np.random.default_rng(0)
    points = []
    for n in (20, 40, 80):
        cer = 2.0 * n ** -0.5
        ref_len = np.full(200, 10)
        distance = rng.binomial(10, min(cer, 1.0), size=200)  # noisy per-row errors around the trend
        points.append({"train_rows": n, "scores": {"distance": distance, "ref_len": ref_len}})
    fit = LC.fit_with_interval(points, resamples=300, seed=0)
    assert fit["predict_at_rows"] == 160
    assert fit["b"] == pytest.approx(0.5, abs=0.15)
    lo, hi = fit["b_ci95"]
    assert lo < fit["b"] < hi and lo < 0.5 < hi
    plo, phi = fit["predicted_val_cer_ci95"]
    assert plo < fit["predicted_val_cer"] < phi and plo < 2.0 * 160 ** -0.5 < phi
    assert LC.fit_power_law([50, 50], [0.2, 0.3], 1e-3) is None      # one size: nothing to fit


def test_the_sentence_reads_the_last_doubling_and_the_prediction():
    points = [{"train_rows": 20, "val_cer": 0.4}, {"train_rows": 40, "val_cer": 0.3}]
    fit = {"a": 1.0, "b": 0.4, "predict_at_rows": 80, "predicted_val_cer": 0.22,
           "b_ci95": [0.3, 0.5], "predicted_val_cer_ci95": [0.2, 0.25]}
    text = LC.reading(points, fit, 0.9)
    assert "The last doubling, 20 -> 40 rows, changed CER by -0.1000 (-25%)" in text
    assert "(CER x0.76 per doubling), predicts 0.2200 (95% bootstrap interval 0.2000-0.2500" in text
    assert "at 80 rows" in text


def test_stage_runs_in_dvc_and_reruns_only_when_its_params_data_or_code_change(tmp_path):
    p = copy_project(tmp_path / "repo")   # shrink(): train_rows [5, all]
    done = p.dvc("repro", "learning_curve", timeout=900)
    assert "Running stage 'learning_curve'" in done.stdout
    curve = p.json("metrics/learning_curve.json")
    train, val = split_train_val(p.json("data/input/ocr_non_test.json"), 0.2, 42)
    assert [pt["train_rows"] for pt in curve["points"]] == [5, len(train)] and curve["val_rows"] == len(val)
    assert all(pt["val_cer_ci95_low"] <= pt["val_cer"] <= pt["val_cer_ci95_high"] for pt in curve["points"])
    assert curve["fit"]["predict_at_rows"] == 2 * len(train) and "rows" in curve["summary"]
    # 'all' is the train stage's run (same rows, order, config): its adapter is read, not trained again
    trained = p.json("metrics/train.json")
    assert [pt["trained_by"] for pt in curve["points"]] == ["learning_curve", "train stage"]
    assert curve["points"][-1]["val_cer"] == pytest.approx(trained["val_cer"])
    assert curve["points"][-1]["best_step"] == trained["best_step"]
    # what a run cost goes to metrics/runtime/ only, never beside the quality figures
    assert not {"runtime_s", "samples_per_second", "peak_rss_mib", "device"} & set(trained)
    assert trained["trainable_params"] > 0
    cost = p.json("metrics/runtime/train.json")
    assert cost["runtime_s"] > 0 and cost["samples_per_second"] > 0 and cost["peak_rss_mib"] > 0 and cost["device"]
    runtime = p.json("metrics/runtime/learning_curve.json")
    assert [r["train_rows"] for r in runtime["points"]] == [5, len(train)]
    assert all(r["peak_rss_mib"] > 0 and r["point_wall_s"] > 0 for r in runtime["points"])
    csv_rows = (p.root / "plots/learning_curve/learning_curve.csv").read_text().splitlines()
    assert csv_rows[0].startswith("train_rows,repeat,val_cer") and len(csv_rows) == 3
    assert (p.root / "plots/learning_curve/learning_curve.png").stat().st_size > 1000
    p.commit("curve")

    again = p.dvc("repro", "learning_curve")
    assert "Running stage 'learning_curve'" not in again.stdout

    def changed(edit_file, old, new):
        path = p.root / edit_file
        text = path.read_text(encoding="utf-8")
        assert old in text
        path.write_text(text.replace(old, new, 1), encoding="utf-8")
        status = p.dvc("status", "learning_curve").stdout
        path.write_text(text, encoding="utf-8")
        return "learning_curve" in status.replace("Data and pipelines are up to date", "")

    params = (p.root / "params.yaml").read_text(encoding="utf-8")
    assert changed("params.yaml", "repeats: 1", "repeats: 2")                  # its own params
    assert changed("params.yaml", "lora_r: 16", "lora_r: 8")                   # the training's
    assert changed("stages/lib/learning_curve.py", "CER_FLOOR = 0.5", "CER_FLOOR = 0.25")   # its code
    assert changed("stages/lib/training.py", "import random", "import random  # edited")
    assert not changed("params.yaml", "top_n: 5", "top_n: 6")                  # another stage's param
    assert not changed("params.yaml", "num_processes: 1", "num_processes: 2")  # how train is launched
    assert not changed("stages/analyze.py", '"""analyze:', '"""analyze (edited):')
    # its data: a new split seed moves rows between train/validation and test
    (p.root / "params.yaml").write_text(params.replace("seed: 42\n  group_by", "seed: 43\n  group_by", 1),
                                        encoding="utf-8")
    p.dvc("repro", "split")
    status = p.dvc("status", "learning_curve").stdout
    assert "data/input/ocr_non_test.json" in status, status
