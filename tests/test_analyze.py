"""The analyze stage: real Optuna SQLite studies (pruned and failed trials), scored results with
real rendered images, the figures, the offline HTML report, the summary, bad input, DVC plots."""
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import ROOT, make_rows
from stages.lib import metrics, report

FIGURES = ["search_history.png", "search_importance.png", "search_parallel_coordinate.png",
           "search_pruning_curves.png", "errors_top_edits.png", "train_loss.png"]


def run_analyze(*args, cwd, storage_env=None):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("OCR_SEARCH_STORAGE", None)
    if storage_env:
        env["OCR_SEARCH_STORAGE"] = storage_env
    return subprocess.run([sys.executable, "-m", "stages.analyze", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def make_study(storage, name, n_trials, fail=(3,), seed=0):
    """A real study shaped like the search stage's: eval_loss reported per evaluation step, a
    median pruner that prunes, a trial that raises (recorded FAIL)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    study.set_user_attr("ocr_search", {"objective": "eval_loss"})

    def objective(trial):
        lr = trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)
        r = trial.suggest_categorical("lora_r", [8, 16, 32])
        if trial.number in fail:
            trial.set_user_attr("error", "RuntimeError: CUDA out of memory")  # as the search stage records it
            raise RuntimeError("CUDA out of memory")
        loss = 3.0 + seed
        for step in range(1, 7):
            loss = loss * (0.8 + abs(math.log10(lr) + 2.3) * 0.1) + 0.08 / r
            trial.report(loss, step * 25)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return loss

    study.optimize(objective, n_trials=n_trials, catch=(RuntimeError,))
    return study


def garble(text, rng):
    if rng.random() < 0.15:
        return ""
    out = []
    for ch in text:
        r = rng.random()
        if r < 0.06:
            continue
        out.append("口" if r < 0.12 else ch)
    return "".join(out) + ("一" if rng.random() < 0.1 else "")


def scored_result(rows, name, error_rate, seed):
    """A normalize-score output: per-sample figures computed with the real metrics module."""
    rng = random.Random(seed)
    samples = []
    for i, row in enumerate(rows):
        pred = garble(row["ocr_text"], rng) if rng.random() < error_rate else row["ocr_text"]
        ref_n, pred_n = metrics.normalize(row["ocr_text"]), metrics.normalize(pred)
        samples.append({"image_path": row["image_path"], "label": row["ocr_text"], "prediction": pred,
                        "cer_score": metrics.cer(ref_n, pred_n), "f1_score": metrics.f1(ref_n, pred_n)})
    samples[1] = {**samples[1], "prediction": "", "error": "ReadTimeout after 3 retries"}
    return {"overall_cer": 0.1, "overall_f1": 0.9, "total_samples": len(samples), "model_name": name,
            "samples_per_s": 2.5 / error_rate, "evaluated_this_run": len(samples), "samples": samples}


def write_loss_curves(live_dir):
    """Loss files written by dvclive itself, the way the train stage logs them."""
    from dvclive import Live

    live = Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
    for step in range(5, 201, 5):
        live.step = step
        live.log_metric("train/loss", 3 * math.exp(-step / 60) + 0.4)
        if step % 25 == 0:
            live.log_metric("eval/loss", 3 * math.exp(-step / 60) + 0.5)
            live.log_metric("eval/val_cer", math.exp(-step / 80))   # the CER during training (val_cer_rows)
    live.end()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A scratch project root holding every input of the analyze stage."""
    root = tmp_path_factory.mktemp("analyze_project")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["analyze"]["worst_n"] = 8
    params["split"]["data"] = "data/raw_data"   # the images below: a dep of the analyze stage
    params["runs"]["engines"] = {"tesseract": params["runs"]["engines"]["tesseract"]}   # the three runs below
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    (root / "models/search").mkdir(parents=True)
    db = f"sqlite:///{root}/models/search/study.db"
    study = make_study(db, params["search"]["study_name"], 12)
    make_study(db, "other", 6, fail=(), seed=1)
    make_study(db, "lonely", 1, fail=())
    best = study.best_trial
    (root / "models/search/best_params.json").write_text(json.dumps(
        {"params": best.params, "trial": best.number, "value": best.value, "objective": "eval_loss",
         "study_name": study.study_name, "skipped": False}))
    rows = make_rows(root / "data/raw_data/images", 30)
    for row in rows:
        row["image_path"] = str(Path(row["image_path"]).relative_to(root))
    (root / "scored").mkdir()
    for file, name, rate, seed in (("finetuned.json", "merged", 0.5, 1), ("base.json", "base", 1.0, 2),
                                   ("tesseract.json", "tesseract", 0.2, 3)):
        (root / "scored" / file).write_text(json.dumps(scored_result(rows, name, rate, seed), ensure_ascii=False))
    (root / "metrics").mkdir()
    score = {"overall_cer": 0.1234, "overall_cer_ci95_low": 0.1001, "overall_cer_ci95_high": 0.1502,
             "overall_f1": 0.8765, "overall_f1_ci95_low": 0.85, "overall_f1_ci95_high": 0.9, "exact_match": 0.5,
             "empty_predictions": 3, "total_samples": 30,
             "baselines": {"base": {"overall_cer": 0.9876, "overall_cer_ci95_low": 0.9, "overall_cer_ci95_high": 1.05,
                                    "overall_f1": 0.2, "total_samples": 30},
                           "tesseract": {"overall_cer": 0.0456, "overall_f1": 0.95, "total_samples": 30,
                                         "truncated_predictions": 2}}}
    score["pairs"] = {"finetuned_vs_base": {"pairs": 30, "cer_diff": -0.8642, "cer_diff_ci95_low": -0.91,
                                            "cer_diff_ci95_high": -0.8, "cer_p": 0.000999, "f1_diff": 0.6765,
                                            "f1_diff_ci95_low": 0.6, "f1_diff_ci95_high": 0.7, "f1_p": 0.0312,
                                            "better": 25, "worse": 2, "equal": 3}}
    score["failures"] = {"repetition": 2, "script_confusion": 1}
    score["failure_rates"] = {"repetition": 2 / 30, "script_confusion": 1 / 30}
    score["views"] = {"strict": {"cer": 0.2, "distance": 60, "label_length": 300},
                      "no_punctuation": {"cer": 0.15, "distance": 36, "label_length": 240},
                      "normalized": {"cer": 0.1234, "distance": 30, "label_length": 240},
                      "script_folded": {"cer": 0.1, "distance": 24, "label_length": 240}}
    score["tags"] = {"amount": {"samples": 12, "overall_cer": 0.2, "overall_cer_ci95_low": 0.1,
                                "overall_cer_ci95_high": 0.3, "overall_f1": 0.8, "macro_cer": 0.25, "failure_rate": 0.25}}
    score["failure_f1"] = 0.6
    score["confidence_source"] = "teacher_forced"
    score["confidence"] = {"samples_with_confidence": 30, "caught_at_5": 0.21, "caught_at_10": 0.4, "caught_at_20": 0.62}
    (root / "metrics/score_details.json").write_text(json.dumps(score))
    (root / "metrics/train.json").write_text(json.dumps({"train_loss": 0.51, "eval_loss": 0.62, "best_step": 150,
                                                          "global_step": 200, "val_cer": 0.031, "val_cer_base": 0.7}))
    write_loss_curves(root / "plots/train")
    write_curve_and_costs(root)
    return root


def write_curve_and_costs(root):
    """The learning_curve stage's and the train stage's outputs that analyze reads (shapes as written there)."""
    from stages.lib.figures import placeholder_figure

    (root / "metrics/runtime").mkdir(parents=True)
    (root / "metrics/learning_curve.json").write_text(json.dumps({
        "skipped": False, "summary": "Learning curve (validation CER, greedy; base 0.7000): 20 rows 0.3000.",
        "points": [{"train_rows": 20, "repeat": 0, "val_cer": 0.3, "trainable_params": 180352}]}))
    (root / "metrics/runtime/learning_curve.json").write_text(json.dumps({"points": [
        {"train_rows": 20, "repeat": 0, "point_wall_s": 12.34, "runtime_s": 9.0, "samples_per_second": 55.5,
         "peak_rss_mib": 812.0, "cuda_max_memory_allocated_mib": None, "device": "cpu: test, 2 cores"}]}))
    (root / "metrics/runtime/train.json").write_text(json.dumps({
        "train_rows": 180, "runtime_s": 54.7, "samples_per_second": 82.8, "peak_rss_mib": 900.4, "cuda_max_memory_allocated_mib": None,
        "device": "cpu: test, 2 cores"}))
    (root / "plots/learning_curve").mkdir(parents=True)
    (root / "plots/learning_curve/learning_curve.csv").write_text(
        "train_rows,repeat,val_cer,val_cer_ci95_low,val_cer_ci95_high,base_val_cer\n20,0,0.3,0.2,0.4,0.7\n")
    placeholder_figure(root / "plots/learning_curve/learning_curve.png", "Learning curve", "a test figure")


@pytest.fixture(scope="module")
def stage_run(project):
    db = project / "models/search/study.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    result = run_analyze(cwd=project)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before, "the study database (a DVC dep) was modified"
    return result


def test_stage_writes_every_figure(project, stage_run):
    for name in FIGURES:
        with Image.open(project / "plots/analysis" / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 150, name
    history = (project / "plots/analysis/search_history.csv").read_text().splitlines()
    assert history[0] == "trial,value,best_value"
    best_so_far = [float(line.split(",")[2]) for line in history[1:]]
    assert best_so_far == sorted(best_so_far, reverse=True) and len(best_so_far) >= 2


def test_loss_curves_are_read_from_dvclive_files(project):
    from stages.analyze import find_loss_files, read_tsv_series

    train, evaluation = find_loss_files(project / "plots/train")
    assert train.parent.name == "train" and evaluation.parent.name == "eval"
    steps, values = read_tsv_series(evaluation)
    assert steps == [25.0 * k for k in range(1, 9)] and values[0] == pytest.approx(3 * math.exp(-25 / 60) + 0.5)


def test_top_trials_table_is_ranked(project, stage_run):
    import optuna

    study = optuna.load_study(study_name="ocr-lora", storage=f"sqlite:///{project}/models/search/study.db")
    states = [t.state.name for t in study.trials]
    assert "PRUNED" in states and "FAIL" in states  # the fixture really exercises both
    table = (project / "reports/top_trials.md").read_text()
    assert f"{states.count('PRUNED')} pruned, 1 failed" in table
    assert "Failed trials: #3 RuntimeError: CUDA out of memory." in table
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert int(rows[0][2]) == study.best_trial.number
    assert float(rows[0][3]) <= float(rows[1][3])


def test_summary_table(project, stage_run):
    summary = (project / "metrics/summary.md").read_text()
    lines = summary.splitlines()
    fine = next(line for line in lines if line.startswith("| fine-tuned"))
    assert "0.1234 [0.1001, 0.1502]" in fine and "0.8765 [0.8500, 0.9000]" in fine and "| 0.5000 |" in fine
    base = next(line for line in lines if line.startswith("| base"))
    assert "0.9876 [0.9000, 1.0500]" in base
    assert next(line for line in lines if line.startswith("| Tesseract")).count("[") == 0  # no interval stored
    # one row per run of params.yaml `runs`: the main one (runs.main) first, then the table's order
    # (this fixture's params.yaml was dumped with sorted keys: base before finetuned)
    assert [line.split("|")[1].strip() for line in lines[2:5]] == ["fine-tuned", "base (no fine-tuning)", "Tesseract"]
    assert lines[0].split("|")[6].strip() == "truncated predictions"
    assert next(line for line in lines if line.startswith("| Tesseract")).split("|")[6].strip() == "2"
    best = json.loads((project / "models/search/best_params.json").read_text())
    assert f"best trial #{best['trial']}, eval_loss {best['value']:.6g}" in summary and "| lora_r |" in summary
    assert "12 trials (" in summary and "1 failed)" in summary
    assert ("Final training: train loss 0.51, eval loss 0.62 (best checkpoint, step 150 of 200), "
            "validation CER (raw text) 0.0310 (base 0.7000).") in summary
    # the score stage's details (metrics/score_details.json): one line per pair, then a table each
    assert ("- fine-tuned vs base (no fine-tuning): CER -0.8642 [-0.9100, -0.8000], p < 0.001; "
            "F1 +0.6765 [+0.6000, +0.7000], p = 0.031; better on 25 / worse on 2 / equal on 3 of 30 pages") in lines
    failures = next(line for line in lines if line.startswith("| fine-tuned | 0.067 (2)"))
    assert failures.count("|") == 10 and "| 0.033 (1) |" in failures
    assert "| script folded | 0.1000 | 24 | 0.400 |" in lines and "| strict | 0.2000 | 60 | 1.000 |" in lines
    assert "| amount | 12 | 0.2000 [0.1000, 0.3000] | 0.8000 | 0.2500 | 0.250 |" in lines
    assert "| fine-tuned | teacher_forced | 30 | 0.210 | 0.400 | 0.620 | `review/finetuned.csv` |" in lines
    assert "| Tesseract | none recorded | | | | | |" in lines


def test_summary_reads_the_curve_and_what_runs_cost(project, stage_run):
    summary = (project / "metrics/summary.md").read_text()
    assert "Learning curve (validation CER, greedy; base 0.7000): 20 rows 0.3000." in summary
    lines = summary.splitlines()
    train = next(line for line in lines if line.startswith("| final training"))
    assert train.startswith("| final training | 180 | n/a | 54.7 | 82.8 | 900 | n/a |") and "cpu: test, 2 cores" in train
    point = next(line for line in lines if line.startswith("| curve point"))
    assert "| 20 | 180,352 | 12.3 | 55.5 | 812 | n/a |" in point
    assert "fine-tuned 5.00 pages/s (30 pages this run)" in summary   # the results' samples_per_s


def test_loss_figure_gets_a_cer_panel(project, stage_run):
    from PIL import Image

    with Image.open(project / "plots/analysis/train_loss.png") as image:
        assert image.height > 550   # two panels (9 x 7 in at 100 dpi) where one is 4.5 in high


def test_error_analysis_counts(project, stage_run):
    data = json.loads((project / "reports/errors.json").read_text())
    result = json.loads((project / "scored/finetuned.json").read_text())
    ok = [s for s in result["samples"] if not s.get("error")]
    empty = [s for s in ok if metrics.normalize(s["prediction"]) == ""]
    ft = data["fine-tuned"]
    assert ft["failed_samples"] == 1 and ft["scored_samples"] == len(ok)
    assert ft["empty_predictions"]["count"] == len(empty) > 0
    assert sorted(r["image_path"] for r in ft["empty_predictions"]["samples"]) == sorted(s["image_path"] for s in empty)
    assert sum(b["samples"] for b in ft["cer_by_length"]) == len(ok)
    assert set(data) == {"fine-tuned", "base (no fine-tuning)", "Tesseract"}


def test_html_report_is_offline_and_shows_the_worst(project, stage_run):
    text = (project / "reports/errors.html").read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "<script" not in text
    result = json.loads((project / "scored/finetuned.json").read_text())
    ok = [s for s in result["samples"] if not s.get("error") and s["cer_score"] > 0]
    worst = max(ok, key=lambda s: s["cer_score"])
    # the image as the one loader reads it, re-encoded as PNG (so a TIFF or a 16-bit scan shows in a browser)
    assert report.image_data_url(project / worst["image_path"]).startswith("data:image/png;base64,")
    assert report.image_data_url(project / worst["image_path"]) in text
    assert text.count('<td class="img">') == min(8, len(ok))
    assert result["samples"][1]["image_path"] in text  # the failed sample is listed as failed


def test_edit_operations_hand_checked():
    scored = [{"ref": "ABCD", "pred": "AXCDE"}, {"ref": "ABC", "pred": "AC"}, {"ref": "台北", "pred": "台北"}]
    subs, ins, dels = report.edit_operations(scored)
    assert dict(subs) == {("B", "X"): 1} and dict(ins) == {"E": 1} and dict(dels) == {"B": 1}


def test_cer_by_length_hand_checked():
    rows = [{"ref": "abc", "distance": 1, "cer": 1 / 3}, {"ref": "abcd", "distance": 0, "cer": 0.0},
            {"ref": "abcdefg", "distance": 7, "cer": 1.0}]
    buckets = report.cer_by_length(rows, lambda n: (n // 5, f"{n // 5 * 5}-{n // 5 * 5 + 4}"))
    assert [(b["bucket"], b["samples"]) for b in buckets] == [("0-4", 2), ("5-9", 1)]
    assert buckets[0]["cer"] == pytest.approx(1 / 7) and buckets[0]["mean_cer"] == pytest.approx(1 / 6)
    assert buckets[1]["cer"] == 1.0


def test_length_buckets_match_the_score_stage():
    from stages.analyze import length_bucket

    assert [length_bucket(n)[1] for n in (0, 1, 5, 6, 20, 21, 3000)] == ["0", "1-5", "1-5", "6-10", "11-20", "21-40",
                                                                         "2561+"]


def test_char_diff_html_hand_checked():
    assert report.char_diff_html("a<bc", "a<xcd") == (
        '<span>a&lt;</span><span class="sub"><del title="label">b</del><ins title="prediction">x</ins></span>'
        '<span>c</span><ins title="not in the label">d</ins>')
    assert report.char_diff_html("ab", "") == '<del title="missing from the prediction">ab</del>'


def test_study_only_compare_and_too_few_trials(project, tmp_path):
    out = tmp_path / "cmp"
    result = run_analyze("--study-name", "ocr-lora", "--compare", "other", "lonely", "--output-dir", str(out),
                         "--storage", f"sqlite:///{project}/models/search/study.db", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "lonely: 1 complete trial(s); parameter importance needs at least 2" in result.stdout
    table = (out / "top_trials.md").read_text()
    assert all(f"## Study `{name}`" in table for name in ("ocr-lora", "other", "lonely"))
    for name in ("search_history.png", "search_importance.png", "search_parallel_coordinate.png",
                 "search_pruning_curves.png"):
        assert (out / name).stat().st_size > 5000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_study_only_reads_the_search_storage_variable(project, tmp_path):
    """$OCR_SEARCH_STORAGE (the search's remote study) is the default storage of --study-name runs;
    the default output folder is studies/NAME, outside the stage's outputs."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(project / "params.yaml", elsewhere / "params.yaml")
    result = run_analyze("--study-name", "other", cwd=elsewhere,
                         storage_env=f"sqlite:///{project}/models/search/study.db")
    assert result.returncode == 0, result.stderr
    assert "## Study `other`" in (elsewhere / "studies/other/top_trials.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--study-name", "x", "--storage", "sqlite:///missing/study.db"], "missing/study.db: study database not found"),
    (["--compare", "other"], "--compare goes with --study-name"),
    (["--worst-n", "0"], "--worst-n must be at least 1"),
])
def test_bad_arguments(project, args, message, monkeypatch):
    from stages.analyze import main
    from stages.lib.cli import UserError

    monkeypatch.chdir(project)
    monkeypatch.delenv("OCR_SEARCH_STORAGE", raising=False)
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        main(args)


def test_unknown_study_is_one_line_and_exit_2(project):
    result = run_analyze("--study-name", "nope", cwd=project)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "study 'nope' not found in sqlite:///models/search/study.db (studies there: " in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_results_file_writes_nothing(project, tmp_path):
    scratch = tmp_path / "p"
    shutil.copytree(project, scratch, ignore=shutil.ignore_patterns("reports", "analysis", "summary.md"))
    bad = json.loads((scratch / "scored/finetuned.json").read_text())
    del bad["samples"][4]["prediction"]
    (scratch / "scored/finetuned.json").write_text(json.dumps(bad))
    result = run_analyze(cwd=scratch)
    assert result.returncode == 2
    assert "scored/finetuned.json: sample 4: field 'prediction' missing or not a string" in result.stderr
    assert not (scratch / "reports").exists() and not (scratch / "plots/analysis").exists()
    assert not (scratch / "metrics/summary.md").exists()


def test_skipped_search(project, tmp_path):
    scratch = tmp_path / "p"
    shutil.copytree(project, scratch, ignore=shutil.ignore_patterns("reports", "analysis", "summary.md"))
    (scratch / "models/search/best_params.json").write_text(json.dumps(
        {"params": {}, "trial": None, "value": None, "study_name": "ocr-lora", "skipped": True}))
    result = run_analyze(cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert "Hyperparameter search: skipped" in (scratch / "metrics/summary.md").read_text()
    assert "skipped" in (scratch / "reports/top_trials.md").read_text()
    for name in FIGURES:
        assert (scratch / "plots/analysis" / name).is_file(), name
    assert (scratch / "plots/analysis/search_history.csv").read_text() == "trial,value,best_value\n"


def test_dvc_stage_and_plots(project, tmp_path):
    """The analyze stage and the top-level plots of the real dvc.yaml run under DVC."""
    repo = tmp_path / "repo"
    shutil.copytree(project, repo, ignore=shutil.ignore_patterns("reports", "analysis", "summary.md"))
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"analyze": spec["stages"]["analyze"]},
                                                   "plots": spec["plots"]}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    dvc = [str(Path(sys.executable).parent / "dvc")]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["repro", "-q", "analyze"]):
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr + done.stdout
    shown = subprocess.run(dvc + ["plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)["data"]
    images = [k for k, v in data.items() if v and v[0]["type"] == "image"]
    assert sorted(Path(k).name for k in images) == sorted(FIGURES + ["learning_curve.png"])
    assert data["loss"][0]["type"] == "vega" and data["search_history"][0]["type"] == "vega"
    assert {row["filename"] for row in data["loss"][0]["content"]["data"]["values"]} == {"train/loss.tsv", "eval/loss.tsv"}


def test_study_without_parameters_says_so(tmp_path):
    import optuna

    from stages.lib.search import analysis as S

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="fixed")
    study.optimize(lambda trial: 1.0, n_trials=3)
    assert S.plot_importances([study], tmp_path / "i.png") == ["fixed: no searched parameters, so no importance"]
    flat = optuna.create_study(study_name="flat")
    flat.optimize(lambda trial: trial.suggest_float("x", 0, 1) * 0 + 1.0, n_trials=4)
    assert "importances would all be equal" in S.importances(flat)[1]
    assert "need at least 2" in S.plot_parallel(study, tmp_path / "p.png")
    table = S.top_trials_markdown(study, 2).splitlines()
    rows = [line for line in table if line.startswith("|")]
    assert len(rows) == 4 and len({line.count("|") for line in rows}) == 1  # header, rule, 2 trials, same width


def test_interactive_html_where_plotly_is_installed(project, tmp_path):
    """plotly is optional (not a requirement): where it is installed, one self-contained HTML."""
    pytest.importorskip("plotly")
    result = run_analyze("--study-name", "ocr-lora", "--output-dir", str(tmp_path / "h"), cwd=project)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "h/search.html").read_text(encoding="utf-8")
    assert text.count('class="plotly-graph-div"') == 4 and '<script src="http' not in text


def test_parallel_coordinates_label_a_log_axis_with_plain_numbers_on_a_box():
    """Issue 24: the learning_rate axis read 2x10^-3 ... drawn over the trials' lines."""
    import matplotlib
    import optuna
    from optuna.visualization import matplotlib as om

    from stages.lib.search.analysis import readable_axis_labels

    matplotlib.use("Agg")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(lambda t: t.suggest_float("learning_rate", 1.0e-3, 1.0e-2, log=True)
                   + t.suggest_categorical("lora_r", [8, 16, 32]) / 1000, n_trials=8)
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        ax = om.plot_parallel_coordinate(study)
    readable_axis_labels(ax)
    ax.figure.canvas.draw()
    log_axes = [a for a in ax.figure.axes if a.get_yscale() == "log"]
    assert len(log_axes) == 1
    labels = [t for t in log_axes[0].get_yticklabels(which="both") if t.get_text()]
    assert len(labels) >= 2
    assert all(0.001 <= float(t.get_text()) <= 0.01 for t in labels), [t.get_text() for t in labels]
    assert all(t.get_bbox_patch() is not None for t in labels)
