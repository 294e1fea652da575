"""The results page (stages/browse.py) in a real browser: headless Chromium from Debian loads it from
file:// (no server, no network) and we read the DOM it rendered.

The project here is real: rendered images (PNG lines, an EXIF-rotated JPEG, a transparent PNG, a page
of a two-page TIFF), evaluation outputs scored by the score stage itself, then the browse stage."""
import html.parser
import json
import os
import random
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, make_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI_REQUIRE_CHROMIUM") != "1",
                                reason="chromium is not installed (make setup installs it)")
RUNS = {"main": "finetuned",
        "models": {"finetuned": {"dir": "models/merged", "title": "fine-tuned"},
                   "base": {"dir": "models/base", "title": "base (no fine-tuning)"}},
        "engines": {"tesseract": {"title": "Tesseract", "lang": "chi_tra+eng", "psm": 6}}}


def garble(text, rng, rate):
    return "".join("口" if rng.random() < rate else ch for ch in text if rng.random() > rate / 2)


def extra_images(folder):
    """Images the way users' data looks: EXIF rotation, transparency, a page of a multi-page TIFF."""
    from stages.lib.synthetic import render_line

    rng = random.Random(5)
    line = render_line("台北市信義路5段7號", "NotoSerifCJK-Regular.ttc:Noto Serif CJK TC", 24, 128, rng).convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 degrees clockwise on display
    line.save(folder / "upright.png")   # what every consumer must see for rotated.jpg (not a sample)
    line.rotate(90, expand=True).save(folder / "rotated.jpg", quality=95, exif=exif.tobytes())
    gray = np.asarray(line)
    rgba = np.zeros((*gray.shape, 4), np.uint8)
    rgba[..., 3] = 255 - gray   # ink opaque, paper transparent (black underneath)
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    pages = [line.convert("RGB"), line.rotate(180).convert("RGB")]
    pages[0].save(folder / "two_pages.tif", save_all=True, append_images=pages[1:])
    return [("rotated.jpg", "台北市信義路5段7號"), ("transparent.png", "台北市信義路5段7號"),
            ("two_pages.tif#page=2", "號7段5路義信市北台")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """results/ -> (score stage) scored/ -> (browse stage) browse/."""
    root = tmp_path_factory.mktemp("browse_project")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["runs"] = RUNS
    params["browse"]["page_size"] = 100
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    rows = [(str(Path(r["image_path"]).relative_to(root)), r["ocr_text"])
            for r in make_rows(root / "data/raw_data/lines", 27)]
    rows += [(f"data/raw_data/{name}", text) for name, text in extra_images(root / "data/raw_data")]
    rng = random.Random(0)
    (root / "results").mkdir()
    for name, rate in (("finetuned", 0.1), ("base", 0.3), ("tesseract", 0.05)):
        samples = []
        for i, (path, text) in enumerate(rows):
            sample = {"image_path": path, "label": text, "prediction": garble(text, rng, rate), "finish_reason": "stop"}
            if name == "base" and i == 3:
                sample.update(prediction=None, error="HTTP 500: Internal Server Error (after 4 attempts)")
            if name == "finetuned" and i == 5:
                sample.update(prediction=text[:3], finish_reason="length")
            if name == "tesseract" and i == 7:
                sample["prediction"] = ""
            if name == "base" and i == 9:
                sample["prediction"] = f"**{text}**"   # markup the label lacks: a failure-mode flag
            sample["tags"] = ["odd" if i % 2 else "even", *(["<b>x</b>"] if i == 4 else [])]
            if name == "tesseract":
                sample["confidence"] = (i * 7) % 11 / 10   # a few ties: input order breaks them
            samples.append(sample)
        doc = {"samples": samples, **({"confidence_source": "tesseract_words"} if name == "tesseract" else {})}
        (root / "results" / f"{name}.json").write_text(json.dumps(doc, ensure_ascii=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for stage in ("score", "browse"):
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    return root


class Page(html.parser.HTMLParser):
    """The rendered DOM: sample rows in order with their CER values per run, and the count line."""

    def __init__(self, text):
        super().__init__()
        self.rows, self.cer, self.count, self.delta = [], {}, None, None
        self._in = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if "sample" in classes and "data-index" in a:
            self.rows.append(int(a["data-index"]))
        if tag == "span" and "cer" in classes:
            self.cer.setdefault(self.rows[-1], {})[a["data-run"]] = float(a["data-value"])
        if tag == "span" and a.get("id") == "count":
            self.count = (int(a["data-shown"]), int(a["data-total"]))
        if tag == "span" and a.get("id") == "delta":
            self._in = "delta"

    def handle_data(self, data):
        if self._in == "delta":
            self.delta, self._in = data, None


def chromium(*args, timeout=120):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def render(project, view=""):
    url = (project / "browse" / "index.html").as_uri() + (f"#{view}" if view else "")
    return Page(chromium("--virtual-time-budget=5000", "--dump-dom", url))


def scored(project, run):
    return json.loads((project / "scored" / f"{run}.json").read_text(encoding="utf-8"))["samples"]


def test_every_sample_with_the_scored_figures(project):
    page = render(project)
    n = len(scored(project, "finetuned"))
    assert page.count == (n, n) and page.rows == list(range(n))   # input order, one row per image
    for run in RUNS["models"] | RUNS["engines"]:
        for i, sample in enumerate(scored(project, run)):
            if sample.get("error"):
                assert run not in page.cer[i]   # failed: no figure shown, a "failed" tag instead
            else:
                assert page.cer[i][run] == pytest.approx(sample["cer_score"], abs=1e-12)


def test_sorting_and_the_worse_after_fine_tuning_filter(project):
    ft, base = scored(project, "finetuned"), scored(project, "base")
    page = render(project, "sort=cer:finetuned:desc")
    by_cer = sorted(range(len(ft)), key=lambda i: (-ft[i]["cer_score"], i))
    assert page.rows == by_cer and page.rows[0] == 5   # the truncated prediction is the worst
    worse = [i for i in range(len(ft)) if base[i].get("cer_score") is not None
             and ft[i]["cer_score"] > base[i]["cer_score"]]
    assert worse, "the data should hold samples that got worse"
    page = render(project, "filter=worse")
    assert page.rows == worse and page.count == (len(worse), len(ft))
    page = render(project, "filter=worse&sort=diff:desc&a=finetuned&b=base")
    gaps = sorted(worse, key=lambda i: (-(ft[i]["cer_score"] - base[i]["cer_score"]), i))
    assert page.rows == gaps
    assert render(project, "filter=failed").rows == [3]
    assert render(project, "filter=truncated").rows == [5]
    assert 7 in render(project, "filter=empty").rows
    assert render(project, "q=號7段5路").rows == [29]


def test_failure_mode_and_tag_filters_and_the_confidence_sort(project):
    data = json.loads((project / "browse/data.js").read_text(encoding="utf-8").split("=", 1)[1].rstrip().rstrip(";"))
    assert data["tags"] == ["<b>x</b>", "even", "odd"] and "markup" in data["flags"]
    markup = data["flags"].index("markup")
    assert render(project, f"filter=flag{markup}").rows == [9]
    assert render(project, "filter=tag2").rows == list(range(1, 30, 2))
    page = render(project, "filter=tag0")   # a tag holding markup is a filter like any other, shown as text
    assert page.rows == [4]
    tess = scored(project, "tesseract")
    order = sorted(range(len(tess)), key=lambda i: (tess[i]["confidence"], i))
    assert render(project, "sort=conf:tesseract:asc").rows == order


def test_side_by_side_shows_two_runs_of_one_sample(project):
    ft, base = scored(project, "finetuned"), scored(project, "base")
    page = render(project, "mode=compare&a=base&b=finetuned&sort=diff:desc&pos=0")
    i = page.rows[0]
    assert len(page.rows) == 1 and set(page.cer[i]) == {"base", "finetuned"}
    assert float(page.delta) == pytest.approx(base[i]["cer_score"] - ft[i]["cer_score"], abs=1e-4)
    assert max(b["cer_score"] - f["cer_score"] for b, f in zip(base, ft) if b.get("cer_score") is not None) \
        == pytest.approx(float(page.delta), abs=1e-4)


def test_images_thumbnails_and_links(project):
    data = (project / "browse" / "data.js").read_text(encoding="utf-8")
    doc = json.loads(data[data.index("=") + 1:].rstrip().rstrip(";"))
    by_path = {s["image_path"]: s for s in doc["samples"]}
    thumbs = {s["thumb"] for s in doc["samples"]}
    assert len(thumbs) == len(list((project / "browse" / "thumbs").glob("*.png")))
    rotated = np.asarray(Image.open(project / "browse" / by_path["data/raw_data/rotated.jpg"]["thumb"]).convert("L"),
                         dtype=float)
    upright = Image.open(project / "data/raw_data/upright.png")
    # EXIF applied: the line is upright, as training sees it (JPEG: a few levels of noise)
    assert np.abs(rotated - np.asarray(upright, dtype=float)).mean() < 4
    assert np.abs(rotated - np.asarray(upright.rotate(90), dtype=float)).mean() > 4 * \
        np.abs(rotated - np.asarray(upright, dtype=float)).mean()
    clear = np.asarray(Image.open(project / "browse" / by_path["data/raw_data/transparent.png"]["thumb"]).convert("L"))
    assert clear.mean() > 200   # transparency on white, not black
    assert by_path["data/raw_data/two_pages.tif#page=2"]["full"] is None   # browsers show no TIFF
    png = by_path["data/raw_data/lines/line_0000.png"]["full"]
    assert (project / "browse" / png).resolve() == (project / "data/raw_data/lines/line_0000.png").resolve()
    for name in ("index.html", "app.js", "style.css"):   # nothing from a network
        text = (project / "browse" / name).read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_screenshot(project, tmp_path):
    """A picture of the page as a user sees it (tests/artifacts/browse.png is looked at by hand)."""
    out = ROOT / "tests" / "artifacts"
    out.mkdir(exist_ok=True)
    url = (project / "browse" / "index.html").as_uri() + "#sort=cer:finetuned:desc"
    chromium("--virtual-time-budget=5000", "--window-size=1400,1000", f"--screenshot={out / 'browse.png'}", url)
    shot = Image.open(out / "browse.png")
    assert shot.size == (1400, 1000)
    assert np.asarray(shot.convert("L")).std() > 10   # not a blank page


def test_serve_on_localhost_only(project):
    import socket

    proc = subprocess.Popen([sys.executable, "-m", "stages.browse", "--serve", "--port", "0"], cwd=project,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split("serving ")[1].split(" ")[0]
        assert url.startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "data.js" in page
        base = url.rsplit("/browse/", 1)[0]
        png = urllib.request.urlopen(f"{base}/data/raw_data/lines/line_0000.png", timeout=10).read()
        assert png.startswith(b"\x89PNG")
        with pytest.raises(urllib.error.HTTPError):   # only the page and its images, not the project
            urllib.request.urlopen(f"{base}/params.yaml", timeout=10)
        port = int(url.split(":")[2].split("/")[0])
        addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for address in addresses:   # not reachable on the machine's other interfaces
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(10)
