"""The results page's "full size" link opens the file whatever its name holds ('#', '%', '?',
spaces, CJK): each path segment is URL-encoded (issue 24). Checked in headless Chromium."""
import html.parser
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin
from urllib.request import url2pathname

import pytest
import yaml

from conftest import ROOT, make_rows
from tests.test_browse import CHROMIUM, chromium

pytestmark = pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (make setup installs it)")
NAMES = ["receipt #1 50%.png", "發票?.png"]


class Links(html.parser.HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.hrefs = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("target") == "_blank":
            self.hrefs.append(a["href"])


def test_full_size_links_open_files_with_url_characters_in_their_names(tmp_path):
    root = tmp_path / "project"
    folder = root / "data/raw_data"
    rows = make_rows(folder, len(NAMES))
    samples = []
    for row, name in zip(rows, NAMES):
        Path(row["image_path"]).rename(folder / name)
        samples.append({"image_path": f"data/raw_data/{name}", "label": row["ocr_text"],
                        "prediction": row["ocr_text"], "finish_reason": "stop"})
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["runs"] = {"main": "finetuned", "models": {"finetuned": {"dir": "models/merged", "title": "fine-tuned"}},
                      "engines": {}}
    params["browse"]["before"] = "finetuned"
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    (root / "results").mkdir()
    (root / "results/finetuned.json").write_text(json.dumps({"samples": samples}, ensure_ascii=False))
    for stage in ("score", "browse"):
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=root, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    page = (root / "browse/index.html").as_uri()
    hrefs = Links(chromium("--virtual-time-budget=5000", "--dump-dom", page)).hrefs
    assert len(hrefs) == len(NAMES), hrefs
    opened = {Path(url2pathname(urljoin(page, href).removeprefix("file://"))).resolve() for href in hrefs}
    assert opened == {(folder / name).resolve() for name in NAMES}
    assert all("#" not in href and "?" not in href for href in hrefs)
