"""Failure-mode flags (stages/lib/failures.py): each on hand-made cases that must and must not fire."""
import pytest

from stages.lib import failures as F
from stages.lib import metrics as M


def flags_of(label, prediction, finish_reason=None):
    norm_label, norm_pred = M.normalize(label), M.normalize(prediction)
    scores = M.score_pairs([norm_label], [norm_pred])
    flags, counts = F.flag_samples([label], [prediction], [norm_label], [norm_pred], scores, [finish_reason])
    assert counts == {name: int(name in flags[0]) for name in F.FLAGS}
    return set(flags[0])


LINE = "統一編號12345678"


@pytest.mark.parametrize("label, prediction, expected", [
    # repetition: a loop, and a label that legitimately repeats a line read right or nearly right
    (LINE, "\n".join([LINE] * 6), {"repetition", "length_ratio"}),
    ("發票號碼AB-12345678", "發票號碼AB-1234567812345678123456781234", {"repetition", "length_ratio"}),
    ("\n".join(["小計 100元"] * 3), "\n".join(["小計 100元"] * 3), set()),
    ("\n".join(["小計 100元"] * 3) + "\n合計 300元", "\n".join(["小計 100元"] * 3) + "\n合計 30O元", set()),
    ("1000000000000元", "1000000000000元整", set()),          # the label's own run of zeros
    # text on a blank page; an empty prediction
    ("", "臺北市", {"text_on_empty"}),
    ("。 ", "", set()),                                       # blank read as blank
    ("臺北市", "", {"empty"}),
    # chatter: a preamble or a closing remark the label does not have
    ("王小明 先生", "Here's the text extracted from the image using OCR:\n王小明 先生", {"chatter", "length_ratio"}),
    ("王小明先生您好", "以下是圖片中的文字：\n王小明先生您好", {"chatter", "length_ratio"}),
    ("王小明先生您好", "王小明先生您好\nLet me know if you need anything else.", {"chatter", "length_ratio"}),
    ("Here is the summary of 2024", "Here is the summary of 2025", set()),   # the page itself says it
    ("這是我的收據", "這是我的收據了", set()),                                 # ordinary text, not a preamble
    # markup the label lacks; a label with real asterisks, an HTML-like tag
    ("王小明 先生", "**王小明** 先生", {"markup"}),
    ("總計", "## 總計", {"markup"}),
    ("總計 100", "```\n總計 100\n```", {"markup"}),
    ("總計 100", "<b>總計</b> 100", {"markup"}),
    ("*** VOID *** 總計", "*** VOID *** 總訐", set()),
    ("**注意** 請保留", "**注意** 請保畄", set()),
    ("5 * 3 = 15", "5 * 3 = 16", set()),
    ("<div> 標籤", "<div> 標籤", set()),
    # truncation
    ("臺北市", "臺北", {"truncated"}),
    # script confusion (Simplified for Traditional, Taiwan variants) and not a mere misreading
    ("營業稅 500元", "營業税 500元", {"script_confusion"}),
    ("裡面", "裏面", {"script_confusion"}),
    ("顯著", "显著", {"script_confusion"}),
    ("營業稅 500元", "營業說 500元", set()),
    ("稅", "税稅", {"script_confusion"}),
    # length ratio far from 1
    ("臺北市中正區重慶南路一段", "臺北", {"length_ratio"}),
    ("臺北市中正區", "臺北市中正", set()),
])
def test_flags(label, prediction, expected):
    finish = "length" if expected == {"truncated"} else "stop"
    assert flags_of(label, prediction, finish) == expected


def test_flag_samples_counts_and_order():
    labels, preds = ["甲乙", "", "稅"], ["甲乙", "字", "税"]
    norm_l, norm_p = M.normalize_many(labels), M.normalize_many(preds)
    flags, counts = F.flag_samples(labels, preds, norm_l, norm_p, M.score_pairs(norm_l, norm_p), [None] * 3)
    assert [list(f) for f in flags] == [[], ["text_on_empty"], ["script_confusion"]]
    assert counts["text_on_empty"] == 1 and counts["script_confusion"] == 1 and sum(counts.values()) == 2
