"""Shared fixtures: a small real dataset (rendered PNGs) and an untrained tiny Gemma 3.

Sections below are owned by the modules they test; add fixtures under your own heading."""
import json
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stages.lib.synthetic import charset, random_line, render_line  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: a whole-pipeline run (real DVC project or 896 px model); "
                                       "`make test` leaves these out, `make test-e2e` runs only them")

SERIF = "NotoSerifCJK-Regular.ttc:Noto Serif CJK TC"


def make_rows(folder, n, seed=0, image_size=128):
    """Render n receipt-like lines as PNGs in `folder`; return split rows [{image_path, ocr_text}]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = random.Random(f"{seed}-{i}")
        text = random_line(rng)
        path = folder / f"line_{i:04d}.png"
        render_line(text, SERIF, 24, image_size, rng).save(path)
        rows.append({"image_path": str(path), "ocr_text": text})
    return rows


@pytest.fixture(scope="session")
def tiny_rows(tmp_path_factory):
    """24 rendered lines (absolute image paths)."""
    return make_rows(tmp_path_factory.mktemp("rows"), 24)


@pytest.fixture(scope="session")
def tiny_rows_file(tiny_rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "rows.json"
    path.write_text(json.dumps(tiny_rows, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """An untrained tiny Gemma 3 (model + processor) built offline once per test session."""
    from stages.lib.tinymodel import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_base") / "model"
    build_tiny_model(out, charset(), seed=0)
    return out
