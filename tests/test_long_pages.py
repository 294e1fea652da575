"""Long multi-line pages through the model path (`transformers serve`), issue 13: with
evaluate.max_tokens 'auto' nothing is cut; a forced small limit is counted as truncated by the
evaluation, by normalize-score (`truncated_predictions`) and warned about.

The model is the tiny Gemma 3 trained in the fixture to write out long multi-line pages (~100
tokens each, longer than the old fixed 64) and stop: it learns to end its answer, which is what
truncation is about (it does not learn to tell the pages apart; accuracy is not asserted here).
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conftest import ROOT
from stages.lib.synthetic import charset, load_font, random_line

INSTRUCTION = "請給我 OCR 結果"


def render_page(lines):
    font = load_font("NotoSansCJK-Regular.ttc:Noto Sans CJK TC", 14)
    image = Image.new("RGB", (512, 24 * len(lines) + 16), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((8, 8 + 24 * i), line, fill="black", font=font)
    return image


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Three rendered pages of four lines each (80-100 characters) and a model that writes such pages."""
    from stages.lib.tinymodel import build_tiny_model, pretrain

    root = tmp_path_factory.mktemp("long_pages")
    rng = random.Random(0)
    rows = []
    for k in range(3):
        lines = [f"{random_line(rng)} {random_line(rng)}" for _ in range(4)]
        path = root / f"page_{k}.png"
        render_page(lines).save(path)
        rows.append({"image_path": str(path), "ocr_text": "\n".join(lines)})
    model = root / "model"
    build_tiny_model(model, sorted(set(charset()) | set("".join(r["ocr_text"] for r in rows))), seed=0)
    samples = [(Image.open(r["image_path"]).convert("RGB"), r["ocr_text"]) for r in rows]
    stats = pretrain(model, samples * 4, INSTRUCTION, steps=150, learning_rate=3.0e-3, batch_size=3, seed=0,
                     warmup_steps=10)
    assert stats["pretrain_loss"] < 0.2, stats
    data = root / "pages.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return {"rows": rows, "model": model, "data": data, "root": root}


def evaluate(pages, out, *extra):
    return subprocess.run([sys.executable, "-m", "stages.evaluate", "--model-dir", str(pages["model"]),
                           "--engine", "transformers", "--data-file", str(pages["data"]), "--output-file", str(out),
                           "--workers", "1", *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_long_pages_are_not_cut_with_auto_and_a_forced_cut_is_counted(pages, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(pages["model"]))
    label_tokens = [len(tokenizer(r["ocr_text"], add_special_tokens=False)["input_ids"]) for r in pages["rows"]]
    assert min(label_tokens) > 64 and all("\n" in r["ocr_text"] for r in pages["rows"])

    auto = tmp_path / "auto.json"
    done = evaluate(pages, auto)              # params.yaml: evaluate.max_tokens auto
    assert done.returncode == 0, done.stderr
    doc = json.loads(auto.read_text(encoding="utf-8"))
    assert doc["generation"]["max_tokens"] >= max(label_tokens) > 64
    assert f"max_tokens auto = {doc['generation']['max_tokens']}" in done.stderr
    assert [s["finish_reason"] for s in doc["samples"]] == ["stop"] * 3, [s.get("finish_reason") for s in doc["samples"]]
    assert all(len(s["prediction"]) > 64 for s in doc["samples"])     # whole pages came back
    assert "cut by max_tokens" not in done.stderr

    cut = tmp_path / "cut.json"
    done = evaluate(pages, cut, "--max-tokens", "20")
    assert done.returncode == 0, done.stderr
    doc = json.loads(cut.read_text(encoding="utf-8"))
    assert [s["finish_reason"] for s in doc["samples"]] == ["length"] * 3
    assert "warning: 3 of 3 predictions were cut by max_tokens 20" in done.stderr

    scored = tmp_path / "cut_norm.json"
    done = subprocess.run([sys.executable, "-m", "stages.score", "--input", str(cut), "--output", str(scored),
                           "--bootstrap-samples", "0", "--seed", "0"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(scored.read_text(encoding="utf-8"))["truncated_predictions"] == 3


def test_validation_reads_long_pages_with_the_same_budget(pages):
    """Training's validation CER uses evaluate's rule: the budget covers the longest label."""
    from stages.lib.modeling import generation_budget, load_model, load_processor, read_images

    processor = load_processor(pages["model"])
    budget, info = generation_budget(processor.tokenizer, [r["ocr_text"] for r in pages["rows"]], pages["model"],
                                     INSTRUCTION)
    assert budget >= info["longest_label_tokens"] > 64 and info["context"] == 1024
    model = load_model(pages["model"])
    images = [Image.open(r["image_path"]).convert("RGB") for r in pages["rows"]]
    stats = {}
    texts = read_images(model, processor, images, INSTRUCTION, max_new_tokens=budget, stats=stats)
    assert stats["truncated"] == 0 and all(len(t) > 64 for t in texts)
    stats = {}
    read_images(model, processor, images, INSTRUCTION, max_new_tokens=64, stats=stats)   # the old fixed limit
    assert stats["truncated"] == 3


def test_training_refuses_rows_longer_than_the_context_before_loading_the_model(pages, tmp_path):
    from stages.lib.cli import UserError
    from stages.lib.training import check_row_lengths

    long_row = {"image_path": "page.png", "ocr_text": "長" * 1100}          # ~1,100 tokens > 1,024 positions
    config = {"max_seq_length": 8192, "instruction": INSTRUCTION}
    with pytest.raises(UserError, match=r"1 of 4 training/validation rows are longer than the model's context .* 1024 tokens"):
        check_row_lengths(pages["model"], pages["rows"] + [long_row], config)
    with pytest.raises(UserError, match=r"3 of 3 .* longer than max_seq_length, 100 tokens"):
        check_row_lengths(pages["model"], pages["rows"], dict(config, max_seq_length=100))
    check_row_lengths(pages["model"], pages["rows"], config)   # these fit


def test_an_unreadable_image_fails_its_sample_without_a_request_and_names_the_server_log(pages, tmp_path):
    """A file that passes the header check but cannot be decoded (a truncated scan): the client fails
    that sample before sending anything; the others are evaluated; the server's log is kept and named."""
    broken = tmp_path / "truncated.png"
    broken.write_bytes(open(pages["rows"][0]["image_path"], "rb").read()[:200])
    rows = pages["rows"][:1] + [{"image_path": str(broken), "ocr_text": "x"}]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "stages.evaluate", "--model-dir", str(pages["model"]),
                           "--engine", "transformers", "--data-file", str(data), "--output-file", str(out),
                           "--workers", "1", "--max-failure-rate", "0.5"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    failed = doc["samples"][1]
    assert failed["prediction"] is None and failed["error"].startswith("image unreadable") and failed["attempts"] == 1
    assert doc["failed_count"] == 1 and doc["overall_cer"] is not None
    line = next(l for l in done.stderr.splitlines() if "the server's log:" in l)
    log = line.rsplit("the server's log: ", 1)[1].strip()
    assert log.endswith(".log") and Path(log).is_file()
    Path(log).unlink()
