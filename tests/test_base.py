"""The base stage's checks (issue 13): bad params refused in one line, and the tiny demo base says
when the data is not what it can read."""
import pytest
import yaml
from PIL import Image

from conftest import ROOT, make_rows
from stages import base
from stages.lib.cli import UserError


def params(**changes):
    p = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    p["base"].update(changes)
    return p


def test_zero_pretraining_steps_is_refused_in_one_line():
    with pytest.raises(UserError, match="'base.pretrain_steps' must be >= 1, got 0"):
        base.read_params(params(pretrain_steps=0))


def test_tiny_base_warns_on_data_that_is_not_its_grid(tmp_path, capsys):
    grid = make_rows(tmp_path / "lines", 3)
    base.warn_if_not_grid(grid, 128)
    assert capsys.readouterr().err == ""                      # the synthetic 128x128 cells: no word
    page = tmp_path / "page.png"
    Image.new("RGB", (1240, 1754), "white").save(page)        # an A4 scan at 150 dpi
    base.warn_if_not_grid(grid + [{"image_path": str(page), "ocr_text": "x"}], 128)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 of 4 sampled images are not (e.g. 1240x1754)" in err
    assert "Set model_name to a real checkpoint folder" in err
