"""stages/lib/metrics.py: every rule of the definitions, with values worked out by hand."""
import random
import string
import unicodedata
from collections import Counter

import numpy as np
import pytest

from stages.lib import metrics as M


def scored(pairs, bootstrap_samples=0, seed=0):
    refs = M.normalize_many([r for r, _ in pairs])
    preds = M.normalize_many([p for _, p in pairs])
    return M.summarize(M.score_pairs(refs, preds), bootstrap_samples, seed)


# ---------------------------------------------------------------- normalize

@pytest.mark.parametrize("text, expected", [
    ("ＡＢＣ１２３ａｂｃ", "ABC123abc"),             # full-width letters and digits fold to ASCII
    ("Ａ，Ｂ！Ｃ？", "ABC"),                         # full-width punctuation goes
    ("＄５＋＜＝＞＾｀｜～", "5"),                  # full-width forms of string.punctuation symbols go
    ("台北\u3000市", "台北市"),                     # ideographic space
    (" a\tb\nc\u00a0d\u2003e ", "abcde"),           # every whitespace, no-break and em space too
    ("「你好」，世界。、…—〜・《》【】", "你好世界"),  # CJK punctuation (categories P*)
    ("¥100 ©→ %$#", "¥100©→"),                      # symbols kept unless in string.punctuation
    ("￥５", "¥5"),                                  # full-width yen folds to ¥ (a symbol, kept)
    ("￥１，２００", "¥1200"),                       # ... beside full-width digits and comma
    ("￨￩", "￨￩"),                                  # half-width forms U+FFE8.. are not folded
    ("AbC", "AbC"),                                 # case kept
    ("ﬁ①㎏", "ﬁ①㎏"),                               # no NFKC: ligature, circled digit, unit kept
    ("x\u200by", "x\u200by"),                       # zero-width space is not whitespace
    ("👍 ok!", "👍ok"),                             # emoji is a symbol (plane 1, beyond the BMP)
    ("a\U0001E95Eb\U00010100c", "abc"),             # plane-1 punctuation (Adlam, Aegean) goes
    ("\U00020000\U000E0041", "\U00020000\U000E0041"),  # planes 2+ (CJK Ext. B, tags) kept
    ("", ""),
])
def test_normalize(text, expected):
    assert M.normalize(text) == expected


@pytest.mark.parametrize("wide, narrow", [
    ("\uffe0", "\u00a2"),   # ￠ -> ¢ CENT SIGN (Sc)
    ("\uffe1", "\u00a3"),   # ￡ -> £ POUND SIGN (Sc)
    ("\uffe2", "\u00ac"),   # ￢ -> ¬ NOT SIGN (Sm)
    ("\uffe3", "\u00af"),   # ￣ -> ¯ MACRON (Sk); NFKC would give " \u0304"
    ("\uffe4", "\u00a6"),   # ￤ -> ¦ BROKEN BAR (So)
    ("\uffe5", "\u00a5"),   # ￥ -> ¥ YEN SIGN (Sc)
    ("\uffe6", "\u20a9"),   # ￦ -> ₩ WON SIGN (Sc)
])
def test_fullwidth_symbols_fold_and_are_kept(wide, narrow):
    # Each target is a symbol, not punctuation and not in string.punctuation, so it survives.
    assert unicodedata.decomposition(wide) == f"<wide> {ord(narrow):04X}"
    assert not unicodedata.category(narrow).startswith("P") and narrow not in string.punctuation
    assert M.normalize(wide) == narrow
    assert M.normalize(f"1 {wide}、2") == f"1{narrow}2"
    assert M.normalize_many([wide, f"a{wide}"]) == [narrow, f"a{narrow}"]
    assert M.cer(M.normalize(f"{narrow}100"), M.normalize(f"{wide}１００")) == 0.0


def test_normalize_composes_nfc():
    decomposed = "e\u0301"  # e + combining acute
    assert M.normalize(decomposed) == "\u00e9"
    assert len(M.normalize("Cafe\u0301")) == 4
    assert M.cer(M.normalize("caf\u00e9"), M.normalize("cafe\u0301")) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("Vie\u0302\u0323t Nam", "Vi\u1ec7tNam"),      # two marks: e + circumflex + dot below = ệ
    ("\u00ea\u0323", "\u1ec7"),                    # a precomposed ê takes the dot below too: ệ
    ("\u304b\u3099\u30cf\u309a", "\u304c\u30d1"),   # kana + combining (semi-)voicing mark = がパ
    ("\u1100\u1161\u11a8", "\uac01"),              # conjoining jamo = the syllable 각
    ("\uac00\u11a8", "\uac01"),                     # a syllable takes a final jamo: 가 + ᆨ = 각
    ("a\u0301\u0316", "\u00e1\u0316"),              # marks reordered, then a + acute composed
    ("\u212b\u2126", "\u00c5\u03a9"),               # singletons: angstrom and ohm signs
    ("\u0301e", "\u0301e"),                         # a leading mark has nothing to compose with
    ("x\u0301", "x\u0301"),                         # no precomposed x́: kept as two
    ("\u0915\u093c", "\u0915\u093c"),               # क + nukta stays two (क़ U+0958 is excluded)...
    ("\u0958\u0915", "\u0915\u093c\u0915"),          # ... and U+0958 decomposes: NFC lengthens it
    ("中\u0301，\uff25\u0301", "中\u0301E\u0301"),     # full-width Ｅ folds after NFC, no composing
])
def test_normalize_nfc_hand_checked(text, expected):
    assert M.normalize(text) == expected
    # In a block, beside texts NFC changes and texts it leaves (the windows of nfc_windows).
    texts = ["e\u0301", text, "中文", text, "\u0301"]
    assert M.normalize_many(texts) == ["\u00e9", expected, "中文", expected, "\u0301"]


def test_nfc_may_change_flags_every_character_that_composes_with_the_one_before():
    # nfc_windows leaves alone whatever is not flagged: every character that can be the second of
    # a canonical pair (Unicode's decompositions, all of them) must be flagged, and the Hangul
    # vowels and final consonants (composed by rule). The everyday ones must not be.
    seconds = set()
    for code in range(0x110000):
        parts = unicodedata.decomposition(chr(code)).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            seconds.add(int(parts[1], 16))
    seconds |= set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
    assert len(seconds) > 100
    assert [hex(c) for c in sorted(seconds) if not M.nfc_may_change(chr(c))] == []
    assert [c for c in "a1 中é가か，Ａ¥😀" if M.nfc_may_change(c)] == []
    assert all(M.nfc_may_change(c) for c in "\u0301\u0316\u3099\u09be\u212b\u0958")


def test_table_matches_a_full_scan_of_unicode():
    # The table stops at U+1FFFF; a full scan must find no character to delete above it,
    # else str.translate would keep it.
    above = [c for c in range(M.TABLE_SIZE, 0x110000) if M.is_removed(chr(c))]
    assert above == []


def test_normalize_many_equals_normalize():
    # Boundaries: a combining mark or a Hangul vowel at the start of a text must not compose
    # with the end of the previous text; a text holding the separator takes the slow path.
    texts = ["Ａ，b", "", "e\u0301 !", "\u0301a", "中文。", "\u1100", "\u1161", "e"]
    assert M.normalize_many(texts) == [M.normalize(t) for t in texts]
    assert M.normalize_many(["a\x00b", "c"]) == [M.normalize("a\x00b"), "c"]
    assert M.normalize_many([]) == []


def test_normalize_many_over_all_of_unicode_and_several_blocks():
    # Every code point of planes 0-2 and a few above (tags, the last one), in texts spread over
    # several blocks, starting from an empty lookup array (filled in as code points are seen).
    # One block also holds a text with the separator, so that block alone takes the slow path.
    M.lookup_array.cache_clear()
    codes = [c for c in range(1, 0x30000)] + [0xE0041, 0xE007F, 0xF0000, 0x10FFFF]
    texts = ["".join(map(chr, codes[i:i + 40])) for i in range(0, len(codes), 40)]
    texts[2 * M.BLOCK + 5] = "a\x00b"
    assert len(texts) > 3 * M.BLOCK
    assert M.normalize_many(texts) == [M.normalize(t) for t in texts]
    assert M.normalize_many(texts[:10]) == [M.normalize(t) for t in texts[:10]]  # the array filled in


def literal(text):
    """A slow, literal reading of the definition: NFC of the whole text, fold, then drop
    whitespace and punctuation, one character at a time."""
    text = unicodedata.normalize("NFC", text)
    symbols = {"￠": "¢", "￡": "£", "￢": "¬", "￣": "¯", "￤": "¦", "￥": "¥", "￦": "₩"}
    folded = []
    for c in text:
        if 0xFF01 <= ord(c) <= 0xFF5E:
            c = chr(ord(c) - 0xFEE0)
        elif c == "\u3000":
            c = " "
        c = symbols.get(c, c)
        if not (c.isspace() or c in string.punctuation or unicodedata.category(c).startswith("P")):
            folded.append(c)
    return "".join(folded)


def test_normalize_matches_a_per_character_definition():
    rng = random.Random(3)
    pool = [chr(c) for c in range(0x20, 0x250)] + [chr(c) for c in range(0x3000, 0x3040)] + \
           [chr(c) for c in range(0xFF00, 0xFF70)] + [chr(c) for c in range(0xFFE0, 0xFFF0)] + \
           ["\U0001F600", "\u0301", "中", "\U0001E95E"]
    for _ in range(500):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 30)))
        assert M.normalize(text) == literal(text), text


def test_normalize_many_on_mixed_nfc_and_non_nfc_texts():
    # NFC is applied text by text, and only where the quick check finds work: texts with and
    # without combining marks, in blocks that hold both, must all match the literal definition.
    rng = random.Random(4)
    marked = ["e\u0301", "o\u031b\u0323", "e\u0302\u0301", "\u304b\u3099", "\u1100\u1161", "\u11a8",
              "a\u0301\u0316", "\u0301", "\u212b", "\u0958", "x\u0301", "a\u0316", "\uffe5\u0301"]
    plain = list("abc 中文，。ＡＢ１２\u3000！éệが각") + ["\U0001F600", "\uffe3"]
    texts = []
    for _ in range(3 * M.BLOCK + 11):
        pool = plain + marked if rng.random() < 1 / 3 else plain
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(0, 20))))
    nfc = [unicodedata.is_normalized("NFC", t) for t in texts]
    assert 0.1 < nfc.count(False) / len(texts) < 0.5          # both kinds, mixed within blocks
    assert all(False in nfc[i:i + M.BLOCK] and True in nfc[i:i + M.BLOCK] for i in range(0, len(texts), M.BLOCK))
    expected = [literal(t) for t in texts]
    assert M.normalize_many(texts) == expected
    assert [M.normalize(t) for t in texts] == expected


# ---------------------------------------------------------------- per sample

def test_cer_and_f1_hand_checked():
    assert M.cer("abcd", "abce") == 0.25                   # one substitution / 4
    assert M.f1("aab", "abb") == pytest.approx(2 / 3)      # common {a:1, b:1} = 2; P = R = 2/3
    assert M.cer("aab", "abb") == pytest.approx(1 / 3)
    assert M.f1("abc", "xyz") == 0.0                       # nothing in common


def test_both_empty():
    assert M.cer("", "") == 0.0
    assert M.f1("", "") == 1.0


def test_reference_empty_after_normalization():
    ref = M.normalize("。！ ")
    assert ref == ""
    assert M.cer(ref, M.normalize("abc")) == 1.0
    assert M.f1(ref, M.normalize("abc")) == 0.0
    assert M.cer(ref, M.normalize("，")) == 0.0           # both empty after normalization
    assert M.f1(ref, M.normalize("，")) == 1.0


def test_empty_prediction():
    assert M.cer("abc", "") == 1.0
    assert M.f1("abc", "") == 0.0


def test_cer_above_one():
    assert M.cer("ab", "xyzw") == 2.0   # 2 substitutions + 2 insertions over 2 characters


def test_scrambled_order_f1_one_cer_above_zero():
    assert M.f1("abc", "cba") == 1.0
    assert M.cer("abc", "cba") == pytest.approx(2 / 3)    # swap a and c: 2 substitutions


def test_code_points_emoji_and_cjk():
    assert M.cer("👍", "👎") == 1.0
    assert M.cer("台灣", "臺灣") == 0.5
    assert M.f1("台灣", "臺灣") == 0.5
    assert len(M.normalize("👨\u200d👩\u200d👧")) == 5   # a ZWJ sequence counts its code points


def test_ned_is_bounded():
    assert M.ned_value(4, 2, 4) == 1.0
    assert M.ned_value(0, 0, 0) == 0.0
    assert M.ned_value(1, 4, 4) == 0.25


def test_batch_scores_equal_single_pair_functions():
    # Random strings with many repeats exercise the numpy sort and the subsequence shortcut.
    rng = random.Random(0)
    pool = "aab😀c的的一\ud800"
    refs = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 9))) for _ in range(2000)]
    preds = [r if rng.random() < 0.3 else "".join(rng.choice(pool) for _ in range(rng.randint(0, 9))) for r in refs]
    scores = M.score_pairs(refs, preds)
    assert scores["common"].tolist() == [sum((Counter(r) & Counter(p)).values()) for r, p in zip(refs, preds)]
    assert scores["cer"].tolist() == [M.cer(r, p) for r, p in zip(refs, preds)]
    assert scores["f1"].tolist() == [M.f1(r, p) for r, p in zip(refs, preds)]
    assert scores["ned"].tolist() == [M.ned_value(d, len(r), len(p)) for d, r, p in zip(scores["distance"], refs, preds)]
    assert M.common_counts(["ba", "", "c😀a", "xx"], ["ab", "", "😀x", ""]).tolist() == [2, 0, 1, 0]
    assert M.common_counts(["", ""], ["a", ""]).tolist() == [0, 0]
    assert M.common_counts([], []).tolist() == []


def test_common_counts_over_several_blocks():
    rng = random.Random(1)
    pool = "aab😀c的的一\ud800"
    refs = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(3 * M.BLOCK + 7)]
    preds = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in refs]
    refs[M.BLOCK:2 * M.BLOCK] = [""] * M.BLOCK  # a block of empty references
    expected = [sum((Counter(r) & Counter(p)).values()) for r, p in zip(refs, preds)]
    assert M.common_counts(refs, preds).tolist() == expected


# ---------------------------------------------------------------- aggregates

def test_aggregates_hand_checked():
    s = scored([("abcd", "abce"), ("ab", "")])
    assert s["overall_cer"] == 0.5                    # (1 + 2) / (4 + 2)
    assert s["macro_cer"] == 0.625                    # (0.25 + 1) / 2
    assert s["overall_f1"] == 0.375                   # (0.75 + 0) / 2
    assert s["micro_f1"] == 0.6                       # 2 * 3 / (6 + 4)
    assert s["exact_match"] == 0.0
    assert s["normalized_edit_distance"] == 0.625     # (1/4 + 2/2) / 2
    assert s["empty_predictions"] == 1


def test_aggregates_with_empty_references():
    s = scored([("。", ""), ("！", "")])             # every reference and prediction empty
    assert (s["overall_cer"], s["overall_f1"], s["micro_f1"], s["exact_match"]) == (0.0, 1.0, 1.0, 1.0)
    s = scored([("。", "x"), ("！", "")])
    assert s["overall_cer"] == 1.0 and s["macro_cer"] == 0.5 and s["overall_f1"] == 0.5


def test_fullwidth_prediction_is_not_an_error():
    s = scored([("ABC 123", "ＡＢＣ１２３"), ("價格：100元", "價格:１００元")])
    assert s["overall_cer"] == 0.0 and s["overall_f1"] == 1.0 and s["exact_match"] == 1.0


# ---------------------------------------------------------------- bootstrap

def make_scores(n, seed):
    rng = random.Random(seed)
    refs = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 12))) for _ in range(n)]
    preds = [r if rng.random() < 0.4 else r[: rng.randint(0, len(r))] + rng.choice("axyz") for r in refs]
    return M.score_pairs(refs, preds)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    scores = make_scores(2000, 1)
    s1, s2 = M.summarize(scores, 1000, 7), M.summarize(scores, 1000, 7)
    assert s1 == s2
    assert M.summarize(scores, 1000, 8)["overall_cer_ci95_low"] != s1["overall_cer_ci95_low"]
    assert s1["overall_cer_ci95_low"] < s1["overall_cer"] < s1["overall_cer_ci95_high"]
    assert s1["overall_f1_ci95_low"] < s1["overall_f1"] < s1["overall_f1_ci95_high"]


def test_bootstrap_does_not_depend_on_sample_order():
    scores = make_scores(500, 2)
    order = np.random.default_rng(0).permutation(500)
    shuffled = {k: v[order] for k, v in scores.items()}
    assert M.bootstrap_intervals(scores, 300, 0) == M.bootstrap_intervals(shuffled, 300, 0)


def test_bootstrap_matches_plain_index_resampling():
    # Drawing counts per distinct value must give the distribution of resampling indices.
    scores = make_scores(300, 3)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 300, size=(4000, 300))
    cers = scores["distance"][idx].sum(1) / scores["ref_len"][idx].sum(1)
    f1s = scores["f1"][idx].mean(1)
    (cer_lo, cer_hi), (f1_lo, f1_hi) = M.bootstrap_intervals(scores, 4000, 0)
    spread_cer, spread_f1 = np.quantile(cers, 0.975) - np.quantile(cers, 0.025), np.quantile(f1s, 0.975) - np.quantile(f1s, 0.025)
    assert abs(cer_lo - np.quantile(cers, 0.025)) < 0.05 * spread_cer + 1e-9
    assert abs(cer_hi - np.quantile(cers, 0.975)) < 0.05 * spread_cer + 1e-9
    assert abs(f1_lo - np.quantile(f1s, 0.025)) < 0.05 * spread_f1 + 1e-9
    assert abs(f1_hi - np.quantile(f1s, 0.975)) < 0.05 * spread_f1 + 1e-9


def test_bootstrap_of_identical_samples_is_a_point():
    s = scored([("abcd", "abce")] * 50, bootstrap_samples=200)
    assert s["overall_cer_ci95_low"] == s["overall_cer_ci95_high"] == 0.25
    assert s["overall_f1_ci95_low"] == s["overall_f1_ci95_high"] == 0.75


def test_bootstrap_with_all_empty_references_uses_the_empty_rule():
    s = scored([("。", "x"), ("！", "")] * 10, bootstrap_samples=200)
    assert 0.0 <= s["overall_cer_ci95_low"] <= s["overall_cer_ci95_high"] <= 1.0
    assert s["overall_cer_ci95_high"] == 1.0


def test_bootstrap_zero_means_no_interval():
    assert "overall_cer_ci95_low" not in scored([("a", "a")], bootstrap_samples=0)
