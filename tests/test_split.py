"""The synth and split stages: bad input, reproducibility, ratio, grouping, DVC caching."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_rows


def run_stage(module, *args, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def project(tmp_path):
    """A scratch project root: params.yaml with a small synth section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["synth"]["n_lines"] = 40
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return tmp_path


def write_raw(project, rows):
    path = project / "raw.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def raw_rows(project, n=12):
    return [{"img_path": r["image_path"], "ocr_results": r["ocr_text"]} for r in make_rows(project / "img", n)]


def split(project, raw, *extra):
    return run_stage("split", "--input", str(raw), "--output-dir", str(project / "out"),
                     "--metrics", str(project / "m.json"), "--plots-dir", str(project / "plots"), *extra, cwd=project)


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


BAD_INPUTS = {
    "not_json": ("{oops", "not valid JSON"),
    "not_list": ({"img_path": "a.png"}, "expected a JSON list"),
    "missing_field": ([{"img_path": "IMG0"}], "row 0: missing field 'ocr_results'"),
    "wrong_type": ([{"img_path": "IMG0", "ocr_results": 12}], "row 0: field 'ocr_results' must be a string"),
    "no_image": ([{"img_path": "nowhere/x.png", "ocr_results": "a"}], "row 0: image 'nowhere/x.png' does not exist"),
    "not_image": ([{"img_path": "raw.txt", "ocr_results": "a"}], "is not a readable image"),
    "duplicate": ([{"img_path": "IMG0", "ocr_results": "a"}, {"img_path": "IMG0", "ocr_results": "b"}],
                  "row 1: duplicate img_path"),
    "empty_text": ([{"img_path": "IMG0", "ocr_results": " "}, {"img_path": "IMG1", "ocr_results": "b"}],
                   "row 0: empty ocr_results"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_line_error_and_writes_nothing(project, case):
    content, message = BAD_INPUTS[case]
    images = [r["img_path"] for r in raw_rows(project, 2)]
    (project / "raw.txt").write_text("not an image")
    if isinstance(content, str):
        raw = project / "raw.json"
        raw.write_text(content)
    else:
        text = json.dumps(content).replace('"IMG0"', json.dumps(images[0])).replace('"IMG1"', json.dumps(images[1]))
        raw = project / "raw.json"
        raw.write_text(text)
    extra = ["--empty-text", "error"] if case == "empty_text" else []
    result = split(project, raw, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "out").exists() and not (project / "m.json").exists()


def test_empty_text_policy_drop_counts_and_keep_keeps(project):
    rows = raw_rows(project, 6)
    rows[2]["ocr_results"] = ""
    raw = write_raw(project, rows)
    assert split(project, raw, "--empty-text", "drop", "--test-ratio", "0.5", "--group-by", "none").returncode == 0
    metrics = json.loads((project / "m.json").read_text())
    assert metrics["dropped_empty"] == 1 and metrics["test"]["count"] + metrics["non_test"]["count"] == 5
    assert split(project, raw, "--empty-text", "keep", "--test-ratio", "0.5", "--group-by", "none").returncode == 0
    assert json.loads((project / "m.json").read_text())["dropped_empty"] == 0


def test_split_is_reproducible_and_seeded(project):
    raw = write_raw(project, raw_rows(project, 12))
    assert split(project, raw, "--seed", "3", "--group-by", "none").returncode == 0
    first = digest(project / "out")
    assert split(project, raw, "--seed", "3", "--group-by", "none").returncode == 0
    assert digest(project / "out") == first
    assert split(project, raw, "--seed", "4", "--group-by", "none").returncode == 0
    assert digest(project / "out") != first


def test_ratio_is_rounded_not_truncated(project):
    raw = write_raw(project, raw_rows(project, 7))
    assert split(project, raw, "--test-ratio", str(5 / 6), "--group-by", "none").returncode == 0
    test = json.loads((project / "out" / "ocr_test.json").read_text())
    non_test = json.loads((project / "out" / "ocr_non_test.json").read_text())
    assert (len(non_test), len(test)) == (1, 6)  # 7 * 5/6 = 5.83 -> 6; int() would give 5
    assert {r["image_path"] for r in test} | {r["image_path"] for r in non_test} == \
        {r["img_path"] for r in json.loads(raw.read_text())}


def test_group_by_parent_keeps_documents_on_one_side(project):
    rows = []
    for doc in range(6):
        rows += [{"img_path": r["image_path"], "ocr_results": r["ocr_text"]}
                 for r in make_rows(project / f"doc{doc}", 3, seed=doc)]
    raw = write_raw(project, rows)
    assert split(project, raw, "--test-ratio", "0.5", "--group-by", "parent").returncode == 0
    sides = {}
    for side in ("ocr_test", "ocr_non_test"):
        for row in json.loads((project / "out" / f"{side}.json").read_text()):
            sides.setdefault(Path(row["image_path"]).parent.name, set()).add(side)
    assert len(sides) == 6 and all(len(s) == 1 for s in sides.values())


def test_synth_is_byte_identical_across_runs(project):
    assert run_stage("synth", "--output-dir", "a", cwd=project).returncode == 0
    assert run_stage("synth", "--output-dir", "b", cwd=project).returncode == 0
    raw = json.loads((project / "a" / "ocr.json").read_text())
    assert len(raw) == 40 and all(r["ocr_results"] for r in raw)
    assert (project / "a" / "ocr.json").read_text().replace("a/", "b/") == (project / "b" / "ocr.json").read_text()
    assert digest(project / "a" / "images") == digest(project / "b" / "images")


def test_dvc_repro_skips_when_unchanged_and_split_seed_reruns_only_split(project):
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent))
    shutil.copytree(ROOT / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in ("synth", "split")}}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(*cmd):
        result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    sh("git", "init", "-q")
    sh(dvc, "init", "-q")
    first = sh(dvc, "repro")
    assert "Running stage 'synth'" in first and "Running stage 'split'" in first
    second = sh(dvc, "repro")
    assert "Running stage" not in second
    assert "up to date" in sh(dvc, "status") or sh(dvc, "status").strip().startswith("Data and pipelines are up to date")
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["split"]["seed"] = 43
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    third = sh(dvc, "repro")
    assert "Running stage 'split'" in third and "Running stage 'synth'" not in third
