"""stages/score.py: the one-file command, the DVC stage mode, bad input, and the light import."""
import csv
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

from stages import score
from stages.lib.io import MARKER
from stages.lib.cli import UserError

ROOT = Path(__file__).resolve().parents[1]


def evaluation(samples, **top):
    doc = {"overall_cer": 0.5, "overall_f1": 0.4, "total_samples": len(samples),
           "timestamp": "2026-01-01T00:00:00+00:00", "model_name": "m", "samples": samples}
    doc.update(top)
    return doc


SAMPLES = [
    {"image_path": "a.png", "label": "ABC 123", "prediction": "ＡＢＣ１２３", "cer_score": 0.9, "f1_score": 0.1,
     "latency_s": 0.25, "completion_tokens": 7},
    {"image_path": "b.png", "label": "你好，世界。", "prediction": "你好世", "cer_score": 0.5, "f1_score": 0.6},
    {"image_path": "c.png", "label": "失敗", "prediction": None, "cer_score": None, "f1_score": None,
     "error": "HTTP 503 after 3 retries", "latency_s": 60.0},
    {"image_path": "d.png", "label": "abc", "prediction": "cba", "cer_score": 0.6, "f1_score": 1.0},
]


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def test_one_file(tmp_path):
    src = write(tmp_path / "x.json", evaluation([dict(s) for s in SAMPLES], extra_field={"k": 1}))
    score.main(["--input", str(src), "--output", str(tmp_path / "x_norm.json"), "--bootstrap-samples", "200",
                "--seed", "0"])
    out = json.loads((tmp_path / "x_norm.json").read_text(encoding="utf-8"))
    samples = out["samples"]
    assert [s["image_path"] for s in samples] == ["a.png", "b.png", "c.png", "d.png"]   # input order
    assert [s["label"] for s in samples] == [s["label"] for s in SAMPLES]                # as they came
    assert [s["prediction"] for s in samples] == [s["prediction"] for s in SAMPLES]
    assert samples[0]["latency_s"] == 0.25 and samples[0]["completion_tokens"] == 7     # other fields kept
    assert out["extra_field"] == {"k": 1} and out["model_name"] == "m"
    # Hand-checked: a: full-width folds, CER 0 F1 1; b: 你好世界 vs 你好世, CER 1/4, F1 2*3/7;
    # d: abc vs cba, CER 2/3, F1 1; c failed: no score, not counted.
    assert [s["cer_score"] for s in samples] == pytest.approx([0.0, 0.25, None, 2 / 3])
    assert [s["f1_score"] for s in samples] == pytest.approx([1.0, 6 / 7, None, 1.0])
    assert [s["raw_cer_score"] for s in samples] == [0.9, 0.5, None, 0.6]
    assert samples[2]["error"] == "HTTP 503 after 3 retries"
    assert out["overall_cer"] == pytest.approx(3 / 13)        # (0 + 1 + 2) / (6 + 4 + 3)
    assert out["overall_f1"] == pytest.approx((1 + 6 / 7 + 1) / 3)
    assert (out["raw_overall_cer"], out["raw_overall_f1"]) == (0.5, 0.4)
    assert (out["total_samples"], out["scored_samples"], out["failed_samples"]) == (4, 3, 1)
    assert out["exact_match"] == pytest.approx(1 / 3) and out["empty_predictions"] == 0
    assert out["overall_cer_ci95_low"] <= out["overall_cer"] <= out["overall_cer_ci95_high"]


def test_failed_samples_are_left_out_of_every_figure(tmp_path):
    ok = [dict(s) for s in SAMPLES if "error" not in s]
    with_failed = [dict(s) for s in SAMPLES]
    for name, samples in (("ok", ok), ("all", with_failed)):
        score.main(["--input", str(write(tmp_path / f"{name}.json", evaluation(samples))), "--bootstrap-samples",
                    "100", "--seed", "3"])
    a = json.loads((tmp_path / "ok_norm.json").read_text(encoding="utf-8"))     # default output name
    b = json.loads((tmp_path / "all_norm.json").read_text(encoding="utf-8"))
    figures = [k for k in a if k.startswith(("overall", "macro", "micro", "exact", "normalized_edit", "empty"))]
    assert len(figures) >= 10
    assert {k: a[k] for k in figures} == {k: b[k] for k in figures}
    assert (a["failed_samples"], b["failed_samples"]) == (0, 1)


@pytest.mark.parametrize("content, message", [
    ("", "not valid JSON"),
    ("{not json", "not valid JSON"),
    ('{"overall_cer": 0.1}', "'samples' list"),
    ('{"samples": {}}', "'samples' must be a list"),
    ('{"samples": [{"label": "a", "prediction": "a"}, 3]}', "samples[1]: expected an object"),
    ('{"samples": [{"label": "a", "prediction": "a"}, {"label": "b", "prediction": "b"}, {"label": "c"}]}',
     "samples[2]: field 'prediction' missing"),
    ('{"samples": [{"label": "a", "prediction": 5}]}', "samples[0]: field 'prediction' must be a string, got int"),
    ('{"samples": [{"label": null, "prediction": "x"}]}', "samples[0]: field 'label' must be a string, got NoneType"),
    ('{"samples": [{"prediction": null, "error": "timeout"}]}', "samples[0]: field 'label' missing"),
    ('{"samples": [{"label": "a", "prediction": null, "error": "timeout"}]}', "no sample to score"),
    ('{"samples": []}', "no sample to score"),
])
def test_bad_input_one_line_error_nothing_written(tmp_path, content, message):
    src = tmp_path / "bad.json"
    src.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as err:
        score.main(["--input", str(src), "--output", str(tmp_path / "out.json"), "--bootstrap-samples", "10",
                    "--seed", "0"])
    assert message in str(err.value) and str(src) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_nan_and_infinity_are_read(tmp_path):
    # A Python writer (json.dumps) emits NaN/Infinity, which strict JSON parsers reject.
    src = tmp_path / "x.json"
    src.write_text('{"overall_cer": Infinity, "samples": [{"label": "ab", "prediction": "ab", "cer_score": NaN}]}')
    score.main(["--input", str(src), "--bootstrap-samples", "0", "--seed", "0"])
    out = json.loads((tmp_path / "x_norm.json").read_text(encoding="utf-8"))
    assert out["overall_cer"] == 0.0 and out["raw_overall_cer"] is None   # orjson writes inf/nan as null


def test_command_line_exit_code_and_one_line(tmp_path):
    src = write(tmp_path / "x.json", {"samples": [{"label": "a"}]})
    done = subprocess.run([sys.executable, "-m", "stages.score", "--input", str(src), "--bootstrap-samples", "5"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {src}: samples[0]: field 'prediction' missing"


def test_command_line_success(tmp_path):
    # The command as a user runs it: output complete and in place, the report line on stdout
    # (buffered, as in a pipe), exit code 0, no temp file left.
    src = write(tmp_path / "x.json", evaluation([dict(s) for s in SAMPLES]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-m", "stages.score", "--input", str(src), "--output",
                           str(tmp_path / "out.json"), "--bootstrap-samples", "20", "--seed", "0"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"score: {describe_of(tmp_path / 'out.json')}\n" and done.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "x.json"]


def describe_of(path):
    out = json.loads(path.read_text(encoding="utf-8"))
    return score.describe(path, out)


def test_scoring_does_not_import_torch():
    code = ("import sys, stages.score, stages.lib.metrics; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


RUNS = ("finetuned", "base", "tesseract")   # the runs table written by stage_inputs, main run first


def stage_inputs(results):
    """Three runs' evaluation outputs, and the project's params.yaml (its runs table) beside them."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["runs"]["engines"] = {"tesseract": params["runs"]["engines"]["tesseract"]}   # the three runs of RUNS
    (results.parent / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    write(results / "finetuned.json", evaluation([dict(s) for s in SAMPLES]))
    write(results / "base.json", evaluation([dict(s, prediction="xyz" * 3, finish_reason="length")
                                             for s in SAMPLES if "error" not in s]))
    write(results / "tesseract.json", evaluation([dict(s, prediction=s["label"]) for s in SAMPLES if "error" not in s]))


def test_stage_mode_writes_every_dvc_output(tmp_path, monkeypatch, capsys):
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["normalize-score"]
    stage_inputs(tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    score.main(["--bootstrap-samples", "100", "--seed", "0"])

    declared = [next(iter(m)) for m in stage["metrics"]] + [next(iter(p)) for p in stage["plots"]]
    assert all((tmp_path / path).exists() for path in declared), declared
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
    assert outs == ["scored", "metrics/runtime/normalize-score.json", "metrics/score_details.json", "review"] and "results" in stage["deps"]
    assert all((tmp_path / path).exists() for path in outs if not path.startswith("metrics/runtime/"))  # run_main under DVC writes it
    assert sorted(p.name for p in (tmp_path / "scored").iterdir() if p.name != MARKER) == sorted(f"{r}.json" for r in RUNS)
    warned = capsys.readouterr().err
    assert "warning: base: 3 of 3 predictions were cut by the token limit" in warned and "finetuned:" not in warned

    headline = json.loads((tmp_path / "metrics/score.json").read_text(encoding="utf-8"))
    assert set(headline) == {*score.HEADLINE_KEYS, "failure_rates", "baselines", "pairs"}   # lean: dvc exp show
    assert set(headline["baselines"]["base"]) == {"overall_cer", "overall_f1", "failure_rates"}
    assert headline["baselines"]["base"]["failure_rates"]["truncated"] == 1.0
    assert set(headline["pairs"]) == {"finetuned_vs_base", "finetuned_vs_tesseract"}
    assert set(headline["pairs"]["finetuned_vs_base"]) == set(score.PAIR_KEYS)
    metrics = json.loads((tmp_path / "metrics/score_details.json").read_text(encoding="utf-8"))
    assert metrics["overall_cer"] == headline["overall_cer"] == pytest.approx(round(3 / 13, 6))  # the fine-tuned model
    assert metrics["failed_samples"] == 1
    # fine-tuned (3 / 13) vs Tesseract (exact on all 3 scored pages): worse on the 2 pages it misreads
    pair = metrics["pairs"]["finetuned_vs_tesseract"]
    assert (pair["pairs"], pair["better"], pair["worse"], pair["equal"]) == (3, 0, 2, 1)
    assert pair["cer_diff"] == pytest.approx(round(3 / 13, 6))
    assert set(metrics["views"]) == {"strict", "no_punctuation", "normalized", "script_folded"}
    # strict: a 7 (width + space), b 3 (，界。), d 2 over 7 + 6 + 3; without punctuation and spaces:
    # a 6 (width), b 1, d 2 over 6 + 4 + 3; normalized and script-folded: 0 + 1 + 2 over 13
    views = {view: (v["distance"], v["label_length"]) for view, v in metrics["views"].items()}
    assert views == {"strict": (12, 16), "no_punctuation": (9, 13), "normalized": (3, 13), "script_folded": (3, 13)}
    assert metrics["baselines"]["tesseract"]["overall_cer"] == 0.0
    assert metrics["baselines"]["tesseract"]["exact_match"] == 1.0
    assert metrics["baselines"]["base"]["overall_f1"] == 0.0
    assert (metrics["truncated_predictions"], metrics["baselines"]["base"]["truncated_predictions"]) == (0, 3)

    with open(tmp_path / "plots/score/cer_histogram.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["cer_bin"] for r in rows][:2] == ["0.0-0.1", "0.1-0.2"] and rows[-1]["cer_bin"] == "1.0+"
    assert [sum(int(r[run]) for r in rows) for run in RUNS] == [3, 3, 3]
    assert (rows[0]["finetuned"], rows[2]["finetuned"], rows[6]["finetuned"]) == ("1", "1", "1")  # 0, 0.25, 0.67
    assert (rows[0]["tesseract"], rows[-1]["base"]) == ("3", "3")
    with open(tmp_path / "plots/score/cer_by_length.csv", encoding="utf-8") as f:
        rows = {r["length_bucket"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"1-5", "6-10"}     # normalized label lengths 3, 4 and 6
    assert float(rows["1-5"]["finetuned"]) == pytest.approx(round(3 / 7, 6))   # (1 + 2) / (4 + 3)
    assert rows["6-10"]["finetuned_samples"] == "1"


def test_stage_mode_bad_baseline_writes_nothing(tmp_path, monkeypatch):
    stage_inputs(tmp_path / "results")
    write(tmp_path / "results/tesseract.json", {"samples": [{"label": "a", "prediction": 1}]})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"tesseract\.json: samples\[0\]: field 'prediction'"):
        score.main(["--bootstrap-samples", "10", "--seed", "0"])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["base.json", "finetuned.json", "tesseract.json"]
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "plots").exists()
    assert not (tmp_path / "scored").exists()


def test_cer_histogram_bins_exact_tenths():
    bins = dict(score.cer_histogram([0.0, 0.1, 0.3, 0.7, 0.99, 1.0, 2.5]))
    assert (bins["0.0-0.1"], bins["0.1-0.2"], bins["0.3-0.4"], bins["0.7-0.8"], bins["0.9-1.0"], bins["1.0+"]) == \
        (1, 1, 1, 1, 1, 2)


@pytest.mark.parametrize("marks", [False, True])
def test_bench_runs_and_bare_loop_scores_the_same_pairs(marks):
    # `make bench` at a tiny size, both cases: the three ways run, and the bench's own check that
    # the bare loop's corpus CER equals ours passes (it exits otherwise).
    from bench.bench_score import run_bench

    wall, cpu = run_bench(300, 1, marks)
    assert set(wall) == set(cpu) == {"ours", "original", "bare"}
    assert all(t > 0 for t in wall.values())


def test_bench_marks_case_needs_nfc_in_about_a_third_of_the_texts():
    from bench.bench_score import make_evaluation

    for marks in (False, True):
        samples = [s for s in make_evaluation(3000, marks=marks)["samples"] if not s.get("error")]
        texts = [s["label"] for s in samples] + [s["prediction"] for s in samples]
        share = sum(not unicodedata.is_normalized("NFC", t) for t in texts) / len(texts)
        assert (0.2 < share < 0.45) if marks else share == 0, (marks, share)
