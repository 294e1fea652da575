"""Per-tag figures, confidence deciles and the review list (stages/lib/breakdowns.py)."""
import pytest

from stages.lib import breakdowns as B
from stages.lib import metrics as M


def scored(pairs):
    samples = [dict(s) for s in pairs]
    scores = M.score_pairs(M.normalize_many([s["label"] for s in samples]),
                           M.normalize_many([s["prediction"] for s in samples]))
    return samples, scores


def test_tag_table_counts_each_tag_and_untagged():
    samples, scores = scored([
        {"label": "甲乙丙丁", "prediction": "甲乙丙丁", "tags": ["table"]},
        {"label": "甲乙丙丁", "prediction": "戊", "tags": ["table", "seal"]},          # F1 0: a failure
        {"label": "甲乙", "prediction": "甲", "focus_layout": "seal"},                 # F1 2/3: not one
        {"label": "甲乙", "prediction": "甲乙"},
    ])
    table = B.tag_table(samples, scores, failure_f1=0.6, resamples=50, seed=0)
    assert list(table) == ["seal", "table", "untagged"]
    assert table["table"]["samples"] == 2 and table["table"]["overall_cer"] == pytest.approx(4 / 8)
    assert table["table"]["failure_rate"] == 0.5 and table["seal"]["failure_rate"] == 0.5
    assert table["seal"]["overall_cer"] == pytest.approx((4 + 1) / (4 + 2))
    assert table["untagged"] == {**table["untagged"], "samples": 1, "overall_cer": 0.0, "failure_rate": 0.0}
    assert "overall_cer_ci95_low" in table["seal"]
    assert B.tag_table(samples[3:], {k: v[3:] for k, v in scores.items()}, 0.6, 0, 0) == {}


def test_confidence_deciles_and_errors_caught():
    rows = [{"image_path": f"{i}.png", "label": "甲乙丙丁戊", "prediction": "甲乙丙丁戊" if i >= 4 else "甲",
             "confidence": i / 40} for i in range(40)]
    rows.append({"image_path": "x.png", "label": "甲", "prediction": "乙"})              # no confidence: left out
    samples, scores = scored(rows)
    figures, order = B.confidence_figures(samples, scores)
    assert figures["samples_with_confidence"] == 40 and order[:3] == [0, 1, 2]
    assert [d["samples"] for d in figures["deciles"]] == [4] * 10
    assert figures["deciles"][0]["cer"] == pytest.approx(0.8) and figures["deciles"][1]["cer"] == 0.0
    assert figures["caught_at_10"] == 1.0 and figures["caught_at_5"] == pytest.approx(0.5)   # 2 of the 4 bad pages
    csv_text = B.review_csv(samples, scores, order)
    assert csv_text.splitlines()[1].startswith("1,0.png,0.0,0.8,")
    assert B.confidence_figures(samples[-1:], {k: v[-1:] for k, v in scores.items()}) == (None, [])
