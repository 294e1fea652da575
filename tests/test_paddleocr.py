"""The paddleocr engine (stages/lib/evaluation/engines/paddleocr.py): RapidOCR with the PP-OCRv6
models bundled in its wheel, run for real on rendered images (nothing of RapidOCR is mocked; only
its downloader is made to fail, so that a test that would download fails instead)."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import make_rows
from stages.lib import metrics
from stages.lib.cli import UserError
from stages.lib.evaluation import engines
from stages.lib.evaluation.client import SampleError
from stages.lib.evaluation.engines import paddleocr
from stages.lib.synthetic import load_font

SANS = "NotoSansCJK-Regular.ttc:Noto Sans CJK TC"
ROW = {"title": "PaddleOCR (PP-OCRv6)", "det_model": "small", "rec_model": "small", "use_cls": False,
       "limit_type": "auto", "threads": 1}


def params(**changes):
    return {"runs": {"engines": {"paddleocr": dict(ROW, **changes)}}}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any download attempt by rapidocr fails the test (models must come from the wheel)."""
    from rapidocr.utils import download_file

    def refuse(*args, **kwargs):
        raise AssertionError("rapidocr tried to download a file")

    monkeypatch.setattr(download_file.DownloadFile, "run", classmethod(refuse))


@pytest.fixture(scope="module")
def predict():
    return paddleocr.predictor(paddleocr.settings(params()), timeout=60)


def text_line(text, height=64, size=40):
    """One line of text, black on white, `height` px tall."""
    from PIL import ImageDraw

    font = load_font(SANS, size)
    image = Image.new("RGB", (int(font.getlength(text)) + 40, height), "white")
    ImageDraw.Draw(image).text((20, height // 2), text, fill="black", font=font, anchor="lm")
    return image


def stacked(*lines):
    """Lines stacked top to bottom on one white image."""
    width = max(line.width for line in lines)
    image = Image.new("RGB", (width, sum(line.height for line in lines)), "white")
    y = 0
    for line in lines:
        image.paste(line, (0, y))
        y += line.height
    return image


def test_registered_and_settings_validated():
    assert "paddleocr" in engines.ENGINES and engines.load_engine("paddleocr") is paddleocr
    assert paddleocr.PARAMS == ("runs.engines.paddleocr",)
    assert paddleocr.settings(params())["limit_type"] == "auto"
    with pytest.raises(UserError, match=r"'runs\.engines\.paddleocr\.limit_type' must be one of"):
        paddleocr.settings(params(limit_type="largest"))
    with pytest.raises(UserError, match=r"'runs\.engines\.paddleocr\.threads' must be >= 0"):
        paddleocr.settings(params(threads=-1))
    with pytest.raises(UserError, match=r"missing parameter 'runs\.engines\.paddleocr\.use_cls'"):
        paddleocr.settings({"runs": {"engines": {"paddleocr": {k: v for k, v in ROW.items() if k != "use_cls"}}}})


@pytest.mark.parametrize("key", ["rec_model", "det_model"])
def test_a_model_the_wheel_does_not_bundle_is_refused_in_one_line(key):
    settings = paddleocr.settings(params(**{key: "medium"}))
    for call in (paddleocr.identity, lambda s: paddleocr.predictor(s, 60)):
        with pytest.raises(UserError) as refused:
            call(settings)
        message = str(refused.value)
        assert "\n" not in message and f"'runs.engines.paddleocr.{key}'" in message and "medium" in message


def test_identity_is_stable_and_names_versions_and_model_files():
    settings = paddleocr.settings(params())
    first, second = paddleocr.identity(settings), paddleocr.identity(settings)
    assert first == second
    assert first["engine"] == "paddleocr"
    assert first["version"].startswith("rapidocr 3.10.0 / onnxruntime ")
    assert first["det_file"].startswith("PP-OCRv6_det_small.onnx sha256:")
    assert first["rec_file"].startswith("PP-OCRv6_rec_small.onnx sha256:")
    assert {key: first[key] for key in settings} == settings


def test_detector_limit_rule():
    assert paddleocr.detector_limit(128, 128, "auto") == ("min", 736)     # small square: upscaled
    assert paddleocr.detector_limit(300, 64, "auto") == ("max", 960)      # a single line: not upscaled
    assert paddleocr.detector_limit(1000, 1400, "auto") == ("min", 736)   # a page: as it is
    assert paddleocr.detector_limit(300, 64, "min") == ("min", 736)
    assert paddleocr.detector_limit(128, 128, "max") == ("max", 960)


def test_join_lines_groups_boxes_by_vertical_centre():
    def box(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    boxes = [box(60, 2, 100, 30), box(0, 40, 50, 70), box(0, 0, 50, 28), box(55, 44, 90, 72)]
    assert paddleocr.join_lines(boxes, ["B", "C", "A", "D"]) == "A B\nC D"
    assert paddleocr.join_lines(None, None) == ""


def test_rendered_lines_are_read(predict, tmp_path):
    rows = make_rows(tmp_path, 6, seed=3)
    outcomes = [predict({"image_path": r["image_path"], "label": r["ocr_text"]}) for r in rows]
    predictions = [o["prediction"] for o in outcomes]
    refs = [metrics.normalize(r["ocr_text"]) for r in rows]
    assert metrics.corpus_cer(refs, [metrics.normalize(p) for p in predictions]) < 0.15
    # the recognition scores, averaged per page (stages/lib/evaluation/confidence.py paddleocr_scores)
    assert paddleocr.CONFIDENCE == "paddleocr_scores" and all(0.5 < o["confidence"] <= 1 for o in outcomes)


def test_two_line_image_gives_two_lines_in_order(predict, tmp_path):
    top, bottom = "營業人：新光百貨", "合計1280元"
    path = tmp_path / "two.png"
    stacked(text_line(top), text_line(bottom)).save(path)
    result = predict({"image_path": str(path), "label": f"{top}\n{bottom}"})
    assert result["completion_tokens"] is None
    lines = result["prediction"].split("\n")
    assert len(lines) == 2
    for line, label in zip(lines, (top, bottom)):
        assert metrics.cer(metrics.normalize(label), metrics.normalize(line)) <= 0.2


def test_blank_image_gives_empty_text(predict, tmp_path):
    path = tmp_path / "blank.png"
    Image.new("RGB", (128, 128), "white").save(path)
    blank = predict({"image_path": str(path), "label": ""})
    assert blank["prediction"] == "" and blank["confidence"] is None   # no box, no score


def test_transparent_png_reads_like_its_white_version(predict, tmp_path):
    base = text_line("永和豆漿2份60元")
    gray = np.asarray(base.convert("L"))
    rgba = np.zeros(gray.shape + (4,), np.uint8)
    rgba[..., 3] = 255 - gray                      # ink opaque, paper transparent (black under it)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB").save(tmp_path / "white.png")
    clear = predict({"image_path": str(tmp_path / "clear.png"), "label": ""})["prediction"]
    white = predict({"image_path": str(tmp_path / "white.png"), "label": ""})["prediction"]
    assert clear == white and metrics.normalize(white)


def test_unreadable_image_is_a_sample_error(predict, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(SampleError, match="image unreadable"):
        predict({"image_path": str(path), "label": ""})


def test_predictions_identical_on_a_rerun_from_two_threads(predict, tmp_path):
    rows = make_rows(tmp_path, 3, seed=5)
    samples = [{"image_path": r["image_path"], "label": r["ocr_text"]} for r in rows]
    first = [predict(s)["prediction"] for s in samples]
    fresh = paddleocr.predictor(paddleocr.settings(params()), timeout=60)
    with ThreadPoolExecutor(2) as pool:
        again = [r["prediction"] for r in pool.map(fresh, samples + samples)]
    assert again == first + first
