"""`dvc plots show` / `dvc plots diff` draw their vega charts with no network: .dvc/config points
DVC at .dvc/plots_template.html (vega, vega-lite, vega-embed inlined by tools/vendor_vega.py).
Checked in a real git+DVC repo, rendered by headless Chromium with every host unresolvable."""
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_browse import CHROMIUM, chromium

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (make setup installs it)")

DVC_YAML = """plots:
  - loss:
      x: step
      y: {loss.csv: loss}
  - bars.csv:
      x: count
      y: bucket
      template: bar_horizontal_in_order
"""


def sh(*cmd, cwd):
    done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
    return done.stdout


def charts_drawn(page: Path) -> int:
    dom = chromium("--virtual-time-budget=8000", "--dump-dom", page.as_uri())
    return len(re.findall(r'<canvas[^>]*class="marks"', dom))


@pytest.fixture()
def plots_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh("git", "config", "user.email", "t@example.com", cwd=repo)
    sh("git", "config", "user.name", "t", cwd=repo)
    sh(*DVC, "init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvc" / "plots_template.html", repo / ".dvc" / "plots_template.html")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "loss.csv").write_text("step,loss\n1,0.9\n2,0.5\n3,0.3\n")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    (repo / "bars.csv").write_text("bucket,count\n1-5,40\n6-10,7\n11-20,3\n")
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "plots", cwd=repo)
    (repo / "loss.csv").write_text("step,loss\n1,0.8\n2,0.4\n3,0.2\n")
    return repo


def test_project_config_points_at_the_vendored_template():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    template = ROOT / ".dvc" / config["plots"]["html_template"]
    page = template.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "cdn." not in page and "{scripts}" not in page
    for name in ("vega", "vega-lite", "vega-embed"):
        assert f"<!-- {name} " in page, f"{name} is not inlined"
    assert "Redistribution and use in source and binary forms" in page  # the licences are kept


def test_charts_draw_offline_with_the_template_and_not_without(plots_repo):
    # DVC's own page (CDN scripts) draws nothing here: proof that the network is really cut off.
    sh(*DVC, "plots", "show", "-o", "default", cwd=plots_repo)
    assert charts_drawn(plots_repo / "default" / "index.html") == 0

    sh(*DVC, "config", "plots.html_template", "plots_template.html", cwd=plots_repo)
    sh(*DVC, "plots", "show", "-o", "show", cwd=plots_repo)
    assert charts_drawn(plots_repo / "show" / "index.html") == 2
    sh(*DVC, "plots", "diff", "HEAD", "-o", "diff", cwd=plots_repo)
    assert charts_drawn(plots_repo / "diff" / "index.html") == 2


def test_length_buckets_keep_the_files_order(plots_repo):
    """plots/score/cer_by_length: '6-10' before '11-20' (a nominal axis is sorted alphabetically
    unless the template says otherwise: .dvc/plots/bar_horizontal_in_order.json)."""
    import json

    shown = json.loads(sh(*DVC, "plots", "show", "--json", cwd=plots_repo))["data"]
    spec = next(plot["content"] for plots in shown.values() for plot in plots
                if plot["content"].get("encoding", {}).get("y", {}).get("field") == "bucket")
    assert spec["encoding"]["y"]["sort"] is None
    assert [v["bucket"] for v in spec["data"]["values"]] == ["1-5", "6-10", "11-20"]
