"""Paired comparison (stages/lib/paired.py): the figures against a direct computation."""
import numpy as np
import pytest

from stages.lib import metrics as M
from stages.lib import paired


def scores(refs, preds):
    return M.score_pairs(refs, preds)


def test_difference_counts_and_a_clear_winner():
    refs = [f"收據{i:03d}金額" for i in range(60)]
    a = scores(refs, refs)                                           # A reads every page right
    b = scores(refs, [r[:-1] + "頟" for r in refs])                  # B misreads one character each
    out = paired.compare(a, b, resamples=500, seed=0)
    assert out["pairs"] == 60 and (out["better"], out["worse"], out["equal"]) == (60, 0, 0)
    assert out["cer_diff"] == pytest.approx(-60 / sum(map(len, refs)))
    assert out["f1_diff"] == pytest.approx(float((a["f1"] - b["f1"]).mean()))
    assert out["cer_diff_ci95_low"] == out["cer_diff_ci95_high"] == pytest.approx(out["cer_diff"])   # same on every page
    assert out["cer_p"] == pytest.approx(1 / 501)                    # no flip reaches the observed sum


def test_no_difference_on_average_is_not_significant():
    refs = [f"收據{i:03d}金額" for i in range(200)]
    wrong = [r[:-1] + "頟" for r in refs]
    a = scores(refs, [w if i % 2 else r for i, (r, w) in enumerate(zip(refs, wrong))])
    b = scores(refs, [r if i % 2 else w for i, (r, w) in enumerate(zip(refs, wrong))])
    out = paired.compare(a, b, resamples=1000, seed=1)
    assert out["cer_diff"] == 0 and (out["better"], out["worse"]) == (100, 100)
    assert out["cer_p"] > 0.9 and out["cer_diff_ci95_low"] < 0 < out["cer_diff_ci95_high"]


def test_bootstrap_matches_index_resampling():
    rng = np.random.default_rng(3)
    refs = ["".join(rng.choice(list("甲乙丙丁戊己"), size=rng.integers(1, 12))) for _ in range(300)]
    noisy = lambda r: "".join(c for c in r if rng.random() > 0.2)  # noqa: E731
    a, b = scores(refs, [noisy(r) for r in refs]), scores(refs, [noisy(noisy(r)) for r in refs])
    out = paired.compare(a, b, resamples=4000, seed=0)
    direct = []
    for _ in range(4000):
        i = rng.integers(0, 300, 300)
        direct.append((a["distance"][i].sum() - b["distance"][i].sum()) / a["ref_len"][i].sum())
    assert out["cer_diff_ci95_low"] == pytest.approx(np.quantile(direct, 0.025), abs=0.01)
    assert out["cer_diff_ci95_high"] == pytest.approx(np.quantile(direct, 0.975), abs=0.01)
    assert paired.p_text(0.0004) == "p < 0.001" and paired.p_text(0.0312) == "p = 0.031"
