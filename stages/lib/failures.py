"""Failure modes: per-sample flags that name how a prediction went wrong (no torch import).

Each flag is computed on one scored sample from its label L and prediction P as given (raw) and
as normalized (stages/lib/metrics.py normalize(): l, p; lengths in code points). A flag that
depends on the label fires only where the prediction adds something the label does not have,
so a label that legitimately repeats a line, starts with "Here is", holds real asterisks or an
HTML-like tag, does not make its own faithful transcription fire.

    repetition        p is at least REPEAT_MIN_UNIT characters longer than l, and p holds a unit of
                      REPEAT_MIN_UNIT..REPEAT_MAX_UNIT characters repeated back to back at least
                      REPEAT_MIN_COPIES times (unit x k, k maximal at that place; the leftmost
                      shortest unit of each run) that l does not hold k times in a row: a
                      generation loop (a loop adds text, hence "longer").
    text_on_empty     l is empty and p is not: text invented on a blank page (or one whose label
                      has only spaces and punctuation).
    chatter           a preamble or a closing remark: the first non-empty line of P matches
                      PREAMBLE, or its last non-empty line matches CLOSING (case-insensitive;
                      English and Chinese phrasings such as "Here's the text extracted from the
                      image:", "Sure!", "以下是圖片中的文字", "Let me know if ..."), and L holds no
                      line matching the same pattern, and p is at least CHATTER_MIN_EXTRA characters
                      longer than l (the remark adds text).
    markup            for one of the kinds emphasis (**x** or __x__ within a line), heading (a line
                      starting with 1-6 '#' and a space), code fence (```), HTML tag (<b>, </p>,
                      <br/>, ...), P holds more occurrences than L. Checked only where P != L and P
                      holds one of * _ # ` < (normalization removes them, so l == p does not rule it out).
    truncated         the server stopped at the token limit (finish_reason "length").
    empty             p is empty and l is not (the older count `empty_predictions` also counts a
                      blank page read as blank; this flag does not).
    script_confusion  P holds a character c that L does not hold, while L holds a character c' != c
                      with fold(c) == fold(c'), fold being OpenCC's `tw2s` (Taiwan Traditional to
                      Simplified, Taiwan variants included) of the single character (CJK ideographs
                      of the BMP; others fold to themselves): 税 for 稅, 着 for 著, 裏 for 裡.
    length_ratio      l and p are both non-empty and len(p) / len(l) > LENGTH_RATIO or
                      < 1 / LENGTH_RATIO (normalized lengths).

A failed sample (no prediction) has no flags (null in scored files) and is not counted; the rate
of a flag is the share of scored samples it fires on.
"""
import functools
import re
import sys

REPEAT_MIN_UNIT, REPEAT_MAX_UNIT, REPEAT_MIN_COPIES = 4, 200, 3
LENGTH_RATIO = 2.0
CHATTER_MIN_EXTRA = 2   # the shortest remark PREAMBLE/CLOSING know ("ok", "如需") is 2 characters
FLAGS = ("repetition", "text_on_empty", "chatter", "markup", "truncated", "empty", "script_confusion",
         "length_ratio")

REPEAT = re.compile(rf"(.{{{REPEAT_MIN_UNIT},{REPEAT_MAX_UNIT}}}?)\1{{{REPEAT_MIN_COPIES - 1},}}", re.DOTALL)
PREAMBLE = re.compile(
    r"^\s*(?:sure\b|certainly\b|of course\b|okay\b|here(?:'s| is| are)\b|below is\b"
    r"|the (?:image|picture|document|page) (?:contains|shows|reads|says)\b"
    r"|.*\b(?:extracted|recogni[sz]ed|transcribed|ocr(?:'d)?) text\b"
    r"|.*\btext (?:in|from|of|on) (?:the|this) (?:image|picture|document|page)\b"
    r"|以下是|這是圖|这是图|圖片中的文字|图片中的文字|圖中的文字|图中的文字|識別結果|识别结果|辨識結果)", re.IGNORECASE)
CLOSING = re.compile(
    r"(?:let me know|hope (?:this|that) helps|if you (?:need|have|want|would like)|feel free|"
    r"is there anything else|如需|如果您|希望(?:這|这|對|对)|還需要|还需要)", re.IGNORECASE)
MARKUP = {
    "emphasis": re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"),
    "heading": re.compile(r"(?m)^#{1,6}[ \t]"),
    "fence": re.compile(r"```"),
    "html": re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>\n]*)?/?>"),
}
MARKUP_CHARS = re.compile(r"[*_#`<]")


def repetition(label, prediction):
    """True when a loop of the normalized prediction is not in the normalized label (docstring)."""
    for match in REPEAT.finditer(prediction):
        unit = match.group(1)
        copies = len(match.group(0)) // len(unit)
        if unit * copies not in label:
            return True
    return False


def chatter(label, prediction):
    # PREAMBLE starts with \s* and its '.' stops at a newline: matching the whole text matches its
    # first non-empty line.
    if PREAMBLE.match(prediction) and not any(PREAMBLE.match(line) for line in label.splitlines()):
        return True
    last = prediction.rstrip().rpartition("\n")[2]
    return bool(CLOSING.search(last)) and not any(CLOSING.search(line) for line in label.splitlines())


def markup(label, prediction):
    return any(len(pattern.findall(prediction)) > len(pattern.findall(label)) for pattern in MARKUP.values())


@functools.cache
def _converter():
    import opencc   # only where a sample can be a script confusion

    return opencc.OpenCC("tw2s")


CJK_RANGES = ((0x3400, 0x9FFF), (0xF900, 0xFAFF))   # the BMP's ideographs: what OpenCC's tables cover


@functools.cache
def fold_tables():
    """(fold, involved): numpy arrays over every code point. fold: OpenCC tw2s of the character
    (itself outside CJK_RANGES, or where tw2s gives more than one character); involved: True for
    the characters of some pair c != c' with fold(c) == fold(c') (those tw2s changes, and what they
    become). Built at once: one OpenCC call on the ~28,000 ideographs joined by newlines (~0.05 s)."""
    import numpy as np

    codes = np.concatenate([np.arange(lo, hi + 1) for lo, hi in CJK_RANGES])
    folded = _converter().convert("\n".join(map(chr, codes.tolist()))).split("\n")
    if len(folded) != len(codes):   # not seen with opencc 1.4.2; one call per character then
        folded = [_converter().convert(chr(code)) for code in codes.tolist()]
    fold = np.arange(sys.maxunicode + 1, dtype=np.uint32)
    involved = np.zeros(sys.maxunicode + 1, dtype=bool)
    for code, text in zip(codes.tolist(), folded):
        if len(text) == 1 and ord(text) != code:
            fold[code] = ord(text)
            involved[code] = involved[ord(text)] = True
    return fold, involved


def code_points_of(texts):
    """(code points of the texts joined, the index of the text each belongs to, as uint32)."""
    import numpy as np

    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    code_points = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return code_points, np.repeat(np.arange(len(texts), dtype=np.uint32), lengths)


def script_confusions(labels, predictions, block=2048):
    """script_confusion of many normalized pairs (bool array), in numpy, a block of pairs at a
    time: a character key is (pair index in the block << 21 | code point), 32 bits as in
    metrics.key_counts. A prediction's character whose key the label lacks, and whose folded key
    is among the label's characters' folded keys, is a confusion."""
    import numpy as np

    hits = [block_script_confusions(labels[start:start + block], predictions[start:start + block])
            for start in range(0, len(labels), block)]
    return np.concatenate(hits) if hits else np.zeros(0, dtype=bool)


def block_script_confusions(labels, predictions):
    import numpy as np

    fold, involved = fold_tables()
    ref_cp, ref_pair = code_points_of(labels)
    pred_cp, pred_pair = code_points_of(predictions)
    keep = involved[pred_cp]   # a confusion pairs two involved characters: drop the rest first
    pred_cp, pred_pair = pred_cp[keep], pred_pair[keep] << np.uint32(21)
    keep = involved[ref_cp]
    ref_cp, ref_pair = ref_cp[keep], ref_pair[keep] << np.uint32(21)
    hit = np.zeros(len(labels), dtype=bool)
    if len(pred_cp) == 0 or len(ref_cp) == 0:
        return hit
    extra = ~contains(np.sort(ref_pair | ref_cp), pred_pair | pred_cp)
    if not extra.any():
        return hit
    pred_cp, pred_pair = pred_cp[extra], pred_pair[extra]
    found = contains(np.sort(ref_pair | fold[ref_cp]), pred_pair | fold[pred_cp])
    hit[pred_pair[found] >> np.uint32(21)] = True
    return hit


def contains(sorted_keys, keys):
    """Whether each of `keys` is in `sorted_keys` (a sorted, non-empty array)."""
    import numpy as np

    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def markup_candidates(texts):
    """Indices of the texts that hold one of * _ # ` <: one regex scan of all of them joined (the
    characters are rare), each hit's text found from the texts' start offsets."""
    import numpy as np

    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    starts = np.cumsum(lengths) - lengths + np.arange(len(texts))   # one separator after each text
    hits = [m.start() for m in MARKUP_CHARS.finditer("\n".join(texts))]
    return np.unique(np.searchsorted(starts, hits, side="right") - 1).tolist() if hits else []


def flag_samples(labels, predictions, norm_labels, norm_preds, scores, finish_reasons):
    """([[flag names]] of each scored sample, {flag: count}), in FLAGS order (the module docstring).

    `scores` holds numpy arrays of the normalized `distance`, `ref_len`, `pred_len`. The cheap
    flags are array comparisons; the others run only on the samples where they can fire."""
    import numpy as np

    ref_len, pred_len = scores["ref_len"], scores["pred_len"]
    n = len(labels)
    fired = {name: np.zeros(n, dtype=bool) for name in FLAGS}
    fired["text_on_empty"] = (ref_len == 0) & (pred_len > 0)
    fired["empty"] = (pred_len == 0) & (ref_len > 0)
    fired["truncated"] = np.fromiter((r == "length" for r in finish_reasons), dtype=bool, count=n)
    both = (ref_len > 0) & (pred_len > 0)
    fired["length_ratio"] = both & ((pred_len > LENGTH_RATIO * ref_len) | (LENGTH_RATIO * pred_len < ref_len))
    differ = scores["distance"] > 0
    longer = differ & (pred_len > ref_len)
    for i in np.flatnonzero(longer & (pred_len >= REPEAT_MIN_UNIT * REPEAT_MIN_COPIES)
                            & (pred_len >= ref_len + REPEAT_MIN_UNIT)).tolist():
        fired["repetition"][i] = repetition(norm_labels[i], norm_preds[i])
    for i in np.flatnonzero(differ & (pred_len >= ref_len + CHATTER_MIN_EXTRA)).tolist():
        fired["chatter"][i] = chatter(labels[i], predictions[i])
    for i in markup_candidates(predictions):
        fired["markup"][i] = labels[i] != predictions[i] and markup(labels[i], predictions[i])
    candidates = np.flatnonzero(differ & (scores["common"] < pred_len))   # else no character of p is new
    if len(candidates):
        hits = script_confusions([norm_labels[i] for i in candidates.tolist()],
                                 [norm_preds[i] for i in candidates.tolist()])
        fired["script_confusion"][candidates[hits]] = True
    columns = [fired[name] for name in FLAGS]
    flags = [()] * n   # one shared empty tuple (orjson writes []): 200,000 fresh lists cost ~0.1 s
    for i in np.flatnonzero(np.logical_or.reduce(columns)).tolist():
        flags[i] = [name for name, column in zip(FLAGS, columns) if column[i]]
    return flags, {name: int(fired[name].sum()) for name in FLAGS}
