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
    "bad_tags": ([{"img_path": "IMG0", "ocr_results": "a", "tags": ["table", 3]}], "row 0: field 'tags' must be"),
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


# ---------------------------------------------------------------- real documents (issue 13)

def two_page_pdf(path, texts):
    """A two-page PDF as a scanner writes one: one image per page (Pillow's PDF writer)."""
    from PIL import Image, ImageDraw

    from stages.lib.synthetic import load_font

    font = load_font("NotoSansCJK-Regular.ttc:Noto Sans CJK TC", 28)
    pages = []
    for text in texts:
        page = Image.new("RGB", (400, 200), "white")
        ImageDraw.Draw(page).text((20, 80), text, fill="black", font=font)
        pages.append(page)
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=100)
    return path


def test_pdf_pages_are_rendered_hashed_and_kept_on_one_side(project):
    rows = raw_rows(project, 12)
    (project / "scans").mkdir()
    two_page_pdf(project / "scans/report.pdf", ["第一頁 page one", "第二頁 page two"])
    two_page_pdf(project / "scans/other.pdf", ["甲", "乙"])
    rows += [{"img_path": "scans/report.pdf", "ocr_results": ["第一頁 page one", "第二頁 page two"]},
             {"img_path": "scans/other.pdf#page=2", "ocr_results": "乙"}]
    done = split(project, write_raw(project, rows), "--group-by", "none", "--pdf-dpi", "72")
    assert done.returncode == 0, done.stderr
    assert "3 PDF pages rendered at 72 dpi" in done.stdout
    out = json.loads((project / "out/ocr_non_test.json").read_text()) + json.loads((project / "out/ocr_test.json").read_text())
    pdf_rows = [r for r in out if "source" in r]
    assert sorted(r["source"] for r in pdf_rows) == ["scans/other.pdf#page=2", "scans/report.pdf#page=1",
                                                     "scans/report.pdf#page=2"]
    from PIL import Image

    for row in pdf_rows:   # rendered PNGs inside the split's output, at the asked resolution (400 px at 100 dpi -> 288 at 72)
        assert row["image_path"].startswith(str(project / "out/pages")) and Path(row["image_path"]).is_file()
        assert Image.open(row["image_path"]).size == (288, 144)
        assert row["image_sha256"] == hashlib.sha256(Path(row["image_path"]).read_bytes()).hexdigest()
    sides = {r["source"]: name for name in ("ocr_non_test", "ocr_test")
             for r in json.loads((project / f"out/{name}.json").read_text()) if "source" in r}
    assert sides["scans/report.pdf#page=1"] == sides["scans/report.pdf#page=2"]   # one PDF, one side
    assert json.loads((project / "m.json").read_text())["pdf_pages"] == 3
    assert all(len(r["image_sha256"]) == 64 for r in out)


@pytest.mark.parametrize("case,message", [
    ("pdf_one_text", "has 2 pages: give 'ocr_results' as a list of 2 texts, or name one page as"),
    ("pdf_wrong_count", "has 2 page(s) but 'ocr_results' has 3 texts"),
    ("pdf_no_such_page", "has 2 page(s), not page 5"),
    ("tiff_one_text", "has 2 pages: give 'ocr_results' as a list"),
    ("fake_pdf", "is not a readable PDF"),
    ("text_as_png", "is not a readable image"),
])
def test_multi_page_and_non_image_files_are_refused_with_one_line(project, case, message):
    from PIL import Image

    (project / "scans").mkdir()
    two_page_pdf(project / "scans/doc.pdf", ["a", "b"])
    Image.new("RGB", (50, 50), "white").save(project / "scans/doc.tif", save_all=True,
                                             append_images=[Image.new("RGB", (50, 50), "gray")])
    (project / "scans/fake.pdf").write_text("not a pdf")
    (project / "scans/notes.png").write_text("a text file with an image's name")
    bad = {"pdf_one_text": {"img_path": "scans/doc.pdf", "ocr_results": "a b"},
           "pdf_wrong_count": {"img_path": "scans/doc.pdf", "ocr_results": ["a", "b", "c"]},
           "pdf_no_such_page": {"img_path": "scans/doc.pdf#page=5", "ocr_results": "a"},
           "tiff_one_text": {"img_path": "scans/doc.tif", "ocr_results": "a"},
           "fake_pdf": {"img_path": "scans/fake.pdf", "ocr_results": "a"},
           "text_as_png": {"img_path": "scans/notes.png", "ocr_results": "a"}}[case]
    rows = raw_rows(project, 4) + [bad]
    done = split(project, write_raw(project, rows))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "row 4" in done.stderr and message in done.stderr, done.stderr
    assert not (project / "out").exists() and not (project / "m.json").exists()   # nothing half-written


def test_a_changed_image_changes_the_split(project):
    from PIL import Image

    rows = raw_rows(project, 8)
    raw = write_raw(project, rows)
    assert split(project, raw, "--group-by", "none").returncode == 0
    first = {r["image_path"]: r["image_sha256"] for name in ("ocr_non_test", "ocr_test")
             for r in json.loads((project / f"out/{name}.json").read_text())}
    target = rows[3]["img_path"]
    Image.new("RGB", (128, 128), "white").save(target)     # same path, same label, new pixels
    assert split(project, raw, "--group-by", "none").returncode == 0
    second = {r["image_path"]: r["image_sha256"] for name in ("ocr_non_test", "ocr_test")
              for r in json.loads((project / f"out/{name}.json").read_text())}
    assert {p for p in first if first[p] != second[p]} == {target}


def test_label_length_histogram_counts_long_labels(project):
    rows = raw_rows(project, 8)
    rows[0]["ocr_results"] = "長" * 300 + "\n" + "page" * 20     # a page, not a line
    assert split(project, write_raw(project, rows), "--group-by", "none").returncode == 0
    csv_rows = (project / "plots/label_lengths.csv").read_text().splitlines()
    assert any(line.endswith(",381,1") for line in csv_rows)
    assert (project / "plots/label_lengths.png").stat().st_size > 0


def test_tags_and_focus_layout_travel_into_every_row(project):
    rows = raw_rows(project, 6)
    rows[0]["tags"] = ["table", "seal", "table"]
    rows[1]["focus_layout"] = "text"
    raw = write_raw(project, rows)
    assert split(project, raw, "--test-ratio", "0.5", "--group-by", "none").returncode == 0
    out = [r for name in ("ocr_test.json", "ocr_non_test.json")
           for r in json.loads((project / "out" / name).read_text(encoding="utf-8"))]
    tags = {r["image_path"]: r.get("tags") for r in out}
    assert tags[rows[0]["img_path"]] == ["table", "seal"] and tags[rows[1]["img_path"]] == ["text"]
    assert sum(t is None for t in tags.values()) == 4
